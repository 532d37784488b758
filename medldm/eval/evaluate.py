"""Per-case metrics of a prediction against its reference: 3D over the volume and 2D per slice.

Images are ``(X, Y, Z)`` tensors in scanner units on the same grid. The intensity convention
(:class:`Convention`) is passed to ``medldm.metrics`` unchanged: a width ``R`` or a ``(lo, hi)``
window (both images clipped to it, ``R = hi - lo``). A case whose 3D volume is too small for a
metric (e.g. MS-SSIM's five scales) gets ``NaN`` and a note; so do slices with an empty mask.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch

import medldm.metrics as M
from medldm.io.errors import CaseError
from medldm.io.geometry import spacing_from_affine, world_corners
from medldm.metrics import resolve_range

METRICS = ("psnr", "ssim", "ms_ssim")
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}
SLICE_CHUNK = 32  # slices per metric call (bounds memory on large volumes)


@dataclass(frozen=True)
class Convention:
    """Intensity range of the metrics: ``R`` alone, or a window ``(lo, hi)`` with ``R = hi - lo``."""

    r: float
    lo: float | None = None
    hi: float | None = None
    name: str | None = None  # window preset name, when one was used

    @property
    def data_range(self) -> float | tuple[float, float]:
        """The value handed to ``medldm.metrics`` as ``data_range``."""
        return self.r if self.lo is None else (self.lo, self.hi)

    @property
    def window(self) -> tuple[float, float] | None:
        return None if self.lo is None else (self.lo, self.hi)

    def text(self) -> str:
        """One line for table captions."""
        if self.lo is None:
            return f"data_range R = {self.r:g} (intensities used as stored, no clipping)"
        name = f" '{self.name}'" if self.name else ""
        return (f"window{name} [{self.lo:g}, {self.hi:g}]: prediction and reference clipped to it, "
                f"data_range R = {self.r:g}")

    def to_json(self) -> dict:
        return {"data_range": self.r, "window": list(self.window) if self.window else None,
                "window_name": self.name, "text": self.text()}


def convention_from(data_range: float | None = None, window: str | tuple[float, float] | None = None) -> Convention:
    """Build a :class:`Convention` through ``medldm.metrics.resolve_range`` (same rules, same errors)."""
    lo, hi, r = resolve_range(data_range=data_range, window=window)
    name = window.strip().lower() if isinstance(window, str) else None
    return Convention(r=float(r), lo=lo, hi=hi, name=name)


def check_grid(ref, other, *, ref_name: str, other_name: str, what: str = "prediction",
               tol_voxel: float = 0.01) -> None:
    """Raise :class:`CaseError` unless ``other`` (X, Y, Z) lies on ``ref``'s grid.

    Same shape, and every corner of the field of view within ``tol_voxel`` × the smallest voxel
    size of the reference (world mm, from the affines).
    """
    if tuple(other.shape) != tuple(ref.shape):
        raise CaseError(other_name, f"{what} grid {tuple(other.shape)} differs from the reference "
                        f"{tuple(ref.shape)} ({ref_name})",
                        f"resample the {what} onto the reference grid (same shape and affine) before evaluating")
    a_ref = np.asarray(ref.affine, dtype=np.float64)
    a_oth = np.asarray(other.affine, dtype=np.float64)
    tol = tol_voxel * min(spacing_from_affine(a_ref))
    dev = float(np.abs(world_corners(a_ref, ref.shape) - world_corners(a_oth, other.shape)).max())
    if dev > tol:
        raise CaseError(other_name, f"{what} affine differs from the reference ({ref_name}): field-of-view "
                        f"corners up to {dev:.3g} mm apart (tolerance {tol:.3g} mm)",
                        f"resample the {what} onto the reference grid, or check its orientation/origin")


def _as_array(img) -> torch.Tensor:
    t = img.as_subclass(torch.Tensor) if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
    return t.detach().to(torch.float32)


def _call(name: str, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor | None, dr) -> tuple[np.ndarray, str]:
    fn = getattr(M, name)
    kwargs = {"data_range": dr}
    if m is not None:
        if "mask" not in inspect.signature(fn).parameters:
            return np.full(x.shape[0], math.nan), f"{name}: no masked form in medldm.metrics — NaN with a mask"
        kwargs["mask"] = m
    try:
        val = fn(x, y, **kwargs)
    except ValueError as e:  # too small for the metric's window/scales
        return np.full(x.shape[0], math.nan), f"{name}: not computed ({e})"
    return val.detach().to(torch.float64).cpu().numpy().reshape(-1), ""


def volume_metrics(pred, ref, mask, conv: Convention) -> tuple[dict[str, float], list[str]]:
    """3D metrics of one case over the whole volume (2D for a single-slice image).

    ``pred``, ``ref`` (X, Y, Z); ``mask`` (X, Y, Z) bool or None. Returns ``({metric: value}, notes)``.
    """
    x, y = _as_array(pred), _as_array(ref)
    m = mask.to(torch.bool) if mask is not None else None
    if x.shape[2] == 1:
        x, y = x[..., 0], y[..., 0]
        m = m[..., 0] if m is not None else None
    x, y = x[None, None], y[None, None]
    m = m[None, None] if m is not None else None
    vals, notes = {}, []
    for name in METRICS:
        v, note = _call(name, x, y, m, conv.data_range)
        vals[name] = float(v[0])
        if note:
            notes.append(note)
    return vals, notes


def slice_metrics(pred, ref, mask, conv: Convention, axis: int = 2) -> tuple[dict[str, np.ndarray], list[str]]:
    """2D metrics of every slice along ``axis`` (0, 1 or 2) -> ``({metric: (S,) array}, notes)``.

    Slices whose mask is empty get NaN.
    """
    x = _as_array(pred).movedim(axis, 0)[:, None]
    y = _as_array(ref).movedim(axis, 0)[:, None]
    m = mask.to(torch.bool).movedim(axis, 0)[:, None] if mask is not None else None
    out = {name: [] for name in METRICS}
    notes: set[str] = set()
    for s0 in range(0, x.shape[0], SLICE_CHUNK):
        sl = slice(s0, s0 + SLICE_CHUNK)
        for name in METRICS:
            v, note = _call(name, x[sl], y[sl], m[sl] if m is not None else None, conv.data_range)
            out[name].append(v)
            if note:
                notes.add(note)
    res = {name: np.concatenate(v) for name, v in out.items()}
    if m is not None:
        empty = ~m.flatten(1).any(dim=1).numpy()
        for v in res.values():
            v[empty] = math.nan
        if empty.any():
            notes.add(f"{int(empty.sum())} slice(s) with an empty mask: NaN")
    return res, sorted(notes)


def nan_mean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries (NaN if none; ``inf`` kept: PSNR of identical slices)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan
