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
    comparison_conditions,
    conditions,
    matched_random,
    null_conditions,
    select_attributed,
    select_features,
    typical_activation,
)
from .editing import intervene
from .effects import effects, expected_sign, noop_check, score
from .errors import ConfigError, DataError
from .experiments import DIRECTION_COMPARISONS, EXPERIMENTS, SWEPT, check_directions, selection_method
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
    """What the report half generates of the experiment's conditions: the baselines, the
    condition picked on the select half at its alpha, its matched random control, and (the
    group, when steering) its sign-flipped twin. The random null and the comparison methods
    come on top (``run``)."""
    kept = {"plain", "noop", name, control} | ({"flipped"} if name == "features" else set())
    return [c for c in conds if c.name in kept and (c.alpha is None or alpha is None or c.alpha == alpha)]


def _site_rows(model, layer: int, hook: str, id_lists, device="cpu"):
    """The activation at (layer, hook) of each token sequence, position 0 left out as in SAE training."""
    import torch

    from . import models

    for ids in id_lists:
        with torch.inference_mode(), models.capture(model, [(layer, hook)]) as store:
            models.run_until_stopped(model, input_ids=torch.tensor([list(ids)], device=device))
        yield store[(layer, hook)][0, 1:]


def firing_at_edits(model, sae: SAE, layer: int, hook: str, generations: pd.DataFrame, tokenizer, device="cpu"):
    """Each feature's firing rate over the tokens the edits reach (every prompt and completion
    token of ``generations`` but the first position, as in SAE training): what an ablation's
    random controls are matched on, so that a control fires where the edit acts."""
    import torch

    sequences = (
        list(tokenizer(row["prompt_text"], add_special_tokens=True)["input_ids"]) + list(row["completion_ids"])
        for _, row in generations.iterrows()
    )
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    for x in _site_rows(model, layer, hook, sequences, device):
        fired += (sae.encode(x.to(sae.W_dec.dtype).to(sae.W_dec.device)) > 0).sum(dim=0).double().cpu()
        n += x.shape[0]
    return pd.Series((fired / max(n, 1)).numpy(), index=np.arange(sae.cfg.d_sae), name="freq_at_edits")


def mean_projection(
    model, tokenizer, layer: int, hook: str, prompts: pd.DataFrame, sampling: dict, direction, device="cpu"
):
    """The mean of x . u (u = direction / |direction|) over the prompts' tokens as the model
    reads them (chat template applied; position 0 left out): the level a mean-ablation of the
    direction sets its projection to."""
    from .data import format_prompt

    unit = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    texts = [
        format_prompt(tokenizer, p, sampling["chat_template"], sampling.get("system_prompt")) for p in prompts["prompt"]
    ]
    sequences = (tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts)
    values = [x.double().cpu().numpy() @ unit for x in _site_rows(model, layer, hook, sequences, device)]
    return float(np.concatenate(values).mean())


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
        asked = prompts
        if cond.instruction is not None:  # the prompting baseline: the instruction after each prompt
            asked = prompts.assign(prompt=prompts["prompt"] + " " + cond.instruction)
        with context as moved:
            table = data.generate(
                model, tokenizer, asked, sampling, device=device, progress=progress, keep_ids=True, desc=label
            )
        table["delta_norm"] = np.nan if moved is None or moved.mean_norm is None else moved.mean_norm
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
    split_path: str | Path,
    separate: bool,
    place="cpu",
    progress: bool = True,
    work_dir: Path | None = None,
    attribution: pd.DataFrame | None = None,
    directions: dict[str, np.ndarray | None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One experiment on one (cell, layer, SAE, metric): generations, scores and effects
    (``place``: a models.Placement or a device name). The features come from the probe or, when
    ``opts['select'][experiment]`` is ``attribution``, from the fork ``attribution`` table, both
    fitted on the split's feature-selection prompts; the prompts' other two parts (the split at
    ``split_path``; ``separate``: the prompts are a set of their own) pick the condition and
    report it. ``directions``: the comparison methods' directions by name (``DIRECTION_COMPARISONS``):
    ``diffmean``, the probe's difference in means; ``adl``, the activation-difference lens's
    direction of the cell's iteration (Mi − M0 on its texts); ``crosscoder``, what the iteration's
    crosscoder's top Mi-only latents add to Mi (``crosscoder.mi_only_direction``); ``diff_sae``, what
    the diff-SAE latents behind the metric write into Mi − M0 (``metric_latents.direction``). A method that
    ``interventions.baselines`` turns off is not run."""
    from . import models, splits
    from .sae import files

    if experiment not in EXPERIMENTS:
        raise ValueError(f"interventions.experiments: {experiment!r}: expected one of {sorted(EXPERIMENTS)}")
    sae = files.load(sae_dir)
    method = selection_method(opts, experiment)
    if method == "attribution":
        if attribution is None:
            raise ValueError(f"interventions.select.{experiment} = attribution: no attribution table given")
        features = select_attributed(attribution, opts["k"], opts["sign"], opts["attribution"]["rank_by"])
    else:
        features = select_features(
            probe_table, probe_json.get("top_features") or [], opts["k"], opts["sign"], direction
        )
    if not features:
        raise DataError(
            f"no feature of {sae_dir} points the asked way ({opts['sign']}) for {metric} (selected by {method})"
        )
    exclude = probe_json.get("top_features") or []
    random = matched_random(stats, features, seed=opts["seed"], pool=opts["random_pool"], exclude=exclude)
    table = stats.set_index("feature")
    live = table.index[(table["freq"] > 0) & ~table["dead"].astype(bool)]
    typical = dict(zip(table.index, typical_activation(stats, list(table.index), opts["scale"])))
    conds = conditions(experiment, features, random, typical, opts["alphas"], opts["singles"], opts["positions"])
    w_dec = sae.W_dec.detach().double().cpu().numpy()
    swept = opts["alphas"] if experiment in SWEPT else [None]
    baselines = opts.get("baselines") or {}
    instruction = baselines.get("prompting", {}).get(metric)
    check_directions(directions or {})  # before the model loads and the mean projections run
    # a method turned off, or without a direction (a crosscoder with no Mi-only latent), is not run
    directions = {
        name: v
        for name, v in (directions or {}).items()
        if baselines.get(name, True) and v is not None and np.linalg.norm(v) > 0
    }
    # the condition-selection half also runs the comparison methods at every size: their size is
    # picked there the same way as the SAE edit's (prompting has no size: report half only)
    place = models.as_placement(place)
    model, tokenizer = place.load(model_dir)
    halves = splits.intervention_halves(prompts, split_path, separate)
    levels = {}
    for name, vector in directions.items():
        if experiment == "ablation":
            # mean-ablation: the projection's mean over the condition half's prompts, read before anything runs
            select_half = halves[halves["half"] == "select"]
            levels[name] = mean_projection(model, tokenizer, layer, hook, select_half, sampling, vector, place.device)
    compared = comparison_conditions(
        experiment, features, w_dec, directions, None, swept, typical, opts["positions"], levels
    )
    registry = conds + compared  # every condition's index in effects.json (condition_index)
    expected = expected_sign(direction, opts["sign"], experiment)

    def measured(scores: pd.DataFrame) -> dict:
        measured_metrics = [m for m in metrics if m in scores.columns]
        return effects(
            scores, metric, expected, experiment, measured_metrics, opts["max_perplexity_ratio"], opts["seed"]
        )

    # two stages: every condition on the select half picks what is reported; only that condition,
    # its controls, its random null and the comparison methods then generate on the report half
    stages, scored = [], []
    with place.precision():
        base, base_tokenizer = (model, tokenizer) if Path(base_dir) == Path(model_dir) else place.load(base_dir)
        for half in ("select", "report"):
            stage = conds + compared
            if half == "report":
                chosen = measured(pd.concat(scored, ignore_index=True))["chosen"]
                stage = reported_conditions(conds, chosen["condition"], chosen["alpha"], chosen["control"])
                target = next(c for c in stage if c.name == chosen["condition"])
                freq = table["freq"]
                if experiment == "ablation":  # controls that fire where the ablation acts
                    plain = stages[0][stages[0]["condition"] == "plain"]
                    freq = firing_at_edits(model, sae, layer, hook, plain, tokenizer, place.device)
                nulls = null_conditions(
                    experiment,
                    target,
                    w_dec,
                    freq,
                    live,
                    typical,
                    opts["random_null"]["n_controls"],
                    opts["seed"] + 7,
                    opts["random_pool"],
                    sorted(set(exclude) | set(features)),
                    opts["positions"],
                )
                picked = chosen["comparisons"]
                report_compared = [c for c in compared if c.name in picked and c.alpha == picked[c.name]]
                report_compared += comparison_conditions(
                    experiment, features, w_dec, {}, instruction, [], typical, opts["positions"]
                )
                stage = stage + report_compared + nulls
                registry += [c for c in report_compared + nulls if all(c is not r for r in registry)]
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
                {i: next(j for j, r in enumerate(registry) if r is c) for i, c in enumerate(stage)}
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
        typical_activation={str(k): typical[k] for k in features + random},
        scale=opts["scale"],
        alphas=opts["alphas"] if experiment in SWEPT else None,
        positions=opts["positions"],
        max_perplexity_ratio=opts["max_perplexity_ratio"],
        noop=noop_check(generations),
        # the projection each comparison's mean-ablation sets (ablation)
        **{f"{name}_level": levels.get(name) for name in DIRECTION_COMPARISONS},
        split=splits.counts(splits.read(split_path), separate, set(prompts["prompt"])),
        prompts={"select": int((halves["half"] == "select").sum()), "report": int((halves["half"] == "report").sum())},
        generations={half: int((generations["half"] == half).sum()) for half in ("select", "report")},
    )
    return generations, scores, result
