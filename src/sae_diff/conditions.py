"""Which features an intervention experiment edits and under which conditions it generates.

An experiment takes its features from the probe (features that carry the metric) or from fork
attribution (``sae_diff.attribution``: features the model uses where it decides), and
generates on one prompt set under each condition (plain, no-op, the group, matched random
features, sign-flipped steering, single features with their own random controls, over an
alpha grid). The prompts are split in two: one half picks what is reported (the group or a
single feature, and alpha), the other reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .editing import Edit
from .experiments import DIRECTION_COMPARISONS, EXPERIMENTS, SWEPT, check_directions

# --------------------------------------------------------------------------- feature choice


def _check_sign(sign: str) -> None:
    if sign not in ("promote", "suppress", "any"):
        raise ValueError(f"interventions.sign = {sign!r}: expected promote, suppress or any")


def select_features(probe: pd.DataFrame, top: list[int], k: int, sign: str, direction: str) -> list[int]:
    """The first ``k`` features of the probe's L1-path order whose difference in means points the
    asked way: ``promote`` (higher metric in the target direction), ``suppress``, or ``any``.

    After the probe's ``top`` list, features continue in path-entry order, then by |SMD|.
    """
    _check_sign(sign)
    smd = probe.set_index("feature")["smd"]
    ordered = probe.assign(order=probe["l1_entry"].fillna(np.inf), size=-probe["smd"].abs())
    ordered = ordered.sort_values(["order", "size", "feature"])["feature"].tolist()
    want = 1.0 if direction == "up" else -1.0
    if sign == "suppress":
        want = -want
    chosen: list[int] = []
    for feature in [*top, *ordered]:
        feature = int(feature)
        if feature in chosen or not np.isfinite(smd.get(feature, np.nan)):
            continue
        if sign == "any" or np.sign(smd[feature]) == want:
            chosen.append(feature)
        if len(chosen) == k:
            break
    return chosen


def select_attributed(attribution: pd.DataFrame, k: int, sign: str, by: str = "t") -> list[int]:
    """The ``k`` features whose fork attribution points most surely toward the better
    continuation (``promote``), away from it (``suppress``) or either way (``any``), ranked by
    ``by``: ``t`` (mean / standard error over the selection forks: a feature that pushes the same
    way at every fork beats one large push at a single fork) or ``attribution`` (the mean alone).
    Zero scores (features that never fire before a fork) are never chosen."""
    _check_sign(sign)
    if by not in ("t", "attribution"):
        raise ValueError(f"interventions.attribution.rank_by = {by!r}: expected t or attribution")
    if by not in attribution.columns:
        raise ValueError(f"the attribution table has no column {by!r} (columns: {list(attribution.columns)})")
    score = attribution.set_index("feature")[by]
    score = {"promote": score, "suppress": -score, "any": score.abs()}[sign]
    score = score[score > 0].sort_values(ascending=False, kind="stable")
    return [int(f) for f in score.index[:k]]


def matched_random(
    stats: pd.DataFrame, features: list[int], seed: int, pool: int = 20, exclude: list[int] | None = None
) -> list[int]:
    """For each feature, a random live feature among the ``pool`` nearest in log firing frequency
    (none chosen twice, none from ``features`` or ``exclude``): one draw of ``matched_draws``."""
    table = stats.set_index("feature")
    live = table.index[(table["freq"] > 0) & ~table["dead"].astype(bool)]
    return matched_draws(table["freq"], live, features, 1, seed, pool, exclude)[0]


def matched_draws(
    freq: pd.Series,
    live: pd.Index,
    features: list[int],
    n_draws: int,
    seed: int,
    pool: int = 20,
    exclude: list[int] | None = None,
) -> list[list[int]]:
    """``n_draws`` random feature sets for the null, each matched to ``features`` one for one:
    for each feature, a live feature among the ``pool`` nearest in log ``freq`` (the firing
    frequency to match: overall, or at the positions the edit reaches), none of ``features`` or
    ``exclude``, none twice within a draw."""
    rng = np.random.default_rng(seed)
    log_freq = np.log(freq.clip(lower=1e-12))
    candidates = log_freq[log_freq.index.isin(live) & ~log_freq.index.isin(set(features) | set(exclude or []))]
    if len(candidates) < len(features):
        raise ValueError(f"matched_draws: {len(candidates)} live features left to draw {len(features)} from")
    nearest = {
        f: np.asarray((candidates - log_freq.get(f, np.log(1e-12))).abs().sort_values(kind="stable").index[:pool])
        for f in features
    }
    draws = []
    for _ in range(n_draws):
        taken: list[int] = []
        for f in features:
            options = [int(c) for c in nearest[f] if int(c) not in taken] or [
                int(c) for c in candidates.index if int(c) not in taken
            ]
            taken.append(int(rng.choice(options)))
        draws.append(taken)
    return draws


def random_units(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` directions uniform on the unit sphere of R^dim (float64)."""
    v = np.random.default_rng(seed).standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def typical_activation(stats: pd.DataFrame, features: list[int], how: str) -> list[float]:
    """s_j: the mean nonzero activation (``mean``) or the largest seen (``max``)."""
    column = {"mean": "mean_act", "max": "max_act"}.get(how)
    if column is None:
        raise ValueError(f"interventions.scale = {how!r}: expected mean or max")
    values = stats.set_index("feature").loc[features, column].to_numpy(dtype=float)
    return [float(v) if np.isfinite(v) else 0.0 for v in values]


# --------------------------------------------------------------------------- conditions


@dataclass
class Condition:
    """One way of generating: ``edit`` None is the plain, unhooked model."""

    name: str
    role: str  # baseline | target | control | single | null | comparison
    edit: Edit | None
    alpha: float | None = None
    features: list[int] = field(default_factory=list)
    instruction: str | None = None  # appended to every prompt (the prompting baseline)


def conditions(
    experiment: str,
    features: list[int],
    random: list[int],
    typical: dict[int, float],
    alphas: list[float],
    n_single: int,
    positions: str,
) -> list[Condition]:
    """Every condition of one experiment: plain and no-op baselines, the features as a group,
    matched random features, (steering) the sign-flipped group, and single features, each with
    its own matched random feature."""
    edit_kind = EXPERIMENTS[experiment][0]
    out = [Condition("plain", "baseline", None), Condition("noop", "baseline", Edit("noop", positions=positions))]

    def make(name, role, group, alpha=None, sign=1.0):
        values = () if alpha is None else tuple(sign * alpha * typical[j] for j in group)
        return Condition(name, role, Edit(edit_kind, tuple(group), values, positions), alpha, list(group))

    # each single feature has its own matched random control (random[i] was drawn for features[i])
    singles = list(zip(features[:n_single], random[:n_single]))
    for alpha in alphas if experiment in SWEPT else [None]:
        out += [make("features", "target", features, alpha), make("random", "control", random, alpha)]
        if experiment == "steering":
            out.append(make("flipped", "control", features, alpha, sign=-1.0))
        for j, r in singles:
            out += [make(f"feature_{j}", "single", [j], alpha), make(f"random_{j}", "control", [r], alpha)]
    return out


def split_prompts(prompts: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Half the prompts pick alpha (``select``), the other half report (``report``)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    half = np.where(np.isin(np.arange(len(prompts)), order[: len(prompts) // 2]), "select", "report")
    return prompts.assign(half=half)


def steering_size(w_dec: np.ndarray, features: list[int], values: list[float]) -> float:
    """|sum_j c_j d_j|: how far a steering edit moves the activation at every position."""
    return float(np.linalg.norm(np.asarray(values, dtype=np.float64) @ np.asarray(w_dec, dtype=np.float64)[features]))


def null_conditions(
    experiment: str,
    chosen: Condition,
    w_dec: np.ndarray,
    freq: pd.Series,
    live: pd.Index,
    typical: dict[int, float],
    n_controls: int,
    seed: int,
    pool: int,
    exclude: list[int],
    positions: str,
) -> list[Condition]:
    """The random null of the reported condition: ``n_controls`` edits that keep everything but
    the choice of features. Half are feature sets matched one for one on firing frequency
    (``freq``: for ablation, the firing at the positions the edit reaches), edited like the
    chosen ones (steered by alpha times their own typical activation, or ablated); half are
    random directions moved by exactly the chosen edit's |dx| at each position (steering: the
    constant |sum_j c_j d_j|; ablation: |sum_j f_j(x) d_j| of the chosen features, per position).

    ``typical`` must hold every live feature's typical activation (steering)."""
    edit_kind = EXPERIMENTS[experiment][0]
    n_feat = n_controls // 2
    draws = matched_draws(freq, live, chosen.features, n_feat, seed, pool, exclude)
    units = random_units(n_controls - n_feat, w_dec.shape[1], seed + 1)
    out = []
    for i, group in enumerate(draws):
        values = () if chosen.alpha is None else tuple(chosen.alpha * typical[j] for j in group)
        edit = Edit(edit_kind, tuple(group), values, positions)
        out.append(Condition(f"null_feature_{i:03d}", "null", edit, chosen.alpha, list(group)))
    size = steering_size(w_dec, chosen.features, list(chosen.edit.values)) if edit_kind == "steer" else 1.0
    for i, unit in enumerate(units):
        if edit_kind == "steer":
            edit = Edit("add", positions=positions, direction=tuple(size * unit))
        elif edit_kind == "ablate":
            edit = Edit("ablate_matched", tuple(chosen.features), positions=positions, direction=tuple(unit))
        else:
            raise ValueError(f"a random-direction null for {experiment} is not defined (steering, ablation)")
        out.append(Condition(f"null_direction_{i:03d}", "null", edit, chosen.alpha))
    return out


def comparison_conditions(
    experiment: str,
    group: list[int],
    w_dec: np.ndarray,
    directions: dict[str, np.ndarray | None],
    instruction: str | None,
    alphas: list[float | None],
    typical: dict[int, float],
    positions: str,
    levels: dict[str, float] | None = None,
) -> list[Condition]:
    """The simple methods an SAE edit must beat (the AxBench lesson), in ``DIRECTION_COMPARISONS``
    order: ``directions`` by method — the difference in means of the metric's high and low samples'
    activations, the activation-difference lens's direction (the mean of Mi − M0 over the
    iteration's texts: training-free, no labels) and the crosscoder's (what its top Mi-only latents
    add to Mi and not to M0: ``crosscoder.mi_only_direction``) and the diff-SAE's (what its latents
    behind the metric write into Mi − M0: ``metric_latents.direction``); a method that is absent, None or zero
    is left out. Steering: added, at each alpha of ``alphas`` moved by the same |dx| as steering the
    SAE ``group`` at that alpha; ablation: mean-ablated, its projection set to ``levels[method]``,
    its mean where the edit acts (zero-ablating a direction the activations carry a large mean along
    breaks the text). And, for steering with an ``instruction``, that instruction appended to the
    prompt. The select half runs every alpha; the report half the one picked there."""
    check_directions(directions)
    out = []
    edit_kind = EXPERIMENTS[experiment][0]
    for name in DIRECTION_COMPARISONS:
        direction = directions.get(name)
        if direction is None or not np.linalg.norm(direction) > 0:
            continue
        level = (levels or {}).get(name)
        unit = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
        if edit_kind == "steer":
            for alpha in alphas:
                size = steering_size(w_dec, group, [alpha * typical[j] for j in group])
                edit = Edit("add", positions=positions, direction=tuple(size * unit))
                out.append(Condition(name, "comparison", edit, alpha))
        elif edit_kind == "ablate":
            values = () if level is None else (float(level),)
            edit = Edit("project_out", values=values, positions=positions, direction=tuple(unit))
            out.append(Condition(name, "comparison", edit))
    if instruction and edit_kind == "steer":
        out.append(Condition("prompting", "comparison", None, instruction=instruction))
    return out
