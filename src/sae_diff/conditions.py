"""Which features an intervention experiment edits and under which conditions it generates.

An experiment takes its features from the probe (features that carry the metric) or from fork
attribution (``sae_diff.attribution``: features the model uses where it decides), and
generates on one prompt set under each condition (plain, no-op, the group, matched random
features, sign-flipped steering, single features with their own random controls, over an
alpha grid). The prompts are split in two: one half picks what is reported (the group or a
single feature, and alpha), the other reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .editing import Edit
from .experiments import EXPERIMENTS, SWEPT

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


def select_attributed(attribution: pd.DataFrame, k: int, sign: str) -> list[int]:
    """The ``k`` features with the largest fork attribution toward the better continuation
    (``promote``), away from it (``suppress``) or either way (``any``); zero attributions
    (features that never fire before a fork) are never chosen."""
    _check_sign(sign)
    score = attribution.set_index("feature")["attribution"]
    score = {"promote": score, "suppress": -score, "any": score.abs()}[sign]
    score = score[score > 0].sort_values(ascending=False, kind="stable")
    return [int(f) for f in score.index[:k]]


def matched_random(
    stats: pd.DataFrame, features: list[int], seed: int, pool: int = 20, exclude: list[int] | None = None
) -> list[int]:
    """For each feature, a random live feature among the ``pool`` nearest in log firing frequency
    (none chosen twice, none from ``features`` or ``exclude``)."""
    rng = np.random.default_rng(seed)
    table = stats.set_index("feature")
    live = table[(table["freq"] > 0) & ~table["dead"].astype(bool)]
    taken = set(features) | set(exclude or [])
    out = []
    for feature in features:
        candidates = live.drop(index=[f for f in taken if f in live.index])
        if candidates.empty:
            raise ValueError("matched_random: no live feature left to draw a control from")
        target = math.log(max(float(table.loc[feature, "freq"]), 1e-12))
        distance = (np.log(candidates["freq"].clip(lower=1e-12)) - target).abs()
        nearest = distance.sort_values(kind="stable").index[:pool]
        pick = int(rng.choice(np.asarray(nearest)))
        out.append(pick)
        taken.add(pick)
    return out


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
    role: str  # baseline | target | control | single
    edit: Edit | None
    alpha: float | None = None
    features: list[int] = field(default_factory=list)


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
