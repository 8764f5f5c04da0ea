"""Causal tests of SAE features: ablate, steer or clamp them at one layer during generation,
and measure what that does to the metrics, against controls.

An experiment (``run``) takes its features from the probe (features that carry the metric)
or from fork attribution (``sae_diff.attribution``: features the model uses where it decides),
generates on one prompt set under each condition (plain, no-op, the group, matched random
features, sign-flipped steering, single features with their own random controls, over an
alpha grid), scores every text with the configured scorers plus coherence (perplexity under
M0, repetition), and reports effects against the no-op with bootstrap CIs and permutation
p-values. The prompts are split in two: one half picks what is reported (the group or a
single feature, and alpha), the other reports it.

The pieces live in their own modules: ``sae_diff.editing`` (the edit and its hook),
``sae_diff.conditions`` (feature choice, conditions and controls, the prompt halves) and
``sae_diff.effects`` (scores, effects and their statistics); this module runs an experiment
end to end, and says when one is skipped (``skip_reason``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .conditions import (
    Condition,
    conditions,
    matched_random,
    select_attributed,
    select_features,
    split_prompts,
    typical_activation,
)
from .editing import intervene
from .effects import effects, expected_sign, noop_check, score
from .errors import ConfigError, DataError
from .experiments import EXPERIMENTS, SWEPT, selection_method
from .sae.model import SAE

log = logging.getLogger(__name__)


def skip_reason(
    experiment: str,
    opts: dict,
    scorers: list[dict],
    metric: str,
    probe: str | Path,
    attribution: str | Path | None = None,
) -> str | None:
    """Why one experiment cannot run, or None when it can.

    ``probe`` is the probe's summary JSON (its table is the ``.parquet`` beside it) and
    ``attribution`` the fork attribution table (its summary is the ``.json`` beside it). An
    experiment is skipped when no configured scorer scores ``metric``, when its features come
    from a probe that was skipped (too few labelled samples: no table, nothing was picked), or
    from an attribution that was skipped. Features to be picked by attribution with no
    attribution table given is a configuration error (``ConfigError``), not a skip.
    """
    from .grid import unscored_metric_reason

    method = selection_method(opts, experiment)
    reason = unscored_metric_reason(scorers, metric)
    if reason is not None:
        return reason
    if method == "probe":
        if Path(probe).with_suffix(".parquet").exists():
            return None
        summary = json.loads(Path(probe).read_text())
        return f"the probe {probe} was skipped: {summary.get('skipped', 'no table')}"
    if attribution is None:
        raise ConfigError(
            f"interventions.select.{experiment} = attribution: no attribution table given (--attribution)"
        )
    summary = json.loads(Path(attribution).with_suffix(".json").read_text())
    if "skipped" in summary:
        return f"the attribution {attribution} was skipped: {summary['skipped']}"
    return None


def experiment_prompts(path: str | Path, wheres: list[dict | None], max_prompts: int | None = None) -> pd.DataFrame:
    """The prompts an experiment generates from: the prompt set at ``path`` with each row filter
    of ``wheres`` applied in order (``grid.intervention_prompts`` gives both), then the first
    ``max_prompts``. At least two must be left: one half picks alpha, the other reports."""
    from .data import load_prompts, select_prompts

    prompts = load_prompts(path)
    for where in wheres:
        prompts = select_prompts(prompts, where, str(path))
    if max_prompts:
        prompts = prompts.iloc[:max_prompts]
    if len(prompts) < 2:
        raise DataError(
            f"interventions: {len(prompts)} prompt(s) left in {path} after the filters "
            f"{wheres}; need at least 2 (one to pick alpha, one to report)"
        )
    return prompts


def reported_conditions(conds: list[Condition], name: str, alpha: float | None, control: str) -> list[Condition]:
    """What the report half generates: the baselines, the condition picked on the select half at
    its alpha, its matched random control, and (the group, when steering) its sign-flipped twin."""
    kept = {"plain", "noop", name, control} | ({"flipped"} if name == "features" else set())
    return [c for c in conds if c.name in kept and (c.alpha is None or alpha is None or c.alpha == alpha)]


def generate_all(
    model,
    tokenizer,
    sae: SAE,
    layer: int,
    hook: str,
    prompts: pd.DataFrame,
    conds: list[Condition],
    sampling: dict,
    device: str = "cpu",
    progress: bool = True,
    work_dir: Path | None = None,
) -> pd.DataFrame:
    """Generations of every condition on the same prompts and the same random draws.

    With ``work_dir``, each finished condition is kept there, so an interrupted job resumes
    at the first condition it had not finished.
    """
    from . import data, io

    tables = []
    for i, cond in enumerate(conds):
        label = cond.name + ("" if cond.alpha is None else f"_a{cond.alpha:g}")
        done = None if work_dir is None else Path(work_dir) / f"{i:03d}_{label}.parquet"
        if done is not None and done.exists():
            tables.append(pd.read_parquet(done))
            log.info("condition %s: resumed from %s", label, done)
            continue
        context = contextlib.nullcontext() if cond.edit is None else intervene(model, sae, layer, hook, cond.edit)
        with context:
            table = data.generate(
                model, tokenizer, prompts, sampling, device=device, progress=progress, keep_ids=True, desc=label
            )
        table.insert(0, "condition", cond.name)
        table.insert(1, "role", cond.role)
        table.insert(2, "alpha", np.nan if cond.alpha is None else float(cond.alpha))
        table.insert(3, "features", " ".join(map(str, cond.features)))
        table.insert(4, "condition_index", i)
        if done is not None:
            io.write_parquet(table, done)
        tables.append(table)
    out = pd.concat(tables, ignore_index=True)
    out.insert(0, "generation_id", np.arange(len(out)))
    return out


def run(
    experiment: str,
    model_dir: Path,
    base_dir: Path,
    sae_dir: Path,
    layer: int,
    hook: str,
    probe_json: dict,
    probe_table: pd.DataFrame,
    stats: pd.DataFrame,
    prompts: pd.DataFrame,
    opts: dict,
    scorer_specs: list[dict],
    metric: str,
    direction: str,
    metrics: list[str],
    sampling: dict,
    place="cpu",
    progress: bool = True,
    work_dir: Path | None = None,
    attribution: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One experiment on one (cell, layer, SAE, metric): generations, scores and effects
    (``place``: a models.Placement or a device name). The features come from the probe or, when
    ``opts['select'][experiment]`` is ``attribution``, from the fork ``attribution`` table."""
    from . import models
    from .sae import files

    if experiment not in EXPERIMENTS:
        raise ValueError(f"interventions.experiments: {experiment!r}: expected one of {sorted(EXPERIMENTS)}")
    sae = files.load(sae_dir)
    method = selection_method(opts, experiment)
    if method == "attribution":
        if attribution is None:
            raise ValueError(f"interventions.select.{experiment} = attribution: no attribution table given")
        features = select_attributed(attribution, opts["k"], opts["sign"])
    else:
        features = select_features(
            probe_table, probe_json.get("top_features") or [], opts["k"], opts["sign"], direction
        )
    if not features:
        raise DataError(
            f"no feature of {sae_dir} points the asked way ({opts['sign']}) for {metric} (selected by {method})"
        )
    random = matched_random(
        stats, features, seed=opts["seed"], pool=opts["random_pool"], exclude=probe_json.get("top_features") or []
    )
    typical = dict(zip(features + random, typical_activation(stats, features + random, opts["scale"])))
    conds = conditions(experiment, features, random, typical, opts["alphas"], opts["singles"], opts["positions"])
    place = models.as_placement(place)
    model, tokenizer = place.load(model_dir)
    halves = split_prompts(prompts, opts["seed"])
    expected = expected_sign(direction, opts["sign"], experiment)

    def measured(scores: pd.DataFrame) -> dict:
        measured_metrics = [m for m in metrics if m in scores.columns]
        return effects(
            scores, metric, expected, experiment, measured_metrics, opts["max_perplexity_ratio"], opts["seed"]
        )

    # two stages: every condition on the select half picks what is reported; only that condition,
    # its controls and the baselines then generate on the report half (the rest would never be read)
    stages, scored = [], []
    with place.precision():
        base, base_tokenizer = (model, tokenizer) if Path(base_dir) == Path(model_dir) else place.load(base_dir)
        for half in ("select", "report"):
            stage = conds
            if half == "report":
                chosen = measured(pd.concat(scored, ignore_index=True))["chosen"]
                stage = reported_conditions(conds, chosen["condition"], chosen["alpha"], chosen["control"])
            stage_dir = None if work_dir is None else Path(work_dir) / half
            generated = generate_all(
                model,
                tokenizer,
                sae,
                layer,
                hook,
                halves[halves["half"] == half],
                stage,
                sampling,
                place.device,
                progress,
                stage_dir,
            )
            # condition_index: the condition's place in the experiment's full list, in both stages
            generated["condition_index"] = generated["condition_index"].map(
                {i: conds.index(c) for i, c in enumerate(stage)}
            )
            stages.append(generated)
            scored.append(score(generated, scorer_specs, base, base_tokenizer, sampling["batch_size"], place.device))
    generations = pd.concat(stages, ignore_index=True).assign(generation_id=lambda t: np.arange(len(t)))
    scores = pd.concat(scored, ignore_index=True).assign(generation_id=generations["generation_id"])
    result = measured(scores)
    result.update(
        experiment=experiment,
        metric=metric,
        direction=direction,
        layer=layer,
        hook_point=hook,
        select=method,
        features=features,
        random_features=random,
        typical_activation={str(k): v for k, v in typical.items()},
        scale=opts["scale"],
        alphas=opts["alphas"] if experiment in SWEPT else None,
        positions=opts["positions"],
        max_perplexity_ratio=opts["max_perplexity_ratio"],
        noop=noop_check(generations),
        prompts={"select": int((halves["half"] == "select").sum()), "report": int((halves["half"] == "report").sum())},
        generations={half: int((generations["half"] == half).sum()) for half in ("select", "report")},
    )
    return generations, scores, result
