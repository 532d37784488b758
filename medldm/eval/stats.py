"""Summary statistics over cases: mean, standard deviation and a 95% confidence interval.

The unit of analysis is the **case** (one volume): slices of one volume are not independent, so
per-slice values are first averaged within each case and the interval is taken over cases.

CI definitions (``method``):

* ``"t"`` (default): Student-t interval for the mean,
  ``mean ± t_{1-α/2, n-1} · s / √n`` with ``s`` the sample standard deviation (ddof=1).
  Needs ``n ≥ 2``; for ``n < 2`` the interval is ``NaN``.
* ``"bootstrap"``: percentile bootstrap of the mean (``scipy.stats.bootstrap``, ``method="percentile"``),
  ``n_boot`` resamples of the cases with replacement drawn from ``numpy.random.default_rng(seed)``
  (reproducible), interval = ``[q_{α/2}, q_{1-α/2}]`` of the resampled means. Needs ``n ≥ 2``.

NaN values (a metric that could not be computed for a case, e.g. MS-SSIM on a too-small volume)
are left out and counted in ``n_missing``; ``inf`` (PSNR of identical images) is kept, so the
mean is then ``inf`` and the spread undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from scipy.stats import bootstrap

CI_METHODS = ("t", "bootstrap")


def summarize(
    values: Sequence[float],
    *,
    ci: str = "t",
    level: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict:
    """``{"n", "n_missing", "mean", "std", "ci_low", "ci_high"}`` of the non-NaN ``values``.

    ``std`` is the sample standard deviation (ddof=1; NaN for n < 2).
    """
    if ci not in CI_METHODS:
        raise ValueError(f"unknown CI method {ci!r}; choose one of {CI_METHODS}")
    arr = np.asarray(list(values), dtype=np.float64)
    finite = arr[~np.isnan(arr)]
    n = int(finite.size)
    out = {"n": n, "n_missing": int(arr.size - n), "mean": math.nan, "std": math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if n == 0:
        return out
    mean = float(finite.mean())
    out["mean"] = mean
    if n < 2 or not np.all(np.isfinite(finite)):  # inf (identical images): spread undefined
        return out
    std = float(finite.std(ddof=1))
    out["std"] = std
    alpha = 1.0 - level
    if ci == "t":
        half = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1)) * std / math.sqrt(n)
        out["ci_low"], out["ci_high"] = mean - half, mean + half
    else:
        if np.ptp(finite) == 0:  # every case equal: the resampled means are all the same value
            out["ci_low"] = out["ci_high"] = mean
            return out
        res = bootstrap((finite,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                        rng=np.random.default_rng(seed), vectorized=True)
        out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out


def paired_differences(a: dict[str, float], b: dict[str, float]) -> list[float]:
    """``a[case] - b[case]`` for the cases both dicts have (non-NaN) (paired comparison)."""
    common = [c for c in a if c in b]
    return [a[c] - b[c] for c in common if not (math.isnan(a[c]) or math.isnan(b[c]))]


def ci_definition(ci: str, level: float = 0.95, n_boot: int = 10000, seed: int = 0) -> str:
    """One sentence stating how the interval was computed (goes into summary.json and the report)."""
    pct = f"{100 * level:g}%"
    if ci == "t":
        return (f"{pct} Student-t interval of the mean over cases: mean ± t(1-α/2, n-1)·s/√n, "
                "s = sample standard deviation (ddof=1); NaN when n < 2")
    return (f"{pct} percentile bootstrap of the mean over cases (scipy.stats.bootstrap, {n_boot} resamples with "
            f"replacement, numpy default_rng(seed={seed})); NaN when n < 2")
