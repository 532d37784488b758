"""The image condition of the latent U-Net (SR and denoising), shared by training and inference.

**Condition** = the degraded image on the high-res grid, rearranged to the latent grid by space-to-depth
(``pixel_unshuffle``): ``(N, 1, *S)`` -> ``(N, f**d, *S/f)``. It is lossless (no encoder pass per batch and no
information thrown away by pooling), so every pixel of the low-res / noisy input reaches the U-Net.

Training makes its degraded pairs in :mod:`medldm.data.condition`; inference
(:mod:`medldm.pipelines.enhance`) lays out its condition with the same :func:`space_to_depth`.
"""

from __future__ import annotations

import torch
from einops import rearrange


def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    """(N, C, *S) -> (N, C * f**d, *S / f); d = 2 or 3. Inverse: :func:`depth_to_space`.

    Channel order is (c, f_1, ..., f_d), the same as ``torch.nn.functional.pixel_unshuffle`` in 2D."""
    s = x.shape[2:]
    if any(v % f for v in s):
        raise ValueError(f"spatial shape {tuple(s)} is not a multiple of {f}")
    if len(s) == 2:
        return rearrange(x, "n c (h a) (w b) -> n (c a b) h w", a=f, b=f)
    return rearrange(x, "n c (h a) (w b) (d e) -> n (c a b e) h w d", a=f, b=f, e=f)


def depth_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`."""
    if x.dim() == 4:
        return rearrange(x, "n (c a b) h w -> n c (h a) (w b)", a=f, b=f)
    return rearrange(x, "n (c a b e) h w d -> n c (h a) (w b) (d e)", a=f, b=f, e=f)
