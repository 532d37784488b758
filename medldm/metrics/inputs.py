"""Input checks shared by the metrics: tensors/arrays -> plain torch tensors of one dtype/device."""

from __future__ import annotations

import numpy as np
import torch

from medldm.metrics.ranges import DataRange, apply_window, resolve_range


def as_tensor(x: object) -> torch.Tensor:
    """Plain ``torch.Tensor`` view of a tensor (MetaTensor included) or array-like (numpy is copied
    zero-copy where it can)."""
    if isinstance(x, torch.Tensor):
        return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


def compute_dtype(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """float64 when asked (``dtype``) or when both inputs are float64, else float32."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype} — metrics compute in torch.float32 or torch.float64")
        return dtype
    return torch.float64 if a.dtype == torch.float64 and b.dtype == torch.float64 else torch.float32


def prepare(
    pred: object,
    ref: object,
    data_range: DataRange | None,
    mask: object | None,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Check and convert a pair (+ mask) and apply the range convention.

    Returns ``(x, y, m, R)``: ``x``, ``y`` of shape (N, C, *spatial) with 2 or 3 spatial dims, in the
    compute dtype on ``ref``'s device, clipped and shifted when ``data_range`` is a window; ``m`` a
    bool mask of shape (N, 1|C, *spatial) or None.
    """
    lo, hi, r = resolve_range(data_range)
    x, y = as_tensor(pred), as_tensor(ref)
    if x.shape != y.shape:
        raise ValueError(
            f"pred {tuple(x.shape)} and ref {tuple(y.shape)} differ in shape — pass matching pairs"
        )
    if x.ndim not in (4, 5):
        raise ValueError(
            f"images of shape {tuple(x.shape)}: expected (N, C, H, W) or (N, C, D, H, W) — "
            "add batch and channel dims, e.g. img[None, None]"
        )
    if x.is_complex() or y.is_complex():
        raise TypeError("complex images are not supported — pass magnitudes")
    dt = compute_dtype(x, y, dtype)
    dev = y.device
    x = apply_window(x.to(dev, dt), lo, hi)
    y = apply_window(y.to(dev, dt), lo, hi)
    m = None
    if mask is not None:
        m = as_tensor(mask).to(dev)
        n, c = x.shape[:2]
        if m.ndim != x.ndim or m.shape[0] != n or m.shape[1] not in (1, c) or m.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"mask of shape {tuple(m.shape)} does not fit images {tuple(x.shape)} — "
                "expected (N, 1 or C, *spatial)"
            )
        m = m.bool()
    return x, y, m, r
