"""Bootstrap intervals and permutation tests shared by the stages that compare groups of samples
(iterations, interventions)."""

from __future__ import annotations

import numpy as np

N_BOOTSTRAP = 4000


def bootstrap_mean(values, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """Mean with a percentile-bootstrap CI."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"n": int(len(x)), "mean": float(x.mean()), "ci_low": float(low), "ci_high": float(high)}


def bootstrap_shift(before, after, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """Difference of means (after - before), two independent samples, with a percentile-bootstrap CI
    and a two-sided permutation p-value."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return {
            "diff": None,
            "ci_low": None,
            "ci_high": None,
            "p": None,
            "n_before": int(len(a)),
            "n_after": int(len(b)),
        }
    rng = np.random.default_rng(seed)
    diffs = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1) - a[
        rng.integers(0, len(a), size=(n_boot, len(a)))
    ].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    observed = b.mean() - a.mean()
    pooled = np.concatenate([a, b])
    null = np.empty(n_boot)
    for i in range(n_boot):
        perm = rng.permutation(pooled)
        null[i] = perm[len(a) :].mean() - perm[: len(a)].mean()
    p = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (n_boot + 1)
    return {
        "diff": float(observed),
        "ci_low": float(low),
        "ci_high": float(high),
        "p": float(p),
        "n_before": int(len(a)),
        "n_after": int(len(b)),
        "significant": bool(low > 0 or high < 0),
    }
