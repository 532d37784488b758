"""Diversity (mean pairwise MS-SSIM) and realism (classifier two-sample test) of image sets.

Images are (N, 1, *grid) float tensors in [0, 1] on the comparison grid (:mod:`audit_load`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medldm.metrics import MS_SSIM_WEIGHTS, ms_ssim, ssim

WIN = 11
L2 = 1.0


# ------------------------------------------------------------------ diversity

def ms_ssim_scales(grid: int, win: int = WIN) -> int:
    """Most MS-SSIM scales (<= 5) whose coarsest image still exceeds the window: grid > (win-1)*2**(L-1)."""
    levels = 0
    while levels < len(MS_SSIM_WEIGHTS) and grid > (win - 1) * 2**levels:
        levels += 1
    return levels


def pair_indices(n: int, max_pairs: int, seed: int = 0) -> np.ndarray:
    """(P, 2) index pairs i < j: all of them, or ``max_pairs`` drawn at random without replacement."""
    total = n * (n - 1) // 2
    if total == 0:
        return np.zeros((0, 2), dtype=np.int64)
    iu = np.stack(np.triu_indices(n, k=1), axis=1)
    if total <= max_pairs:
        return iu
    rng = np.random.default_rng(seed)
    return iu[np.sort(rng.choice(total, size=max_pairs, replace=False))]


def diversity(x: torch.Tensor, *, max_pairs: int = 2000, seed: int = 0, chunk_voxels: int = 2**21) -> dict:
    """Mean pairwise MS-SSIM of a set (lower = more diverse). x (N, 1, *grid).

    MS-SSIM uses the first L weights of ``MS_SSIM_WEIGHTS`` (renormalized to sum 1) with the largest L
    that fits the grid; when not even two scales fit, plain SSIM is used (``metric`` says which).
    """
    n = len(x)
    grid = min(x.shape[2:]) if n else 0
    levels = ms_ssim_scales(grid) if n else 0
    if levels >= 2:
        w = np.asarray(MS_SSIM_WEIGHTS[:levels], dtype=np.float64)
        weights = tuple(float(v) for v in w / w.sum())
        metric = f"MS-SSIM ({levels} scales)" + ("" if levels == 5 else f"; the comparison grid ({grid}) is too "
                                                                        "small for 5 scales")
    else:
        weights = None
        metric = f"SSIM (the comparison grid ({grid}) is too small for MS-SSIM)"
    pairs = pair_indices(n, max_pairs, seed)
    out = {"n_images": n, "n_pairs": int(len(pairs)), "all_pairs": bool(len(pairs) == n * (n - 1) // 2),
           "metric": metric, "mean": None, "std": None, "median": None}
    if len(pairs) == 0:
        return out
    vox = int(np.prod(x.shape[2:]))
    step = max(1, chunk_voxels // vox)
    vals = []
    for a in range(0, len(pairs), step):
        p = torch.from_numpy(pairs[a:a + step])
        xa, xb = x[p[:, 0]], x[p[:, 1]]
        v = ms_ssim(xa, xb, data_range=1.0, weights=weights) if weights else ssim(xa, xb, data_range=1.0)
        vals.append(v.double())
    v = torch.cat(vals).numpy()
    out.update(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, median=float(np.median(v)))
    return out


# ------------------------------------------------------------------ realism

FEATURE_NAMES = ([f"hist_{i}" for i in range(16)] + ["mean", "std"] + [f"p{q}" for q in (5, 25, 50, 75, 95)]
                 + ["grad_mean", "grad_std", "grad_p50", "grad_p90", "lap_abs_mean", "lap_mad", "foreground"]
                 + [f"spec_band_{i}" for i in range(6)])


def image_features(x: torch.Tensor) -> torch.Tensor:
    """Hand-made image statistics (N, 1, *grid) -> (N, F) float64, F = len(FEATURE_NAMES).

    Intensity histogram (16 bins over [0, 1]), mean / std / percentiles, gradient magnitude statistics,
    Laplacian energy and its median absolute value (noise), foreground fraction (> 0.05) and the share
    of spectral power in 6 radial frequency bands (log).
    """
    n = len(x)
    nd = x.ndim - 2
    v = x.reshape(n, -1).double()
    bins = (v * 16).long().clamp(0, 15)
    hist = torch.zeros(n, 16, dtype=torch.float64).scatter_add_(1, bins, torch.ones_like(v)) / v.shape[1]
    qs = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64), dim=1).T
    img = x[:, 0].double()
    grads = [torch.diff(img, dim=d + 1) for d in range(nd)]
    crop = [g[(slice(None), *[slice(0, s - 1) for s in img.shape[1:]])] for g in grads]
    gmag = torch.sqrt(sum(g**2 for g in crop)).reshape(n, -1)
    gq = torch.quantile(gmag, torch.tensor([0.5, 0.9], dtype=torch.float64), dim=1).T
    lap = -2 * nd * img
    for d in range(nd):
        lap = lap + torch.roll(img, 1, d + 1) + torch.roll(img, -1, d + 1)
    lap = lap[(slice(None), *[slice(1, s - 1) for s in img.shape[1:]])].reshape(n, -1)
    power = torch.fft.fftshift(torch.abs(torch.fft.fftn(img - img.mean(dim=tuple(range(1, nd + 1)), keepdim=True),
                                                        dim=tuple(range(1, nd + 1)))) ** 2,
                               dim=tuple(range(1, nd + 1)))
    axes = [torch.linspace(-1, 1, s, dtype=torch.float64) for s in img.shape[1:]]
    radius = torch.sqrt(sum(g**2 for g in torch.meshgrid(*axes, indexing="ij"))) / math.sqrt(nd)
    band = torch.clamp((radius * 6).long(), max=5).reshape(-1)
    flat = power.reshape(n, -1)
    spec = torch.zeros(n, 6, dtype=torch.float64).index_add_(1, band, flat)
    spec = torch.log(spec / flat.sum(1, keepdim=True).clamp_min(1e-20) + 1e-12)
    feats = torch.cat([hist, v.mean(1, keepdim=True), v.std(1, keepdim=True), qs,
                       gmag.mean(1, keepdim=True), gmag.std(1, keepdim=True), gq,
                       lap.abs().mean(1, keepdim=True), lap.abs().median(1, keepdim=True).values,
                       (v > 0.05).double().mean(1, keepdim=True), spec], dim=1)
    return feats


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, iters: int = 25) -> tuple[np.ndarray, ...]:
    """Logistic regression on standardized features by Newton's method (IRLS), penalty ``l2 * |w|^2 / 2``
    on the summed log-loss (scikit-learn's ``C = 1 / l2``). x (n, F) float64, y (n,) in {0, 1}.
    Returns (mu, sd, w, b): predict ``((x - mu) / sd) @ w + b > 0``. (numpy: tiny matrices, no threads.)"""
    mu, sd = x.mean(0), np.maximum(x.std(0, ddof=1), 1e-8)
    z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)
    theta = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 1e-8  # the intercept is not penalized
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ theta, -30, 30)))
        grad = z.T @ (p - y) + reg * theta
        hess = (z.T * (p * (1 - p))) @ z + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return mu, sd, theta[:-1], theta[-1]


def cv_accuracy(feats: np.ndarray, y: np.ndarray, folds: list[np.ndarray]) -> float:
    """Accuracy of out-of-fold predictions over all samples."""
    correct = 0
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        mu, sd, w, b = fit_logistic(feats[train], y[train])
        pred = (((feats[test] - mu) / sd) @ w + b) > 0
        correct += int((pred == (y[test] > 0.5)).sum())
    return correct / len(y)


def stratified_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` test folds, each holding a near-equal share of every class."""
    folds: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, j in enumerate(idx):
            folds[i % k].append(int(j))
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (``scipy.stats.binomtest(...).proportion_ci``)."""
    if n == 0:
        return (float("nan"), float("nan"))
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


def two_sample_test(real: torch.Tensor, synthetic: torch.Tensor, *, folds: int = 5, permutations: int = 200,
                    seed: int = 0) -> dict:
    """Classifier two-sample test real vs synthetic (images (N, 1, *grid)); accuracy near 0.5 is good.

    The larger set is subsampled at random to the size of the smaller (chance = 0.5 exactly); logistic
    regression on :func:`image_features` with stratified k-fold cross-validation gives the out-of-fold
    accuracy. p-values: one-sided exact binomial test against 0.5 and a label-permutation test (the
    whole cross-validation rerun ``permutations`` times with shuffled labels).
    """
    from scipy.stats import binomtest

    rng = np.random.default_rng(seed)
    m = min(len(real), len(synthetic))
    out = {"classifier": f"logistic regression (L2 {L2:g}) on {len(FEATURE_NAMES)} image statistics", "n_per_class": int(m),
           "n_real": int(len(real)), "n_synthetic": int(len(synthetic))}
    k = min(folds, m)
    if m < 4:
        out["skipped"] = f"needs at least 4 real and 4 synthetic images, got {len(real)} and {len(synthetic)}"
        return out
    ir = np.sort(rng.choice(len(real), m, replace=False))
    is_ = np.sort(rng.choice(len(synthetic), m, replace=False))
    feats = torch.cat([image_features(real[torch.from_numpy(ir)]), image_features(synthetic[torch.from_numpy(is_)])])
    keep = torch.isfinite(feats).all(0)
    feats = feats[:, keep].numpy()
    y = np.r_[np.zeros(m), np.ones(m)]
    split = stratified_folds(y, k, rng)
    acc = cv_accuracy(feats, y, split)
    n = 2 * m
    correct = round(acc * n)
    null = [cv_accuracy(feats, rng.permutation(y), split) for _ in range(permutations)]
    p_perm = (1 + sum(a >= acc - 1e-12 for a in null)) / (1 + permutations) if permutations else None
    lo, hi = wilson(correct, n)
    out.update(folds=k, accuracy=acc, ci95=[lo, hi], p_binomial=float(binomtest(correct, n, 0.5, "greater").pvalue),
               p_permutation=p_perm, permutations=permutations,
               null_accuracy_mean=float(np.mean(null)) if null else None)
    return out


def _frechet(a: np.ndarray, b: np.ndarray, shrink: float) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` and ``b`` (covariances shrunk toward
    their diagonal by ``shrink``: a few dozen images cannot fill a 36 x 36 covariance)."""
    from scipy.linalg import sqrtm

    def cov(x):
        c = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
        return (1 - shrink) * c + shrink * np.diag(np.diag(c)) + 1e-9 * np.eye(len(c))

    ca, cb = cov(a), cov(b)
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    root = sqrtm(ca @ cb)
    root = root.real if np.iscomplexobj(root) else root
    return max(0.0, mean_term + float(np.trace(ca + cb - 2 * root)))


def feature_distance(real: torch.Tensor, synthetic: torch.Tensor, *, shrink: float = 0.5, seed: int = 0) -> dict:
    """Realism distance with an offline feature extractor: Fréchet distance (as FID, Heusel et al. 2017) between
    the :func:`image_features` (36 radiomics-style statistics, no network, no weights) of real and synthetic
    images, each feature standardized by the mean and standard deviation of both sets pooled. Beside it, the same distance
    between two random halves of the real set (the real-vs-real reference at about half the size): a value near
    the reference = the feature distributions agree. Limits: the estimate grows as the sets shrink (compare only
    at similar sizes), hand-made statistics miss anatomy and texture that a learned extractor would see, and
    the covariances are shrunk toward their diagonals (``shrink``)."""
    out = {"metric": f"Fréchet distance on {len(FEATURE_NAMES)} standardized image statistics",
           "n_real": int(len(real)), "n_synthetic": int(len(synthetic)), "shrink": shrink}
    if len(real) < 4 or len(synthetic) < 2:
        out["skipped"] = f"needs at least 4 real and 2 synthetic images, got {len(real)} and {len(synthetic)}"
        return out
    fr, fs = image_features(real).numpy(), image_features(synthetic).numpy()
    keep = np.isfinite(fr).all(0) & np.isfinite(fs).all(0)
    fr, fs = fr[:, keep], fs[:, keep]
    both = np.concatenate([fr, fs])  # pooled: a feature nearly constant in one set does not explode
    mu, sd = both.mean(0), np.maximum(both.std(0, ddof=1), 1e-8)
    fr, fs = (fr - mu) / sd, (fs - mu) / sd
    perm = np.random.default_rng(seed).permutation(len(fr))
    half = len(fr) // 2
    out.update(distance=_frechet(fr, fs, shrink),
               real_halves_reference=_frechet(fr[perm[:half]], fr[perm[half:]], shrink))
    return out
