"""Tissue label maps medldm derives itself (mask-conditioned synthesis, the audit's utility test).

**Method** (documented in docs/models.md, "Mask-conditioned synthesis"): on one normalized image (a 2D slice or a
3D volume, model range [-1, 1] or any monotone scale),

1. **foreground** = voxels above ``min + 0.1 (max - min)`` (the background of MR and CT is the darkest class);
2. **k-means in 1D** (Lloyd's algorithm, ``classes - 1`` centres started evenly spaced between the 2nd and
   98th percentiles of the foreground intensities, at most 30 iterations, deterministic);
3. labels: 0 = background, ``1 .. classes - 1`` = the clusters ordered by their mean intensity (darkest first:
   on T1-weighted MR with 4 classes, roughly CSF, grey matter, white matter).

Limits: intensity clusters are not anatomy. Partial-volume voxels go to the nearest centre, a bias field moves
the boundaries, and on other contrasts the order of the classes means something else (on T2, CSF is the
brightest). They are a stand-in for real segmentations when none ship offline, and a mask from a real
segmentation with the same number of classes (0 = background) can be given to ``medldm synthesize --mask``.
"""

from __future__ import annotations

import numpy as np
import torch

FOREGROUND_FRACTION = 0.1
KMEANS_ITERATIONS = 30


def _kmeans_1d(v: np.ndarray, k: int) -> np.ndarray:
    """Sorted centres (k,) of 1D k-means on values ``v`` (deterministic start, evenly spaced in the 2-98 % range)."""
    lo, hi = np.quantile(v, [0.02, 0.98])
    centres = lo + (hi - lo) * (np.arange(k) + 0.5) / k
    for _ in range(KMEANS_ITERATIONS):
        edges = (centres[1:] + centres[:-1]) / 2
        lab = np.searchsorted(edges, v)
        new = np.array([v[lab == j].mean() if np.any(lab == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = np.sort(new)
    return centres


def tissue_labels(image: torch.Tensor | np.ndarray, classes: int = 4) -> torch.Tensor:
    """Label map (same shape, int64) of ``image``: 0 background, 1..classes-1 intensity clusters, darkest first."""
    if classes < 2:
        raise ValueError(f"tissue classes: need at least 2 (background + one tissue), got {classes}")
    x = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    lo, hi = float(x.min()), float(x.max())
    out = np.zeros(x.shape, dtype=np.int64)
    if not hi > lo:
        return torch.from_numpy(out)
    fg = x > lo + FOREGROUND_FRACTION * (hi - lo)
    v = x[fg].astype(np.float64)
    if v.size == 0:
        return torch.from_numpy(out)
    k = classes - 1
    centres = _kmeans_1d(v, k) if v.size >= k else np.sort(np.unique(v))
    edges = (centres[1:] + centres[:-1]) / 2
    out[fg] = 1 + np.searchsorted(edges, v)
    return torch.from_numpy(np.minimum(out, classes - 1))


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, *S) int labels -> (N, classes, *S) float one-hot; values outside 0..classes-1 are a ValueError."""
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"label values {int(labels.min())}..{int(labels.max())}: the model knows labels "
                         f"0..{classes - 1} (0 = background)")
    oh = torch.nn.functional.one_hot(labels, classes)  # (N, *S, K)
    return torch.movedim(oh, -1, 1).float()


def dice_per_class(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, classes: int,
                   skip_background: bool = True) -> np.ndarray:
    """Dice of label maps ``a`` and ``b`` per class (NaN where a class is in neither)."""
    a, b = np.asarray(a), np.asarray(b)
    out = []
    for c in range(1 if skip_background else 0, classes):
        x, y = a == c, b == c
        s = x.sum() + y.sum()
        out.append(2.0 * np.logical_and(x, y).sum() / s if s else np.nan)
    return np.asarray(out, dtype=np.float64)
