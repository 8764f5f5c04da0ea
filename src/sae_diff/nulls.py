"""The data-resampling null of the SAE diffs: what the labels count when nothing changed but the
sample of data.

Pair k splits the base cell's (M0D0) training prompts into two disjoint halves at random (seed
``seed + k``; every sample of a prompt goes to the same half; single samples are the units where
there are fewer than four prompts), caps both at the same number of
tokens, and trains the cells' SAE configs on each half through the unchanged training code (same
settings, same init seed, same data-order seed as the cells). The two SAEs are then diffed and
labelled exactly as a step of the grid (``diff.compare``: the calibrated thresholds; alive on the
base cell's eval split, each feature's presence tested between two halves of its prompts). The
counts of pair k are one draw of "same model, same distribution, other sample"; an observed count
is called only where it falls outside their range.

The halves hold half the cell's training tokens; each null SAE trains as many steps as a cell's
(so each token is seen twice as often). Fewer steps would leave both halves nearer their shared
init, and the null would look quieter than two cells (measured on the synthetic worlds). The init
policy is the cells': with a shared init seed both halves share it too.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

LABELS = ("same", "changed", "died", "born")  # the labels a null is reported for
LEVEL = 0.95  # the null interval's coverage


def prompt_halves(samples: pd.DataFrame, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids of two disjoint halves of ``split``'s prompts (by the ``prompt`` column; each
    sample is its own unit without one). With an odd count the last prompt of the permutation is left out."""
    from .presence import halving

    units, ids = _units(samples, split)
    names = np.unique(units)
    a, b = halving(len(names), seed)
    return ids[np.isin(units, names[a])], ids[np.isin(units, names[b])]


def _units(samples: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """What the halves are made of (``presence.units``: prompts, or single samples where there are
    fewer than four prompts), and the split's sample ids."""
    from .presence import MIN_PROMPTS, units

    part = samples[samples["split"] == split]
    ids = part["sample_id"].to_numpy(dtype=np.int64)
    unit = units(ids, part)
    if len(np.unique(unit)) < MIN_PROMPTS:
        prompts = part["prompt"].nunique() if "prompt" in part.columns else 0
        raise ValueError(
            f"the samples' split {split!r} has {len(part)} sample(s) from {prompts} prompt(s): a resampling null "
            f"needs at least {MIN_PROMPTS}, to draw two different halves"
        )
    return unit, ids


def prompt_splits(samples: pd.DataFrame, split: str, n_pairs: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_pairs`` different prompt halvings (``prompt_halves`` with seeds seed, seed + 1, ...; a
    halving drawn again, in either order, is skipped), or a clear error when there are not that many."""
    out, seen = [], set()
    for attempt in range(1000 * n_pairs):
        a, b = prompt_halves(samples, split, seed + attempt)
        key = frozenset((tuple(a.tolist()), tuple(b.tolist())))
        if key not in seen:
            seen.add(key)
            out.append((a, b))
        if len(out) == n_pairs:
            return out
    raise ValueError(
        f"only {len(out)} different prompt halvings of split {split!r} were found for diff.resampling.pairs = "
        f"{n_pairs}: use fewer pairs or more prompts"
    )


def pair_dirs(out_dir: str | Path, n_pairs: int, names: list[str]) -> list[tuple[list[Path], list[Path]]]:
    """Where pair k's two SAEs of each config go: ``<out>/pair<k>/{a,b}/<sae>``."""
    out = Path(out_dir)
    return [
        ([out / f"pair{k}" / "a" / n for n in names], [out / f"pair{k}" / "b" / n for n in names])
        for k in range(n_pairs)
    ]


def splits_json(out_dir: str | Path) -> Path:
    """The record of the null's prompt splits: each pair's sample ids and token count, the cell's tokens."""
    return Path(out_dir) / "splits.json"


def _tokens_per_sample(store, split: str = "train") -> dict[int, int]:
    """How many kept tokens each sample has in ``split`` (one read of it; a streamed store runs its
    model once)."""
    counts: dict[int, int] = {}
    for shard in store.iter_shards(split):
        ids, n = np.unique(shard["sample_idx"].numpy(), return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
    return counts


def train_pairs(
    store, samples: pd.DataFrame, specs: list, out_dir: str | Path, n_pairs: int, split_seed: int, **train_args
) -> list:
    """Train every spec on both halves of each of ``n_pairs`` different prompt splits of ``store``'s
    training split (``prompt_splits`` from ``split_seed``; ``train_args`` are ``sae.train.train``'s,
    the cells' own). Both halves of a pair are cut to the same number of tokens. Resumes pair by
    pair: a half whose SAEs are all written is not trained again."""
    from .activations import SampleSubset
    from .io import write_json
    from .sae.train import train

    dirs = pair_dirs(out_dir, n_pairs, [s.name for s in specs])
    record = {"cell_tokens": store.n_tokens("train"), "pairs": []}
    # as many steps as a cell's SAE: fewer would leave both halves nearer their shared init, and the
    # null would look quieter than two cells that differ only in their sample
    tokens = min(train_args["n_tokens"], store.n_tokens("train"))
    steps = max(1, tokens // train_args["batch_size"]) * train_args.get("epochs", 1)
    per_sample = _tokens_per_sample(store)  # one read of the split for every pair's token counts
    for k, ((dirs_a, dirs_b), (ids_a, ids_b)) in enumerate(
        zip(dirs, prompt_splits(samples, "train", n_pairs, split_seed))
    ):
        cap = min(int(sum(per_sample.get(int(i), 0) for i in ids)) for ids in (ids_a, ids_b))
        if cap < train_args["batch_size"]:  # no full batch: the SAE would be written at its init
            raise ValueError(
                f"{store.folder}: a half of the resampling null holds {cap} training tokens, fewer than one "
                f"batch (training.batch_size {train_args['batch_size']}); use more data or a smaller batch"
            )
        record["pairs"].append({"samples_a": ids_a.tolist(), "samples_b": ids_b.tolist(), "tokens": cap})
        for ids, folders, side in ((ids_a, dirs_a, "a"), (ids_b, dirs_b, "b")):
            if all((f / "sae_weights.safetensors").exists() for f in folders):
                continue
            log.info("null pair %d/%d, half %s: %d samples, %d tokens", k + 1, n_pairs, side, len(ids), cap)
            view = SampleSubset(store, ids, max_tokens=cap)
            args = dict(train_args)
            if args.get("target_store") is not None:  # a transcoder's targets: the same tokens
                args["target_store"] = SampleSubset(args["target_store"], ids, max_tokens=cap)
            work = Path(out_dir) / f".train_state-pair{k}{side}"
            train(view, specs, folders, work_dir=work, steps=steps, **args)
            shutil.rmtree(work, ignore_errors=True)  # train's checkpoint folder (a kill may leave a temp file)
    write_json(splits_json(out_dir), record)
    return dirs


def pair_table(sae_a, sae_b, every, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One null pair's unlabelled diff (``diff.weight_diff``) and its presence tests
    (``presence.both_ways``): A's features on B's tokens and B's on A's, where A's tokens and B's
    are two disjoint halves of the prompts of ``every`` (the base cell's eval tokens, ``presence.
    Tokens``) drawn with ``seed``, so that the null holds what the presence test sees when only the
    sample of texts differs. A feature is alive when it fires anywhere in ``every``."""
    from . import presence
    from .diff import weight_diff

    half_a, half_b = presence.halves(every, seed)
    on_b, on_a = presence.both_ways(sae_a, sae_b, half_a, half_b, seed)
    return weight_diff(sae_a, sae_b), on_b, on_a


def pair_counts(pair: tuple, thresholds, collapse: float, absent_below: float) -> dict:
    """Label counts of one null pair (``pair_table``), as ``diff.compare`` counts a step."""
    from .diff import count_labels, labelled

    table, on_b, on_a = pair
    fires = lambda frame: (frame["own_mass"] + frame["other_mass"]).to_numpy() > 0  # noqa: E731  (on either half)
    table, born = labelled(table, on_b, on_a, thresholds, collapse, absent_below, fires(on_b), fires(on_a))
    counts = count_labels(table, born)
    return {
        "mmcs": float(np.nanmean(table["dec_cos_match"])),
        "n_features": len(table),
        **{k: int(counts.get(k, 0)) for k in COUNT_KEYS},
    }


COUNT_KEYS = LABELS + ("died_absent", "died_norm_collapse", "unmatched", "inactive")


def thresholds(cosines: list[np.ndarray], same_quantile: float, new_quantile: float, leave_out: int | None = None):
    """Same / new thresholds from the matched cosines of the null pairs pooled (``diff.calibrate``),
    without pair ``leave_out``: the thresholds that label pair k are chosen on the other pairs."""
    from .diff import calibrate

    pooled = [c for k, c in enumerate(cosines) if k != leave_out]
    return calibrate(np.concatenate(pooled), same_quantile, new_quantile)


def null_counts(pairs: list[tuple], diff_block: dict, fixed=None) -> list[dict]:
    """Every null pair's label counts (``pair_table`` results): with ``fixed`` thresholds (the seed
    pair's), or, when the thresholds come from this null, with thresholds from the other pairs
    (leave one out)."""
    cosines = [pair[0]["dec_cos_match"].to_numpy(dtype=np.float64) for pair in pairs]
    out = []
    for k, pair in enumerate(pairs):
        chosen = fixed or thresholds(cosines, diff_block["same_quantile"], diff_block["new_quantile"], leave_out=k)
        out.append(pair_counts(pair, chosen, diff_block["norm_collapse"], diff_block["absent_below"]))
    return out


def prediction_interval(
    values, n_terms: int = 1, level: float = LEVEL, n_total: int | None = None
) -> tuple[float, float, float]:
    """Mean and ``level`` prediction interval of a sum of ``n_terms`` new null draws, from the null's
    draws (Student t with N − 1 degrees of freedom, N draws):

        n_terms·x̄ ± t · σ · sqrt(n_terms + n_terms² / N),   σ² = max(s², r·(1 − r / n_total)),
        r = (Σx + 1) / N

    (the variance of a sum of n_terms draws, nσ², plus that of the estimated mean, n²σ²/N). The
    variance is at least that of a binomial count of ``n_total`` features (a Poisson one without
    it) at the draws' rate plus one count: with five draws of a small count (a few 'changed'
    features) the sample variance is often near 0, and five zeros would give a zero-width interval
    (tests/test_nulls.py checks the coverage on Poisson counts). With five draws the plain
    min–max range would miss a sixth draw one time in three. The low end is clipped at 0 (counts)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        raise ValueError(f"a null interval needs at least two null pairs, got {len(v)}")
    mean = n_terms * float(v.mean())
    # add one to the draws' sum in the floor: five zeros are no proof that a count is always 0
    rate = (float(v.sum()) + 1) / len(v)
    floor = rate * (1 - min(rate, float(n_total or np.inf)) / n_total if n_total else 1.0)
    sigma = np.sqrt(max(float(v.var(ddof=1)), floor))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * sigma * np.sqrt(n_terms + n_terms**2 / len(v))
    return mean, max(0.0, mean - half), mean + half


# the side of the null on which a count says "the model changed": more changed, died or born
# features than the null, fewer that stayed the same. A count on the other side (a step quieter
# than resampling) is shown but is no claim of change.
CHANGE_SIDE = {"same": -1, "changed": 1, "died": 1, "born": 1}


def versus(observed: dict, pairs: list[dict], n_terms: int = 1) -> dict:
    """Per label: the observed count (a sum of ``n_terms`` diffs), the null's mean and 95% interval
    for such a sum, the excess (observed − null mean), whether it lies outside the interval, and
    whether it is called: outside on the side of change (``CHANGE_SIDE``)."""
    out = {}
    for key in LABELS:
        mean, low, high = prediction_interval([p[key] for p in pairs], n_terms, n_total=pairs[0].get("n_features"))
        value = int(observed.get(key, 0))
        out[key] = {
            "observed": value,
            "null_mean": mean,
            "null_low": low,
            "null_high": high,
            "excess": value - mean,
            "outside": bool(value < low or value > high),
            "called": bool(value > high if CHANGE_SIDE[key] > 0 else value < low),
        }
    return out
