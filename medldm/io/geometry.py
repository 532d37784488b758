"""Voxel <-> world geometry. One convention everywhere (see docs/io.md):

* arrays are indexed ``(i, j, k)`` = (X, Y, Z) like NIfTI; for DICOM ``i`` = column, ``j`` = row,
  ``k`` = slice in ascending order along the slice normal ``n = row_cosines x col_cosines``;
* ``affine`` (4x4, float64) maps voxel *centres* ``(i, j, k, 1)`` to world millimetres in
  **RAS+** (NIfTI/nibabel/MONAI convention). DICOM patient coordinates are LPS+: RAS = diag(-1,-1,1) LPS.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert an LPS voxel->world affine to RAS (the same matrix flips both ways)."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


ras_to_lps = lps_to_ras


def spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) along each array axis: the norms of the affine's columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def resized_affine(affine: np.ndarray, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid resampled from ``old_shape`` to ``new_shape`` over the *same physical extent*.

    Pixel-area convention (as ``skimage.transform.resize`` and MONAI ``Resize`` with
    ``align_corners=False``): the outer edges of the field of view stay put, so voxel ``i'`` of the new
    grid sits at old index ``(i' + 0.5) * s - 0.5`` with ``s = old_n / new_n``.
    """
    a = np.asarray(affine, dtype=np.float64)
    nd = len(old_shape)
    s = np.ones(3)
    s[:nd] = np.asarray(old_shape[:3], float) / np.asarray(new_shape[:3], float)
    m = np.eye(4)
    m[:3, :3] = np.diag(s)
    m[:3, 3] = 0.5 * s - 0.5
    return a @ m


def world_corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (RAS mm) of the outer corners of the field of view, (8, 3)."""
    a = np.asarray(affine, dtype=np.float64)
    sh = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    pts = np.array([[i, j, k] for i in (-0.5, sh[0] - 0.5) for j in (-0.5, sh[1] - 0.5) for k in (-0.5, sh[2] - 0.5)])
    return pts @ a[:3, :3].T + a[:3, 3]


def affine_problem(affine: np.ndarray) -> str:
    """Why ``affine`` cannot place voxels in the world, or ``""`` when it can.

    Refused: non-finite entries (NaN/inf), and a singular 3x3 part (a zero-length voxel axis, or two axes
    along the same direction: the voxels would collapse onto a plane or a line).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        return f"the affine has shape {a.shape}, not 4x4"
    if not np.all(np.isfinite(a)):
        return "the affine holds NaN or infinite values"
    norms = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(norms <= 0):
        axes = ", ".join("XYZ"[i] for i in np.flatnonzero(norms <= 0))
        return f"the affine is singular: voxel axis {axes} has zero length"
    if abs(float(np.linalg.det(a[:3, :3] / norms))) < 1e-6:
        return "the affine is singular: two voxel axes point in the same direction"
    return ""


def nearest_index(old_n: int, new_n: int) -> np.ndarray:
    """For each voxel of a resized axis (``new_n`` voxels over the same extent as ``old_n``, pixel-area
    convention as :func:`resized_affine`), the index of the old voxel that contains its centre."""
    idx = np.floor((np.arange(new_n) + 0.5) * (old_n / new_n)).astype(np.int64)
    return np.clip(idx, 0, old_n - 1)


def resize_mask_nearest(mask: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask carried to a resized grid (same extent) by nearest neighbour: an output voxel is set
    when the input voxel containing its centre is set (e.g. NaN voxels of a scan mapped onto an SR grid)."""
    m = np.asarray(mask, dtype=bool)
    if tuple(m.shape) == tuple(new_shape):
        return m.copy()
    return m[np.ix_(*(nearest_index(o, n) for o, n in zip(m.shape, new_shape, strict=True)))]
