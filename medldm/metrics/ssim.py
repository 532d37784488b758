"""Structural similarity (Wang et al. 2004, IEEE TIP 13(4)) for batches of 2D and 3D images."""

from __future__ import annotations

import torch

from medldm.metrics.core import ssim_sums
from medldm.metrics.filters import gaussian_taps, uniform_taps
from medldm.metrics.inputs import prepare
from medldm.metrics.ranges import DataRange


@torch.no_grad()
def ssim(
    pred: object,
    ref: object,
    *,
    data_range: DataRange | None = None,
    mask: object | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    gaussian: bool = True,
    return_map: bool = False,
    dtype: torch.dtype | None = None,
    method: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSIM per item, channels averaged.

    pred, ref: (N, C, H, W) or (N, C, D, H, W) tensors or arrays (any device; computed on ``ref``'s
    device in float32, or float64 when both are float64 or ``dtype=torch.float64``).
    data_range: required — float R, (lo, hi) window or a name in ``WINDOWS`` (see
    ``resolve_range``; windows clip both images to [lo, hi] and shift them by -lo).
    mask: optional bool (N, 1|C, *spatial): the score is the mean of the SSIM map over the masked
    voxels of the valid region (NaN for an item whose mask misses the valid region).
    Window: ``win_size`` taps of a Gaussian with ``sigma`` (or a box when ``gaussian=False``),
    applied without padding; the map covers the valid region, i.e. ``win_size // 2`` voxels
    cropped from every side — identical to ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R)``.
    method: "auto" ("shift" on CPU, "conv" elsewhere), "shift" or "conv" (same numbers).

    Returns (N,) — and the SSIM map (N, C, *valid) too when ``return_map``.
    """
    x, y, m, r = prepare(pred, ref, data_range, mask, dtype)
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    taps = gaussian_taps(win_size, sigma) if gaussian else uniform_taps(win_size)
    flat_mask = None if m is None else m.expand(n, c, *spatial).reshape(n * c, *spatial)
    sums = ssim_sums(
        x.reshape(n * c, *spatial),
        y.reshape(n * c, *spatial),
        taps,
        (k1 * r) ** 2,
        (k2 * r) ** 2,
        mask=flat_mask,
        want_map=return_map,
        method=method,
    )
    score = (sums.ssim / sums.count).view(n, c).mean(1).to(x.dtype)
    if return_map:
        return score, sums.map.view(n, c, *sums.map.shape[1:])
    return score
