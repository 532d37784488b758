"""Classical baselines: denoising (Gaussian, non-local means, BM3D) and super-resolution by
interpolation (nearest, linear, Keys bicubic, cubic B-spline). Definitions: docs/evaluation.md.

Arrays are ``(X, Y, Z)`` in scanner units; "2D" processing works slice by slice on the in-plane
``(X, Y)`` planes (axis 2), "3D" on the whole volume. The ``*_scan`` functions take and return a
``MetaTensor`` and keep its meta; super-resolution returns the affine of the finer grid over the
same physical extent (``medldm.io.geometry.resized_affine``).

Denoising works on intensities normalized linearly to [0, 1] by the volume's min and max (exactly
inverted afterwards), so the NLM/BM3D parameters below are scale-free:

* ``gaussian``: ``scipy.ndimage.gaussian_filter`` with standard deviation ``filter_sigma`` voxels
  (default 1.0) along X and Y (2D) or X, Y, Z (3D), ``mode="nearest"``.
* ``nlm``: ``skimage.restoration.denoise_nl_means(patch_size=5, patch_distance=6,
  fast_mode=True, sigma=σ, h=0.8·σ)`` — the starting point scikit-image's documentation recommends
  for ``fast_mode=True`` when ``sigma`` is given. σ = noise standard deviation (see
  :func:`medldm.data.noise.estimate_noise_sigma`: median over the non-constant slices) unless given.
* ``bm3d``: ``bm3d.bm3d(slice, sigma_psd=σ)`` per slice (2D only) from the optional ``bm3d``
  package (``pip install 'medldm[bm3d]'``).
* ``bm4d``: ``bm4d.bm4d(volume, sigma_psd=σ)`` on the whole volume (3D only; ``medldm[bm3d]``).
* ``ants``: ANTs ``DenoiseImage`` (adaptive non-local means, Manjón et al. 2010; ``pip install
  'medldm[ants]'``) on the whole volume, noise model ``Rician`` or ``Gaussian`` after ``noise``, patch radius
  ``ANTS_PATCH_RADIUS``, search radius ``ANTS_SEARCH_RADIUS``, no shrinking. It estimates the noise locally and
  takes no σ. It runs on the volume scaled to [0, ``ANTS_SCALE``]: see ``ANTS_SCALE``.
* ``nlm-dipy``: dipy's ``nlmeans(volume, σ, rician=noise == "rician")`` (blockwise NLM of Coupé et al. 2008,
  with its own Rician correction); blind σ from dipy's ``estimate_sigma`` (``N=1`` for Rician, 0 otherwise).

``noise`` says what the noise is: ``gaussian`` (zero mean; default) or ``rician`` (magnitude MR). For Rician
noise the volume is scaled by its maximum only (0 stays 0: negative voxels are refused), ``bm3d``, ``bm4d`` and
``nlm`` — which assume zero-mean noise — are followed by the exact inverse of the Rician mean
(:func:`medldm.data.noise.rician_unbias`, Koay & Basser 2006), and the blind σ is the one the enhancer uses for
magnitude scans: the larger of the wavelet estimate and the background's Rayleigh mode. ``sigma`` given = every
method told the true level (except ``ants``, which takes none); ``sigma=None`` = every method blind.

Non-finite voxels (NaN, ±inf) never spread: they are left out of the min/max and of the noise estimate,
replaced by their nearest finite neighbour (``medldm.data.intensity.fill_nonfinite``) for the filter or
the interpolation, and are NaN in the output (super-resolution: every output voxel whose centre lies in
such a voxel). ``info["nonfinite_voxels"]`` counts them. An image with no finite voxel is refused.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
from scipy.ndimage import gaussian_filter, zoom
from skimage.restoration import denoise_nl_means

from medldm.data.degrade import like_image
from medldm.data.intensity import clamp_physical, fill_nonfinite
from medldm.data.noise import estimate_noise_sigma, rayleigh_background_sigma, rician_unbias
from medldm.data.resample import KEYS_A, cubic_convolution_resize, keys_kernel  # noqa: F401 (re-exported)
from medldm.io.errors import CaseError
from medldm.io.geometry import resize_mask_nearest, resized_affine

DENOISE_METHODS = ("gaussian", "nlm", "bm3d", "bm4d", "ants", "nlm-dipy")
NOISE_KINDS = ("gaussian", "rician")
THREE_D_ONLY = ("bm4d", "ants", "nlm-dipy")
SR_METHODS = ("nearest", "linear", "bicubic", "bspline")
SPLINE_ORDER = {"nearest": 0, "linear": 1, "bspline": 3}
NLM_PATCH_SIZE = 5
NLM_PATCH_DISTANCE = 6
NLM_H_FACTOR = 0.8
ANTS_PATCH_RADIUS, ANTS_SEARCH_RADIUS = 1, 2  # DenoiseImage's defaults (3x3x3 patches, 5x5x5 search)
ANTS_SCALE = 1.0


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message says how to install it."""


# --------------------------------------------------------------------------------------- denoising
def _normalize(vol: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(np.min(vol)), float(np.max(vol))
    scale = hi - lo if hi > lo else 1.0
    return (vol.astype(np.float64) - lo) / scale, lo, scale


def _per_slice(fn, vol: np.ndarray) -> np.ndarray:
    return np.stack([fn(vol[:, :, k]) for k in range(vol.shape[2])], axis=2)


def require_bm3d():
    return require_extra("bm3d")


def require_extra(method: str):
    """The optional module behind ``method`` (bm3d, bm4d, ants), or MissingExtraError saying how to install it."""
    module, extra = {"bm3d": ("bm3d", "bm3d"), "bm4d": ("bm4d", "bm3d"), "ants": ("ants", "ants")}[method]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"the {method} baseline needs the optional {module!r} package — install it with "
                                f"pip install 'medldm[{extra}]'") from e


def denoise(
    vol: np.ndarray,
    method: str,
    *,
    sigma: float | None = None,
    filter_sigma: float = 1.0,
    dims: int = 2,
    noise: str = "gaussian",
) -> tuple[np.ndarray, dict]:
    """Denoise ``vol`` (X, Y, Z) -> ``(denoised float32 (X, Y, Z), info)``.

    ``sigma``: noise standard deviation in the units of ``vol`` (estimated when None; ``ants`` takes none);
    ``filter_sigma``: Gaussian width in voxels for ``gaussian``; ``dims``: 2 (slice by slice) or 3 (whole
    volume; ``bm3d`` is 2D only, ``bm4d``/``ants``/``nlm-dipy`` 3D only); ``noise``: ``gaussian`` or ``rician``
    (module docstring). ``info`` records the parameters actually used.
    """
    if method not in DENOISE_METHODS:
        raise ValueError(f"unknown denoising method {method!r}; choose one of {DENOISE_METHODS}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    if dims not in (2, 3):
        raise ValueError("dims must be 2 (slice by slice) or 3 (whole volume)")
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) array, got shape {vol.shape}")
    if method in THREE_D_ONLY:
        dims = 3
    elif dims == 3 and vol.shape[2] == 1:
        dims = 2
    if method == "bm3d" and dims == 3:
        raise ValueError("bm3d runs slice by slice only: use dims=2 (or bm4d for the volume)")
    bad = _nonfinite(vol)
    if bad is not None:
        vol = fill_nonfinite(vol, bad)
    if noise == "rician":
        if np.min(vol) < 0:
            raise ValueError("Rician noise is for magnitude images: this one has negative voxels (use noise gaussian)")
        hi = float(np.max(vol))
        x, lo, scale = vol.astype(np.float64) / (hi or 1.0), 0.0, hi or 1.0
    else:
        x, lo, scale = _normalize(vol)
    info: dict = {"method": method, "dims": dims, "noise": noise, "normalization": {"offset": lo, "scale": scale},
                  "nonfinite_voxels": 0 if bad is None else int(bad.sum())}
    if method == "gaussian":
        s = (filter_sigma, filter_sigma, filter_sigma if dims == 3 else 0.0)
        y = gaussian_filter(x, sigma=s, mode="nearest")
        info["filter_sigma_voxels"] = filter_sigma
    elif method == "ants":
        y = _ants(x, noise, info)
    else:
        sig_n = sigma / scale if sigma is not None else _blind_sigma(x, method, noise, dims, bad)
        info["noise_sigma"] = sig_n * scale
        info["noise_sigma_source"] = "given" if sigma is not None else (
            "dipy estimate_sigma" if method == "nlm-dipy" else "estimate_sigma" + (
                " / background Rayleigh mode" if noise == "rician" else ""))
        if sig_n <= 0:
            y = x.copy()
            info["note"] = "noise sigma is 0: image returned unchanged"
        else:
            y = _filter_sigma(x, method, sig_n, dims, noise, info, scale)
            if noise == "rician" and method in ("nlm", "bm3d", "bm4d"):
                y = rician_unbias(y, sig_n)
                info["rician_bias_correction"] = "exact inverse of the Rician mean (Koay & Basser 2006)"
    if noise == "rician":
        y = np.maximum(y, 0.0)  # magnitude: never negative
    out = (y * scale + lo).astype(np.float32)
    if bad is not None:
        out[bad] = np.nan
    return out, info


def _blind_sigma(x: np.ndarray, method: str, noise: str, dims: int, bad) -> float:
    """The noise level each method estimates itself when not told (module docstring)."""
    if method == "nlm-dipy":
        from dipy.denoise.noise_estimate import estimate_sigma as dipy_sigma

        return float(np.asarray(dipy_sigma(x, N=1 if noise == "rician" else 0)).ravel()[0])
    est = estimate_noise_sigma(x, dims=dims, exclude=bad)
    return max(est, rayleigh_background_sigma(x)) if noise == "rician" else est


def _filter_sigma(x: np.ndarray, method: str, sig_n: float, dims: int, noise: str, info: dict,
                  scale: float) -> np.ndarray:
    """``nlm``, ``bm3d``, ``bm4d`` or ``nlm-dipy`` on ``x`` (scaled) with noise level ``sig_n`` (scaled)."""
    if method == "nlm":
        kw = {"patch_size": NLM_PATCH_SIZE, "patch_distance": NLM_PATCH_DISTANCE,
              "h": NLM_H_FACTOR * sig_n, "sigma": sig_n, "fast_mode": True,
              "channel_axis": None, "preserve_range": True}
        info["nlm"] = {k: v for k, v in kw.items() if k not in ("channel_axis", "preserve_range")}
        info["nlm"]["h"] = kw["h"] * scale  # report h in scanner units
        info["nlm"]["sigma"] = sig_n * scale
        return denoise_nl_means(x, **kw) if dims == 3 else _per_slice(lambda s: denoise_nl_means(s, **kw), x)
    if method == "nlm-dipy":
        from dipy.denoise.nlmeans import nlmeans

        info["nlm_dipy"] = {"rician": noise == "rician", "patch_radius": 1, "block_radius": 5}
        return np.asarray(nlmeans(x, sig_n, rician=noise == "rician", patch_radius=1, block_radius=5,
                                  num_threads=1), dtype=np.float64)
    if method == "bm4d":
        return np.asarray(require_extra("bm4d").bm4d(x, sigma_psd=sig_n), dtype=np.float64).reshape(x.shape)
    bm3d = require_extra("bm3d")
    return _per_slice(lambda s: np.asarray(bm3d.bm3d(s, sigma_psd=sig_n), dtype=np.float64), x)


def _ants(x: np.ndarray, noise: str, info: dict) -> np.ndarray:
    """ANTs DenoiseImage on ``x`` (scaled); see ``ANTS_SCALE`` for the intensity range it is given."""
    ants = require_extra("ants")
    model = "Rician" if noise == "rician" else "Gaussian"
    info["ants"] = {"noise_model": model, "patch_radius": ANTS_PATCH_RADIUS, "search_radius": ANTS_SEARCH_RADIUS,
                    "shrink_factor": 1, "intensity_scale": ANTS_SCALE}
    img = ants.from_numpy(np.ascontiguousarray(x * ANTS_SCALE, dtype=np.float32))
    out = ants.denoise_image(img, shrink_factor=1, p=ANTS_PATCH_RADIUS, r=ANTS_SEARCH_RADIUS, noise_model=model)
    return np.asarray(out.numpy(), dtype=np.float64) / ANTS_SCALE


def _nonfinite(vol: np.ndarray) -> np.ndarray | None:
    """Mask of the non-finite voxels (None when there are none); ValueError when no voxel is finite."""
    bad = ~np.isfinite(vol)
    if not bad.any():
        return None
    if bad.all():
        raise ValueError("every voxel is NaN or infinite: nothing to process")
    return bad


# ---------------------------------------------------------------------------------- interpolation
def sr_factors(scale: float, axis: str, ndim: int = 3) -> tuple[float, float, float]:
    """Per-axis zoom factors: ``inplane`` -> (s, s, 1), ``through`` -> (1, 1, s)."""
    if axis == "inplane":
        return (scale, scale, 1.0)
    if axis == "through":
        return (1.0, 1.0, scale)
    raise ValueError(f"axis must be 'inplane' or 'through', got {axis!r}")


def upsample(vol: np.ndarray, scale: float, method: str, axis: str = "inplane") -> np.ndarray:
    """Up-sample ``vol`` (X, Y, Z) by ``scale`` in-plane (X, Y) or through-plane (Z) -> float32.

    New size per zoomed axis: ``round(n · scale)``. ``nearest``/``linear``/``bspline`` are
    ``scipy.ndimage.zoom(order=0/1/3, grid_mode=True, mode="nearest")`` (``bspline`` = interpolating
    cubic B-spline, i.e. spline prefiltering on: what scikit-image calls order 3 / "bicubic");
    ``bicubic`` is Keys cubic convolution with a = -0.5 (:func:`cubic_convolution_resize`).
    """
    if method not in SR_METHODS:
        raise ValueError(f"unknown super-resolution method {method!r}; choose one of {SR_METHODS}")
    if not (math.isfinite(scale) and scale >= 1):
        raise ValueError(f"scale must be a number >= 1, got {scale}")
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) array, got shape {vol.shape}")
    factors = sr_factors(scale, axis)
    if axis == "through" and vol.shape[2] < 2:
        raise ValueError("through-plane up-sampling needs a volume with more than one slice")
    new_shape = tuple(max(1, int(round(n * f))) for n, f in zip(vol.shape, factors, strict=True))
    bad = _nonfinite(vol)
    if bad is not None:
        vol = fill_nonfinite(vol, bad)
    if method == "bicubic":
        out = cubic_convolution_resize(vol, new_shape)
    else:
        zf = [m / n for m, n in zip(new_shape, vol.shape, strict=True)]
        out = zoom(vol.astype(np.float64), zf, order=SPLINE_ORDER[method], mode="nearest", grid_mode=True)
    out = np.asarray(out, dtype=np.float32)
    if bad is not None:
        out[resize_mask_nearest(bad, out.shape)] = np.nan
    return out


# ------------------------------------------------------------------------------------ MetaTensor API
def _scan_error(img, e: ValueError):
    src = (getattr(img, "meta", None) or {}).get("filename_or_obj") or "<image>"
    return CaseError(src, str(e), "check the scan (see `medldm info`)")


def _note_nonfinite(out, n_bad: int, what: str) -> None:
    if n_bad and hasattr(out, "meta"):
        out.meta["warnings"] = [*out.meta.get("warnings", []),
                                f"{n_bad} NaN/infinite input voxel(s): filled with their nearest finite neighbour "
                                f"for the {what}, NaN in the output"]


def _clamped(arr: np.ndarray, img, info: dict) -> np.ndarray:
    """The filter's output clamped to the input modality's physical range, as every enhancer's
    (:func:`medldm.data.intensity.clamp_physical`: magnitude images >= 0, CT >= -1024 HU)."""
    src = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float64)
    finite = src[np.isfinite(src)]
    if not finite.size:
        return arr
    modality = (getattr(img, "meta", None) or {}).get("modality")
    out, info["floor"], info["clamped_voxels"] = clamp_physical(arr, modality, float(finite.min()))
    return out


def denoise_scan(img, method: str, **kwargs):
    """:func:`denoise` on a MetaTensor (X, Y, Z); returns ``(MetaTensor, info)`` on the same grid.
    An image without finite voxels raises :class:`~medldm.io.errors.CaseError`."""
    try:
        arr, info = denoise(np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img), method,
                            **kwargs)
    except ValueError as e:
        if "NaN" not in str(e):
            raise
        raise _scan_error(img, e) from None
    out = like_image(_clamped(arr, img, info), img)
    _note_nonfinite(out, info["nonfinite_voxels"], "filter")
    return out, info


def upsample_scan(img, scale: float, method: str, axis: str = "inplane"):
    """:func:`upsample` on a MetaTensor (X, Y, Z); returns a MetaTensor on the finer grid whose
    affine keeps the physical extent (spacing divided by the actual size ratio)."""
    src = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)
    try:
        arr = upsample(src, scale, method, axis)
    except ValueError as e:
        if "NaN" not in str(e):
            raise
        raise _scan_error(img, e) from None
    aff = resized_affine(np.asarray(img.affine, dtype=np.float64), src.shape, arr.shape)
    out = like_image(_clamped(arr, img, {}), img, aff)
    n_bad = int(src.size - np.count_nonzero(np.isfinite(src)))
    _note_nonfinite(out, n_bad, "interpolation")
    if hasattr(out, "meta"):
        out.meta["nonfinite_voxels"] = n_bad
    return out
