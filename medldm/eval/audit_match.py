"""Nearest training neighbour of each query image, tolerant to small shifts and a left-right flip.

For every query (a synthetic or a held-out scan) on the comparison grid (see :mod:`audit_load`):

1. **Candidates.** Zero-mean, unit-norm thumbnails (32 px per axis in 2D, 16 in 3D) give a normalized
   cross-correlation (NCC) with every training image (and with the flipped query when ``flips``); the
   ``candidates`` best training images are kept (all of them when the training set is that small).
2. **Alignment.** For each candidate, the NCC of the query shifted by every integer offset in
   ``[-shift, shift]`` per axis (and flipped along the first, left-right, axis when ``flips``) is
   computed exactly (FFT cross-correlation and window sums; both images cropped to their overlap,
   ``shift`` voxels off every side), then half-voxel steps around the best offset (linear
   interpolation) are tried for the 3 best candidates; the alignment with the highest NCC is kept.
3. **Scores** at that alignment: SSIM (``medldm.metrics.ssim``, data_range 1, Gaussian window 11 / 1.5)
   and NCC (Pearson correlation over the overlap). The nearest neighbour by SSIM and the one by NCC
   are reported separately.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medldm.metrics import ssim

_THUMB = {2: 32, 3: 16}
_EPS = 1e-12


@dataclass
class Match:
    """Nearest neighbour of one query: indices into the reference set, scores, alignment."""

    ssim: float
    ssim_index: int
    ncc: float
    ncc_index: int
    shift: tuple[float, ...]  # query offset (grid voxels, half-voxel steps) at the SSIM neighbour
    flipped: bool  # query flipped left-right at the SSIM neighbour


def _unit(x: torch.Tensor) -> torch.Tensor:
    """(N, V) -> rows with zero mean and unit norm (constant rows stay zero)."""
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)


def thumbnails(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, *grid) -> (N, V) zero-mean unit-norm thumbnails."""
    nd = x.ndim - 2
    size = min(_THUMB[nd], min(x.shape[2:]))
    t = F.adaptive_avg_pool2d(x, size) if nd == 2 else F.adaptive_avg_pool3d(x, size)
    return _unit(t.reshape(len(x), -1).double()).float()


def flip_lr(x: torch.Tensor) -> torch.Tensor:
    """Flip (N, 1, *grid) along the first spatial (left-right after canonical orientation) axis."""
    return torch.flip(x, dims=(2,))


def candidate_indices(queries: torch.Tensor, refs: torch.Tensor, k: int, flips: bool) -> torch.Tensor:
    """(Q, K) indices of the ``k`` references with the highest thumbnail NCC to each query."""
    tr = thumbnails(refs)
    sim = thumbnails(queries) @ tr.T
    if flips:
        sim = torch.maximum(sim, thumbnails(flip_lr(queries)) @ tr.T)
    k = min(k, len(refs))
    return sim.topk(k, dim=1).indices


def _crop_int(x, off: tuple[int, ...], shift: int):
    sl = tuple(slice(shift + o, x.shape[-len(off) + i] - shift + o) for i, o in enumerate(off))
    return x[(Ellipsis, *sl)]


def _crop(x, off: tuple[float, ...], shift: int):
    """Crop (..., *grid) (tensor or array) to the overlap window moved by ``off`` (``shift`` voxels
    margin); a half-voxel offset along an axis averages the two neighbouring windows (linear
    interpolation)."""
    choices = [(int(o),) if float(o).is_integer() else (math.floor(o), math.ceil(o)) for o in off]
    crops = [_crop_int(x, c, shift) for c in itertools.product(*choices)]
    if len(crops) == 1:
        return crops[0]
    return torch.stack(crops).mean(0) if isinstance(x, torch.Tensor) else np.mean(crops, axis=0)


def _ncc(a, b) -> float:
    """Pearson correlation of two equally shaped arrays (numpy: single-threaded, fast for one pair)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / max(_EPS, np.sqrt((a @ a) * (b @ b))))


def _ncc_surface(queries: torch.Tensor, refs: torch.Tensor, cand: torch.Tensor, shift: int,
                 chunk_voxels: int) -> torch.Tensor:
    """Exact NCC for every integer offset in [-shift, shift]^nd (FFT cross-correlation + window sums).

    queries (Q, *grid), refs (R, *grid), cand (Q, K) -> (Q, K, (2*shift+1)^nd) float64; offsets in the
    order of ``itertools.product(range(-shift, shift + 1), repeat=nd)``.
    """
    nd = queries.ndim - 1
    grid = tuple(queries.shape[1:])
    dims = tuple(range(-nd, 0))
    n_win = tuple(g - 2 * shift for g in grid)
    count = float(np.prod(n_win))
    keep = (Ellipsis, *[slice(0, 2 * shift + 1)] * nd)
    q = queries.double()
    box = torch.zeros(grid, dtype=torch.float64)
    box[tuple(slice(0, n) for n in n_win)] = 1.0
    fbox = torch.conj(torch.fft.rfftn(box, dim=dims))
    sq = torch.fft.irfftn(torch.fft.rfftn(q, dim=dims) * fbox, s=grid, dim=dims)[keep]
    sqq = torch.fft.irfftn(torch.fft.rfftn(q * q, dim=dims) * fbox, s=grid, dim=dims)[keep]
    rc = _crop_int(refs.double(), (0,) * nd, shift)  # the reference window never moves
    sr = rc.reshape(len(refs), -1).sum(1)
    srr = (rc.reshape(len(refs), -1) ** 2).sum(1)
    rpad = torch.zeros((len(refs), *grid), dtype=torch.float64)
    rpad[(slice(None), *[slice(0, n) for n in n_win])] = rc
    fr = torch.conj(torch.fft.rfftn(rpad, dim=dims))
    fq = torch.fft.rfftn(q, dim=dims)
    q_n, k = cand.shape
    out = torch.empty((q_n, k, (2 * shift + 1) ** nd), dtype=torch.float64)
    step = max(1, chunk_voxels // max(1, int(np.prod(grid)) * k))
    for a in range(0, q_n, step):
        b = min(q_n, a + step)
        c = torch.fft.irfftn(fq[a:b, None] * fr[cand[a:b]], s=grid, dim=dims)[keep]  # (q, K, *win)
        sq_a, sqq_a = sq[a:b, None], sqq[a:b, None]
        sr_k = sr[cand[a:b]].view(b - a, k, *[1] * nd)
        srr_k = srr[cand[a:b]].view(b - a, k, *[1] * nd)
        num = c - sq_a * sr_k / count
        den = torch.sqrt(((sqq_a - sq_a**2 / count) * (srr_k - sr_k**2 / count)).clamp_min(0.0))
        out[a:b] = (num / den.clamp_min(_EPS)).reshape(b - a, k, -1)
    return out


def align(queries: torch.Tensor, refs: torch.Tensor, cand: torch.Tensor, *, shift: int, flips: bool,
          refine: int = 3, chunk_voxels: int = 2**22) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best alignment per (query, candidate) by NCC: every integer offset up to ``shift`` voxels per axis
    (exact, via FFT), then half-voxel steps around the best one for the ``refine`` best candidates.

    queries (Q, 1, *grid), refs (R, 1, *grid), cand (Q, K) -> (ncc (Q, K), offsets (Q, K, nd) float,
    flipped (Q, K) bool).
    """
    nd = queries.ndim - 2
    ints = torch.tensor(list(itertools.product(range(-shift, shift + 1), repeat=nd)), dtype=torch.float64)
    variants = [(False, queries[:, 0])] + ([(True, flip_lr(queries)[:, 0])] if flips else [])
    best = best_off = best_flip = None
    for flipped, qs in variants:
        surf = _ncc_surface(qs, refs[:, 0], cand, shift, chunk_voxels)
        val, idx = surf.max(dim=2)
        if best is None:
            best, best_off, best_flip = val, ints[idx], torch.full(val.shape, flipped)
        else:
            better = val > best
            best = torch.where(better, val, best)
            best_off = torch.where(better[..., None], ints[idx], best_off)
            best_flip = torch.where(better, torch.full_like(better, flipped), best_flip)
    if shift > 0 and refine > 0:  # half-voxel refinement (interpolated), clamped to the margin
        steps = [d for d in itertools.product((-0.5, 0.0, 0.5), repeat=nd) if any(d)]
        zero = (0,) * nd
        top = best.topk(min(refine, best.shape[1]), dim=1).indices
        qn, rn = queries[:, 0].numpy(), refs[:, 0].numpy()
        for qi in range(best.shape[0]):
            for j in top[qi].tolist():
                q = qn[qi][::-1] if best_flip[qi, j] else qn[qi]
                r = _crop_int(rn[int(cand[qi, j])], zero, shift)
                base = best_off[qi, j].tolist()
                for d in steps:
                    off = tuple(min(shift, max(-shift, o + e)) for o, e in zip(base, d, strict=True))
                    v = _ncc(_crop(q, off, shift), r)
                    if v > best[qi, j]:
                        best[qi, j] = v
                        best_off[qi, j] = torch.tensor(off, dtype=torch.float64)
    return best.float(), best_off, best_flip


def _pair_ssim(qs: torch.Tensor, rs: torch.Tensor) -> torch.Tensor:
    return ssim(qs, rs, data_range=1.0)


def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor, *, shift: int = 8, flips: bool = True,
                       candidates: int = 10, chunk_voxels: int = 2**21) -> list[Match]:
    """Nearest reference of every query (see module doc). queries (Q, 1, *grid), refs (R, 1, *grid)."""
    if len(queries) == 0 or len(refs) == 0:
        return []
    nd = queries.ndim - 2
    shift = max(0, min(shift, min(queries.shape[2:]) // 4))
    cand = candidate_indices(queries, refs, candidates, flips)
    ncc, offs, flp = align(queries, refs, cand, shift=shift, flips=flips)
    q_n, k = cand.shape
    zero = (0,) * nd
    ssim_vals = torch.empty(q_n, k)
    pairs = [(qi, j) for qi in range(q_n) for j in range(k)]
    vox = int(np.prod([s - 2 * shift for s in queries.shape[2:]]))
    step = max(1, chunk_voxels // max(1, vox))
    for a in range(0, len(pairs), step):
        batch = pairs[a:a + step]
        qs, rs = [], []
        for qi, j in batch:
            q = queries[qi, 0]
            if flp[qi, j]:
                q = torch.flip(q, dims=(0,))
            qs.append(_crop(q, tuple(offs[qi, j].tolist()), shift))
            rs.append(_crop(refs[int(cand[qi, j]), 0], zero, shift))
        vals = _pair_ssim(torch.stack(qs)[:, None], torch.stack(rs)[:, None])
        for (qi, j), v in zip(batch, vals.tolist(), strict=True):
            ssim_vals[qi, j] = v
    out = []
    for qi in range(q_n):
        js = int(torch.argmax(ssim_vals[qi]))
        jn = int(torch.argmax(ncc[qi]))
        out.append(Match(float(ssim_vals[qi, js]), int(cand[qi, js]), float(ncc[qi, jn]), int(cand[qi, jn]),
                         tuple(float(v) for v in offs[qi, js].tolist()), bool(flp[qi, js])))
    return out


def aligned_pair(query: np.ndarray, ref: np.ndarray, match: Match, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """The query (flipped / shifted as matched) and the reference, both cropped to their overlap."""
    q = torch.from_numpy(np.ascontiguousarray(query))
    if match.flipped:
        q = torch.flip(q, dims=(0,))
    nd = q.ndim
    shift = max(0, min(shift, min(q.shape) // 4))
    qc = _crop(q, match.shift, shift).numpy()
    rc = _crop(torch.from_numpy(np.ascontiguousarray(ref)), (0,) * nd, shift).numpy()
    return qc, rc
