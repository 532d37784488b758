"""Write a volume as NIfTI-1 (``.nii`` / ``.nii.gz``), atomically.

The affine goes into both the sform and the qform (the qform only when the grid is not sheared, as
a quaternion cannot hold a shear); codes are kept from the source NIfTI (``meta["sform_code"]``,
e.g. 2 = aligned, 4 = MNI) or 1 (scanner) otherwise. Units: mm and seconds.

Voxel type (``dtype=None``): the source's ``meta["original_dtype"]`` when every value, rounded, fits
it — so a CT in integer HU goes back to int16 — provided rounding is harmless (values already
integers, or spanning at least :data:`MIN_RANGE_FOR_ROUNDING` units); else float32. An explicit
``dtype`` that cannot hold the values raises instead of clipping or wrapping around.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medldm.io.atomic import atomic_file
from medldm.io.errors import CaseError
from medldm.io.geometry import spacing_from_affine

#: Non-integer values are rounded to an integer source type only when they span at least this many
#: units (rounding error <= 0.5 unit, i.e. <= 0.5 % of the range); otherwise float32 keeps them.
MIN_RANGE_FOR_ROUNDING = 100.0


def _fits(values: np.ndarray, dtype: np.dtype) -> bool:
    if np.issubdtype(dtype, np.floating):
        return bool(np.all(np.abs(values[np.isfinite(values)]) <= np.finfo(dtype).max))
    if not np.all(np.isfinite(values)):
        return False
    info = np.iinfo(dtype)
    r = np.rint(values)
    return bool(r.size == 0 or (r.min() >= info.min and r.max() <= info.max))


def choose_dtype(values: np.ndarray, original: str | None) -> np.dtype:
    """Voxel type for ``values`` (float32): the original type when it holds them (see module doc)."""
    try:
        dt = np.dtype(original) if original else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "iuf" or dt.itemsize > 8:
        return np.dtype(np.float32)
    if dt.kind == "f":
        return np.dtype(np.float32) if dt.itemsize <= 4 else dt
    if not _fits(values, dt):
        return np.dtype(np.float32)
    integral = np.array_equal(values, np.rint(values))
    span = float(values.max() - values.min()) if values.size else 0.0
    return dt if integral or span >= MIN_RANGE_FOR_ROUNDING else np.dtype(np.float32)


def _orthogonal(affine: np.ndarray) -> bool:
    m = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.allclose(m.T @ m, np.eye(3), atol=1e-5))


def save_nifti(img, path: str | os.PathLike, *, dtype=None) -> Path:
    """Write ``img`` (MetaTensor (X, Y, Z) or 4D (X, Y, Z, T), ``.affine`` RAS) to ``path`` (.nii or .nii.gz).

    A 2D original (``meta["original_ndim"] == 2`` and Z == 1) is written as a 2D (X, Y) image.
    Returns ``path``.
    """
    import nibabel as nib

    path = Path(path)
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        raise CaseError(path, "not a NIfTI file name", "end the output name with .nii or .nii.gz")
    meta = getattr(img, "meta", {}) or {}
    data = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
    affine = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        raise CaseError(path, f"expected a (X, Y, Z) volume or (X, Y, Z, T) volumes, got shape {data.shape}",
                        "select one volume")
    if dtype is None:
        dt = choose_dtype(data, meta.get("original_dtype"))
    else:
        dt = np.dtype(dtype)
        if not _fits(data, dt):
            lo, hi = (float(data.min()), float(data.max())) if data.size else (0, 0)
            raise CaseError(path, f"values {lo:g}..{hi:g} do not fit {dt.name}",
                            "choose a wider dtype or leave dtype unset")
    out = np.rint(data).astype(dt) if dt.kind in "iu" else data.astype(dt)
    if int(meta.get("original_ndim", 3) or 3) == 2 and out.shape[2] == 1:
        out = out[:, :, 0]
    nimg = nib.Nifti1Image(out, affine)
    hdr = nimg.header
    scode = int(meta.get("sform_code", 0) or 0)
    scode = scode if scode in (1, 2, 3, 4, 5) else 1
    qcode = int(meta.get("qform_code", 0) or 0)
    qcode = qcode if qcode in (1, 2, 3, 4, 5) else scode
    nimg.set_sform(affine, code=scode)
    if _orthogonal(affine):
        nimg.set_qform(affine, code=qcode)
    else:  # a quaternion cannot hold a shear: leave the qform unset rather than wrong
        nimg.set_qform(None, code=0)
    zooms = tuple(spacing_from_affine(affine))
    if out.ndim == 4:  # the volumes' step: the source's (e.g. the repetition time), else 1
        zooms = (*zooms, float(meta.get("volume_step") or 1.0))
    hdr.set_zooms(zooms[: out.ndim])
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_dtype(dt)
    hdr["descrip"] = b"medldm"
    nimg.header.set_slope_inter(1.0, 0.0)
    with atomic_file(path) as tmp:
        nib.save(nimg, str(tmp))
    return path
