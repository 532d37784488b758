"""Peak signal-to-noise ratio for batches of 2D and 3D images."""

from __future__ import annotations

import torch

from medldm.metrics.inputs import prepare
from medldm.metrics.ranges import DataRange

_REDUCTIONS = ("none", "mean", "median")


@torch.no_grad()
def psnr(
    pred: object,
    ref: object,
    *,
    data_range: DataRange | None = None,
    mask: object | None = None,
    reduction: str = "none",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PSNR = 10 log10(R^2 / MSE) per item, in dB (+inf where pred == ref).

    pred, ref: (N, C, H, W) or (N, C, D, H, W); MSE over all channels and voxels of an item, or over
    the masked ones (mask: bool (N, 1|C, *spatial); NaN for an empty mask). data_range: required,
    as for ``ssim`` (windows clip both images first). Differences are squared in the compute dtype
    and summed in float64, as skimage.metrics.peak_signal_noise_ratio.
    reduction: "none" -> (N,), "mean" or "median" -> scalar.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} — use one of {_REDUCTIONS}")
    x, y, m, r = prepare(pred, ref, data_range, mask, dtype)
    n = x.shape[0]
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    d = x - y
    d.square_()
    if m is None:
        mse = d.reshape(n, -1).sum(1, dtype=acc) / d[0].numel()
    else:
        mm = m.expand_as(d)
        mse = torch.where(mm, d, 0).reshape(n, -1).sum(1, dtype=acc) / mm.reshape(n, -1).sum(1).to(acc)
    out = (10.0 * torch.log10(r * r / mse)).to(x.dtype)
    if reduction == "mean":
        return out.mean()
    if reduction == "median":
        return out.median()
    return out
