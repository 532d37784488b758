"""Audit inputs: load scans, normalize them to [0, 1], and bring them to one comparison grid.

Each scan goes through (docs/audit.md, "Preparing the images"):

1. **Modality.** ``--modality`` if given; else the DICOM ``Modality`` of the case; a case of unknown
   modality (e.g. NIfTI) takes the modality shared by every case of known modality in the audit
   (all three folders), else stays "unknown".
2. **Normalization** to ``[0, 1]`` with clipping (:func:`medldm.data.intensity.fit_normalization`):
   CT -> a fixed HU window (``ct_window``, default "full" = [-1024, 3071]), so HU stay comparable across
   scans; anything else -> the 0.5th / 99.5th percentiles of that scan (MR has no absolute scale).
3. **Canonical orientation**: axes permuted / flipped to the closest RAS+ order from the affine
   (nibabel's ``io_orientation``), so a copy stored with another axis order still lines up.
4. **Comparison grid**: a 2D image (one axis of size 1) becomes ``(S, S)``, a volume ``(S, S, S)``, each
   axis resampled independently (area average when shrinking, then linear when enlarging; default
   ``S`` = 128 in 2D, 64 in 3D). Physical
   spacing is ignored on purpose: scans of the same field of view at different matrix sizes line up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medldm.data.intensity import fit_normalization, normalize
from medldm.io.errors import CaseError

DEFAULT_GRID = {2: 128, 3: 64}  # comparison grid per axis when none is given


@dataclass
class Sample:
    """One prepared scan. ``image``: (S, S) or (S, S, S) float32 in [0, 1] on the comparison grid,
    canonical (RAS+) axis order."""

    role: str  # "synthetic" | "train" | "holdout"
    id: str
    source: str
    image: np.ndarray
    native_shape: tuple[int, ...]
    modality: str
    normalization: dict = field(default_factory=dict)
    normal: int = 2  # canonical axis a 2D image was squeezed along (display); 2 for volumes

    @property
    def ndim(self) -> int:
        return self.image.ndim


def case_modality(case) -> str:
    """Modality from a discovered case's DICOM headers ("unknown" for NIfTI / missing)."""
    headers = getattr(case, "headers", None) or []
    if headers:
        m = str(headers[0].get("Modality", "") or "").strip().upper()
        if m:
            return m
    return "unknown"


def resolve_modalities(known: dict[str, str], forced: str | None = None) -> tuple[dict[str, str], str]:
    """Fill in "unknown" modalities: ``known`` maps key -> modality. Returns (resolved map, note)."""
    if forced:
        return {k: forced.upper() for k in known}, f"modality forced to {forced.upper()} for every scan"
    seen = Counter(m for m in known.values() if m != "unknown")
    if len(seen) == 1 and any(m == "unknown" for m in known.values()):
        (only, _), = seen.items()
        return ({k: (only if m == "unknown" else m) for k, m in known.items()},
                f"scans of unknown modality (e.g. NIfTI) treated as {only}, the modality of every DICOM scan")
    note = "modalities as stored" + (f" ({dict(seen)})" if seen else " (none recorded: percentile normalization)")
    if len(seen) > 1:
        note += "; several modalities in one audit: similarities across modalities are not meaningful"
    return dict(known), note


def canonical(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``arr`` (X, Y, Z) permuted/flipped to the closest RAS+ axis order of ``affine``."""
    from nibabel.orientations import apply_orientation, io_orientation

    return np.ascontiguousarray(apply_orientation(arr, io_orientation(np.asarray(affine, np.float64))))


def to_grid(arr: np.ndarray, size: int) -> np.ndarray:
    """Resample a 2D (H, W) or 3D (D, H, W) array to ``size`` per axis (area down, then linear up)."""
    nd = arr.ndim
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    down = tuple(min(s, size) for s in arr.shape)
    if down != tuple(arr.shape):
        x = F.interpolate(x, size=down, mode="area")
    if down != (size,) * nd:
        x = F.interpolate(x, size=(size,) * nd, mode="bilinear" if nd == 2 else "trilinear", align_corners=False)
    return x[0, 0].numpy()


def prepare(img, *, role: str, case_id: str, source: str, modality: str, grid: int | None,
            ct_window: str | tuple[float, float] = "full") -> Sample:
    """A loaded scan (MetaTensor (X, Y, Z)) -> :class:`Sample` on the comparison grid (see module doc)."""
    arr = np.asarray(img.as_tensor() if hasattr(img, "as_tensor") else img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise CaseError(source, f"image has shape {arr.shape}, expected (X, Y, Z)",
                        "give 2D slices or 3D volumes (a 4D series: extract one volume first)")
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    affine = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
    try:
        params = fit_normalization(arr, modality, window=ct_window, out_range=(0.0, 1.0), clip=True,
                                   original_dtype="float32")
    except ValueError as e:
        raise CaseError(source, f"cannot normalize intensities: {e}", "check the scan is not empty") from None
    arr = np.asarray(normalize(arr, params), dtype=np.float32)
    arr = canonical(arr, affine)
    flat = [d for d in range(3) if arr.shape[d] == 1]
    if len(flat) > 1:
        raise CaseError(source, f"image of shape {tuple(img.shape)} has fewer than two axes longer than 1",
                        "give 2D slices or 3D volumes")
    if flat:
        arr = np.squeeze(arr, axis=flat[0])
    if min(arr.shape) < 2:
        raise CaseError(source, f"image of shape {tuple(img.shape)} is too small to compare",
                        "give images of at least 2 voxels per axis")
    grid = grid or (DEFAULT_GRID[arr.ndim])
    return Sample(role, case_id, source, to_grid(arr, grid), tuple(int(s) for s in img.shape), modality, params,
                  flat[0] if flat else 2)


def stack(samples: list[Sample]) -> torch.Tensor:
    """Samples -> (N, 1, *grid) float32 tensor."""
    if not samples:
        return torch.zeros(0)
    return torch.from_numpy(np.stack([s.image for s in samples]))[:, None]
