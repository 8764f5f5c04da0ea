"""Features by group of samples: sparsity and structure per group, effect sizes between
groups, cross-group alignment of paired samples, and class x feature co-activation.

Inputs are the per-sample pooled activations of ``features.run`` (rows = samples) and the
cell's sample table (group columns such as language or gender, a pair id column).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column: (mean_a − mean_b) / pooled SD (n−1 variances). NaN where the pooled SD is 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return np.full(a.shape[1], np.nan)
    pooled = np.sqrt(((na - 1) * a.var(axis=0, ddof=1) + (nb - 1) * b.var(axis=0, ddof=1)) / (na + nb - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, (a.mean(axis=0) - b.mean(axis=0)) / pooled, np.nan)


def _spectrum(matrix: np.ndarray) -> np.ndarray:
    """Variance along each principal axis of the column-centred matrix (descending)."""
    x = np.asarray(matrix, dtype=np.float64)
    if len(x) < 2:
        return np.zeros(0)
    singular = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    return singular**2


def effective_rank(matrix: np.ndarray, variance: float = 0.95) -> int:
    """Number of principal components that explain ``variance`` of the total."""
    spectrum = _spectrum(matrix)
    total = spectrum.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(spectrum) / total, variance - 1e-12) + 1)


def information_content(matrix: np.ndarray) -> float:
    """Shannon entropy (bits) of the normalised PCA spectrum: how many directions the variance spreads over."""
    spectrum = _spectrum(matrix)
    total = spectrum.sum()
    if total <= 0:
        return 0.0
    p = spectrum[spectrum > 0] / total
    return float(-(p * np.log2(p)).sum())


def per_group(pooled: dict, table: pd.DataFrame, column: str, matrix_key: str = "mean", variance: float = 0.95) -> dict:
    """Per value of ``column``: samples, token L0, dead features, mean activation, effective rank, information."""
    x = pooled[matrix_key].double().numpy()
    maxima = pooled["max"].double().numpy()
    l0_sum, act_sum = pooled["l0_sum"].double().numpy(), pooled["act_sum"].double().numpy()
    n_tokens = pooled["n_tokens"].double().numpy()
    d_sae = x.shape[1]
    out = {}
    values = table[column].to_numpy()
    for value in pd.unique(values[pd.notna(values)]):
        rows = values == value
        tokens = n_tokens[rows].sum()
        out[str(value)] = {
            "n_samples": int(rows.sum()),
            "l0": float(l0_sum[rows].sum() / tokens) if tokens else None,
            "dead_features": int((maxima[rows].max(axis=0) <= 0).sum()),
            "mean_activation": float(act_sum[rows].sum() / (tokens * d_sae)) if tokens else None,
            "rank": effective_rank(x[rows], variance),
            "info_content": information_content(x[rows]),
        }
    return out


def group_bias(x: np.ndarray, table: pd.DataFrame, column: str, a: str, b: str, top: int = 10) -> dict:
    """Cohen's d of every feature (columns of x, rows = samples of ``table``) between
    ``column == a`` and ``column == b``, and the top features each way."""
    values = table[column].astype(str).to_numpy()
    d = cohens_d(x[values == a], x[values == b])
    finite = np.where(np.isfinite(d), d, 0.0)
    order = np.argsort(-finite, kind="stable")
    return {
        "column": column,
        "a": a,
        "b": b,
        "n_a": int((values == a).sum()),
        "n_b": int((values == b).sum()),
        "d": d,
        f"top_{a}": [(int(j), float(d[j])) for j in order[:top] if finite[j] > 0],
        f"top_{b}": [(int(j), float(d[j])) for j in order[::-1][:top] if finite[j] < 0],
    }


def paired_matrices(
    x: np.ndarray, table: pd.DataFrame, group_column: str, pair_column: str, a: str, b: str
) -> tuple[np.ndarray, np.ndarray, list]:
    """Rows of group a and group b for the pair ids present in both (samples of a pair averaged)."""
    frame = pd.DataFrame(
        {
            "pair": table[pair_column].astype(str).to_numpy(),
            "group": table[group_column].astype(str).to_numpy(),
            "row": np.arange(len(table)),
        }
    )
    frame = frame[frame["group"].isin([a, b])]
    both = sorted(set(frame.loc[frame["group"] == a, "pair"]) & set(frame.loc[frame["group"] == b, "pair"]))

    def mean_rows(group):
        sub = frame[frame["group"] == group]
        return (
            np.stack([x[sub.loc[sub["pair"] == p, "row"].to_numpy()].mean(axis=0) for p in both])
            if both
            else np.zeros((0, x.shape[1]))
        )

    return mean_rows(a), mean_rows(b), both


def alignment(xa: np.ndarray, xb: np.ndarray, threshold: float = 0.5, min_pairs: int = 5) -> dict:
    """Features whose activation over the pairs correlates across the two groups.

    Per feature: Pearson r between its activation on a pair's group-a and group-b samples;
    a feature counts once it varies in both groups. aligned: r >= threshold;
    alignment_ratio = aligned / counted; mean_similarity: mean cosine (uncentred) of the
    aligned features' activation vectors.
    """
    n = len(xa)
    if n < min_pairs:
        return {"n_pairs": n, "skipped": f"only {n} pairs with both groups (need {min_pairs})"}
    ca, cb = xa - xa.mean(axis=0), xb - xb.mean(axis=0)
    sa, sb = np.sqrt((ca**2).sum(axis=0)), np.sqrt((cb**2).sum(axis=0))
    counted = (sa > 0) & (sb > 0)
    r = np.full(xa.shape[1], np.nan)
    r[counted] = (ca[:, counted] * cb[:, counted]).sum(axis=0) / (sa[counted] * sb[counted])
    aligned = counted & (r >= threshold)
    na, nb = np.linalg.norm(xa, axis=0), np.linalg.norm(xb, axis=0)
    cos = np.where((na > 0) & (nb > 0), (xa * xb).sum(axis=0) / np.maximum(na * nb, 1e-300), np.nan)
    return {
        "n_pairs": n,
        "n_counted": int(counted.sum()),
        "aligned_features": int(aligned.sum()),
        "alignment_ratio": float(aligned.sum() / counted.sum()) if counted.any() else None,
        "mean_similarity": float(np.nanmean(cos[aligned])) if aligned.any() else None,
        "threshold": threshold,
        "r": r,
    }


def bias_correlation(
    x: np.ndarray, table: pd.DataFrame, language_column: str, bias_column: str, a: str, b: str
) -> dict:
    """Pearson correlation across features of the Cohen's d (a vs b) measured within each language."""
    languages = [str(v) for v in pd.unique(table[language_column].dropna())]
    if len(languages) != 2:
        return {"skipped": f"{language_column} has {len(languages)} values; the correlation needs exactly 2"}
    ds = []
    for language in languages:
        rows = table[language_column].astype(str).to_numpy() == language
        ds.append(group_bias(x[rows], table[rows], bias_column, a, b)["d"])
    ok = np.isfinite(ds[0]) & np.isfinite(ds[1])
    if ok.sum() < 3:
        return {
            "skipped": f"fewer than 3 features have a defined {a}/{b} effect in both languages",
            "languages": languages,
        }
    return {
        "languages": languages,
        "n_features": int(ok.sum()),
        "gender_bias_correlation": float(np.corrcoef(ds[0][ok], ds[1][ok])[0, 1]),
    }


def coactivation(x: np.ndarray, table: pd.DataFrame, column: str, top: int = 10):
    """Class x feature matrix of mean activations, and per class its top features and the
    features most above the other classes' mean (target vs others)."""
    values = table[column].astype(str).to_numpy()
    classes = sorted(pd.unique(values))
    matrix = np.stack([x[values == c].mean(axis=0) for c in classes])
    stats = {
        "column": column,
        "classes": classes,
        "n_samples": {c: int((values == c).sum()) for c in classes},
        "per_class": {},
    }
    for i, c in enumerate(classes):
        others = np.delete(matrix, i, axis=0)
        contrast = matrix[i] - (others.mean(axis=0) if len(others) else 0.0)
        stats["per_class"][c] = {
            "top_features": [(int(j), float(matrix[i, j])) for j in np.argsort(-matrix[i], kind="stable")[:top]],
            "top_vs_others": [(int(j), float(contrast[j])) for j in np.argsort(-contrast, kind="stable")[:top]],
        }
    return matrix, stats
