"""Posterior mean and per-voxel uncertainty from K independent samples."""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_many(k: int, draw: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Call ``draw(i)`` for i = 0..k-1 (each returns one sample, any shape) and return (mean, std).

    Welford's running update, in float64, so memory stays at three volumes whatever K. ``std`` is the
    unbiased sample standard deviation (zeros when k = 1). The mean of K posterior samples approximates the
    posterior mean (the MMSE estimate: higher PSNR than any one sample); the std shows where samples disagree,
    i.e. where the model may invent detail.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    mean = m2 = None
    dtype = None
    for i in range(k):
        x = draw(i)
        dtype = x.dtype
        xd = x.detach().to(torch.float64)
        if mean is None:
            mean, m2 = xd.clone(), torch.zeros_like(xd)
            continue
        delta = xd - mean
        mean += delta / (i + 1)
        m2 += delta * (xd - mean)
    assert mean is not None and m2 is not None
    std = (m2 / (k - 1)).sqrt() if k > 1 else m2
    return mean.to(dtype), std.to(dtype)
