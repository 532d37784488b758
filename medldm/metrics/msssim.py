"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) for batches of 2D and 3D images.

Conventions (identical to ``pytorch_msssim.ms_ssim``, the de-facto reference):

* weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` — one scale per weight;
* at every scale the SSIM / contrast-structure maps use the same Gaussian window as ``ssim``,
  without padding, averaged over the valid region;
* between scales both images are averaged over 2x2 (2x2x2 in 3D) blocks with stride 2; an odd axis
  is zero-padded by one voxel on both sides with the zeros counted (``avg_pool(padding=s % 2)``);
* MS-SSIM = prod_{s<L} relu(cs_s)^w_s * relu(ssim_L)^w_L per channel, then averaged over channels;
* every spatial axis must exceed ``(win_size - 1) * 2**(L - 1)`` (160 voxels for the defaults);
* with a ``mask``, every scale's contrast-structure / SSIM map is averaged over the masked voxels of its
  valid region; the mask goes down the scales with the same 2x2(x2) average pooling as the images and
  keeps the voxels that are at least half inside (``pooled >= 0.5``). An item whose mask misses the valid
  region of some scale gets NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medldm.metrics.core import ssim_sums
from medldm.metrics.filters import gaussian_taps
from medldm.metrics.inputs import prepare
from medldm.metrics.ranges import DataRange

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@torch.no_grad()
def ms_ssim(
    pred: object,
    ref: object,
    *,
    data_range: DataRange | None = None,
    mask: object | None = None,
    weights: Sequence[float] | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    dtype: torch.dtype | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """MS-SSIM per item, channels averaged: pred, ref (N, C, H, W) or (N, C, D, H, W) -> (N,).

    data_range as for ``ssim``; mask: optional bool (N, 1|C, *spatial), see the module docstring;
    ``weights`` (default ``MS_SSIM_WEIGHTS``) sets the number of scales.
    """
    x, y, m, r = prepare(pred, ref, data_range, mask, dtype)
    w = tuple(MS_SSIM_WEIGHTS if weights is None else weights)
    if len(w) < 1:
        raise ValueError("weights must hold one weight per scale")
    n, c = x.shape[:2]
    nd = x.ndim - 2
    need = (win_size - 1) * 2 ** (len(w) - 1)
    if min(x.shape[2:]) <= need:
        raise ValueError(
            f"MS-SSIM with {len(w)} scales and win_size={win_size} needs every spatial axis > {need} voxels, "
            f"got {tuple(x.shape[2:])} — use fewer weights (scales) or plain ssim"
        )
    taps = gaussian_taps(win_size, sigma)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    spatial = x.shape[2:]
    x = x.reshape(n * c, 1, *spatial)
    y = y.reshape(n * c, 1, *spatial)
    mk = None if m is None else m.expand(n, c, *spatial).reshape(n * c, 1, *spatial)
    factors = []
    for level in range(len(w)):
        sums = ssim_sums(x[:, 0], y[:, 0], taps, c1, c2, mask=None if mk is None else mk[:, 0], want_cs=True,
                         method=method)
        if level < len(w) - 1:
            factors.append(torch.relu(sums.cs / sums.count))
            padding = [s % 2 for s in x.shape[2:]]
            x = pool(x, kernel_size=2, padding=padding)
            y = pool(y, kernel_size=2, padding=padding)
            if mk is not None:
                mk = pool(mk.to(x.dtype), kernel_size=2, padding=padding) >= 0.5
        else:
            factors.append(torch.relu(sums.ssim / sums.count))
    stacked = torch.stack(factors)  # (L, N*C)
    wt = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).view(-1, 1)
    return torch.prod(stacked**wt, dim=0).view(n, c).mean(1).to(x.dtype)
