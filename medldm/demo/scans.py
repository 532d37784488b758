"""The demo's reference scans: the held-out samples scaled to [0, 1], and the reformatted thick -> thin
references (issue 12 protocol; also docs/training_logs/mr-thinslice-4x/eval_heldout.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medldm.data.datasets import resolve_path
from medldm.data.intensity import fit_normalization, normalize
from medldm.io.nifti import save_nifti
from medldm.io.reader import load_scan
from medldm.samples import available_samples

# Held-out real MR: never used to train shipped models (see docs/models.md).
DEMO_SAMPLES = ("mr-brain-s0", "mr-abdomen", "mr-shoulder")
SR_SCALE = 2
# thick -> thin slices (issue 12): the protocol of docs/training_logs/mr-thinslice-4x/eval_heldout.py
THIN_FACTOR = 4
PIESNO = "dipy-piesno"  # a 3D held-out scan (96 x 96 x 14 at 1 mm) where both reformats are used and fused
PIESNO_PATH = "pkg://dipy/data/files/test_piesno.nii.gz"
REFORMAT_SLICES = (0, 2, 1)  # (X, Y, S) -> (X, S, Y): a 2D slice's (or slice stack's) Y axis becomes Z
REFORMAT_PIESNO = (1, 2, 0)  # (X, Y, Z) -> (Y, Z, X): X becomes Z


def _crop(img, sizes: tuple[int, int, int]):
    """Crop (X, Y, Z) to at most ``sizes`` around the centre, affine updated."""
    shape = tuple(int(n) for n in img.shape)
    keep = [min(int(s), n) for s, n in zip(sizes, shape, strict=True)]
    off = [(n - k) // 2 for n, k in zip(shape, keep, strict=True)]
    out = img[tuple(slice(o, o + k) for o, k in zip(off, keep, strict=True))].clone()
    aff = np.asarray(img.affine, dtype=np.float64).copy()
    aff[:3, 3] = aff[:3, :3] @ np.array(off, float) + aff[:3, 3]
    out.affine = torch.as_tensor(aff)
    return out


def _center_crop(img, size: int, max_slices: int):
    """Crop (X, Y, Z) to at most size x size x max_slices around the centre, affine updated."""
    return _crop(img, (size, size, max_slices))


def prepare_references(out: Path, *, quick: bool, scans: dict[str, Path] | None = None) -> dict[str, Path]:
    """Load each held-out sample (or each of ``scans``: name -> scan path), scale to [0, 1] (0.5-99.5th
    percentiles), save OUT/ref/<name>.nii.gz."""

    have = dict(scans) if scans is not None else available_samples()
    refs: dict[str, Path] = {}
    for name in (have if scans is not None else DEMO_SAMPLES):
        if name not in have:
            print(f"demo: sample {name} not installed, skipped (pip install -e .[data])")
            continue
        img = load_scan(have[name])
        if quick:
            img = _center_crop(img, 96, 2)
        even = [(n // SR_SCALE) * SR_SCALE for n in img.shape[:2]]
        if even != list(img.shape[:2]):  # x2 up-sampling of the low-res input lands on the same grid
            img = _center_crop(img, min(even), img.shape[2])
        params = fit_normalization(img, "MR", out_range=(0.0, 1.0))
        ref = normalize(img, params)
        ref.meta["original_dtype"] = "float32"
        ref.meta["normalization"] = params
        refs[name] = save_nifti(ref, out / "ref" / f"{name}.nii.gz", dtype="float32")
    if not refs:
        raise RuntimeError("no demo sample scans installed: pip install -e .[data]")
    return refs


def thinslice_scans(scans: dict[str, Path] | None = None) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """The thick -> thin references: name -> (scan path, axis permutation of the reformat).

    By default the held-out demo scans (``DEMO_SAMPLES``: 2D slices, or slices 53 mm apart), reformatted
    (X, S, Y) so a real high-resolution in-plane axis (Y) becomes Z, plus dipy's ``test_piesno.nii.gz`` (3D,
    1 mm isotropic; used by no shipped model), reformatted (Y, Z, X): X becomes Z. ``scans`` (name -> path) replace
    them, each reformatted (X, S, Y). Samples whose package is missing are left out (a message says which)."""

    if scans is not None:
        return {n: (Path(p), REFORMAT_SLICES) for n, p in scans.items()}
    have = available_samples()
    out = {}
    for name in DEMO_SAMPLES:
        if name in have:
            out[name] = (have[name], REFORMAT_SLICES)
        else:
            print(f"demo: sample {name} not installed, skipped (pip install -e .[data])")
    piesno = resolve_path(PIESNO_PATH) if importlib.util.find_spec("dipy") is not None else None
    if piesno is not None and piesno.is_file():
        out[PIESNO] = (piesno, REFORMAT_PIESNO)
    else:
        print(f"demo: {PIESNO} ({PIESNO_PATH}) not installed, skipped (pip install dipy)")
    return out


def reformat(img, perm: tuple[int, int, int]):
    """The scan ``img`` (X, Y, Z) with its array axes permuted by ``perm`` and the affine's columns with them: the
    same voxels at the same world positions, another axis as Z (a fresh MetaTensor, float32)."""

    arr = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
    aff = np.asarray(img.affine, dtype=np.float64)[:, [*perm, 3]]
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr.transpose(*perm))), affine=torch.as_tensor(aff))


def prepare_thinslice_references(ref_dir: Path, *, quick: bool = False, scans: dict[str, Path] | None = None,
                                 names: tuple[str, ...] = ()) -> dict[str, Path]:
    """The thick -> thin references (issue 12 protocol; ``medldm demo`` and
    docs/training_logs/mr-thinslice-4x/eval_heldout.py): each scan of :func:`thinslice_scans` (``names``: only
    those) reformatted (:func:`reformat`), ``quick``: centre-cropped to at most 96 x 2 x 96, Z cropped (centred) to a
    multiple of ``THIN_FACTOR``, scaled to [0, 1] by its own 0.5-99.5th percentiles; saved as
    ``ref_dir/<name>.nii.gz`` (float32). Returns name -> path."""

    table = thinslice_scans(scans)
    refs: dict[str, Path] = {}
    for name in names or tuple(table):
        path, perm = table[name]
        vol = reformat(load_scan(path), perm)
        if quick:
            vol = _crop(vol, (96, 2, 96))
        z = vol.shape[2]
        vol = _crop(vol, (vol.shape[0], vol.shape[1], z - z % THIN_FACTOR))
        params = fit_normalization(vol, "MR", out_range=(0.0, 1.0))
        ref = normalize(vol, params)
        ref.meta["original_dtype"] = "float32"
        refs[name] = save_nifti(ref, Path(ref_dir) / f"{name}.nii.gz", dtype="float32")
    return refs
