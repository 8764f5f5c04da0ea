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
    observed = b.mean() - a.mean()
    pooled = np.concatenate([a, b])
    null = np.empty(n_boot)
    for i in range(n_boot):
        perm = rng.permutation(pooled)
        null[i] = perm[len(a) :].mean() - perm[: len(a)].mean()
    return {**_tested(observed, diffs, null, level), "n_before": int(len(a)), "n_after": int(len(b))}


def _tested(observed: float, bootstrap: np.ndarray, null: np.ndarray, level: float) -> dict:
    """The observed difference with its percentile-bootstrap CI and its two-sided p against a
    permutation null ((1 + count) / (1 + draws): never 0)."""
    low, high = np.quantile(bootstrap, [(1 - level) / 2, (1 + level) / 2])
    p = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (len(null) + 1)
    return {
        "diff": float(observed),
        "ci_low": float(low),
        "ci_high": float(high),
        "p": float(p),
        "significant": bool(low > 0 or high < 0),
    }


def paired_shift(before, after, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """Mean within-pair difference (after - before) over the pairs both define, with a
    percentile-bootstrap CI over pairs and a two-sided sign-flip permutation p-value.

    ``before[i]`` and ``after[i]`` are one unit (a prompt) measured under two conditions. A pair
    where either side is undefined (NaN: e.g. a text without any gendered word) drops out of the
    difference; how often each side is undefined is reported beside it (``undefined_change``),
    so an edit that changes which prompts count shows as its own outcome.
    """
    x = np.asarray(before, dtype=np.float64)
    y = np.asarray(after, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_shift: expected two 1-d arrays of one length, got {x.shape} and {y.shape}")
    n_units = len(x)
    undefined = {
        "undefined_before": float(np.mean(~np.isfinite(x))) if n_units else None,
        "undefined_after": float(np.mean(~np.isfinite(y))) if n_units else None,
    }
    undefined["undefined_change"] = undefined["undefined_after"] - undefined["undefined_before"] if n_units else None
    d = (y - x)[np.isfinite(x) & np.isfinite(y)]
    out = {"paired": True, "n_pairs": int(len(d)), "n_units": int(n_units), **undefined}
    if len(d) == 0:
        return {"diff": None, "ci_low": None, "ci_high": None, "p": None, **out}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_boot, len(d)))
    return {**_tested(d.mean(), means, (signs * d).mean(axis=1), level), **out}
