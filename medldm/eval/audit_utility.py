"""The audit's utility test: did the synthetic image/label pairs help a downstream model? (docs/audit.md)

A small tissue segmenter (MONAI ``UNet``, 2D) is trained three times with the same seed, steps and settings:

* **real**: on the real training slices and their label maps;
* **real + synthetic**: on the same plus the synthetic pairs (``medldm synthesize --mask`` writes them);
* **synthetic only** (train on synthetic, test on real, "TSTR");

and each is evaluated on the held-out real slices (other subjects): mean Dice over the tissue classes
(1..K-1; a class absent from both the slice's labels and the prediction is left out). The utility is the
**paired difference** (real + synthetic) - (real) per held-out slice, with a 95 % bootstrap confidence interval
of its mean (``scipy.stats.bootstrap``, BCa, resampling held-out slices; by subject when there are at least 5
held-out subjects).

Labels: synthetic scans are paired with ``<name>_labels.nii.gz`` beside them. Real scans use label maps from
``--labels DIR`` (``DIR/<scan file name>`` or ``DIR/<scan stem>_labels.nii.gz``, on the scan's grid), otherwise
the tissue classes medldm derives (:func:`medldm.data.tissue.tissue_labels`, the same derivation the mask
models are trained on). Images: a 3D scan gives its axial slices (last array axis) with at least
``min_foreground`` of foreground (up to ``max_slices``, evenly spread); each slice is padded to a square with its
background and resized to ``grid`` x ``grid`` (labels by nearest neighbour); intensities are the 0.5th-99.5th
percentiles of each scan mapped to [0, 1].

Limits (stated in the report): one training seed (seed-to-seed variation of the segmenter is not in the
interval); slices of one subject are correlated, so a slice bootstrap with fewer than 5 held-out subjects is
optimistic; derived labels are intensity clusters, not anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medldm.io.errors import CaseError, UsageError

LABEL_SUFFIX = "_labels"


@dataclass
class UtilityOptions:
    grid: int = 64  # slice size the segmenter sees
    classes: int | None = None  # label classes (0 = background); None = from the synthetic label maps
    steps: int = 300  # optimiser steps per segmenter (the same for the three)
    batch: int = 8
    lr: float = 2e-3
    max_slices: int = 24  # per 3D scan
    min_foreground: float = 0.25
    resamples: int = 2000  # bootstrap resamples
    seed: int = 0


@dataclass
class Slice:
    image: np.ndarray  # (grid, grid) float32 in [0, 1]
    labels: np.ndarray  # (grid, grid) int64
    subject: str


def is_label_file(path: Path) -> bool:
    """``*_labels.nii[.gz]``: the label map of a synthetic pair, not a scan."""
    name = path.name.lower()
    return name.endswith((LABEL_SUFFIX + ".nii.gz", LABEL_SUFFIX + ".nii"))


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _square(x: torch.Tensor, value: float) -> torch.Tensor:
    """(H, W) padded symmetrically to a square with ``value``."""
    h, w = x.shape
    s = max(h, w)
    return F.pad(x, [(s - w) // 2, s - w - (s - w) // 2, (s - h) // 2, s - h - (s - h) // 2], value=value)


def _resize(img: np.ndarray, lab: np.ndarray | None, grid: int) -> tuple[np.ndarray, np.ndarray | None]:
    x = _square(torch.from_numpy(np.ascontiguousarray(img, np.float32)), float(img.min()))
    x = F.interpolate(x[None, None], size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    y = None
    if lab is not None:
        t = _square(torch.from_numpy(np.ascontiguousarray(lab)).float(), 0.0)
        y = F.interpolate(t[None, None], size=(grid, grid), mode="nearest")[0, 0].round().long().numpy()
    return x.clamp(0, 1).numpy(), y


def _unit(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return np.clip((arr - lo) / max(float(hi - lo), 1e-8), 0, 1).astype(np.float32)


def _files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))
    return [p for p in files if not is_label_file(p)]


def load_slices(folder: str | Path, *, labels_dir: str | Path | None, classes: int, opt: UtilityOptions,
                paired: bool = False) -> list[Slice]:
    """The (image, label) slices of every NIfTI scan under ``folder`` (see the module doc). ``paired``: each scan's
    label map is ``<stem>_labels.nii.gz`` beside it (synthetic pairs); scans without one are a CaseError."""
    from medldm.data.tissue import tissue_labels
    from medldm.io.reader import load_nifti

    folder = Path(folder)
    out: list[Slice] = []
    for f in _files(folder):
        data, _, _ = load_nifti(f)
        lab = None
        if paired or labels_dir is not None:
            cands = [f.parent / f"{_stem(f)}{LABEL_SUFFIX}.nii.gz"] if paired else [
                Path(labels_dir) / f.name, Path(labels_dir) / f"{_stem(f)}{LABEL_SUFFIX}.nii.gz"]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise CaseError(f, "no label map for this scan", f"expected {cands[0]}"
                                + ("" if paired else f" or {cands[1]}"))
            lab, _, _ = load_nifti(found)
            if lab.shape != data.shape:
                raise CaseError(found, f"label map shape {lab.shape} differs from the scan's {data.shape}",
                                "give the label map on the scan's grid")
            lab = np.rint(lab).astype(np.int64)
            if lab.min() < 0 or lab.max() >= classes:
                raise CaseError(found, f"label values {lab.min()}..{lab.max()} outside 0..{classes - 1}",
                                "use labels 0..K-1 (0 = background), the classes of the synthetic pairs")
        unit = _unit(data)
        zs = list(range(unit.shape[2]))
        if len(zs) > 1:
            fg = [float((unit[:, :, z] > 0.1).mean()) for z in zs]
            zs = [z for z in zs if fg[z] >= opt.min_foreground]
            if len(zs) > opt.max_slices:
                zs = [zs[int(round(i))] for i in np.linspace(0, len(zs) - 1, opt.max_slices)]
        for z in zs:
            img, y = _resize(unit[:, :, z], None if lab is None else lab[:, :, z], opt.grid)
            if y is None:
                y = tissue_labels(img, classes).numpy()
            out.append(Slice(img, y, str(f.relative_to(folder))))
    return out


def _segmenter(classes: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=classes, channels=(16, 32, 64), strides=(2, 2),
                num_res_units=1)


def train_segmenter(slices: list[Slice], classes: int, opt: UtilityOptions) -> torch.nn.Module:
    """A small MONAI UNet trained on ``slices`` (Dice + cross-entropy, Adam, random flips), seeded."""
    from monai.losses import DiceCELoss

    torch.manual_seed(opt.seed)
    net = _segmenter(classes)
    x = torch.from_numpy(np.stack([s.image for s in slices]))[:, None]
    y = torch.from_numpy(np.stack([s.labels for s in slices]))[:, None]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optim = torch.optim.Adam(net.parameters(), lr=opt.lr)
    rng = np.random.default_rng(opt.seed)
    net.train()
    for _ in range(opt.steps):
        idx = rng.integers(0, len(slices), size=opt.batch)
        xb, yb = x[idx], y[idx]
        if rng.random() < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = loss_fn(net(xb), yb)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return net.eval()


@torch.no_grad()
def slice_dice(net: torch.nn.Module, slices: list[Slice], classes: int) -> np.ndarray:
    """Mean Dice over classes 1..K-1 per slice (classes in neither the labels nor the prediction left out)."""
    from medldm.data.tissue import dice_per_class

    x = torch.from_numpy(np.stack([s.image for s in slices]))[:, None]
    pred = torch.cat([net(x[i:i + 32]).argmax(1) for i in range(0, len(x), 32)]).numpy()
    out = []
    for p, s in zip(pred, slices, strict=True):
        d = dice_per_class(p, s.labels, classes)
        out.append(float(np.nanmean(d)) if np.isfinite(d).any() else 1.0)
    return np.asarray(out)


def _ci(diff: np.ndarray, subjects: list[str], opt: UtilityOptions) -> dict:
    """Mean of ``diff`` with a 95 % BCa bootstrap interval, by subject when >= 5 held-out subjects."""
    from scipy.stats import bootstrap

    uniq = sorted(set(subjects))
    by_subject = len(uniq) >= 5
    data = np.asarray([diff[[s == u for s in subjects]].mean() for u in uniq]) if by_subject else diff
    unit = "held-out subjects" if by_subject else "held-out slices"
    if len(data) < 2 or np.allclose(data, data[0]):
        return {"mean": float(diff.mean()), "ci95": [float(data.mean()), float(data.mean())], "n": int(len(data)),
                "resampled": unit}
    res = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=opt.resamples, method="BCa",
                    random_state=np.random.default_rng(opt.seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # BCa degenerates on tiny sets: percentile instead
        res = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=opt.resamples, method="percentile",
                        random_state=np.random.default_rng(opt.seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"mean": float(data.mean()), "ci95": [lo, hi], "n": int(len(data)), "resampled": unit}


def utility_test(real: list[Slice], synthetic: list[Slice], holdout: list[Slice], classes: int,
                 opt: UtilityOptions) -> dict:
    """Train the three segmenters and compare them on ``holdout`` (see the module doc)."""
    for what, s in (("real training", real), ("synthetic", synthetic), ("held-out", holdout)):
        if not s:
            raise UsageError(f"utility test: no {what} slices (see docs/audit.md, 'Utility')")
    subjects = [s.subject for s in holdout]
    scores = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64^2 UNet gains nothing from threads; on a shared CPU they cost 7x (measured)
    try:
        for name, train_set in (("real", real), ("real_plus_synthetic", real + synthetic),
                                ("synthetic_only", synthetic)):
            scores[name] = slice_dice(train_segmenter(train_set, classes, opt), holdout, classes)
    finally:
        torch.set_num_threads(threads)
    out = {name: {"mean_dice": float(v.mean()), "n_train_slices": n}
           for (name, v), n in zip(scores.items(), (len(real), len(real) + len(synthetic), len(synthetic)),
                                   strict=True)}
    out["difference"] = _ci(scores["real_plus_synthetic"] - scores["real"], subjects, opt)
    out["tstr_vs_real"] = _ci(scores["synthetic_only"] - scores["real"], subjects, opt)
    d = out["difference"]
    verdict = ("helped" if d["ci95"][0] > 0 else "hurt" if d["ci95"][1] < 0 else
               "no difference shown (the interval contains 0)")
    out.update({
        "verdict": verdict, "classes": classes, "n_holdout_slices": len(holdout),
        "n_holdout_subjects": len(set(subjects)), "n_real_subjects": len({s.subject for s in real}),
        "settings": {"grid": opt.grid, "steps": opt.steps, "batch": opt.batch, "lr": opt.lr, "seed": opt.seed,
                     "network": "MONAI UNet 2D (16, 32, 64), 1 residual unit, Dice + cross-entropy"},
        "limits": ("one training seed per segmenter (its variation is not in the interval); "
                   + ("slices of one subject are correlated: with fewer than 5 held-out subjects the interval "
                      "resamples slices and is optimistic; " if len(set(subjects)) < 5 else "")
                   + "labels derived by intensity clustering are not anatomy"),
    })
    return out
