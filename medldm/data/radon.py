"""Parallel-beam projector and filtered back-projection in torch (CPU or GPU, batched over slices).

Geometry (pixel units): a square ``(N, N)`` slice with pixel centres at ``c - (N-1)/2``; ``n_det =
ceil(sqrt(2) N) | 1`` detector bins of one pixel width centred on the rotation axis, so the whole square
is covered (like ``skimage.transform.radon(circle=False)``); view angles uniform over [0, pi). A ray
at angle ``theta`` and detector offset ``t`` passes through ``(u, v) = (t cos - s sin, t sin + s cos)``
(``u`` along the last array axis), sampled every pixel in ``s`` with bilinear interpolation.

FBP uses the band-limited ramp filter of Kak & Slaney (1988, eq. 61), zero-padded as in
``skimage.transform.iradon``, and linear interpolation in the back-projection, scaled by ``pi / n_views``,
so ``fbp(radon(f)) ~= f`` (see tests/test_degrade.py).
"""

from __future__ import annotations

import math

import torch


def n_detectors(n: int) -> int:
    """Number of detector bins for an ``n x n`` slice (odd, covers the diagonal)."""
    d = math.ceil(math.sqrt(2.0) * n)
    return d if d % 2 else d + 1


def default_views(n: int) -> int:
    """Views per half rotation: ``ceil(pi/2 * n_det)`` (angular sampling matching the detector's)."""
    return math.ceil(math.pi / 2 * n_detectors(n))


def view_angles(n_views: int, device=None) -> torch.Tensor:
    """Angles (rad, float64) uniform over [0, pi)."""
    return torch.arange(n_views, dtype=torch.float64, device=device) * (math.pi / n_views)


def _chunk(n_points_per_view: int, batch: int, budget: int = 2**23) -> int:
    return max(1, budget // max(1, n_points_per_view * batch))


def radon(img: torch.Tensor, n_views: int) -> torch.Tensor:
    """Line integrals (pixel units) of ``img`` (B, N, N) -> sinogram (B, n_views, n_det)."""
    b, n, n2 = img.shape
    if n != n2:
        raise ValueError(f"radon needs square slices, got {n}x{n2}")
    nd = n_detectors(n)
    dev, dt = img.device, img.dtype
    half = (n - 1) / 2.0
    t = torch.arange(nd, device=dev, dtype=torch.float64) - (nd - 1) / 2.0
    theta = view_angles(n_views, dev)
    out = torch.empty(b, n_views, nd, device=dev, dtype=dt)
    x = img.unsqueeze(1)  # (B, 1, N, N)
    step = _chunk(nd * nd, b)
    for a0 in range(0, n_views, step):
        th = theta[a0:a0 + step]
        c, s = th.cos()[:, None, None], th.sin()[:, None, None]
        tt, ss = t[None, :, None], t[None, None, :]  # detector offset, position along the ray
        u = (tt * c - ss * s) / half if half > 0 else torch.zeros_like(tt * c - ss * s)
        v = (tt * s + ss * c) / half if half > 0 else torch.zeros_like(u)
        grid = torch.stack([u, v], dim=-1).to(dt)  # (V, nd, nd, 2): (x=last axis, y=rows)
        va = grid.shape[0]
        g = grid.reshape(1, va * nd, nd, 2).expand(b, -1, -1, -1)
        samp = torch.nn.functional.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        out[:, a0:a0 + va] = samp.reshape(b, va, nd, nd).sum(-1)
    return out


def ramp_filter(n_det: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """Frequency response (rfft layout) of the Kak-Slaney band-limited ramp, padded length
    ``max(64, 2**ceil(log2(2 n_det)))``; ~ |nu| in cycles/bin."""
    size = max(64, 1 << math.ceil(math.log2(2 * n_det)))
    k = torch.cat([torch.arange(1, size // 2 + 1, 2), torch.arange(size // 2 - 1, 0, -2)]).to(torch.float64)
    h = torch.zeros(size, dtype=torch.float64)
    h[0] = 0.25
    h[1::2] = -1.0 / (math.pi * k) ** 2
    return torch.fft.rfft(h).real.to(device=device, dtype=dtype)


def fbp(sino: torch.Tensor, n: int) -> torch.Tensor:
    """Filtered back-projection of a sinogram (B, n_views, n_det) onto an ``n x n`` grid -> (B, n, n)."""
    b, nv, nd = sino.shape
    dev, dt = sino.device, sino.dtype
    filt = ramp_filter(nd, dev, torch.float64)
    size = 2 * (filt.shape[0] - 1)
    q = torch.fft.irfft(torch.fft.rfft(sino.to(torch.float64), n=size, dim=-1) * filt, n=size, dim=-1)[..., :nd]
    q = q.to(dt)
    scale = (nd - 1) / 2.0
    coord = (torch.arange(n, device=dev, dtype=torch.float64) - (n - 1) / 2.0) / scale
    vv, uu = (c.reshape(1, -1).to(dt) for c in torch.meshgrid(coord, coord, indexing="ij"))  # rows, columns
    theta = view_angles(nv, dev)
    cos, sin = theta.cos().to(dt)[:, None], theta.sin().to(dt)[:, None]
    zero = torch.zeros(1, 1, device=dev, dtype=dt)
    out = torch.zeros(b, n * n, device=dev, dtype=dt)
    step = _chunk(n * n, b, budget=2**22)
    for a0 in range(0, nv, step):
        pos = uu * cos[a0:a0 + step] + vv * sin[a0:a0 + step]  # (Va, N*N), normalized detector coord
        va = pos.shape[0]
        grid = torch.stack([pos, zero.expand_as(pos)], dim=-1)[:, None]  # (Va, 1, N*N, 2)
        grid = grid.repeat(b, 1, 1, 1) if b > 1 else grid
        rows = q[:, a0:a0 + va].reshape(b * va, 1, 1, nd)  # each view a 1-row image
        samp = torch.nn.functional.grid_sample(rows, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out += samp.reshape(b, va, n * n).sum(1)
    return (out * (math.pi / nv)).reshape(b, n, n)
