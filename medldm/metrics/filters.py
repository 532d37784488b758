"""Separable 'valid' filtering of a batch of 2D/3D images (no padding: output shrinks by k-1 per axis).

Two interchangeable implementations of the same sum ``out[i] = sum_j w[j] x[i + j]`` along each
spatial axis:

* ``"shift"``: a weighted sum of shifted views, accumulated in place (k multiply-adds per axis).
  Memory-bound and cache-friendly when called on small chunks: the fast path on CPU.
* ``"conv"``: ``conv2d``/``conv3d`` with a (k,1), (1,k) / (k,1,1), ... kernel per axis, one input
  channel and the batch in the batch dim: the fast path on GPUs (cuDNN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def gaussian_taps(win_size: int, sigma: float) -> list[float]:
    """Normalised 1D Gaussian ``exp(-t^2 / (2 sigma^2))`` at ``t = -(k//2) .. k//2`` (as scipy.ndimage,
    pytorch-msssim and MONAI)."""
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size={win_size} must be a positive odd integer")
    if not sigma > 0:
        raise ValueError(f"sigma={sigma} must be > 0")
    half = win_size // 2
    w = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-half, half + 1)]
    s = math.fsum(w)
    return [v / s for v in w]


def uniform_taps(win_size: int) -> list[float]:
    """Box filter of ``win_size`` taps (skimage's ``gaussian_weights=False``)."""
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size={win_size} must be a positive odd integer")
    return [1.0 / win_size] * win_size


def _axis_shift(x: torch.Tensor, taps: list[float], axis: int) -> torch.Tensor:
    # In-place multiply-adds of shifted views (measured faster on CPU than pairing symmetric taps
    # through a temporary, and than mkldnn convolutions with one input channel).
    k = len(taps)
    n = x.shape[axis] - k + 1
    out = torch.mul(x.narrow(axis, 0, n), taps[0])
    for i in range(1, k):
        out.add_(x.narrow(axis, i, n), alpha=taps[i])
    return out


@contextmanager
def exact_fp32_conv(device: torch.device) -> Iterator[None]:
    """Keep cuDNN from running float32 convolutions in TF32 (its default on Ampere and later): with
    a 10-bit mantissa, ``E[x^2] - E[x]^2`` loses the variance and SSIM is off by ~1e-3."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:  # older torch
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


def _filter_conv(x: torch.Tensor, taps: list[float], nd: int) -> torch.Tensor:
    conv = F.conv2d if nd == 2 else F.conv3d
    w = torch.tensor(taps, dtype=x.dtype, device=x.device)
    y = x.reshape(-1, 1, *x.shape[-nd:])
    with exact_fp32_conv(x.device):
        for a in range(nd):
            shape = [1, 1] + [1] * nd
            shape[2 + a] = len(taps)
            y = conv(y, w.view(shape))
    return y.reshape(*x.shape[:-nd], *y.shape[-nd:])


def filter_valid(x: torch.Tensor, taps: list[float], nd: int, method: str = "shift") -> torch.Tensor:
    """Filter the last ``nd`` axes of ``x`` (..., *spatial) with ``taps`` along each, 'valid' mode.

    Returns (..., *[s - k + 1 for s in spatial]); equals scipy.ndimage.correlate1d applied per axis
    and cropped by ``k // 2`` on every side.
    """
    k = len(taps)
    if any(s < k for s in x.shape[-nd:]):
        raise ValueError(f"spatial size {tuple(x.shape[-nd:])} is smaller than the {k}-tap window")
    if method == "conv":
        return _filter_conv(x, taps, nd)
    if method != "shift":
        raise ValueError(f"method={method!r} — use 'shift' or 'conv'")
    for a in range(x.ndim - nd, x.ndim):
        x = _axis_shift(x, taps, a)
    return x
