"""The audit's utility test: did the synthetic image/label pairs help a downstream model? (docs/audit.md)

A small tissue segmenter (MONAI ``UNet``, 2D) is trained under several protocols, each with ``seeds`` training
seeds (the same seeds, steps and settings for every protocol):

* **real**: on the real training slices and their label maps;
* **real + synthetic** at each dose of ``doses`` (synthetic slices per real slice: 0.5x, 1x, 4x by default; a dose
  needing more pairs than there are uses all of them, and the dose reached is reported);
* **synthetic then real**: pre-trained on the synthetic pairs, then fine-tuned on the real slices (the same steps
  again);
* **synthetic only** (train on synthetic, test on real, "TSTR": the pre-trained network before fine-tuning);

and each is evaluated on the held-out real slices (other subjects): mean Dice over the tissue classes
(1..K-1; a class absent from both the slice's labels and the prediction is left out). The utility of a protocol is
the **paired difference** (protocol) - (real) per held-out subject (its slices averaged; a subject is a scan file,
or a subfolder of the held-out folder holding 2D slices of one subject) and seed, with a 95 %
percentile interval of its mean from a two-level bootstrap: held-out **subjects** resampled with replacement
(slices of one subject are correlated, so they are never resampled as if independent), and the training seeds
resampled with replacement, so seed-to-seed variation of the segmenter is in the interval. With one held-out
subject there is no interval (``ci95`` None).

Labels: synthetic scans are paired with ``<name>_labels.nii.gz`` beside them. Real scans use label maps from
``--labels DIR`` (``DIR/<scan file name>`` or ``DIR/<scan stem>_labels.nii.gz``, on the scan's grid), otherwise
the tissue classes medldm derives (:func:`medldm.data.tissue.tissue_labels`, the same derivation the mask
models are trained on). Images: a 3D scan gives its axial slices (last array axis) with at least
``min_foreground`` of foreground (up to ``max_slices``, evenly spread); each slice is padded to a square with its
background and resized to ``grid`` x ``grid`` (labels by nearest neighbour); intensities are the 0.5th-99.5th
percentiles of each scan mapped to [0, 1].

Limits (stated in the report): few held-out subjects give wide intervals; derived labels are intensity clusters,
not anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medldm.data.tissue import dice_per_class, tissue_labels
from medldm.io.errors import CaseError, UsageError
from medldm.io.reader import load_nifti

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
    seed: int = 0  # first training seed; seeds seed .. seed + seeds - 1
    seeds: int = 3  # training seeds per protocol
    doses: tuple[float, ...] = (0.5, 1.0, 4.0)  # synthetic slices per real slice (real + synthetic protocols)


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


def unit_range(arr: np.ndarray) -> np.ndarray:
    """``arr`` scaled to [0, 1] by its own 0.5-99.5th percentiles (clipped), float32."""
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return np.clip((arr - lo) / max(float(hi - lo), 1e-8), 0, 1).astype(np.float32)


def _files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))
    return [p for p in files if not is_label_file(p)]


def load_slices(folder: str | Path, *, labels_dir: str | Path | None, classes: int, opt: UtilityOptions,
                paired: bool = False) -> list[Slice]:
    """The (image, label) slices of every NIfTI scan under ``folder`` (see the module doc). ``paired``: each scan's
    label map is ``<stem>_labels.nii.gz`` beside it (synthetic pairs); scans without one are a CaseError."""
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
        unit = unit_range(data)
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
            rel = f.relative_to(folder)
            out.append(Slice(img, y, rel.parts[0] if len(rel.parts) > 1 else str(rel)))  # subject: subfolder or file
    return out


def _segmenter(classes: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=classes, channels=(16, 32, 64), strides=(2, 2),
                num_res_units=1)


def train_segmenter(slices: list[Slice], classes: int, opt: UtilityOptions,
                    init: torch.nn.Module | None = None) -> torch.nn.Module:
    """A small MONAI UNet trained on ``slices`` (Dice + cross-entropy, Adam, random flips), seeded; ``init``: a
    network to start from (fine-tuning; its weights are copied, not changed)."""
    import copy

    from monai.losses import DiceCELoss

    torch.manual_seed(opt.seed)
    net = _segmenter(classes) if init is None else copy.deepcopy(init).train()
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
    x = torch.from_numpy(np.stack([s.image for s in slices]))[:, None]
    pred = torch.cat([net(x[i:i + 32]).argmax(1) for i in range(0, len(x), 32)]).numpy()
    out = []
    for p, s in zip(pred, slices, strict=True):
        d = dice_per_class(p, s.labels, classes)
        out.append(float(np.nanmean(d)) if np.isfinite(d).any() else 1.0)
    return np.asarray(out)


def _ci(diff: np.ndarray, subjects: list[str], opt: UtilityOptions) -> dict:
    """Mean of ``diff`` (seeds, held-out slices) with a 95 % percentile interval from a two-level bootstrap:
    held-out subjects (their slices averaged) and training seeds resampled with replacement."""
    diff = np.atleast_2d(np.asarray(diff, dtype=np.float64))
    uniq = sorted(set(subjects))
    subj = np.asarray(subjects)
    per = np.stack([diff[:, subj == u].mean(axis=1) for u in uniq], axis=1)  # (seeds, subjects)
    out = {"mean": float(per.mean()), "ci95": None, "n": len(uniq), "seeds": int(per.shape[0]),
           "resampled": "held-out subjects" + (" and training seeds" if per.shape[0] > 1 else "")}
    if len(uniq) < 2:
        out["resampled"] = "nothing: one held-out subject gives no interval"
        return out
    rng = np.random.default_rng(opt.seed)
    stats = np.empty(opt.resamples)
    for b in range(opt.resamples):
        rows = rng.integers(0, per.shape[0], per.shape[0])
        cols = rng.integers(0, per.shape[1], per.shape[1])
        stats[b] = per[np.ix_(rows, cols)].mean()
    out["ci95"] = [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]
    return out


def _dose_subset(synthetic: list[Slice], n: int, seed: int) -> list[Slice]:
    """``n`` of the synthetic pairs (all when there are fewer), drawn without replacement by ``seed``."""
    if n >= len(synthetic):
        return list(synthetic)
    idx = np.random.default_rng(seed).choice(len(synthetic), size=n, replace=False)
    return [synthetic[i] for i in sorted(idx)]


def _dose_name(dose: float) -> str:
    return f"real_plus_synthetic_{dose:g}x"


def utility_test(real: list[Slice], synthetic: list[Slice], holdout: list[Slice], classes: int,
                 opt: UtilityOptions) -> dict:
    """Train the segmenters of every protocol and seed and compare them on ``holdout`` (see the module doc).

    Returns per protocol ``{mean_dice, n_train_slices, difference: {mean, ci95, n, seeds, resampled}}``;
    ``real_plus_synthetic`` is the 1x dose (or the first dose), ``difference`` its difference to real and
    ``tstr_vs_real`` the synthetic-only one."""
    import dataclasses

    for what, s in (("real training", real), ("synthetic", synthetic), ("held-out", holdout)):
        if not s:
            raise UsageError(f"utility test: no {what} slices (see docs/audit.md, 'Utility')")
    if opt.seeds < 1 or not opt.doses or any(not d > 0 for d in opt.doses):
        raise UsageError("utility test: needs >= 1 seed and positive doses")
    subjects = [s.subject for s in holdout]
    names = ["real", *(_dose_name(d) for d in opt.doses), "synthetic_then_real", "synthetic_only"]
    scores: dict[str, list[np.ndarray]] = {n: [] for n in names}
    n_train: dict[str, int] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64^2 UNet gains nothing from threads; on a shared CPU they cost 7x (measured)
    try:
        for k in range(opt.seeds):
            o = dataclasses.replace(opt, seed=opt.seed + k)
            scores["real"].append(slice_dice(train_segmenter(real, classes, o), holdout, classes))
            n_train["real"] = len(real)
            for d in opt.doses:
                extra = _dose_subset(synthetic, int(round(d * len(real))), o.seed)
                scores[_dose_name(d)].append(slice_dice(train_segmenter(real + extra, classes, o), holdout, classes))
                n_train[_dose_name(d)] = len(real) + len(extra)
            pre = train_segmenter(synthetic, classes, o)
            scores["synthetic_only"].append(slice_dice(pre, holdout, classes))
            scores["synthetic_then_real"].append(slice_dice(train_segmenter(real, classes, o, init=pre), holdout,
                                                            classes))
            n_train["synthetic_only"] = n_train["synthetic_then_real"] = len(synthetic)
    finally:
        torch.set_num_threads(threads)
    base = np.stack(scores["real"])
    out: dict = {}
    for name in names:
        v = np.stack(scores[name])
        out[name] = {"mean_dice": float(v.mean()), "n_train_slices": n_train[name]}
        if name != "real":
            out[name]["difference"] = _ci(v - base, subjects, opt)
    for d in opt.doses:
        out[_dose_name(d)]["dose_reached"] = round((n_train[_dose_name(d)] - len(real)) / len(real), 3)
    out["synthetic_then_real"]["n_train_slices"] = f"{len(synthetic)} synthetic, then {len(real)} real"
    main = _dose_name(1.0) if 1.0 in opt.doses else _dose_name(opt.doses[0])
    out["real_plus_synthetic"] = out[main]
    out["difference"] = out[main]["difference"]
    out["tstr_vs_real"] = out["synthetic_only"]["difference"]
    d = out["difference"]
    verdict = ("no interval (one held-out subject)" if d["ci95"] is None else "helped" if d["ci95"][0] > 0 else
               "hurt" if d["ci95"][1] < 0 else "no difference shown (the interval contains 0)")
    out.update({
        "verdict": verdict, "classes": classes, "n_holdout_slices": len(holdout), "protocols": names[1:],
        "n_holdout_subjects": len(set(subjects)), "n_real_subjects": len({s.subject for s in real}),
        "settings": {"grid": opt.grid, "steps": opt.steps, "batch": opt.batch, "lr": opt.lr, "seed": opt.seed,
                     "seeds": opt.seeds, "doses": list(opt.doses), "resamples": opt.resamples,
                     "network": "MONAI UNet 2D (16, 32, 64), 1 residual unit, Dice + cross-entropy"},
        "limits": ((f"only {len(set(subjects))} held-out subjects: the intervals are wide; "
                    if len(set(subjects)) < 5 else "")
                   + "labels derived by intensity clustering are not anatomy"),
    })
    return out
