"""Builds the training / validation item stores of a run from its config (shared by both stages)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medldm.data.datasets import ItemStore, collect_scans, load_volumes, make_items, split_scans

log = logging.getLogger(__name__)


@dataclass
class RunData:
    train: ItemStore
    val: ItemStore | None
    train_scans: list[str]
    val_scans: list[str]
    normalization: list[dict]  # params of the first few training scans (for the record)

    def val_or_train(self) -> tuple[ItemStore, str]:
        """The store to validate on and a metric prefix ('' for held-out scans, 'train_' otherwise)."""
        return (self.val, "") if self.val is not None and len(self.val) else (self.train, "train_")


def split_refs(cfg) -> tuple[list, list]:
    """(training scans, validation scans) of ``cfg``: ``data.val`` when given (it must not repeat a training
    scan), else a seeded split of ``data.train`` by scan (``data.val_fraction``)."""
    d = cfg.data
    if not d.train:
        raise ValueError("data.train is empty — list folders, list files or scans to train on")
    refs = collect_scans(d.train)
    if not d.val:
        return split_scans(refs, d.val_fraction, cfg.seed)
    val_refs = collect_scans(d.val)
    train_ids = {r.id for r in refs}
    overlap = [r.id for r in val_refs if r.id in train_ids]
    if overlap:
        raise ValueError(f"data.val repeats training scans (e.g. {overlap[0]}): validation must be other scans")
    return refs, val_refs


def item_store(cfg, vols: list[dict], *, from_val: bool = False) -> ItemStore:
    """The training items of loaded volumes (slices or volumes, fitted to the patch) with their class labels;
    ``from_val``: the volumes are data.val entries (their contrasts come from data.val_contrasts; no reformatted
    planes, so validation figures compare across runs with and without ``data.reformat``)."""
    d = cfg.data
    items = make_items(vols, spatial_dims=cfg.spatial_dims, slice_axis=d.slice_axis, patch=d.patch_size,
                       factor=cfg.factor, resize_to=d.resize_to, min_foreground=d.min_foreground,
                       reformat=d.reformat and not from_val)
    return ItemStore(items, d.patch_size, cfg.factor, cfg.unet.num_classes, d.class_from,
                     contrast_of=d.contrast_of(from_val), n_contrasts=max(len(d.contrast_names), 1))


def build_data(cfg, out_dir: Path, *, quiet: bool = False) -> RunData:
    """Collect, split (by scan), load/normalize (cached) and cut items for ``cfg`` (a TrainingConfig)."""
    d = cfg.data
    train_refs, val_refs = split_refs(cfg)
    cache_dir = Path(d.cache_dir) if d.cache_dir else Path(out_dir) / "cache"
    kw = {"modality": d.modality, "ct_window": d.ct_window, "cache": d.cache, "cache_dir": cache_dir}
    vols = load_volumes(train_refs, **kw)
    val_vols = load_volumes(val_refs, **kw) if val_refs else []
    train = item_store(cfg, vols)
    # validation split from data.train (no data.val): its sources are data.train indices
    val = item_store(cfg, val_vols, from_val=bool(d.val)) if val_vols else None
    if not quiet:
        log.info("data: %d training scans -> %d items; %d validation scans%s", len(vols), len(train), len(val_vols),
                 f" -> {len(val)} items" if val is not None else " (validating on training items)")
    return RunData(train, val, [v["id"] for v in vols], [v["id"] for v in val_vols], [v["norm"] for v in vols[:4]])


def center_batch(store: ItemStore, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(n, 1, *patch) centre crops of ``n`` items spread over ``store`` (validation), their labels, indices."""
    idx = store.spread(n)
    arr = np.asarray(idx)
    return store.crop(arr, center_corners(store, idx)), store.labels(arr), idx


def center_corners(store: ItemStore, idx: list[int]) -> list[tuple[int, ...]]:
    """Corners (factor-aligned) of the centre crops of items ``idx`` (:func:`center_batch`'s crops)."""
    return [tuple(((s - p) // 2) // store.factor * store.factor
                  for s, p in zip(store.items[i].image.shape[1:], store.patch, strict=True)) for i in idx]
