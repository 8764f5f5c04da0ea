"""Which latents of a diff-SAE track a per-sample metric: the latents behind a change in the metric.

A diff-SAE's latents describe what Mi adds to M0's activations on the same tokens; ``share`` ranks
them by how much of that difference they carry, which says nothing about the behaviour the
iterations were steered toward. Here each latent's activation is pooled per sample over the tokens
the probes pool (``probes.pooling``: with ``before_scored``, the completion tokens before the first
scored word, so a latent cannot score by reading the very words the metric counts), and:

- **chosen on the train split** of the data: the ``top`` latents by |Spearman ρ| with the metric;
- **reported on the eval split**, prompts the choice never saw (``data.split`` splits by prompt):
  each chosen latent's ρ, a two-sided permutation p-value and Benjamini-Hochberg q over the chosen
  latents. The permutations move the metric between whole prompts of equal sample count
  (``block_permutation``): a prompt's samples share their prompt, so under the null they move
  together and the clustering is kept;
- **against a null of random directions**: the same choice and report on ReLU projections of the
  same pooled difference onto as many random unit directions as the diff-SAE has latents
  (``probes.random_directions``): what choosing the best of that many directions finds alone. It
  is drawn ``random_draws`` times (independent directions each time), so the diff-SAE's count of
  called latents gets a rank p against the draws' counts (``count_p``), not a comparison with one
  draw.

A latent is *called* when q ≤ ``fdr`` and its eval ρ has its train ρ's sign.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# random-direction draws pooled per pass over the difference store: at the demo's width (4608 x 576)
# each draw holds 10.6 MB of directions plus its per-sample projections
DRAWS_PER_PASS = 10


def blocks(groups: np.ndarray) -> list[np.ndarray]:
    """Per size class, the sample indices of its groups as rows [n_groups, size] (each group's
    samples in their order): what ``block_permutation`` moves."""
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [
        np.stack([order[starts[g] : starts[g] + size] for g in np.flatnonzero(counts == size)])
        for size in np.unique(counts)
    ]


def block_permutation(groups: np.ndarray, rng: np.random.Generator, by_size: list | None = None) -> np.ndarray:
    """An index permutation of the samples that moves whole groups: each group's samples take the
    places of another group's of the same size (groups of a size no other group has stay put).
    ``by_size``: ``blocks(groups)``, computed once by a caller that draws many."""
    out = np.arange(len(groups))
    for members in blocks(groups) if by_size is None else by_size:
        out[members.ravel()] = members[rng.permutation(len(members))].ravel()
    return out


def log10_arrangements(groups: np.ndarray) -> float:
    """log10 of how many distinct ways ``block_permutation`` can arrange the groups (the product,
    over size classes, of the factorial of the class's group count): a permutation p-value can
    go no lower than one over it."""
    return float(sum(math.lgamma(len(members) + 1) for members in blocks(groups)) / math.log(10))


def permutation_pvalues(
    x: np.ndarray, values: np.ndarray, groups: np.ndarray, n_permutations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ρ of each column of ``x`` with ``values``, two-sided permutation p-values
    (1 + #{|ρ_null| ≥ |ρ|}) / (1 + n)); every column sees the same ``block_permutation``s. ρ is
    the dot product of the centred, normalised ranks, so a permutation only reorders one side."""
    xr = pd.DataFrame(np.asarray(x, dtype=np.float64)).rank().to_numpy()
    xr = xr - xr.mean(0)
    xr = xr / np.where((norm := np.sqrt((xr**2).sum(0))) > 0, norm, 1.0)
    vr = pd.Series(np.asarray(values, dtype=np.float64)).rank().to_numpy()
    vr = vr - vr.mean()
    vr = vr / max(np.sqrt((vr**2).sum()), 1e-300)
    observed = vr @ xr
    rng = np.random.default_rng(seed)
    by_size = blocks(groups)
    perms = np.stack([vr[block_permutation(groups, rng, by_size)] for _ in range(n_permutations)])  # [P, n]
    null = perms @ xr  # [P, m]: a permuted ρ per column
    exceed = (np.abs(null) >= np.abs(observed) - 1e-12).sum(0)
    return observed, (1 + exceed) / (1 + n_permutations)


def associate(
    x: np.ndarray,
    values: np.ndarray,
    train: np.ndarray,
    held_out: np.ndarray,
    groups: np.ndarray,
    top: int,
    n_permutations: int,
    fdr: float,
    seed: int,
) -> dict:
    """The ``top`` columns of ``x`` by |ρ| with ``values`` on the ``train`` rows, reported on the
    ``held_out`` rows (masks; rows with a missing value are dropped from both)."""
    from .probes import benjamini_hochberg
    from .stats import spearman_columns

    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    train, held_out = np.asarray(train) & finite, np.asarray(held_out) & finite
    out = {"n_train": int(train.sum()), "n_eval": int(held_out.sum()), "n_eval_groups": int(len(set(groups[held_out])))}
    skipped = None
    if min(train.sum(), held_out.sum()) < 4 or np.ptp(values[train]) == 0 or np.ptp(values[held_out]) == 0:
        skipped = "fewer than 4 samples with a varying metric on a split"
    else:
        out["log10_arrangements"] = log10_arrangements(groups[held_out])
        if 10 ** -out["log10_arrangements"] > fdr:  # no p-value could reach fdr: say so, not "0 called"
            skipped = (
                f"the eval prompts allow {10 ** out['log10_arrangements']:.0f} arrangements of equal-sized "
                f"prompts, so no p-value can fall below fdr {fdr}: too few eval prompts"
            )
    if skipped:
        return {**out, "skipped": skipped, "latents": [], "n_called": 0}
    rho_train = spearman_columns(x[train], values[train])
    chosen = np.argsort(-np.abs(rho_train), kind="stable")[:top]
    rho_eval, p = permutation_pvalues(x[held_out][:, chosen], values[held_out], groups[held_out], n_permutations, seed)
    q = benjamini_hochberg(p)
    called = (q <= fdr) & (np.sign(rho_eval) == np.sign(rho_train[chosen]))
    latents = [
        {
            "latent": int(j),
            "rho_train": float(rho_train[j]),
            "rho_eval": float(r),
            "p": float(pj),
            "q": float(qj),
            "called": bool(c),
        }
        for j, r, pj, qj, c in zip(chosen, rho_eval, p, q, called)
    ]
    return {**out, "latents": latents, "n_called": int(called.sum())}


def count_p(observed: int, null_counts) -> float:
    """Rank p of a count of called latents against the counts of the null's draws:
    (1 + #{draws calling at least as many}) / (1 + draws); 1 when nothing was called."""
    null_counts = np.asarray(null_counts)
    return float((1 + (null_counts >= observed).sum()) / (1 + len(null_counts)))


def random_null(draws: list[dict], observed: int) -> dict:
    """The random-direction null of one metric from its draws (``associate`` results): the count
    called in each draw, the observed count's rank p among them, and per rank the median held-out
    |ρ| of the direction chosen at that rank (what the figure draws beside each latent)."""
    rhos = [[abs(row["rho_eval"]) for row in null["latents"]] for null in draws]
    return {
        "draws": len(draws),
        "n_called": [null["n_called"] for null in draws],
        "p": count_p(observed, [null["n_called"] for null in draws]),
        "abs_rho_eval": [float(v) for v in np.median(rhos, axis=0)] if all(rhos) else [],
    }


def direction(diff_sae_dir: str | Path, metric: str, way: str = "up") -> np.ndarray | None:
    """What the diff-SAE latents called for ``metric`` write into the difference Mi − M0, signed so
    that adding it moves the metric ``way`` (float64 [d], raw activation space):

        v = s · Σ_j sign(ρ_j) · a_j · d_j

    over the called latents j (``metric_latents.json`` beside the diff-SAE), ρ_j their eval ρ, a_j
    their mean activation when firing (eval tokens, ``features/stats.parquet``), d_j their decoder
    row, s = +1 for ``up`` and −1 for ``down``. None when the metric was not associated; a zero
    vector when no latent was called: then the diff-SAE has nothing to steer with. The interventions
    steer M0 with it, and project it out of Mi, as the crosscoder's direction is
    (``conditions.comparison_conditions``)."""
    from .io import read_json
    from .sae import files

    diff_sae_dir = Path(diff_sae_dir)
    found = read_json(diff_sae_dir / "metric_latents.json")["metrics"].get(metric)
    if found is None:
        return None
    called = [row for row in found["latents"] if row["called"]]
    sae = files.load(diff_sae_dir / "sae")
    if not called:
        return np.zeros(sae.cfg.d_in, dtype=np.float64)
    stats = pd.read_parquet(diff_sae_dir / "features" / "stats.parquet").set_index("feature")
    ids = [row["latent"] for row in called]
    weights = np.array([np.sign(row["rho_eval"]) for row in called]) * stats.loc[ids, "mean_act"].to_numpy(float)
    rows = sae.W_dec.detach().double().numpy()[ids]
    out = (weights[:, None] * rows).sum(0)
    return out if way == "up" else -out


def write(
    diff_sae_dir: Path,
    store,
    samples: pd.DataFrame,
    metrics: dict[str, dict | None],
    opts: dict,
    out_path: Path,
) -> dict:
    """Per metric, the diff-SAE's latents behind it and the random-direction null, into ``out_path`` (JSON).

    diff_sae_dir: a diff-SAE run's folder (``diff_sae.run``: ``features/pooled.safetensors``, ``sae/``);
    store: the difference store it was trained on (for the random directions); samples: the samples
    that may be read (with causal tests on the data's own prompts, only their feature-selection
    part: ``splits.restrict_samples``); metrics: metric -> ``where`` filter of the samples
    (``data.select``; None: every sample); opts: ``pooling``, ``top``, ``n_permutations``, ``fdr``,
    ``seed``, ``random_draws``. A sample with no token to pool (e.g. a completion that opens with
    the scored word) is left out rather than read as zeros."""
    from safetensors.numpy import load_file

    from . import data, features, io, probes

    diff_sae_dir = Path(diff_sae_dir)
    pooled_path = diff_sae_dir / "features" / "pooled.safetensors"
    pooled = load_file(str(pooled_path))
    pooling = opts["pooling"]
    if pooling not in pooled:
        have = sorted(k for k in pooled if k in features.POOLINGS)
        raise ValueError(f"{pooled_path}: no pooling {pooling!r} (probes.pooling); it has {have}")
    ids = pooled["sample_id"]
    pooled_tokens = pooled[f"n_{features.POOLINGS[pooling][0]}_tokens"]
    readable = np.isin(ids, samples["sample_id"].to_numpy())
    if not readable.any():
        raise ValueError(f"{pooled_path}: none of its samples is in the samples table: another data set's diff-SAE?")
    rows = readable & (pooled_tokens > 0)
    table = samples.set_index("sample_id").loc[ids[rows]].reset_index()
    x = pooled[pooling][rows].astype(np.float64)
    cutoffs = pooled["scored_cutoff"] if pooling == "before_scored" else None
    groups = table["prompt_id"].astype(str).to_numpy() if "prompt_id" in table.columns else np.arange(len(table))
    result = {
        "pooling": pooling,
        "width": int(x.shape[1]),
        "n_without_tokens": int((readable & (pooled_tokens == 0)).sum()),
        **{key: opts[key] for key in ("top", "n_permutations", "fdr", "random_draws")},
        "metrics": {},
    }
    asked = {}  # metric -> its where filter and associate's arguments after x
    for metric, where in metrics.items():
        if metric not in table.columns:
            raise ValueError(f"metric {metric!r} is not a column of the samples table; it has {list(table.columns)}")
        kept = table["sample_id"].isin(data.select(table, where, "samples")["sample_id"]).to_numpy()
        train = kept & (table["split"] == "train").to_numpy()
        held_out = kept & (table["split"] == "eval").to_numpy()
        values = table[metric].to_numpy(dtype=float)
        settings = (opts["top"], opts["n_permutations"], opts["fdr"], opts["seed"])
        asked[metric] = where, (values, train, held_out, groups, *settings)
    # the null of the call count, selection alone: draw d is as many random directions of seed + d,
    # pooled over every sample the store holds (pool_tokens wants them all), then the same rows;
    # DRAWS_PER_PASS draws share a pass over the store (each holds its directions and projections)
    null_draws = {metric: [] for metric in asked}
    center = probes.store_center(store)  # every draw centres on the same mean: read it once
    for first in range(0, opts["random_draws"], DRAWS_PER_PASS):
        names = {f"random_draw{d}": d for d in range(first, min(first + DRAWS_PER_PASS, opts["random_draws"]))}
        encoders = {
            name: probes.random_directions(store, x.shape[1], opts["seed"] + d, center) for name, d in names.items()
        }
        pooled_random = features.pool_tokens(store, ids, pooling, encoders, cutoffs=cutoffs)
        for name in names:
            random = pooled_random[name][rows].astype(np.float64)
            for metric, (_, args) in asked.items():
                null_draws[metric].append(associate(random, *args))
    for metric, (where, args) in asked.items():
        found = associate(x, *args)
        found["where"] = where
        null = found["random_directions"] = random_null(null_draws[metric], found["n_called"])
        result["metrics"][metric] = found
        log.info(
            "%s %s: %d of %d chosen latents called (random directions, %d draws: %s called, p = %.3g); %s",
            diff_sae_dir,
            metric,
            found["n_called"],
            len(found["latents"]),
            null["draws"],
            null["n_called"],
            null["p"],
            [(row["latent"], round(row["rho_eval"], 2)) for row in found["latents"]],
        )
    io.write_json(out_path, result)
    return result
