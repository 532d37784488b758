"""Seeded synthetic degradations of clean scans (docs/degradations.md).

Every function takes an array ``(X, Y)`` or ``(X, Y, Z)`` — numpy, torch, or ``MetaTensor`` — and returns
the same type; a ``MetaTensor`` comes back with its affine updated when the grid changes
(:func:`medldm.io.geometry.resized_affine`: the physical extent is kept). Randomness comes only from the
``seed`` argument (an int, a ``numpy.random.Generator``, or None for fresh entropy): the same seed gives the
same output. ``axis`` is the slice (through-plane) axis; the other two are in-plane.

========== ======================================== ================================================
kind       level                                    model
========== ======================================== ================================================
gaussian   sigma as a fraction of the intensity     ``x + N(0, s^2)``, ``s = level * range``
           range (p99.5 - p0.5 of the volume)
rician     same                                     ``|x + N(0,s^2) + i N(0,s^2)|`` (magnitude MR)
lowdose    dose fraction in (0, 1] (0.25 = quarter) projection-domain extra noise (:mod:`lowdose`)
downsample in-plane factor > 1 (2, 4, or any real)  area (box) average per low-res pixel
thick      slices per thick slice (int >= 2)        mean of ``k`` adjacent slices along ``axis``
========== ======================================== ================================================
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from skimage.transform import resize

from medldm.data.lowdose import I0_FULL, lowdose_noise, lowdose_noise_std
from medldm.io.geometry import resized_affine, spacing_from_affine

Seed = int | np.random.Generator | None
KINDS = ("gaussian", "rician", "lowdose", "downsample", "thick")
RANGE_PERCENTILES = (0.5, 99.5)


def make_rng(seed: Seed) -> np.random.Generator:
    """A numpy Generator from an int seed (or pass a Generator through)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---------------------------------------------------------------- array plumbing
def _to_numpy(img: Any) -> np.ndarray:
    """float32 copy-free view where possible (float64 kept), so large volumes stay affordable."""
    if isinstance(img, torch.Tensor):
        t = img.as_tensor() if hasattr(img, "as_tensor") else img
        a = t.detach().cpu().numpy()
    else:
        a = np.asarray(img)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
    dt = np.float64 if like.dtype == np.float64 else np.float32
    return rng.standard_normal(shape, dtype=dt)


def _affine(img: Any) -> np.ndarray | None:
    aff = getattr(img, "affine", None)
    if aff is None:
        return None
    return np.asarray(aff.detach().cpu().numpy() if isinstance(aff, torch.Tensor) else aff, dtype=np.float64)


def like_image(arr: np.ndarray, img: Any, affine: np.ndarray | None = None) -> Any:
    """Wrap ``arr`` like ``img``: numpy -> float32 numpy; tensor -> float32 tensor on img's device;
    MetaTensor -> MetaTensor with a copy of img's meta (affine and spacing replaced if given)."""
    arr = arr.astype(np.float32)
    if not isinstance(img, torch.Tensor):
        return arr
    t = torch.from_numpy(arr).to(img.device)
    if not hasattr(img, "meta"):
        return t
    meta = copy.deepcopy(dict(img.meta))
    meta.pop("affine", None)
    aff = _affine(img) if affine is None else affine
    if affine is not None:
        meta["spacing"] = spacing_from_affine(affine)
    return MetaTensor(t, affine=torch.as_tensor(aff, dtype=torch.float64), meta=meta)


def _check_axis(ndim: int, axis: int) -> int:
    if ndim not in (2, 3):
        raise ValueError(f"expected an array (X, Y) or (X, Y, Z), got {ndim} dimensions")
    if ndim == 2:
        return -1
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    return axis % 3


def intensity_range(x: np.ndarray, percentiles: tuple[float, float] = RANGE_PERCENTILES) -> float:
    """Reference range for relative noise levels: ``p99.5 - p0.5`` of all finite voxels (the same
    range as the default MR normalization; falls back to max - min, then 1)."""
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    lo, hi = np.percentile(a, percentiles)
    r = float(hi - lo) or float(a.max() - a.min())
    return r if r > 0 else 1.0


# ---------------------------------------------------------------- noise
def _sigma(x: np.ndarray, sigma: float, relative: bool) -> float:
    if not sigma >= 0:
        raise ValueError(f"noise level must be >= 0, got {sigma}")
    return float(sigma) * (intensity_range(x) if relative else 1.0)


def gaussian_noise(img: Any, sigma: float, seed: Seed = None, *, relative: bool = True) -> Any:
    """Additive white Gaussian noise, std ``sigma`` x intensity range (or absolute: ``relative=False``)."""
    x = _to_numpy(img)
    s = _sigma(x, sigma, relative)
    y = x + s * _normal(make_rng(seed), x.shape, x)
    return like_image(y, img)


def rician_noise(img: Any, sigma: float, seed: Seed = None, *, relative: bool = True) -> Any:
    """Rician noise of magnitude MR: ``sqrt((x + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, s^2)`` i.i.d.,
    ``s = sigma`` x intensity range (or absolute). Needs non-negative ``x`` (a magnitude image)."""
    x = _to_numpy(img)
    s = _sigma(x, sigma, relative)
    if x.size and x.min() < -1e-6 * intensity_range(x):
        raise ValueError("Rician noise needs a non-negative magnitude image (MR); this one has negative values")
    rng = make_rng(seed)
    n1 = _normal(rng, x.shape, x)
    n2 = _normal(rng, x.shape, x)
    y = np.hypot(np.maximum(x, 0) + s * n1, s * n2)
    return like_image(y, img)


# ---------------------------------------------------------------- resampling
def area_weights(old_n: int, new_n: int) -> np.ndarray:
    """(new_n, old_n) matrix averaging old pixels over each new pixel's extent (same field of view):
    new pixel ``i'`` covers old coordinates ``[i' s, (i'+1) s)``, ``s = old_n / new_n``; rows sum to 1.
    For an integer factor this is the plain block mean."""
    s = old_n / new_n
    lo = np.arange(new_n)[:, None] * s
    hi = lo + s
    edges = np.arange(old_n)[None, :]
    overlap = np.clip(np.minimum(hi, edges + 1) - np.maximum(lo, edges), 0.0, None)
    return overlap / s


def _apply_along(x: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.tensordot(w, np.moveaxis(x, axis, 0), axes=(1, 0)), 0, axis)


def _new_n(n: int, factor: float) -> int:
    return max(1, int(round(n / factor)))


def _restore(y: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    return resize(y, shape, order=order, mode="edge", anti_aliasing=False, preserve_range=True)


_ORDERS = {"linear": 1, "cubic": 3}


def _order(restore: str | None) -> int | None:
    if restore is None:
        return None
    if restore not in _ORDERS:
        raise ValueError(f"restore must be None, 'linear' or 'cubic', got {restore!r}")
    return _ORDERS[restore]


def downsample(img: Any, factor: float, *, axis: int = 2, method: str = "area",
               restore: str | None = None) -> Any:
    """In-plane down-sampling by ``factor`` (the two axes other than ``axis``; both axes of a 2D array).

    New in-plane size ``round(n / factor)``, same physical extent (spacing ``n / new_n`` x old; exactly
    ``factor`` x when it divides ``n``). ``method="area"``: each low-res pixel is the mean of the
    high-res area it covers (a larger detector element / voxel); ``"gaussian"``: ``skimage.transform.
    resize(order=1, anti_aliasing=True)``. ``restore="linear"|"cubic"`` re-samples the result back to the
    original grid (for models that enhance on the original grid)."""
    if not factor > 1:
        raise ValueError(f"down-sampling factor must be > 1, got {factor}")
    x = _to_numpy(img)
    ax = _check_axis(x.ndim, axis)
    axes = [a for a in range(x.ndim) if a != ax]
    new_shape = list(x.shape)
    for a in axes:
        new_shape[a] = _new_n(x.shape[a], factor)
    order = _order(restore)
    if method == "area":
        y = x
        for a in axes:
            y = _apply_along(y, area_weights(x.shape[a], new_shape[a]), a)
    elif method == "gaussian":
        y = resize(x, new_shape, order=1, mode="reflect", anti_aliasing=True, preserve_range=True)
    else:
        raise ValueError(f"unknown down-sampling method {method!r}; use 'area' or 'gaussian'")
    return _finish_resample(img, x, y, order)


def thick_slices(img: Any, k: int, *, axis: int = 2, restore: str | None = None) -> Any:
    """Thick slices: the mean of ``k`` adjacent slices along ``axis`` (new spacing ``k`` x dz, same
    extent). When ``k`` does not divide the slice count, ``round(n / k)`` slabs share the extent and
    straddle slice borders (area weights). ``restore`` as in :func:`downsample`."""
    if int(k) != k or k < 2:
        raise ValueError(f"thick-slice factor must be an integer >= 2, got {k}")
    x = _to_numpy(img)
    if x.ndim != 3:
        raise ValueError(f"thick slices need a 3D volume (X, Y, Z), got shape {x.shape}")
    ax = _check_axis(x.ndim, axis)
    n = x.shape[ax]
    if n < k:
        raise ValueError(f"thick slices of {k} need at least {k} slices along axis {ax}, got {n}")
    y = _apply_along(x, area_weights(n, _new_n(n, k)), ax)
    return _finish_resample(img, x, y, _order(restore))


def _finish_resample(img: Any, x: np.ndarray, y: np.ndarray, order: int | None) -> Any:
    aff = _affine(img)
    if order is not None:
        return like_image(_restore(y, x.shape, order), img)
    new_aff = None
    if aff is not None:
        s3 = lambda s: tuple(s) + (1,) * (3 - len(s))  # noqa: E731
        new_aff = resized_affine(aff, s3(x.shape), s3(y.shape))
    return like_image(y, img, new_aff)


# ---------------------------------------------------------------- low-dose CT
def _pixel_mm(img: Any, ax: int, ndim: int, spacing: tuple[float, ...] | None) -> float:
    if spacing is None:
        aff = _affine(img)
        if aff is None:
            raise ValueError("low-dose simulation needs the pixel size: pass spacing=(dx, dy[, dz]) for a bare array")
        spacing = spacing_from_affine(aff)
    sp = [float(v) for v in spacing][:max(ndim, 2)]
    inplane = [sp[a] for a in range(len(sp)) if a != ax][:2]
    if abs(inplane[0] - inplane[1]) > 0.01 * max(inplane):
        raise ValueError(f"low-dose simulation needs square pixels, got {inplane[0]:.4g} x {inplane[1]:.4g} mm")
    return float(np.sqrt(inplane[0] * inplane[1]))


def lowdose_ct(img: Any, dose: float, seed: Seed = None, *, axis: int = 2, spacing: tuple[float, ...] | None = None,
               batch: int = 8, device: str | torch.device | None = None, outside_fov_hu: float = -1500.0,
               **model: Any) -> Any:
    """Low-dose CT at dose fraction ``dose`` (HU in, HU out), slice by slice across ``axis``.

    Adds the extra noise of the reduced dose (:func:`medldm.data.lowdose.lowdose_noise`; ``model``
    passes ``i0``, ``n_views``, ``mu_water``, ``electronic_noise``, ``coarse``). ``spacing`` is needed for bare
    arrays; ``device`` (default: the input's, CPU for numpy) runs the projector, e.g. on a GPU. Pixels
    below ``outside_fov_hu`` (padding outside the reconstructed field, e.g. -2000 or -3024) are air in the
    projections and stay unchanged."""
    x = _to_numpy(img)
    ax = _check_axis(x.ndim, axis)
    px = _pixel_mm(img, ax, x.ndim, spacing)
    rng = make_rng(seed)
    dev = torch.device(device) if device is not None else (img.device if isinstance(img, torch.Tensor) else "cpu")
    slices = x[None] if x.ndim == 2 else np.moveaxis(x, ax, 0)
    out = np.empty_like(slices)
    for s0 in range(0, slices.shape[0], batch):
        hu = torch.from_numpy(np.ascontiguousarray(slices[s0:s0 + batch], dtype=np.float32)).to(dev)
        noise = lowdose_noise(hu, px, dose, rng, **model)
        part = slices[s0:s0 + batch]
        out[s0:s0 + batch] = np.where(part < outside_fov_hu, part, part + noise.cpu().numpy())
    y = out[0] if x.ndim == 2 else np.moveaxis(out, 0, ax)
    return like_image(y, img)


def calibrate_i0(img: Any, full_dose_noise: float, *, axis: int = 2, spacing: tuple[float, ...] | None = None,
                 i0: float | None = None, **model: Any) -> float:
    """Full-dose ``I0`` for which the model's predicted full-dose noise (rms over soft tissue, -200..200 HU,
    of the middle slice) equals ``full_dose_noise`` HU, e.g. the std measured in a uniform region of the
    scan. Uses ``noise ~ 1/sqrt(I0)`` (exact without electronic noise, which is ignored here)."""
    if not full_dose_noise > 0:
        raise ValueError(f"full-dose noise must be > 0 HU, got {full_dose_noise}")
    x = _to_numpy(img)
    ax = _check_axis(x.ndim, axis)
    px = _pixel_mm(img, ax, x.ndim, spacing)
    sl = x if x.ndim == 2 else np.take(x, x.shape[ax] // 2, axis=ax)
    tissue = (sl > -200) & (sl < 200)
    if tissue.sum() < 100:
        raise ValueError("cannot calibrate the dose model: the middle slice has no soft tissue (-200..200 HU)")
    ref = float(i0 or I0_FULL)
    model = {k: v for k, v in model.items() if k in ("n_views", "mu_water", "coarse")}
    std = lowdose_noise_std(torch.from_numpy(np.ascontiguousarray(sl, dtype=np.float32))[None], px, 0.5, i0=ref,
                            **model)[0].numpy()
    rms = float(np.sqrt(np.mean(std[tissue].astype(np.float64) ** 2)))
    return ref * (rms / float(full_dose_noise)) ** 2


# ---------------------------------------------------------------- one entry point
def looks_like_hu(x: np.ndarray) -> bool:
    """Heuristic for scans without a modality tag: CT in HU has air (<= -700 HU) in the field of view."""
    return bool(x.size) and float(np.percentile(x, 1.0)) <= -700.0


def check_ct(img: Any) -> None:
    """Raise ``ValueError`` unless ``img`` is CT in HU (meta modality CT, or untagged with HU-like values)."""
    modality = str((getattr(img, "meta", None) or {}).get("modality", "unknown") or "unknown").upper()
    if modality == "CT":
        return
    if modality in ("UNKNOWN", "") and looks_like_hu(_to_numpy(img)):
        return
    what = f"modality {modality}" if modality not in ("UNKNOWN", "") else "no CT-like HU values (no air below -700)"
    raise ValueError(f"lowdose needs CT in Hounsfield units, this scan has {what}")


def check_level(kind: str, level: float) -> None:
    """Raise ``ValueError`` (naming what the level means) unless ``level`` suits ``kind``."""
    ok = {"gaussian": level >= 0, "rician": level >= 0, "lowdose": 0 < level <= 1,
          "downsample": level > 1, "thick": level >= 2 and float(level).is_integer()}
    if kind not in ok:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {', '.join(KINDS)}")
    if not ok[kind]:
        need = {"gaussian": ">= 0 (sigma as a fraction of the intensity range)", "rician": ">= 0 (sigma fraction)",
                "lowdose": "in (0, 1] (dose fraction)", "downsample": "> 1 (in-plane factor)",
                "thick": "an integer >= 2 (slices per thick slice)"}[kind]
        raise ValueError(f"level for {kind} must be {need}, got {level:g}")


def apply_degradation(img: Any, kind: str, level: float, seed: int | None = None, *, axis: int = 2,
                      **opts: Any) -> Any:
    """Apply degradation ``kind`` at ``level`` (see the module table) and record it.

    A ``MetaTensor`` result gets ``meta["degradation"] = {"kind", "level", "seed", "axis", "options",
    ...}`` (plus ``"sigma"`` and ``"intensity_range"`` for noise; ``"i0"`` for lowdose calibrated with the
    option ``full_dose_noise=HU``, see :func:`calibrate_i0`). Noise keeps ``meta["original_dtype"]``
    (the writers fall back to float32 when the values no longer fit it); down-sampled and thick-slice
    results become ``"float32"`` so their averages are stored exactly."""
    level = float(level)
    check_level(kind, level)
    seed_rec = seed if seed is None or isinstance(seed, (int, np.integer)) else "numpy Generator"
    record: dict[str, Any] = {"kind": kind, "level": level, "seed": seed_rec, "axis": axis,
                              "options": {k: v for k, v in opts.items() if k not in ("device",)}}
    if kind in ("gaussian", "rician"):
        rel = opts.pop("relative", True)
        x = _to_numpy(img)
        record["intensity_range"] = intensity_range(x) if rel else None
        record["sigma"] = _sigma(x, level, rel)
        fn = gaussian_noise if kind == "gaussian" else rician_noise
        out = fn(img, record["sigma"], seed, relative=False)
    elif kind == "lowdose":
        check_ct(img)
        target = opts.pop("full_dose_noise", None)
        if target is not None:
            opts["i0"] = calibrate_i0(img, target, axis=axis, **opts)
            record["i0"] = opts["i0"]
        out = lowdose_ct(img, level, seed, axis=axis, **opts)
    elif kind == "downsample":
        out = downsample(img, level, axis=axis, **opts)
    else:
        out = thick_slices(img, int(level), axis=axis, **opts)
    if hasattr(out, "meta"):
        out.meta["degradation"] = record
        if kind in ("downsample", "thick"):  # averages of integers: keep them exact on disk
            out.meta["original_dtype"] = "float32"
    return out

