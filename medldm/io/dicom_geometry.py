"""Geometry of one DICOM image (ImagePositionPatient / ImageOrientationPatient / PixelSpacing): the slice's position,
direction cosines, spacing and thickness (:class:`SliceGeom`), and the LPS affine of voxel centres."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from medldm.io.errors import CaseError


@dataclass
class SliceGeom:
    """Geometry of one 2D image in LPS: ``position`` of the first voxel centre, unit row direction
    (along columns, i), unit column direction (along rows, j), spacing ``(di, dj)`` in mm."""

    position: np.ndarray | None
    row_cos: np.ndarray | None
    col_cos: np.ndarray | None
    spacing: tuple[float, float]
    thickness: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray | None:
        if self.row_cos is None or self.col_cos is None:
            return None
        n = np.cross(self.row_cos, self.col_cos)
        return n / (np.linalg.norm(n) or 1.0)


def _floats(v, n: int) -> np.ndarray | None:
    try:
        a = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.size == n and np.all(np.isfinite(a)) else None


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float], list[str]]:
    """In-plane spacing ``(di, dj)`` = (between columns, between rows) in mm."""
    for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if key in ds:
            ps = _floats(ds[key].value, 2)
            if ps is not None and np.all(ps > 0):
                w = [] if key == "PixelSpacing" else [f"no PixelSpacing: used {key} {ps[0]:g}x{ps[1]:g} mm"]
                return (float(ps[1]), float(ps[0])), w
    return (1.0, 1.0), ["no pixel spacing in the header: assumed 1 mm"]


def thickness(ds: Dataset) -> float | None:
    for key in ("SliceThickness", "SpacingBetweenSlices"):
        try:
            v = float(ds.get(key, 0) or 0)
        except (TypeError, ValueError):
            v = 0.0
        if v > 0:
            return v
    return None


#: |row . col| above this: the two direction cosines are not perpendicular (a damaged ImageOrientationPatient)
ORTHO_TOL = 1e-2


def orientation(value, where) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Unit row and column direction cosines from an ImageOrientationPatient value; ``(None, None)`` when it is
    absent (an image without patient geometry). A value that is present but cannot describe an orientation (all
    zero, not six numbers, a zero-length or non-perpendicular pair) raises :class:`CaseError`: the slices' real
    directions are unknown, and a made-up grid would put every voxel at a wrong position."""
    if value is None or (not isinstance(value, str) and len(value) == 0) or value == "":
        return None, None
    iop = _floats(value, 6)
    bad = None
    if iop is None:
        bad = "is not six finite numbers"
    elif np.linalg.norm(iop[:3]) < 1e-3 or np.linalg.norm(iop[3:]) < 1e-3:
        bad = "holds a zero-length direction (all zero?)"
    else:
        row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
        if abs(float(row @ col)) > ORTHO_TOL:
            bad = f"has row and column directions that are not perpendicular (cosine {float(row @ col):.3g})"
    if bad:
        raise CaseError(where, f"ImageOrientationPatient {list(value) if not isinstance(value, str) else value} "
                               f"{bad}: the slice orientation is unknown",
                        "the header is damaged; export the series again from the scanner or PACS (medldm does "
                        "not guess an orientation)")
    return row, col


def slice_geometry(ds: Dataset) -> SliceGeom:
    """Geometry of a single-frame image header (ImagePositionPatient/ImageOrientationPatient)."""
    spacing, warn = pixel_spacing(ds)
    pos = _floats(ds.get("ImagePositionPatient", None) or [], 3)
    row, col = orientation(ds.get("ImageOrientationPatient", None), getattr(ds, "filename", None) or "")
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        warn.append("MONOCHROME1: low values are meant to display white; values kept as stored")
    return SliceGeom(pos, row, col, spacing, thickness(ds), warn)


def affine_lps(row_cos, col_cos, step, spacing, origin) -> np.ndarray:
    """4x4 LPS affine of voxel centres: columns ``row_cos*di``, ``col_cos*dj``, ``step``, ``origin``."""
    a = np.eye(4)
    a[:3, 0] = np.asarray(row_cos) * spacing[0]
    a[:3, 1] = np.asarray(col_cos) * spacing[1]
    a[:3, 2] = step
    a[:3, 3] = origin
    return a
