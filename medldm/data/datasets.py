"""Training data: scans -> normalized volumes (parsed once, cached by MONAI) -> 2D slices / 3D volumes
("items") -> random crops drawn per step.

* :func:`collect_scans` turns ``data.train`` entries (folders, list files, files, ``pkg://`` paths) into scan refs;
* :func:`split_scans` holds out validation scans BY SCAN (never slices of one scan), seeded;
* :func:`load_volumes` parses + normalizes each scan once (``CacheDataset`` in memory or ``PersistentDataset`` on
  disk, so DICOM is never re-parsed);
* :func:`make_items` cuts 2D slices (along ``data.slice_axis``) or keeps 3D volumes, padded so every side is
  >= the patch and a multiple of the VAE factor; shapes ``(1, H, W)`` or ``(1, X, Y, Z)`` in the model range.
* :class:`ItemStore` holds the items and draws seeded, factor-aligned random crops: ``(B, 1, *patch)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medldm.data.condition import neighbour_slices
from medldm.data.intensity import fit_normalization, normalize
from medldm.data.tissue import tissue_labels
from medldm.io import load_scan, scan_folder
from medldm.io.discover import Case
from medldm.io.errors import CaseError
from medldm.io.volumes import count_volumes

SCAN_SUFFIXES = (".nii", ".nii.gz", ".dcm")


@dataclass
class ScanRef:
    """One scan: a NIfTI file, a DICOM file or the files of one DICOM series."""

    id: str
    path: str
    files: list[str] = field(default_factory=list)
    source: int = 0  # index of the data.train entry it came from (class label for class_from: source)
    volume: int | None = None  # one volume of a 4D scan (each volume is a scan of its own for training)

    def as_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "files": list(self.files), "source": self.source,
                "volume": self.volume}


def resolve_path(entry: str) -> Path:
    """``pkg://PACKAGE/sub/path`` -> the file inside the installed package; other strings -> Path."""
    if entry.startswith("pkg://"):
        pkg, _, rest = entry[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise CaseError(entry, f"package {pkg!r} is not installed", f"pip install {pkg}, or give a file path")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    return Path(os.path.expanduser(entry))


def _folder_scans(root: Path, source: int) -> list[ScanRef]:
    """NIfTI files and DICOM series under ``root`` (``medldm.io.scan_folder``); broken cases are skipped with a
    warning naming the reason."""
    refs = []
    for case in scan_folder(root).cases:
        where = case.source or str(case.paths[0] if case.paths else case.id)
        if case.error is not None:
            warnings.warn(f"skipping {where}: {case.error}", stacklevel=2)
            continue
        files = [str(p) for p in case.paths] if case.kind != "nifti" else []
        path = str(case.paths[0]) if case.kind == "nifti" else where
        refs += _volume_refs(ScanRef(id=f"{root}/{case.id}", path=path, files=files, source=source), case)
    return refs


def _volume_refs(ref: ScanRef, case=None) -> list[ScanRef]:
    """A 4D scan (DWI, fMRI, multi-echo) as one ref per volume (``id#volK``; kept on one side of every split by
    :func:`scan_group`), else ``[ref]``."""
    if case is None:

        case = Case(id=ref.id, kind="nifti", paths=[Path(ref.path)], root=Path(ref.path).parent)
    try:
        n = count_volumes(case)
    except CaseError:
        return [ref]
    if n <= 1:
        return [ref]
    return [ScanRef(id=f"{ref.id}#vol{k}", path=ref.path, files=list(ref.files), source=ref.source, volume=k)
            for k in range(n)]


def scan_group(scan_id: str) -> str:
    """The scan a ref belongs to: the volumes of one 4D scan are one group (never split between train and val)."""
    return scan_id.split("#vol", 1)[0]


def _file_refs(p: Path, source: int) -> list[ScanRef]:
    ref = ScanRef(str(p), str(p), source=source)
    return _volume_refs(ref) if str(p).lower().endswith((".nii", ".nii.gz")) else [ref]


def collect_scans(entries: Sequence[str], base: Path | None = None) -> list[ScanRef]:
    """Expand ``data.train``/``data.val`` entries into scan refs (sorted within each entry, deduplicated)."""
    refs: list[ScanRef] = []
    for source, entry in enumerate(entries):
        p = resolve_path(entry)
        if base is not None and not p.is_absolute() and not p.exists():
            p = base / p
        if p.is_dir():
            found = _folder_scans(p, source)
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            lines = [ln.strip() for ln in p.read_text().splitlines()]
            found = []
            for ln in lines:
                if ln and not ln.startswith("#"):
                    q = resolve_path(ln)
                    q = q if q.is_absolute() else p.parent / q
                    found += _folder_scans(q, source) if q.is_dir() else _file_refs(q, source)
        elif p.is_file():
            found = _file_refs(p, source)
        else:
            raise CaseError(entry, "not found", "give a folder, a list file (.txt), a scan path or pkg://PACKAGE/path")
        if not found:
            raise CaseError(entry, "no NIfTI or DICOM scans found", "check the path in data.train / data.val")
        refs += found
    seen, out = set(), []
    for r in refs:
        if r.id not in seen:
            seen.add(r.id)
            out.append(r)
    return out


def split_scans(refs: list[ScanRef], val_fraction: float, seed: int) -> tuple[list[ScanRef], list[ScanRef]]:
    """Deterministic split by scan: sorted by a seeded hash of the scan id, the first ``ceil(f*n)`` go to
    validation (at least one when ``f > 0`` and there are >= 2 scans). Independent of the listing order."""
    if val_fraction <= 0 or len(refs) < 2:
        return list(refs), []
    groups = sorted({scan_group(r.id) for r in refs})  # the volumes of a 4D scan stay together
    if len(groups) < 2:
        return list(refs), []
    key = {g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest() for g in groups}
    order = sorted(groups, key=lambda g: key[g])
    n_val = min(len(groups) - 1, max(1, int(np.ceil(val_fraction * len(groups)))))
    val_groups = set(order[:n_val])
    return ([r for r in refs if scan_group(r.id) not in val_groups], [r for r in refs if scan_group(r.id) in val_groups])


class LoadNormalize:
    """MONAI-style deterministic transform: scan ref dict -> ``{"image": (X, Y, Z) float32 in [-1, 1]-ish,
    "norm": normalization params, "spacing", "id", "source"}``. Cached, so it runs once per scan."""

    def __init__(self, modality: str = "auto", ct_window: str = "full"):
        self.modality = modality
        self.ct_window = ct_window

    def __call__(self, ref: dict) -> dict:
        img = load_scan(ref["files"] if ref.get("files") else ref["path"], volume=ref.get("volume"))
        modality = None if self.modality == "auto" else self.modality
        params = fit_normalization(img, modality, window=self.ct_window, foreground=True)
        x = normalize(img, params)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return {"image": x.float().contiguous(), "norm": params, "id": ref["id"], "source": int(ref["source"]),
                "spacing": [float(s) for s in img.meta.get("spacing", (1.0, 1.0, 1.0))]}


def load_volumes(refs: list[ScanRef], *, modality: str = "auto", ct_window: str = "full", cache: str = "memory",
                 cache_dir: str | Path | None = None, progress: bool = False) -> list[dict]:
    """Parse and normalize every scan once via MONAI ``CacheDataset`` (memory) or ``PersistentDataset`` (disk).

    Scans that fail to load are skipped with a warning naming the file and the reason."""
    from monai.data import CacheDataset, PersistentDataset

    tf = LoadNormalize(modality, ct_window)
    # the settings ride along in each item so PersistentDataset's hash (of the item) changes with them
    good = [{**r.as_dict(), "settings": f"{modality}|{ct_window}|foreground-percentiles"} for r in refs]
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache 'disk' needs a cache_dir")
        ds = PersistentDataset(good, transform=_safe(tf), cache_dir=str(cache_dir))
    else:
        ds = CacheDataset(good, transform=_safe(tf), num_workers=0, progress=progress, copy_cache=False)
    vols = []
    for i in range(len(ds)):
        v = ds[i]
        if v.get("error"):
            warnings.warn(f"skipping {v['id']}: {v['error']}", stacklevel=2)
            continue
        vols.append(v)
    if not vols:
        raise CaseError(refs[0].path if refs else "data", "no readable scans", "check data.train / data.val")
    return vols


def _safe(tf: LoadNormalize):
    """``tf`` as a deterministic MONAI ``Transform`` (so Cache/PersistentDataset cache its output — they treat
    plain callables as random) that turns a broken scan into ``{"error": line}`` instead of raising."""
    from monai.transforms import Transform

    class _Safe(Transform):
        def __call__(self, ref: dict) -> dict:
            return _load_or_error(tf, ref)

    return _Safe()


def _load_or_error(tf: LoadNormalize, ref: dict) -> dict:
    try:
        return tf(ref)
    except CaseError as e:
        return {"id": ref["id"], "error": e.line()}
    except Exception as e:  # noqa: BLE001 - reported per scan, the run goes on
        return {"id": ref["id"], "error": f"{ref['path']}: {type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------------ items
@dataclass
class Item:
    """A training sample source: ``image`` (1, *S) in the model range; its class and scan."""

    image: torch.Tensor
    scan: str
    source: int
    position: float = 0.5  # relative slice position in [0, 1] (2D)


def _pad_to(x: torch.Tensor, size: Sequence[int], value: float) -> torch.Tensor:
    """Pad (C, *S) symmetrically up to ``size``."""
    pads = []
    for s, t in zip(reversed(x.shape[1:]), reversed(list(size)), strict=True):
        d = max(0, t - s)
        pads += [d // 2, d - d // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def _fit(x: torch.Tensor, patch: Sequence[int], factor: int, resize_to: Sequence[int] | None) -> torch.Tensor:
    """Resize (optionally, after padding to a square/cube) and pad so every side >= patch and % factor == 0."""
    bg = float(x.min())
    if resize_to is not None:
        side = max(x.shape[1:])
        x = _pad_to(x, [side] * (x.ndim - 1), bg)
        mode = "bilinear" if x.ndim == 3 else "trilinear"
        x = F.interpolate(x[None], size=tuple(resize_to), mode=mode, align_corners=False, antialias=x.ndim == 3)[0]
    target = [max(p, -(-s // factor) * factor) for s, p in zip(x.shape[1:], patch, strict=True)]
    return _pad_to(x, target, bg).contiguous()


#: data.reformat: a plane along another axis is used when its two pixel spacings differ by at most this ratio
REFORMAT_MAX_ANISOTROPY = 1.25


def reformat_axes(shape: Sequence[int], spacing: Sequence[float], slice_axis: int, patch: Sequence[int]) -> list[int]:
    """The axes other than ``slice_axis`` whose planes have near-square pixels (spacing ratio <=
    :data:`REFORMAT_MAX_ANISOTROPY`) and are at least a patch on each side (so no plane is mostly padding)."""
    out = []
    for a in range(3):
        if a == slice_axis:
            continue
        rest = [i for i in range(3) if i != a]
        sp = [float(spacing[i]) for i in rest]
        square = min(sp) > 0 and max(sp) / min(sp) <= REFORMAT_MAX_ANISOTROPY
        if square and all(int(shape[i]) >= int(p) for i, p in zip(rest, patch, strict=True)):
            out.append(a)
    return out


def make_items(vols: list[dict], *, spatial_dims: int, slice_axis: int, patch: Sequence[int], factor: int,
               resize_to: Sequence[int] | None = None, min_foreground: float = 0.0,
               reformat: bool = False, context: int = 0) -> list[Item]:
    """2D: slices along ``slice_axis`` with enough foreground; 3D: whole volumes. Each (1, *S) padded/resized.

    ``reformat`` (2D, ``data.reformat``): also the planes along the other two axes of volumes whose pixels in that
    plane are near-square (:func:`reformat_axes`; the volume's ``spacing``), for orientation variety.
    ``context`` (2D, ``refine.context``): each item is (1 + 2 context, *S), the slice then its neighbouring slices
    in the order of :func:`medldm.data.condition.neighbour_slices` (what a 2.5D refiner sees at inference)."""
    items: list[Item] = []
    for v in vols:
        img = v["image"]
        if spatial_dims == 3:
            items.append(Item(_fit(img[None], patch, factor, resize_to), v["id"], v["source"]))
            continue
        axes = [slice_axis]
        if reformat and img.ndim == 3:
            axes += reformat_axes(img.shape, v.get("spacing", (1.0, 1.0, 1.0)), slice_axis, patch)
        for ax in axes:
            vol = torch.movedim(img, ax, -1)
            n = vol.shape[-1]
            bg = float(vol.min())
            thr = bg + 0.05 * (float(vol.max()) - bg)
            stack = torch.movedim(vol, -1, 0)  # (n, H, W)
            for k in range(n):
                sl = vol[..., k]
                if min_foreground > 0 and float((sl > thr).float().mean()) < min_foreground:
                    continue
                near = neighbour_slices(stack, torch.tensor([k]), context)[0] if context else sl[None][:0]
                items.append(Item(_fit(torch.cat([sl[None], near]), patch, factor, resize_to), v["id"], v["source"],
                                  (k + 0.5) / n))
    if not items:
        raise CaseError("data", "no slices with enough foreground", "lower data.min_foreground")
    return items


def step_rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator for one (step, micro-batch, rank): data order is a pure function of the step, which makes
    resume exact without saving sampler state."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


class ItemStore:
    """Items plus seeded, factor-aligned random crops."""

    def __init__(self, items: list[Item], patch: Sequence[int], factor: int, num_classes: int = 0,
                 class_from: str = "none", contrast_of: Sequence[int] = (), n_contrasts: int = 1):
        self.items = items
        # class_from 'contrast_position': contrast index of each source (its data.train / data.val entry);
        # class = contrast * position_bins + position bin
        self.contrast_of = list(contrast_of)
        self.position_bins = max(num_classes // max(n_contrasts, 1), 1)
        self.patch = tuple(int(p) for p in patch)
        self.factor = int(factor)
        self.num_classes = num_classes
        self.class_from = class_from
        self.masks: list[torch.Tensor] | None = None  # tissue label maps per item (condition: mask)

    def __len__(self) -> int:
        return len(self.items)

    def label(self, i: int) -> int:
        it = self.items[i]
        if self.class_from == "source":
            return it.source
        if self.class_from == "slice_position":
            return min(self.num_classes - 1, int(it.position * self.num_classes))
        if self.class_from == "contrast_position":
            b = self.position_bins
            return self.contrast_of[it.source] * b + min(b - 1, int(it.position * b))
        return 0

    def draw(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Item indices (B,) and crop corners (pixel units, multiples of the factor)."""
        idx = rng.integers(0, len(self.items), size=batch)
        corners = []
        for i in idx:
            shape = self.items[int(i)].image.shape[1:]
            corners.append(tuple(int(rng.integers(0, (s - p) // self.factor + 1)) * self.factor
                                 for s, p in zip(shape, self.patch, strict=True)))
        return idx, corners

    def crop(self, idx: np.ndarray, corners: list[tuple[int, ...]], context: bool = False) -> torch.Tensor:
        """(B, 1, *patch) crops; ``context``: (B, 1 + 2 k, *patch), each slice with its neighbouring slices (items
        made with ``make_items(context=k)``)."""
        ch = slice(None) if context else slice(0, 1)
        return torch.stack([self.items[int(i)].image[(ch, *self._window(c))]
                            for i, c in zip(idx, corners, strict=True)])

    def _window(self, corner: tuple[int, ...]) -> tuple[slice, ...]:
        """The spatial slices of the patch at ``corner``."""
        return tuple(slice(a, a + p) for a, p in zip(corner, self.patch, strict=True))

    def derive_masks(self, classes: int) -> None:
        """Tissue label maps of every item (``medldm.data.tissue.tissue_labels``: background + intensity clusters),
        derived once, on the whole item, so crops of one item agree (mask-conditioned synthesis)."""
        self.masks = [tissue_labels(it.image[0], classes) for it in self.items]

    def mask_crop(self, idx: np.ndarray, corners: list[tuple[int, ...]]) -> torch.Tensor:
        """(B, *patch) int64 label crops at the same places as :meth:`crop` (after :meth:`derive_masks`)."""
        if self.masks is None:
            raise ValueError("no label maps: call derive_masks first")
        return torch.stack([self.masks[int(i)][self._window(c)] for i, c in zip(idx, corners, strict=True)])

    def labels(self, idx: np.ndarray) -> torch.Tensor:
        """Class labels (B,) of items ``idx``, each in [0, num_classes - 1]: checked here, on the host, where they
        are made (the denoiser does not check them in its forward pass, which would sync the GPU each step)."""
        labels = [self.label(int(i)) for i in idx]
        if self.num_classes > 0:
            bad = [v for v in labels if not 0 <= v < self.num_classes]
            if bad:
                raise ValueError(f"class label {bad[0]} (class_from {self.class_from!r}) is outside "
                                 f"[0, {self.num_classes - 1}]: unet.num_classes = {self.num_classes} is too small")
        return torch.tensor(labels, dtype=torch.long)

    def spread(self, n: int) -> list[int]:
        """``n`` item indices spread evenly over the store (validation)."""
        if n >= len(self.items):
            return list(range(len(self.items)))
        return [int(round(x)) for x in np.linspace(0, len(self.items) - 1, n)]
