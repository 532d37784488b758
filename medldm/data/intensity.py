"""Intensity normalization for the models, with an exact inverse back to scanner units.

Every model in medldm sees intensities in the **model range [-1, 1]** (``out_range``). The map is
linear, ``y = (x - lo) / (hi - lo) * (out_hi - out_lo) + out_lo``, and is described by a small
JSON-serializable dict (``params``) that travels in ``img.meta["normalization"]`` and in model folders:

* CT (``method="window"``): ``[lo, hi]`` is an HU window, by name (:data:`CT_WINDOWS`, default ``"full"``
  = [-1024, 3071]) or given as ``window=(lo, hi)``.
* MR and anything else (``method="percentile"``): ``[lo, hi]`` are the ``p_lo``/``p_hi`` percentiles
  (default 0.5 / 99.5) of the whole volume, or of its foreground (``foreground=True``: voxels above the
  volume minimum, i.e. the zero background of a masked MR is left out; a constant image, which has no
  foreground, uses all its voxels). NaN and infinite voxels never enter the statistics.

Clipping (``clip=True``) saturates ``y`` to ``out_range``; it is off by default so that
``denormalize(normalize(x))`` is exact for every voxel. With ``clip=True`` the inverse is exact for voxels
inside ``[lo, hi]`` and returns ``lo``/``hi`` for the others. "Exact" means: bit-identical after the
restore to an integer ``original_dtype`` (round + clip to the dtype's range); within a few float ulps for
float data. Everything works on numpy arrays and torch tensors (``MetaTensor`` included) of any shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

#: Named CT windows ``(lo, hi)`` in HU (level/width in the comment).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "full": (-1024.0, 3071.0),  # the 12-bit HU range of most scanners
    "brain": (0.0, 80.0),  # L40 W80
    "subdural": (-100.0, 300.0),  # L100 W400
    "soft-tissue": (-160.0, 240.0),  # L40 W400
    "lung": (-1350.0, 150.0),  # L-600 W1500
    "bone": (-450.0, 1050.0),  # L300 W1500
}
MODEL_RANGE: tuple[float, float] = (-1.0, 1.0)
PARAMS_VERSION = 1

Array = np.ndarray | torch.Tensor


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor
        return t.detach().cpu().numpy()
    return np.asarray(x)


def _meta(x: Any) -> dict:
    return dict(getattr(x, "meta", {}) or {})


def nonfinite_mask(x: Any) -> np.ndarray:
    """Boolean array: True where ``x`` (array, tensor or MetaTensor) is NaN or infinite."""
    return ~np.isfinite(_as_numpy(x))


def fill_nonfinite(x: Any, mask: np.ndarray | None = None) -> np.ndarray:
    """A float32 copy of ``x`` with every non-finite voxel (or every voxel of ``mask``) replaced by the value
    of its nearest finite voxel (Euclidean distance in index space, ``scipy.ndimage.distance_transform_edt``).

    A neutral stand-in for networks and filters: it adds no new intensity and no edge, and a few filled voxels
    cannot move intensity statistics. Raises ``ValueError`` when no voxel is finite."""
    a = np.array(_as_numpy(x), dtype=np.float32)
    bad = nonfinite_mask(a) if mask is None else np.asarray(mask, dtype=bool)
    if not bad.any():
        return a
    if bad.all():
        raise ValueError("every voxel is NaN or infinite: no finite value to fill with")
    idx = distance_transform_edt(bad, return_distances=False, return_indices=True)
    return a[tuple(idx)]


#: the lowest value a CT holds: air (lower stored values are padding outside the field of view)
CT_AIR_HU = -1024.0


def physical_floor(modality: str | None, input_min: float) -> float | None:
    """The lowest value an enhanced image may hold, from the input's modality and its smallest finite value:

    * CT (Hounsfield units): -1024 HU (air), or the input's minimum when it stores lower values (padding);
    * anything else whose input has no negative value (a magnitude MR image, a PET or an X-ray): 0;
    * anything else with negative values (MR phase, real-valued or already filtered data): no floor (None).

    Models and filters overshoot below it near edges and in dark background (a denoised magnitude MR had 40-50 %
    of its voxels below 0 without it); every enhancer and baseline clamps its output with :func:`clamp_physical`."""
    if str(modality or "").upper() == "CT":
        return min(CT_AIR_HU, float(input_min))
    return 0.0 if float(input_min) >= 0 else None


def clamp_physical(out, modality: str | None, input_min: float):
    """``out`` (tensor or array; NaN stays NaN) clamped from below to :func:`physical_floor`; returns
    ``(clamped, floor, number of voxels raised)``."""
    floor = physical_floor(modality, input_min)
    if floor is None:
        return out, None, 0
    low = out < floor  # False for NaN
    n = int(low.sum())
    if n:
        out = out.clone() if hasattr(out, "clone") else np.array(out, copy=True)
        out[low] = floor
    return out, floor, n


def fit_normalization(
    img: Any,
    modality: str | None = None,
    *,
    method: str | None = None,
    window: str | tuple[float, float] = "full",
    percentiles: tuple[float, float] = (0.5, 99.5),
    foreground: bool = False,
    out_range: tuple[float, float] = MODEL_RANGE,
    clip: bool = False,
    original_dtype: str | None = None,
) -> dict:
    """Fit normalization parameters for ``img`` (array, tensor or MetaTensor, any shape).

    ``modality`` defaults to ``img.meta["modality"]``; CT uses an HU window, anything else percentiles
    (override with ``method="window"|"percentile"``). ``original_dtype`` defaults to
    ``img.meta["original_dtype"]``, then to the array's dtype. Returns a JSON-serializable dict.
    """
    meta = _meta(img)
    modality = str(modality or meta.get("modality") or "unknown").upper()
    if method is None:
        method = "window" if modality == "CT" else "percentile"
    if original_dtype is None:
        original_dtype = meta.get("original_dtype") or str(_as_numpy(img).dtype)
    original_dtype = str(np.dtype(original_dtype))
    params: dict[str, Any] = {"version": PARAMS_VERSION, "modality": modality, "method": method}
    if method == "window":
        if isinstance(window, str):
            if window not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {window!r}; choose one of {sorted(CT_WINDOWS)} or give (lo, hi)")
            params["window"] = window
            lo, hi = CT_WINDOWS[window]
        else:
            lo, hi = (float(v) for v in window)
            params["window"] = "custom"
    elif method == "percentile":
        a = _as_numpy(img).astype(np.float64, copy=False).ravel()
        a = a[np.isfinite(a)]
        if foreground and a.size:
            fg = a[a > a.min()]
            a = fg if fg.size else a  # constant image: no foreground, all voxels used
        if a.size == 0:
            raise ValueError("cannot fit percentile normalization: no (foreground) voxels")
        lo, hi = (float(v) for v in np.percentile(a, percentiles))
        if hi <= lo:  # constant image: fall back to the full data range, then to a unit range
            lo, hi = float(a.min()), float(a.max())
            hi = hi if hi > lo else lo + 1.0
        params["percentiles"] = [float(percentiles[0]), float(percentiles[1])]
        params["foreground"] = bool(foreground)
    else:
        raise ValueError(f"unknown normalization method {method!r}; use 'window' or 'percentile'")
    if not hi > lo:
        raise ValueError(f"normalization range must have hi > lo, got [{lo}, {hi}]")
    params.update({"lo": float(lo), "hi": float(hi), "out_range": [float(out_range[0]), float(out_range[1])],
                   "clip": bool(clip), "original_dtype": original_dtype})
    return params


def magnitude_scan(params: dict) -> bool:
    """True when normalization ``params`` are of a percentile-normalized scan that had no negative values (magnitude
    MR: Rician noise). The lower percentile as fitted (``lo_fit``) decides: a denoiser moves ``lo`` up on scans with
    zero-mean noise (``medldm.pipelines.enhance.Enhancer._fit_normalization``), which can make it non-negative."""
    return params.get("method") == "percentile" and float(params.get("lo_fit", params.get("lo", 0.0))) >= 0


def _scale(params: dict) -> tuple[float, float, float, float]:
    lo, hi = float(params["lo"]), float(params["hi"])
    olo, ohi = (float(v) for v in params["out_range"])
    return lo, hi, olo, ohi


def normalize(x: Array, params: dict) -> Array:
    """Scanner units -> model range. numpy in: float32 numpy out; tensor in: float tensor out (same
    device; float64 kept, other dtypes -> float32). Any shape. Meta of a MetaTensor is kept."""
    lo, hi, olo, ohi = _scale(params)
    k = (ohi - olo) / (hi - lo)
    if isinstance(x, torch.Tensor):
        xf = x if x.dtype == torch.float64 else x.to(torch.float32)
        y = (xf - lo) * k + olo
        return y.clamp(olo, ohi) if params.get("clip") else y
    y = (np.asarray(x, dtype=np.float64) - lo) * k + olo
    if params.get("clip"):
        np.clip(y, olo, ohi, out=y)
    return y.astype(np.float32)


def _torch_dtype(name: str) -> torch.dtype | None:
    return getattr(torch, str(np.dtype(name)), None)


def denormalize(y: Array, params: dict, to_original_dtype: bool = True) -> Array:
    """Model range -> scanner units (exact inverse of :func:`normalize`).

    With ``to_original_dtype`` the values are restored to ``params["original_dtype"]``: integers are
    rounded and clipped to the dtype's range. numpy in -> numpy array of that dtype; tensor in -> tensor
    of that dtype when torch has it (else float32 holding the rounded values). Without it: float32
    (float64 tensors stay float64)."""
    lo, hi, olo, ohi = _scale(params)
    k = (hi - lo) / (ohi - olo)
    dt = np.dtype(params.get("original_dtype", "float32"))
    if isinstance(y, torch.Tensor):
        yf = y if y.dtype == torch.float64 else y.to(torch.float32)
        x = (yf - olo) * k + lo
        if not to_original_dtype:
            return x
        if dt.kind in "iub":
            info = np.iinfo(dt) if dt.kind != "b" else None
            x = x.round()
            if info is not None:
                x = x.clamp(float(info.min), float(info.max))
        tdt = _torch_dtype(dt.name)
        if tdt is None:
            return x
        try:
            return x.to(tdt)
        except (RuntimeError, TypeError):  # e.g. unsigned dtypes without full torch support
            return x
    x = (np.asarray(y, dtype=np.float64) - olo) * k + lo
    if not to_original_dtype:
        return x.astype(np.float32)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        x = np.clip(np.rint(x), info.min, info.max)
    elif dt.kind == "b":
        x = np.rint(x)
    return x.astype(dt)


def normalize_image(img: Any, params: dict | None = None, **fit_opts: Any) -> Any:
    """Normalize a (Meta)Tensor/array and record ``params`` in ``meta["normalization"]`` when it has meta.

    ``params`` is fitted with :func:`fit_normalization` (``fit_opts``) when not given."""
    params = params if params is not None else fit_normalization(img, **fit_opts)
    y = normalize(img, params)
    if hasattr(y, "meta"):
        y.meta["normalization"] = params
    return y
