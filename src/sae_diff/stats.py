"""Bootstrap intervals and permutation tests shared by the stages that compare groups of samples
(iterations, interventions), and column-wise Spearman correlation (probes, metric latents)."""

from __future__ import annotations

import numpy as np
import pandas as pd

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


def _cluster_sums(values, clusters, order) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster of ``order``: the sum and the count of the defined (finite) values."""
    frame = pd.DataFrame({"v": np.asarray(values, dtype=np.float64), "c": np.asarray(clusters)})
    frame = frame[np.isfinite(frame["v"])]
    grouped = frame.groupby("c")["v"].agg(["sum", "count"]).reindex(order, fill_value=0)
    return grouped["sum"].to_numpy(dtype=np.float64), grouped["count"].to_numpy(dtype=np.float64)


def cluster_mean(values, clusters, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of the defined values with a percentile-bootstrap CI that resamples whole clusters
    (a prompt's samples share the prompt: resampling them one by one understates the spread)."""
    x = np.asarray(values, dtype=np.float64)
    c = np.asarray(clusters)
    order = pd.unique(c[np.isfinite(x)])
    if len(order) == 0:
        return {"n": 0, "n_clusters": 0, "mean": None, "ci_low": None, "ci_high": None}
    sums, counts = _cluster_sums(x, c, order)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(order), size=(n_boot, len(order)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "n": int(counts.sum()),
        "n_clusters": int(len(order)),
        "mean": float(sums.sum() / counts.sum()),
        "ci_low": float(low),
        "ci_high": float(high),
    }


def paired_cluster_shift(
    before, before_clusters, after, after_clusters, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95
) -> dict:
    """Difference of means (after - before) over the clusters (prompts) both sides have, paired
    by cluster: a bootstrap that resamples clusters (each with its before and after samples) and
    a permutation p that swaps, per cluster, which side its samples belong to (under the null,
    the two sides of one prompt are exchangeable). Values that are undefined (NaN) drop out;
    a cluster with no defined value on one side drops out of the pairing."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    ca, cb = np.asarray(before_clusters), np.asarray(after_clusters)
    shared = sorted(set(ca[np.isfinite(a)]) & set(cb[np.isfinite(b)]))
    out = {"paired": True, "n_clusters": len(shared), "n_before": 0, "n_after": 0}
    if not shared:
        return {"diff": None, "ci_low": None, "ci_high": None, "p": None, **out}
    sa, na = _cluster_sums(a, ca, shared)
    sb, nb = _cluster_sums(b, cb, shared)
    out.update(n_before=int(na.sum()), n_after=int(nb.sum()))
    observed = sb.sum() / nb.sum() - sa.sum() / na.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(shared), size=(n_boot, len(shared)))
    boot = sb[idx].sum(1) / nb[idx].sum(1) - sa[idx].sum(1) / na[idx].sum(1)
    swap = rng.random((n_boot, len(shared))) < 0.5
    null = np.where(swap, sa, sb).sum(1) / np.where(swap, na, nb).sum(1) - np.where(swap, sb, sa).sum(1) / np.where(
        swap, nb, na
    ).sum(1)
    return {**_tested(observed, boot, null, level), **out}


def spearman_columns(x, values) -> np.ndarray:
    """Spearman ρ of every column of ``x`` [n, m] with ``values`` [n] (average ranks for ties;
    0 for a constant column)."""
    xr = pd.DataFrame(np.asarray(x, dtype=np.float64)).rank().to_numpy()
    vr = pd.Series(np.asarray(values, dtype=np.float64)).rank().to_numpy()
    xc, vc = xr - xr.mean(0), vr - vr.mean()
    denom = np.sqrt((xc**2).sum(0) * (vc**2).sum())
    return np.where(denom > 0, (xc * vc[:, None]).sum(0) / np.where(denom > 0, denom, 1.0), 0.0)
