"""Tiled evaluation of latent networks: overlapping windows blended with Gaussian weights (any spatial rank).

At every sampler step the denoiser runs on overlapping latent windows whose outputs are blended before the
solver update (as in MultiDiffusion, Bar-Tal et al. 2023), so all windows follow one shared trajectory and no
seam appears; VAE decoding is tiled the same way (MONAI ``sliding_window_inference``, which also handles the
f-times larger output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference


def needs_tiling(shape: Sequence[int], window: Sequence[int] | None) -> bool:
    """True when any spatial size exceeds the window."""
    return window is not None and any(s > w for s, w in zip(shape, window, strict=True))


def tiled_call(
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    cond: torch.Tensor | None,
    window: Sequence[int] | None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """``fn(x_window, cond_window)`` over overlapping windows of x (N, C, *S) (and cond, same grid), blended.

    Without tiling (window None or covering x) it is ``fn(x, cond)``.
    """
    if not needs_tiling(x.shape[2:], window):
        return fn(x, cond)
    c = x.shape[1]
    inp = x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)
    roi = tuple(min(int(w), int(s)) for w, s in zip(window, x.shape[2:], strict=True))  # type: ignore[arg-type]

    def predictor(w: torch.Tensor) -> torch.Tensor:
        return fn(w[:, :c], None if cond is None else w[:, c:])

    out = sliding_window_inference(
        inp, roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian", padding_mode="replicate"
    )
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    window: Sequence[int] | None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Decode latents z (N, C, *S) to images (N, 1, *S * f) in overlapping latent windows."""
    if not needs_tiling(z.shape[2:], window):
        return decode(z)
    roi = tuple(min(int(w), int(s)) for w, s in zip(window, z.shape[2:], strict=True))  # type: ignore[arg-type]
    out = sliding_window_inference(z, roi, 1, decode, overlap=overlap, mode="gaussian", padding_mode="replicate")
    return out.as_tensor() if hasattr(out, "as_tensor") else out
