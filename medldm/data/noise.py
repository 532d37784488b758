"""Noise level of a scan: the one estimator behind the denoiser's noise-level input, the classical baselines and
``medldm plan``'s dataset fingerprint.

``skimage.restoration.estimate_sigma`` (the wavelet MAD estimator of Donoho & Johnstone 1994) per 2D slice, and
the median over the chosen slices: robust to the anatomy (the finest diagonal wavelet band is mostly noise) and to
a few odd slices. For magnitude MR (Rician noise) it reads LOW where much of the slice is background: there the
noise is Rayleigh-distributed with a std of 0.655 sigma. Measured on dipy's S0_10slices brain (73 % background,
tests/test_noise_estimate.py): Rician sigma 2 / 5 / 10 % of the range -> estimates 1.7 / 3.8 / 7.1 % (Gaussian:
2.3 / 5.3 / 10.2 %). So for magnitude scans the Enhancer also reads the background's Rayleigh mode
(:func:`rayleigh_background_sigma`) and takes the larger of the two; `medldm enhance --noise-level` overrides
both. Slices are chosen as follows:

* along ``axis``, within ``span`` (a fraction range of the slices, e.g. (0.2, 0.8) to stay clear of the often
  empty ends of a head volume);
* constant slices (blank padding, all-zero ends) are left out: their estimate is 0 and would pull the median down;
* slices touching ``exclude`` (e.g. filled-in non-finite voxels) are left out unless every slice touches it;
* at most ``max_slices`` of the rest, spread evenly (None: all);
* slices narrower than ``min_side`` voxels in-plane have no usable wavelet detail (none left: 0.0).

``dims=3`` asks for one 3D estimate of the whole volume instead (``estimate_sigma`` on the volume).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import i0e, i1e
from skimage.restoration import estimate_sigma


def estimate_noise_sigma(vol, *, axis: int = 2, max_slices: int | None = None, span: tuple[float, float] = (0.0, 1.0),
                         min_side: int = 2, exclude: np.ndarray | None = None, dims: int = 2) -> float:
    """Noise standard deviation of ``vol`` (X, Y, Z; numpy or torch), in its units. See the module docstring."""
    arr = vol.detach().cpu().numpy() if hasattr(vol, "detach") else vol
    arr = np.moveaxis(np.nan_to_num(np.asarray(arr, dtype=np.float64)), axis, -1)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if min(arr.shape[:2]) < min_side:
        return 0.0
    if dims == 3 and arr.shape[2] > 1:
        return float(estimate_sigma(arr, channel_axis=None))
    z = arr.shape[2]
    lo, hi = int(np.floor(span[0] * z)), max(int(np.ceil(span[1] * z)), int(np.floor(span[0] * z)) + 1)
    ks = [k for k in range(lo, min(hi, z)) if np.ptp(arr[:, :, k]) > 0]
    if exclude is not None and np.any(exclude):
        bad = np.moveaxis(np.asarray(exclude, bool), axis, -1).reshape(-1, z).any(axis=0) if np.ndim(exclude) == 3 \
            else np.zeros(z, bool)
        ks = [k for k in ks if not bad[k]] or ks
    if max_slices is not None and len(ks) > max_slices:
        ks = [ks[i] for i in np.linspace(0, len(ks) - 1, max_slices).round().astype(int)]
    est = [float(estimate_sigma(arr[:, :, k], channel_axis=None)) for k in ks]
    return float(np.median(est)) if est else 0.0


def rayleigh_background_sigma(vol, *, min_voxels: int = 1000, exclude: np.ndarray | None = None) -> float:
    """Noise sigma of a magnitude (Rician) image from its background: there the magnitude of complex Gaussian
    noise is Rayleigh-distributed, and the mode of a Rayleigh distribution is sigma. Background = voxels below
    max(10 % of the 99.5th percentile, 5 x the wavelet estimate); the mode is the peak of their lightly smoothed
    histogram (200 bins). Non-finite voxels and ``exclude`` (a mask of ``vol``'s shape) are left out. Returns 0.0 for images with negative values (not magnitude data), for fewer than
    ``min_voxels`` background voxels, and when the peak is at zero (a zero-filled background: no noise to read).

    Measured on the demo's held-out brain, abdomen and shoulder with Rician noise of 2 / 5 / 10 % of the range:
    0.021-0.023 / 0.053-0.056 / 0.109-0.119 (the wavelet estimate: 0.016-0.020 / 0.038-0.042 / 0.072-0.077)."""
    arr = np.asarray(vol.detach().cpu().numpy() if hasattr(vol, "detach") else vol, dtype=np.float64)
    skip = ~np.isfinite(arr) if exclude is None else (~np.isfinite(arr) | np.asarray(exclude, bool))
    a = arr[~skip]
    if a.size == 0 or a.min() < 0:
        return 0.0
    thr = max(0.1 * float(np.percentile(a, 99.5)), 5.0 * estimate_noise_sigma(np.where(skip, 0.0, arr), exclude=skip))
    bg = a[a < thr]
    if bg.size < min_voxels or float(bg.max()) <= 0:
        return 0.0
    h, edges = np.histogram(bg, bins=200, range=(0.0, float(bg.max())))
    k = int(np.argmax(gaussian_filter1d(h.astype(np.float64), 2)))
    return 0.0 if k == 0 else float(0.5 * (edges[k] + edges[k + 1]))


RICIAN_MEAN_AT_ZERO = float(np.sqrt(np.pi / 2))  # E[M] / sigma when the true signal is 0
_THETA_MAX = 40.0  # beyond this SNR, E[M] = sigma * sqrt(theta^2 + 1) to better than 1e-4 relative


def rician_mean(a, sigma: float) -> np.ndarray:
    """Mean of the magnitude ``M = |a + n1 + i n2|``, ``n1, n2 ~ N(0, sigma^2)`` (Rician), elementwise:
    ``sigma sqrt(pi/2) L_1/2(-a^2 / (2 sigma^2))`` with the Laguerre polynomial written through the exponentially
    scaled Bessel functions (Koay & Basser 2006, eq. 3): ``(1 + t) i0e(t/2) + t i1e(t/2)``, ``t = a^2 / (2 sigma^2)``."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    if sigma <= 0:
        return a
    t = (a / sigma) ** 2 / 2
    return sigma * RICIAN_MEAN_AT_ZERO * ((1 + t) * i0e(t / 2) + t * i1e(t / 2))


def rician_unbias(m, sigma: float) -> np.ndarray:
    """Exact inverse of the Rician mean (the bias correction for magnitude MR that was filtered as if its noise
    were zero-mean, e.g. by BM3D/BM4D; Koay & Basser 2006, Foi 2011 "exact unbiased inverse" of the mean): the
    signal ``a >= 0`` whose magnitude mean :func:`rician_mean` is ``m``; 0 where ``m <= sigma sqrt(pi/2)`` (below
    the mean of pure noise). Elementwise, monotone, by interpolation on a dense SNR table (error < 1e-6 sigma)."""
    m = np.asarray(m, dtype=np.float64)
    if sigma <= 0:
        return np.maximum(m, 0.0)
    theta = np.concatenate([np.linspace(0.0, 4.0, 4001), np.linspace(4.0, _THETA_MAX, 3601)[1:]])
    r_tab = rician_mean(theta, 1.0)
    r = m / sigma
    out = np.interp(r, r_tab, theta, left=0.0)
    high = r > r_tab[-1]
    out[high] = np.sqrt(r[high] ** 2 - 1.0)
    return out * sigma
