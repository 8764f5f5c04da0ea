"""Which features predict a metric, with statistics that survive review.

Samples are labelled high / low by quantiles of the metric (or absolute thresholds); the
middle is left out of the classification. Two probes rank features:

* difference in means: standardised mean difference (Cohen's d) between high and low, with
  permutation p-values (labels shuffled, all features at once) and Benjamini-Hochberg q;
* sparse: L1 logistic regression along a regularisation path; a feature's importance is
  where it enters the path, and the top-k at each sparsity k are the first k to enter.

Honest evaluation: every AUROC comes from nested cross-validation, with the feature
selection and the choice of k inside the training folds only. The folds are grouped by
prompt (StratifiedGroupKFold on the samples' ``prompt_id``): the samples of one prompt share
its tokens, so a feature that merely recognises the prompt would otherwise score by seeing
the same prompt on both sides of a fold. The baselines use the same folds and, where they
choose features, the same selector at the probe's k of each outer fold:

* ``random_features``: k features drawn at random among the live ones (no selection);
* ``init_sae`` (the untrained SAE, re-created from its recorded seed: ``init_sae``),
  ``random_directions`` (ReLU projections onto as many random unit directions as the SAE has
  features: ``random_directions``), or any matrix passed in ``baselines``: the selector picks
  k of its columns on the training folds, exactly as for the SAE;
* ``raw_neurons``: the selector picks k of the model's raw (pooled) activation dimensions;
* ``diffmean``: the difference-in-means direction of the raw activations (high minus low,
  training fold only), the projection onto it a 1-d logistic probe;
* ``raw_activations``: a dense logistic probe on all raw activation dimensions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
DEFAULT_KS = (1, 5, 10, 20)


# --------------------------------------------------------------------------- labels


def labels(values, quantiles=(0.25, 0.75), low: float | None = None, high: float | None = None) -> np.ndarray:
    """1 for high, 0 for low, -1 for the middle and for missing values.

    Quantile cut-offs are inclusive (values tied at the cut-off join that side), so a
    two-valued metric such as a ratio that is mostly 0 or 1 still splits cleanly; when both
    quantiles fall on one value, the samples split at it.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if low is None or high is None:
        if not finite.any():
            return np.full(len(v), -1)
        q_low, q_high = np.quantile(v[finite], quantiles)
        low = q_low if low is None else low
        high = q_high if high is None else high
    out = np.full(len(v), -1)
    if low >= high:
        # the quantiles collapsed onto one value c (a metric that is mostly c): split at c, with
        # c on the side that leaves both sides non-empty
        c = high
        above = finite & (v >= c) if (finite & (v < c)).any() else finite & (v > c)
        out[finite] = 0
        out[above] = 1
        return out
    out[finite & (v <= low)] = 0
    out[finite & (v >= high)] = 1
    return out


def metric_labels(values, opts: dict, metric: str) -> np.ndarray:
    """``labels`` with the probes' cut-offs for ``metric`` (``probes.thresholds`` or ``probes.quantiles``)."""
    cut = opts["thresholds"].get(metric, {})
    return labels(values, opts["quantiles"], cut.get("low"), cut.get("high"))


# --------------------------------------------------------------------------- difference in means


def standardized_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cohen's d of every column between y == 1 and y == 0 (0 where the pooled SD is 0)."""
    from .groups import cohens_d

    d = cohens_d(x[y == 1], x[y == 0])
    return np.where(np.isfinite(d), d, 0.0)


def permutation_pvalues(
    x: np.ndarray, y: np.ndarray, n_permutations: int = 1000, seed: int = 0, chunk: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided permutation p-values of the standardised difference, (1 + #{|null| >= |obs|}) / (1 + n).

    Shuffles labels, never features: every feature sees the same permutations. Returns (d, p).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    observed = np.abs(standardized_difference(x, y))
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    rng = np.random.default_rng(seed)
    exceed = np.zeros(x.shape[1])
    sq = x**2
    total, total_sq = x.sum(0), sq.sum(0)
    for start in range(0, n_permutations, chunk):
        m = min(chunk, n_permutations - start)
        perms = np.stack([rng.permutation(y) for _ in range(m)])  # [m, n]
        ones = (perms == 1).astype(np.float64)
        s1, q1 = ones @ x, ones @ sq
        s0, q0 = total - s1, total_sq - q1
        mean1, mean0 = s1 / n1, s0 / n0
        var1 = (q1 - n1 * mean1**2) / max(n1 - 1, 1)
        var0 = (q0 - n0 * mean0**2) / max(n0 - 1, 1)
        pooled = np.sqrt(np.clip(((n1 - 1) * var1 + (n0 - 1) * var0) / max(n1 + n0 - 2, 1), 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            null = np.where(pooled > 1e-12, np.abs(mean1 - mean0) / pooled, 0.0)
        exceed += (null >= observed - 1e-12).sum(0)
    return standardized_difference(x, y), (1 + exceed) / (1 + n_permutations)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values (monotone, capped at 1)."""
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.clip(q, 0, 1)
    return out


# --------------------------------------------------------------------------- L1 path


def l1_path_order(x: np.ndarray, y: np.ndarray, n_cs: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Order in which features enter an L1 logistic-regression path (strong to weak penalty).

    Returns (entry, coef): entry[j] = position at which feature j first has a nonzero
    coefficient (ties at one C broken by |coef|), or -1 if never; coef = coefficients at the
    weakest penalty of the path.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import l1_min_c

    xs = _standardize(x)
    c_min = l1_min_c(xs, y, loss="log")
    entry = np.full(x.shape[1], -1)
    position = 0
    coef = np.zeros(x.shape[1])
    model = LogisticRegression(
        l1_ratio=1.0, solver="liblinear", tol=1e-6, max_iter=1000, random_state=seed, intercept_scaling=100.0
    )
    for c in c_min * np.logspace(0.05, 2.5, n_cs):
        model.set_params(C=c)
        model.fit(xs, y)
        coef = model.coef_[0]
        new = np.nonzero((coef != 0) & (entry < 0))[0]
        for j in new[np.argsort(-np.abs(coef[new]), kind="stable")]:
            entry[j] = position
            position += 1
    return entry, coef


def top_k(entry: np.ndarray, k: int) -> np.ndarray:
    """The first k features to enter the path (fewer if fewer ever enter)."""
    entered = np.nonzero(entry >= 0)[0]
    return entered[np.argsort(entry[entered], kind="stable")][:k]


def _standardize(x: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    ref = x if reference is None else reference
    mean, sd = ref.mean(0), ref.std(0)
    return (x - mean) / np.where(sd > 1e-12, sd, 1.0)


def _dim_top_k(x, y, k):
    return np.argsort(-np.abs(standardized_difference(x, y)), kind="stable")[:k]


SELECTORS = {"dim": _dim_top_k, "l1": lambda x, y, k: top_k(l1_path_order(x, y)[0], k)}


# --------------------------------------------------------------------------- nested CV


def _fit_predict(x_train, y_train, x_test, c: float = 1.0, seed: int = 0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_train)) < 2:  # a training fold with one class: no probe, chance scores
        return np.full(len(x_test), 0.5)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit(_standardize(x_train), y_train)
    return model.predict_proba(_standardize(x_test, x_train))[:, 1]


def _auroc(y, scores) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if len(np.unique(y)) == 2 else float("nan")


def folds(y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs, stratified by ``y``; with ``groups``, no group is split across
    a train and a test side (StratifiedGroupKFold). Without groups: StratifiedKFold by sample.

    The number of folds drops to the number of groups when there are fewer (at least 2)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    if groups is None:
        n = min(n_splits, int(np.bincount(y).min()) if len(y) else 0)
        if n < 2:
            raise ValueError(f"cannot make {n_splits} folds: a class has {n} sample(s)")
        return list(StratifiedKFold(n_splits=n, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    groups = np.asarray(groups)
    if len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries for {len(y)} samples")
    n = min(n_splits, len(np.unique(groups)))
    if n < 2:
        raise ValueError(f"cannot make grouped folds: {len(np.unique(groups))} group(s) (prompt ids)")
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def _sub(groups, index):
    return None if groups is None else np.asarray(groups)[index]


def diffmean_direction(raw: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean of the y == 1 rows minus mean of the y == 0 rows (zeros when a class is empty)."""
    raw = np.asarray(raw, dtype=np.float64)
    y = np.asarray(y)
    if not (y == 1).any() or not (y == 0).any():
        return np.zeros(raw.shape[1])
    return raw[y == 1].mean(0) - raw[y == 0].mean(0)


def nested_cv(
    x: np.ndarray,
    y: np.ndarray,
    ks=DEFAULT_KS,
    selector: str = "dim",
    n_outer: int = 5,
    n_inner: int = 3,
    seed: int = 0,
    raw: np.ndarray | None = None,
    leaky: bool = False,
    groups: np.ndarray | None = None,
    baselines: dict[str, np.ndarray] | None = None,
    live: np.ndarray | None = None,
) -> dict:
    """Out-of-fold AUROC of a probe on the top-k features, k and the features chosen on the
    training folds only; and, on the same folds, the baselines of the module docstring:
    ``auroc_random_features`` (k random live features; ``live`` a boolean mask, default all),
    ``auroc_<name>`` for each matrix of ``baselines`` (the same selector at the fold's k),
    and with ``raw``: ``auroc_raw_neurons``, ``auroc_diffmean``, ``auroc_raw_activations``.

    groups: one label per sample (its prompt id); folds never split a group (outer and inner).
    None: plain stratified folds by sample.
    leaky=True selects features on all samples first (the mistake this guards against; tests only).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    select = SELECTORS[selector]
    rng = np.random.default_rng(seed)
    baselines = {k: np.asarray(v, dtype=np.float64) for k, v in (baselines or {}).items()}
    for name, matrix in baselines.items():
        if len(matrix) != len(y):
            raise ValueError(f"baseline {name!r} has {len(matrix)} rows for {len(y)} samples")
    pool = np.arange(x.shape[1]) if live is None else np.nonzero(np.asarray(live, dtype=bool))[0]
    if not len(pool):
        pool = np.arange(x.shape[1])
    names = ["probe", "random_features", *baselines]
    if raw is not None:
        raw = np.asarray(raw, dtype=np.float64)
        names += ["raw_neurons", "diffmean", "raw_activations"]
    oof = {name: np.zeros(len(y)) for name in names}
    chosen_k = []
    leaked = select(x, y, max(ks)) if leaky else None
    for train, test in folds(y, groups, n_outer, seed):
        scores = {k: [] for k in ks}
        for itrain, ival in folds(y[train], _sub(groups, train), n_inner, seed + 1):
            a, b = train[itrain], train[ival]
            order = leaked if leaky else select(x[a], y[a], max(ks))
            for k in ks:
                cols = order[:k]
                scores[k].append(_auroc(y[b], _fit_predict(x[a][:, cols], y[a], x[b][:, cols], seed=seed)))
        best = max(ks, key=lambda k: (np.nanmean(scores[k]) if np.isfinite(scores[k]).any() else -1.0, -k))
        chosen_k.append(best)

        def probe(matrix, cols):
            return _fit_predict(matrix[train][:, cols], y[train], matrix[test][:, cols], seed=seed)

        oof["probe"][test] = probe(x, (leaked if leaky else select(x[train], y[train], max(ks)))[:best])
        oof["random_features"][test] = probe(x, rng.choice(pool, size=min(best, len(pool)), replace=False))
        for name, matrix in baselines.items():
            oof[name][test] = probe(matrix, select(matrix[train], y[train], best)[:best])
        if raw is not None:
            oof["raw_neurons"][test] = probe(raw, select(raw[train], y[train], best)[:best])
            w = diffmean_direction(raw[train], y[train])
            oof["diffmean"][test] = _fit_predict(raw[train] @ w[:, None], y[train], raw[test] @ w[:, None], seed=seed)
            oof["raw_activations"][test] = _fit_predict(raw[train], y[train], raw[test], seed=seed)
    out = {
        "auroc": _auroc(y, oof["probe"]),
        **{f"auroc_{name}": _auroc(y, oof[name]) for name in names[1:]},
        "chosen_k": [int(k) for k in chosen_k],
        "n_samples": int(len(y)),
        "n_high": int((y == 1).sum()),
        "selector": selector,
        "fold_groups": "sample" if groups is None else "groups",
        "n_groups": int(len(y) if groups is None else len(np.unique(groups))),
    }
    return out


def spearman_cv(
    x: np.ndarray, values: np.ndarray, k: int, n_folds: int = 5, seed: int = 0, groups: np.ndarray | None = None
) -> float:
    """Spearman correlation of out-of-fold ridge predictions of the continuous metric from
    the top-k features by |Spearman| on each training fold (folds grouped by ``groups`` when given)."""
    from scipy.stats import spearmanr
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold, KFold

    from .stats import spearman_columns

    x = np.asarray(x, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(v)
    x, v = x[keep], v[keep]
    g = None if groups is None else np.asarray(groups)[keep]
    if len(v) < 2 * n_folds or np.std(v) == 0:
        return float("nan")
    if g is None:
        splits = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x)
    else:
        n = min(n_folds, len(np.unique(g)))
        if n < 2:
            return float("nan")
        splits = GroupKFold(n_splits=n, shuffle=True, random_state=seed).split(x, v, g)
    predictions = np.zeros(len(v))
    for train, test in splits:
        rho = spearman_columns(x[train], v[train])
        cols = np.argsort(-np.abs(rho), kind="stable")[:k]
        model = Ridge(alpha=1.0).fit(_standardize(x[train][:, cols]), v[train])
        predictions[test] = model.predict(_standardize(x[test][:, cols], x[train][:, cols]))
    return float(spearmanr(predictions, v).statistic)


def iterative_annotation(
    x: np.ndarray,
    y: np.ndarray,
    k: int,
    max_rounds: int = 5,
    stop_auroc: float = 0.55,
    selector: str = "dim",
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """Fit, record the top-k features, zero them, refit, until the nested-CV AUROC <= stop_auroc.

    Returns (one row per recorded feature: round, rank), and per round its AUROC.
    """
    x = np.array(x, dtype=np.float64)
    rows, rounds = [], []
    for r in range(max_rounds):
        result = nested_cv(x, y, ks=(k,), selector=selector, seed=seed, groups=groups)
        rounds.append({"round": r, "auroc": result["auroc"]})
        if not result["auroc"] > stop_auroc:
            break
        top = SELECTORS[selector](x, y, k)
        rows += [{"feature": int(j), "round": r, "rank": i} for i, j in enumerate(top)]
        x[:, top] = 0.0
    return pd.DataFrame(rows, columns=["feature", "round", "rank"]), rounds


# --------------------------------------------------------------------------- correlations


def spearman_with_ci(a, b, n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman rho of two feature statistics with a percentile-bootstrap 95% CI (features resampled)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 4 or np.std(a) == 0 or np.std(b) == 0:
        return {"rho": None, "ci_low": None, "ci_high": None, "n": int(len(a))}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        if np.std(a[idx]) > 0 and np.std(b[idx]) > 0:
            boots.append(spearmanr(a[idx], b[idx]).statistic)
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"rho": float(spearmanr(a, b).statistic), "ci_low": float(low), "ci_high": float(high), "n": int(len(a))}


def jaccard(a, b) -> float | None:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else None


# --------------------------------------------------------------------------- baseline encoders

INIT_SAMPLE = 4096  # tokens whose geometric median the trainer's init puts in b_dec (TrainSpec.init_sample)


def init_sae(sae_dir: str | Path, store) -> tuple[object | None, str]:
    """The untrained SAE of an SAE folder we trained, re-created as the trainer made it: the
    same config, ``SAE.initialize`` with the recorded seed on the first ``INIT_SAMPLE`` training
    tokens of ``store`` (scaled by the recorded input scale), then the scaling folded in so it
    reads raw activations. Returns (SAE or None, a note saying what it is or why there is none).

    A warm-started SAE started from another SAE, not from this init: the init is still
    the untrained SAE of its config and seed (the note says so)."""
    import json

    import torch

    from .sae import files
    from .sae.model import SAE, SAEConfig

    record_path = Path(sae_dir) / files.OURS
    if not record_path.exists():
        return None, f"no {files.OURS} in {sae_dir}: not trained here, no recorded seed"
    record = json.loads(record_path.read_text())
    training = record.get("training") or {}
    missing = [key for key in ("seed", "scale") if key not in training]
    if missing:
        return None, f"{record_path}: training record lacks {missing}"
    sae = SAE(SAEConfig(**record["config"]))
    if sae.cfg.is_transcoder:
        return None, "transcoder: its init needs the target site's store"
    first = next(iter(store.iter_batches(INIT_SAMPLE)), None)
    if first is None:
        return None, f"{store.folder}: no training tokens"
    scale = float(training["scale"])
    sae.initialize(first.float() * scale, seed=int(training["seed"]))
    files.fold_scaling(sae, scale, float(training.get("scale_out", scale)))
    warm = ((training.get("config") or {}).get("warm_start") or "none") != "none"
    note = f"re-created from seed {int(training['seed'])}"
    if warm:
        note += " (the trained SAE was warm-started: its actual start was another SAE)"
    return sae.to(torch.float32).eval(), note


def store_center(store):
    """The mean of the store's first ``INIT_SAMPLE`` training tokens (float32 [d]; zeros when the
    split is empty): where ``random_directions`` centres the activations."""
    import torch

    first = next(iter(store.iter_batches(INIT_SAMPLE)), None)
    return first.float().mean(0) if first is not None else torch.zeros(store.d_model)


def random_directions(store, width: int, seed: int, center=None):
    """ReLU projections of the centred activations onto ``width`` random unit directions:
    f(x) = ReLU((x - c) R^T), R Gaussian rows normalised (seeded), c the mean of the first
    ``INIT_SAMPLE`` training tokens (``store_center``; pass it as ``center`` when drawing many, so
    the store is read once). An encoder for ``features.pool_tokens``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    r = torch.randn((width, store.d_model), generator=gen, dtype=torch.float64)
    r = (r / r.norm(dim=1, keepdim=True)).float()
    c = store_center(store) if center is None else center

    def encode(x):
        return torch.relu((x - c.to(x.device)) @ r.to(x.device).T)

    return encode


# --------------------------------------------------------------------------- one SAE, one metric


def max_cos_to(dec: np.ndarray, base: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Each unit decoder row's largest cosine with any row of ``base`` (unit rows)."""
    return np.concatenate([(dec[i : i + chunk] @ base.T).max(axis=1) for i in range(0, len(dec), chunk)])


def probe_metric(
    x: np.ndarray,
    values: np.ndarray,
    stats: pd.DataFrame,
    opts: dict,
    raw: np.ndarray | None,
    cos_to_base: np.ndarray | None,
    metric: str,
    groups: np.ndarray | None = None,
    baselines: dict[str, np.ndarray] | None = None,
) -> tuple[pd.DataFrame | None, dict]:
    """Everything the probes say about one metric for one SAE: (one row per feature, summary).

    groups: each sample's prompt id (the folds never split one); baselines: other per-sample
    feature matrices (rows as ``x``, e.g. ``init_sae``, ``random_directions``) probed on the
    same folds with the same selector; raw: the model's pooled activations (dense, neuron and
    difference-in-means baselines)."""
    cut = opts["thresholds"].get(metric, {})
    y_all = metric_labels(values, opts, metric)
    keep = y_all >= 0
    y = y_all[keep]
    n_high, n_low = int((y == 1).sum()), int((y == 0).sum())
    summary: dict = {
        "metric": metric,
        "n_labelled": int(keep.sum()),
        "n_high": n_high,
        "n_low": n_low,
        "cutoffs": cut or {"quantiles": opts["quantiles"]},
    }
    if min(n_high, n_low) < max(opts["min_per_class"], opts["n_folds"]):
        summary["skipped"] = (
            f"{n_high} high and {n_low} low samples; need {max(opts['min_per_class'], opts['n_folds'])} "
            "of each (probes.min_per_class)"
        )
        return None, summary
    if groups is not None and len(np.unique(np.asarray(groups)[keep])) < 2:
        summary["skipped"] = "the labelled samples come from fewer than 2 prompts: no grouped folds"
        return None, summary
    xl = x[keep]
    d, p = permutation_pvalues(xl, y, opts["n_permutations"], seed=opts["seed"])
    q = benjamini_hochberg(p)
    entry, coef = l1_path_order(xl, y, seed=opts["seed"])
    table = pd.DataFrame(
        {"feature": np.arange(x.shape[1]), "smd": d, "p": p, "q": q, "l1_entry": entry, "l1_coef": coef}
    )
    for k in opts["ks"]:
        table[f"top{k}"] = False
        table.loc[top_k(entry, k), f"top{k}"] = True
    table["importance"] = 1.0 / (1.0 + np.where(entry >= 0, entry, np.inf))  # earlier on the path: larger; never: 0
    table["rank"] = np.where(entry >= 0, entry, -1)
    gl = None if groups is None else np.asarray(groups)[keep]
    cv = nested_cv(
        xl,
        y,
        ks=opts["ks"],
        selector=opts["selector"],
        n_outer=opts["n_folds"],
        seed=opts["seed"],
        raw=raw[keep] if raw is not None else None,
        groups=gl,
        baselines={name: matrix[keep] for name, matrix in (baselines or {}).items()},
        live=~stats["dead"].to_numpy(dtype=bool),
    )
    k_star = int(np.median(cv["chosen_k"]))
    rows, rounds = iterative_annotation(
        xl, y, k_star, opts["rounds"], opts["stop_auroc"], opts["selector"], seed=opts["seed"], groups=gl
    )
    table["round"] = -1
    table["round_rank"] = -1
    table.loc[rows["feature"].to_numpy(), "round"] = rows["round"].to_numpy()
    table.loc[rows["feature"].to_numpy(), "round_rank"] = rows["rank"].to_numpy()
    for column in ("freq", "seq_freq", "enc_norm", "dead"):
        table[column] = stats[column].to_numpy()
    if cos_to_base is not None:
        table["cos_to_base"] = cos_to_base
    summary.update(
        {
            "auroc": cv["auroc"],
            **{key: value for key, value in cv.items() if key.startswith("auroc_")},
            "auroc_raw_activations": cv.get("auroc_raw_activations"),
            "n_groups": cv["n_groups"],
            "chosen_k": cv["chosen_k"],
            "k": k_star,
            "selector": opts["selector"],
            "spearman": spearman_cv(x, values, k_star, n_folds=opts["n_folds"], seed=opts["seed"], groups=groups),
            "top_features": [int(j) for j in top_k(entry, max(opts["ks"]))],
            "top_dim": [
                {"feature": int(j), "smd": float(d[j]), "q": float(q[j])}
                for j in np.argsort(-np.abs(d), kind="stable")[:10]
            ],
            "n_significant": int((q < opts["fdr"]).sum()),
            "fdr": opts["fdr"],
            "rounds": rounds,
            "correlations": correlations(table),
        }
    )
    return table, summary


def correlations(table: pd.DataFrame, thresholds=(0.0, 1e-3, 1e-2, 5e-2)) -> dict:
    """Importance (|standardised difference|) against weight and firing statistics, over live
    features, and how the correlation with the cosine to base moves with the activity threshold."""
    live = table[~table["dead"]]
    importance = live["smd"].abs().to_numpy()
    out = {
        name: spearman_with_ci(importance, live[column].to_numpy())
        for name, column in (
            ("cos_to_base", "cos_to_base"),
            ("firing_rate", "freq"),
            ("encoder_norm", "enc_norm"),
            ("prevalence", "seq_freq"),
        )
        if column in live.columns
    }
    if "cos_to_base" in live.columns:
        out["by_activity"] = []
        for t in thresholds:
            part = live[live["freq"] >= t]
            rho = spearman_with_ci(part["smd"].abs().to_numpy(), part["cos_to_base"].to_numpy(), n_boot=200)
            out["by_activity"].append({"min_freq": t, **rho})
    return out


# --------------------------------------------------------------------------- comparisons


def compare_cells(table_a: pd.DataFrame, table_b: pd.DataFrame, diff_table: pd.DataFrame, k: int) -> dict:
    """How the probe results of one SAE config move from cell A to cell B, through the
    Hungarian matching of their features (``diff_table``: A's features, their match in B).

    Jaccard of the top-k sets (A's mapped into B's indices); Spearman of importance across
    matched features; and the change in importance against the decoder cosine and the change
    in firing rate.
    """
    match = diff_table["match"].to_numpy()
    has = match >= 0
    top_a = table_a.loc[table_a[f"top{k}"], "feature"].to_numpy()
    top_b = set(table_b.loc[table_b[f"top{k}"], "feature"].tolist())
    mapped = {int(match[j]) for j in top_a if match[j] >= 0}
    imp_a = table_a["smd"].abs().to_numpy()
    imp_b = table_b["smd"].abs().to_numpy()
    delta = np.full(len(match), np.nan)
    delta[has] = imp_b[match[has]] - imp_a[has]
    freq_delta = np.full(len(match), np.nan)
    freq_delta[has] = table_b["freq"].to_numpy()[match[has]] - table_a["freq"].to_numpy()[has]
    cos = diff_table["dec_cos_match"].to_numpy()
    return {
        "k": k,
        "jaccard_top": jaccard(mapped, top_b),
        "importance_spearman": spearman_with_ci(imp_a[has], imp_b[match[has]], n_boot=200),
        "importance_change_vs_cos": spearman_with_ci(delta[has], cos[has], n_boot=200),
        "importance_change_vs_firing_change": spearman_with_ci(delta[has], freq_delta[has], n_boot=200),
    }


def compare_layer(spec: dict, layer: int, probe_jsons: list, diff_jsons: list) -> dict:
    """Probe results of one layer across cells and metrics.

    probe_jsons: every probe summary of the layer (each names its cell, SAE and metric; its table,
    when the probe ran, is beside it as .parquet); diff_jsons: every diff of the layer (each names
    its cells a and b and its SAE; its table is beside it). Returns the AUROCs per cell, the
    comparison of each diffed pair of cells through the diff's matching, and the comparison of
    metrics within each cell, at k = the largest ``probes.ks``.
    """
    from .grid import diff_pairs
    from .io import read_json

    k = max(spec["probes"]["ks"])
    probes = {}
    for path in map(Path, probe_jsons):
        block = read_json(path)
        probes[(block["cell"], block["sae"], block["metric"])] = (block, path.with_suffix(".parquet"))
    diffs = {}
    for path in map(Path, diff_jsons):
        block = read_json(path)
        diffs[(block["a"], block["b"], block["sae"])] = path.with_suffix(".parquet")
    out: dict = {"layer": layer, "k": k, "auroc": [], "cells": [], "metrics": {}}

    def table(cell: str, name: str, metric: str):
        _, path = probes[(cell, name, metric)]
        return pd.read_parquet(path) if path.exists() else None

    for name in spec["saes"]:
        for metric in spec["metrics"]:
            for cell in spec["cells"]:
                block, _ = probes[(cell, name, metric)]
                keys = (
                    "auroc",
                    "auroc_random_features",
                    "auroc_raw_activations",
                    "auroc_init_sae",
                    "auroc_random_directions",
                    "auroc_diffmean",
                    "auroc_raw_neurons",
                    "n_labelled",
                    "skipped",
                )
                out["auroc"].append({"cell": cell, "sae": name, "metric": metric, **{k_: block.get(k_) for k_ in keys}})
            for a, b, kind in diff_pairs(spec):
                ta, tb = table(a.name, name, metric), table(b.name, name, metric)
                if name not in spec["diff_saes"] or ta is None or tb is None:
                    continue
                diff_table = pd.read_parquet(diffs[(a.name, b.name, name)])
                out["cells"].append(
                    {"a": a.name, "b": b.name, "kind": kind, "sae": name, "metric": metric}
                    | compare_cells(ta, tb, diff_table, k)
                )
        for cell in spec["cells"]:
            tables = {m: t for m in spec["metrics"] if (t := table(cell, name, m)) is not None}
            if len(tables) > 1:
                out["metrics"].setdefault(name, {})[cell] = compare_metrics(tables, k)
    return out


def compare_metrics(tables: dict[str, pd.DataFrame], k: int) -> dict:
    """Jaccard of the top-k sets of every pair of metrics (one SAE, one cell), and features in several."""
    names = sorted(tables)
    tops = {m: set(tables[m].loc[tables[m][f"top{k}"], "feature"].tolist()) for m in names}
    pairs = {f"{a}|{b}": jaccard(tops[a], tops[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    counts: dict[int, int] = {}
    for top in tops.values():
        for j in top:
            counts[j] = counts.get(j, 0) + 1
    return {"k": k, "jaccard": pairs, "shared_features": sorted(j for j, c in counts.items() if c > 1)}


def write_cell(
    spec: dict,
    cell: str,
    layer: int,
    samples_path: Path,
    prompt_split,
    features_dir: Path,
    acts_dir: Path,
    saes_dir: Path,
    base_saes_dir: Path,
    out_dir: Path,
    model_dir=None,
    place="cpu",
) -> None:
    """Probes of every SAE of one (cell, layer) against every probed metric, written under ``out_dir``.

    Folds are grouped by the samples' prompt_id (by sample when there is none); with
    --prompt-split only the feature-selection prompts' samples are probed. Beside each
    probe's JSON: ``<metric>.diffmean.npy``, the difference-in-means direction (high minus low)
    of the pooled raw activations over the labelled samples, float32 [d_model]."""
    import numpy as np
    import pandas as pd
    from safetensors.numpy import load_file

    from . import features, io, models, splits
    from .activations import open_stores
    from .diff import unit_rows
    from .grid import site_dir
    from .sae import files

    samples = splits.restrict_samples(pd.read_parquet(samples_path), prompt_split)
    opts = spec["probes"]
    pooling = opts["pooling"]
    place = models.as_placement(place)
    fold_groups = "prompt_id" if "prompt_id" in samples.columns else "sample"
    stores: dict = {}  # one activation store per hook site
    for name, block in spec["saes"].items():
        folder = Path(features_dir) / name
        pooled = load_file(str(folder / "pooled.safetensors"))
        if pooling not in pooled:
            raise ValueError(
                f"{folder / 'pooled.safetensors'}: no pooling {pooling!r} (pooling); it has "
                f"{sorted(k for k in pooled if k in features.POOLINGS)}: rerun the features stage"
            )
        ids = pooled["sample_id"]
        kept = np.isin(ids, samples["sample_id"].to_numpy())
        table = samples.set_index("sample_id").loc[ids[kept]].reset_index()
        groups = table[fold_groups].astype(str).to_numpy()
        stats = pd.read_parquet(folder / "stats.parquet")
        site = site_dir(layer, block.get("hook_point", "resid_post"))
        if site not in stores:
            (stores[site],) = open_stores([Path(acts_dir) / site], model_dir, samples_path, place)
        store = stores[site]
        sae = files.load(Path(saes_dir) / name)
        init, init_note = init_sae(Path(saes_dir) / name, store)
        encoders = {"random_directions": random_directions(store, sae.cfg.d_sae, opts["seed"])}
        if init is not None:
            encoders["init_sae"] = init.to(place.device).encode
        else:
            log.warning("%s %s: no init-SAE baseline (%s)", cell, name, init_note)
        # every sample of the cell is pooled (the store holds them all), then the kept rows
        cutoffs = pooled["scored_cutoff"] if pooling == "before_scored" else None
        by_store = features.pool_tokens(store, ids, pooling, encoders, device=place.device, cutoffs=cutoffs)
        raw = by_store.pop("raw")[kept]
        baselines = {key: matrix[kept] for key, matrix in by_store.items()}
        base = files.load(Path(base_saes_dir) / name)
        cos = max_cos_to(unit_rows(sae.W_dec), unit_rows(base.W_dec))
        for metric in spec["metrics"]:
            if metric not in table.columns:
                raise ValueError(f"metrics: {metric!r} is not a column of {samples_path}")
            values = table[metric].to_numpy(dtype=float)
            result, summary = probe_metric(
                pooled[pooling][kept].astype("float64"),
                values,
                stats,
                opts,
                raw,
                cos,
                metric,
                groups=groups,
                baselines=baselines,
            )
            y = metric_labels(values, opts, metric)
            direction = diffmean_direction(raw[y >= 0], y[y >= 0]).astype(np.float32)
            out = Path(out_dir) / name
            if result is not None:
                io.write_parquet(result, out / f"{metric}.parquet")
            else:  # skipped: a table an earlier run of this rule wrote must not pass for this one's
                (out / f"{metric}.parquet").unlink(missing_ok=True)
            with io.atomic_path(out / f"{metric}.diffmean.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, direction)
            extra = {
                "pooling": pooling,
                "fold_groups": fold_groups,
                "n_samples_split": int(len(table)),
                "prompt_split": str(prompt_split) if prompt_split else None,
                "diffmean_norm": float(np.linalg.norm(direction)),
                "init_sae": init_note,
                "random_directions": f"ReLU projections onto {sae.cfg.d_sae} random unit directions",
            }
            io.write_json(out / f"{metric}.json", {"cell": cell, "layer": layer, "sae": name, **summary, **extra})
            log.info(
                "%s layer%d %s %s: AUROC %s (random %s, raw %s, diffmean %s, init SAE %s)",
                cell,
                layer,
                name,
                metric,
                summary.get("auroc"),
                summary.get("auroc_random_features"),
                summary.get("auroc_raw_activations"),
                summary.get("auroc_diffmean"),
                summary.get("auroc_init_sae"),
            )
