"""SSIM machinery on flat batches: (B, *spatial) pairs -> per-row sums of the SSIM (and cs) maps.

The five local statistics of SSIM only enter as ``mu_x``, ``mu_y``, ``var_x + var_y`` and ``cov``,
so four filtered channels suffice: ``x, y, x^2 + y^2, x*y`` (stacked, filtered in one pass).
Images are centred by a per-row constant first (exact: variances are shift-invariant and the
means are shifted back), which keeps float32 accurate for large offsets such as HU.

Work is split into chunks of rows (and, for large volumes, slabs along the first spatial axis with
a k-1 halo) so that the intermediates stay in cache on CPU and memory stays bounded on GPU.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from medldm.metrics.filters import filter_valid

CPU_CHUNK = 1 << 17  # voxels per chunk on CPU (measured best: 2 images of 256^2, statistics stay in cache)
DEV_CHUNK = 1 << 24  # voxels per chunk on accelerators
SLAB = 1 << 21  # rows larger than this (or than the chunk on accelerators) are cut into slabs
WORKER_MEMORY = 2 << 30  # bytes of intermediates that parallel CPU workers may hold together


@dataclass
class SSIMSums:
    """Per-row sums over the (masked) valid region: ``ssim`` (B,), ``count`` (B,), ``cs`` (B,) or
    None, and the full ``map`` (B, *valid) when asked."""

    ssim: torch.Tensor
    count: torch.Tensor
    cs: torch.Tensor | None
    map: torch.Tensor | None


def pick_method(device: torch.device, method: str) -> str:
    if method == "auto":
        return "shift" if device.type == "cpu" else "conv"
    if method not in ("shift", "conv"):
        raise ValueError(f"method={method!r} — use 'auto', 'shift' or 'conv'")
    return method


def _pieces(b: int, spatial: tuple[int, ...], k: int, chunk: int, slab: int):
    """Yield (row0, row1, out0, out1): rows of the batch and an output range along axis 0.

    Rows of more than ``slab`` voxels are cut into slabs of about ``slab`` voxels (at least
    ``4 (k - 1)`` output planes, so the k-1 halo costs at most 25 % extra work)."""
    vox = math.prod(spatial)
    n0 = spatial[0] - k + 1
    if vox <= slab or n0 <= 1:
        step = max(1, chunk // vox)
        for r in range(0, b, step):
            yield r, min(b, r + step), 0, n0
        return
    plane = vox // spatial[0]
    so = max(4 * (k - 1), slab // plane - (k - 1), 1)
    for r in range(b):
        for a in range(0, n0, so):
            yield r, r + 1, a, min(n0, a + so)


def ssim_maps(
    x: torch.Tensor, y: torch.Tensor, taps: list[float], c1: float, c2: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps of a chunk: x, y (b, *spatial) -> two (b, *valid)."""
    nd = x.ndim - 1
    b = x.shape[0]
    c = y.reshape(b, -1).mean(1).view(b, *([1] * nd))
    s = torch.empty((b, 4, *x.shape[1:]), dtype=x.dtype, device=x.device)
    xc, yc = s[:, 0], s[:, 1]
    torch.sub(x, c, out=xc)
    torch.sub(y, c, out=yc)
    torch.mul(xc, xc, out=s[:, 2]).addcmul_(yc, yc)
    torch.mul(xc, yc, out=s[:, 3])
    f = filter_valid(s, taps, nd, method)
    mx, my, sq, xy = f.unbind(1)
    den = sq.addcmul_(mx, mx, value=-1.0).addcmul_(my, my, value=-1.0).add_(c2)  # var_x + var_y + C2
    cs = xy.addcmul_(mx, my, value=-1.0).mul_(2.0).add_(c2).div_(den)  # (2 cov + C2) / (...)
    mx.add_(c)
    my.add_(c)
    lum = torch.mul(mx, my).mul_(2.0).add_(c1)
    lum.div_(mx.square_().addcmul_(my, my).add_(c1))
    return lum.mul_(cs), cs


def ssim_sums(
    x: torch.Tensor,
    y: torch.Tensor,
    taps: list[float],
    c1: float,
    c2: float,
    *,
    mask: torch.Tensor | None = None,
    want_cs: bool = False,
    want_map: bool = False,
    method: str = "auto",
    chunk: int | None = None,
) -> SSIMSums:
    """Sums of the SSIM (and contrast-structure) maps per row over the valid region, restricted to
    ``mask`` when given.

    x, y: (B, *spatial) float; mask: (B, *spatial) bool or None. The valid region drops
    ``k // 2`` voxels on every side (skimage's crop); the mask is cropped the same way.
    """
    k = len(taps)
    pad = k // 2
    b, spatial = x.shape[0], tuple(x.shape[1:])
    nd = len(spatial)
    valid = tuple(s - k + 1 for s in spatial)
    if any(v < 1 for v in valid):
        raise ValueError(
            f"spatial size {spatial} is smaller than the {k}-voxel SSIM window — use a smaller win_size"
        )
    method = pick_method(x.device, method)
    on_cpu = x.device.type == "cpu"
    chunk = chunk or (CPU_CHUNK if on_cpu else DEV_CHUNK)
    slab = SLAB if on_cpu else max(chunk, SLAB)
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    full = torch.empty((b, *valid), dtype=x.dtype, device=x.device) if want_map else None

    def one(piece: tuple[int, int, int, int]):
        r0, r1, a0, a1 = piece
        xs = x[r0:r1].narrow(1, a0, a1 - a0 + k - 1)
        ys = y[r0:r1].narrow(1, a0, a1 - a0 + k - 1)
        smap, csmap = ssim_maps(xs, ys, taps, c1, c2, method)
        if full is not None:
            full[r0:r1].narrow(1, a0, a1 - a0).copy_(smap)
        n = None
        if mask is not None:
            mv = mask[r0:r1].narrow(1, a0 + pad, a1 - a0)
            for ax in range(2, nd + 1):
                mv = mv.narrow(ax, pad, valid[ax - 1])
            smap = torch.where(mv, smap, 0)
            if want_cs:
                csmap = torch.where(mv, csmap, 0)
            n = mv.reshape(r1 - r0, -1).sum(1)
        cs = csmap.reshape(r1 - r0, -1).sum(1) if want_cs else None
        return r0, r1, smap.reshape(r1 - r0, -1).sum(1), n, cs

    pieces = list(_pieces(b, spatial, k, chunk, slab))
    s_sum = torch.zeros(b, dtype=acc, device=x.device)
    cs_sum = torch.zeros(b, dtype=acc, device=x.device) if want_cs else None
    count = torch.zeros(b, dtype=acc, device=x.device) if mask is not None else None
    plane = math.prod(spatial[1:])
    biggest = max((r1 - r0) * (a1 - a0 + k - 1) * plane for r0, r1, a0, a1 in pieces)
    workers = max(1, WORKER_MEMORY // (12 * x.element_size() * biggest))  # ~12 piece-sized buffers each
    for r0, r1, sm, n, cs in _run(one, pieces, on_cpu, workers):
        s_sum[r0:r1] += sm
        if n is not None:
            count[r0:r1] += n
        if cs is not None:
            cs_sum[r0:r1] += cs
    if count is None:
        count = torch.full((b,), float(math.prod(valid)), dtype=acc, device=x.device)
    return SSIMSums(s_sum, count, cs_sum, full)


def _run(fn, pieces: list, on_cpu: bool, max_workers: int) -> list:
    """Map ``fn`` over the pieces.

    On CPU with torch using T > 1 threads, up to T worker threads (fewer when ``max_workers``, set by
    memory, says so) each run whole pieces single-threaded: the many small ops of a piece would
    otherwise each pay an OpenMP barrier, which collapses throughput on a loaded machine (measured:
    30 vs 160 images/s). Otherwise pieces run in turn with torch's own threading.
    """
    threads = torch.get_num_threads()
    workers = min(threads, len(pieces), max_workers)
    if not on_cpu or workers < 2:
        return [fn(p) for p in pieces]
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as ex:
            return list(ex.map(fn, pieces))
    finally:
        torch.set_num_threads(threads)  # the workers' setting also touches torch's process-wide default
