"""`sae-diff <verb>`: one verb per workflow rule, so every step also runs outside Snakemake.

Rules pass the part of the config a step depends on as ``--spec`` (a JSON string, or
``@file.json``); a user can instead give ``--config config.yaml`` plus the ids.
Errors in inputs print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sae_diff")


def _spec(args) -> dict:
    if args.spec is not None:
        text = Path(args.spec[1:]).read_text() if args.spec.startswith("@") else args.spec
        return json.loads(text)
    if args.config is None:
        raise SystemExit("error: give --spec JSON or --config FILE")
    from . import config as cfglib

    return cfglib.load(args.config)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", help="the step's config as JSON, or @path/to/spec.json")
    parser.add_argument("--config", help="a full config YAML (instead of --spec)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cell(parser: argparse.ArgumentParser, layer: bool = False) -> None:
    """--model / --data (and --layer) naming the cell a verb works on."""
    parser.add_argument("--model", required=True, help="model id, e.g. M1")
    parser.add_argument("--data", required=True, help="data id, e.g. D1")
    if layer:
        parser.add_argument("--layer", type=int, required=True, help="block index")


# verb name -> (help, the function adding its arguments, the command); each verb's arguments
# sit right above its command, and build_parser adds them in this order
VERBS: dict[str, tuple[str, Callable, Callable]] = {}


def verb(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(fn: Callable) -> Callable:
        VERBS[name] = (help_text, add_arguments, fn)
        return fn

    return register


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("configfile")
    p.add_argument("--show", action="store_true", help="print the config with defaults filled in")


@verb("validate", "validate a config file and print the grid", _validate_args)
def cmd_validate(args) -> None:
    from . import config as cfglib
    from . import data, grid, models

    cfg = cfglib.load(args.configfile)
    tables = {
        data_id: data.load_table(spec) for data_id, spec in cfg["data"].items() if spec["source"] == "table"
    }  # the user's tables, with the checks make-data applies
    if tables:  # and every text against each tokenizer that is at hand (extraction checks them all)
        for model_id, spec in cfg["models"].items():
            tokenizer = models.source_tokenizer(spec, model_id)
            for data_id, table in tables.items() if tokenizer is not None else ():
                data.check_vocabulary(table, tokenizer, cfg["data"][data_id]["path"], f"models.{model_id}")
    for scorer in cfg["scorers"]:  # reference sequences, with the scorer's own check
        if scorer["name"] == "protein_identity":
            from . import scorers

            scorers.read_fasta(
                scorer["reference"], scorers.matrix_alphabet(scorer.get("substitution_matrix", "BLOSUM62"))
            )
    print(
        json.dumps(cfg, indent=2)
        if args.show
        else f"{args.configfile}: valid ({len(grid.cells(cfg))} cells, layers {cfg['layers']})"
    )
    for metric in dict.fromkeys(run.metric for run in grid.intervention_runs(cfg)):
        reason = grid.unscored_metric_reason(cfg["scorers"], metric)
        if reason:
            print(f"note: interventions on {metric} will be skipped: {reason}", file=sys.stderr)


def _prepare_model_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--model", required=True)
    p.add_argument("--init-from", help="the prepared folder of the model this one starts from (init_from)")
    p.add_argument("--out", required=True)


@verb("prepare-model", "convert a configured model to a safetensors HF folder", _prepare_model_args)
def cmd_prepare_model(args) -> None:
    from . import models

    spec = _spec(args)
    models.set_threads(args.threads)
    models.prepare(args.model, spec["models"], args.out, init_from=args.init_from)


def _make_data_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--data", required=True)
    p.add_argument("--model-dir", help="the generating model's prepared folder (source generate)")
    p.add_argument("--out", required=True)


@verb("make-data", "generate or load one data set, with its train/eval split", _make_data_args)
def cmd_make_data(args) -> None:
    from . import data, io, models

    spec = _spec(args)
    models.set_threads(args.threads)
    table = data.make(
        spec["data"][args.data],
        spec["split"],
        args.model_dir,
        place=models.placement(spec),
        progress=not args.no_progress,
    )
    io.write_parquet(table, args.out)
    log.info("%s: %s", args.data, data.describe(table))


def _score_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True)


@verb("score", "add the configured scorers' metric columns", _score_args)
def cmd_score(args) -> None:
    import pandas as pd

    from . import io, scorers

    spec = _spec(args)
    table = scorers.score(pd.read_parquet(args.samples), spec["scorers"], spec.get("own_metrics", []))
    io.write_parquet(table, args.out)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--model", required=True, help="the model id this round makes, e.g. M1")
    p.add_argument("--samples", required=True, help="scored samples the pairs come from")
    p.add_argument("--parent", required=True, help="the prepared folder of the model this round trains")
    p.add_argument("--reference", required=True, help="the prepared folder of the DPO reference model")
    p.add_argument("--out", required=True)


@verb("finetune", "make one iteration by DPO on its parent's scored generations", _finetune_args)
def cmd_finetune(args) -> None:
    """One DPO round: pairs from the scored samples, then TRL's DPOTrainer on the parent model."""
    import pandas as pd

    from . import finetune, models

    spec = _spec(args)
    models.set_threads(args.threads)
    it, model = spec["iterations"], spec["models"][args.model]
    pairs = finetune.build_pairs(
        pd.read_parquet(args.samples),
        it["target"]["metric"],
        it["target"]["direction"],
        margin=it["pairs"]["margin"],
        missing=it["pairs"]["missing"],
        max_per_prompt=it["pairs"]["max_per_prompt"],
        where=it["target"].get("where"),
    )
    log.info(
        "%s: %d preference pairs from %s on %s (%s)",
        args.model,
        len(pairs),
        model["pairs_from"],
        it["target"]["metric"],
        it["target"]["direction"],
    )
    record = finetune.dpo(
        Path(args.parent),
        Path(args.reference),
        pairs,
        it["dpo"],
        args.out,
        place=models.placement(spec),
        progress=not args.no_progress,
    )
    log.info("%s: DPO loss %.4f -> %.4f", args.model, record["loss_first"], record["loss_last"])


def _iterations_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--samples", nargs="+", required=True, help="results/data/Di/samples.parquet, in order")
    p.add_argument("--examples", help="also write a few held-out generations per iteration (CSV) here")
    p.add_argument("--out", required=True)


@verb("iterations", "per-iteration metric means with bootstrap CIs and the shift", _iterations_args)
def cmd_iterations(args) -> None:
    """Per-iteration means of every metric with bootstrap CIs, and the M0 -> MX shift."""
    import pandas as pd

    from . import io, iterations, scorers

    spec = _spec(args)
    tables = {Path(path).parent.name: pd.read_parquet(path) for path in args.samples}
    metrics = scorers.metric_columns(spec["scorers"], spec["data"])
    target = (spec.get("iterations") or {}).get("target")
    result = iterations.summarize(tables, metrics, target, seed=spec["seed"])
    io.write_json(args.out, result)
    if args.examples:
        rows = [{"model": model, **row} for model, examples in result["examples"].items() for row in examples]
        with io.atomic_path(args.examples) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


def _features_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _cell(p, layer=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--acts-dir", required=True, help="the cell's activation stores (one folder per site)")
    p.add_argument("--saes-dir", required=True, help="the (cell, layer)'s SAEs, one folder per config")
    p.add_argument("--out-dir", required=True, help="one folder per SAE config is written here")


@verb("features", "feature statistics, examples, logit lens and groups of one (cell, layer)", _features_args)
def cmd_features(args) -> None:
    """Feature statistics, examples, logit lens, group statistics of the SAEs of one (cell, layer)."""
    import pandas as pd

    from . import features, models
    from .activations import open_stores
    from .grid import site_dir

    spec = _spec(args)
    models.set_threads(args.threads)
    place = models.placement(spec)
    cell = f"{args.model}_{args.data}"
    # one copy of the model, placed like every other model job: the logit lens and (with
    # activations.cache: false) the streamed shards both use it
    model, tokenizer = place.load(args.model_dir)
    samples = pd.read_parquet(args.samples)
    for name, block in spec["saes"].items():
        hook = block.get("hook_point", "resid_post")
        (store,) = open_stores(
            [Path(args.acts_dir) / site_dir(args.layer, hook)],
            args.model_dir,
            args.samples,
            place,
            loaded=(model, tokenizer),
        )
        summary = features.write(
            Path(args.saes_dir) / name,
            store,
            samples,
            Path(args.out_dir) / name,
            spec["features"],
            model=model,
            tokenizer=tokenizer,
            device=place.device,
            progress=not args.no_progress,
        )
        log.info("%s layer %d %s: %s", cell, args.layer, name, summary)


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--saes", required=True, help="folder of the base cell's SAEs of this layer")
    p.add_argument("--seed-saes", required=True, help="folder of the seed-pair SAEs")
    p.add_argument(
        "--cross-init",
        nargs="+",
        metavar="SAE=FOLDER",
        help="per SAE config: the folder of its partner from another init",
    )
    p.add_argument("--null-dir", help="the resampling null's folder (null-diffs' cosines): thresholds from it")
    p.add_argument(
        "--stats",
        nargs="+",
        metavar="SAE=FILE",
        help="per SAE config: the base cell's feature statistics (stats.parquet); the seed pair's changed "
        "fraction then counts only features that fire on its eval tokens",
    )
    p.add_argument("--out-dir", required=True)


@verb("calibrate", "same / new thresholds from the resampling null (or a seed pair) of the base cell", _calibrate_args)
def cmd_calibrate(args) -> None:
    """Same / changed / new thresholds per SAE config from a seed pair on the base cell, and the
    cross-init MMCS of its convergence check."""
    import numpy as np
    import pandas as pd

    from . import convergence, diff, io, nulls
    from .sae import files

    spec = _spec(args)
    criterion = convergence.Criterion.from_config(spec["diff"]["convergence"])
    partners = dict(item.split("=", 1) for item in args.cross_init or [])
    stats = dict(item.split("=", 1) for item in args.stats or [])
    for name in spec["saes"]:
        main = files.load(Path(args.saes) / name)
        seed = files.load(Path(args.seed_saes) / name)
        block = spec["diff"]
        thresholds, null = diff.calibration(main, seed, block["same_quantile"], block["new_quantile"])
        if block["thresholds_from"] == "resampling":
            if not args.null_dir:
                raise SystemExit("calibrate: diff.thresholds_from is resampling, so --null-dir is required")
            cosines = pd.read_parquet(Path(args.null_dir) / f"{name}_cosines.parquet")
            pooled = [group["dec_cos_match"].to_numpy() for _, group in cosines.groupby("pair")]
            thresholds = nulls.thresholds(pooled, block["same_quantile"], block["new_quantile"])
        # changed_fraction: the seed pair (the second null) labelled with the thresholds in use
        alive = None
        if name in stats:  # the base cell's features that fire on its eval split (a step's 'alive')
            table = pd.read_parquet(stats[name], columns=["feature", "fire_count"])
            alive = np.zeros(main.cfg.d_sae, dtype=bool)
            alive[table["feature"].to_numpy()] = table["fire_count"].to_numpy() > 0
        record = diff.calibration_record(null, thresholds, alive)
        record["thresholds_from"] = block["thresholds_from"]
        record["seed_pair"] = [str(Path(args.saes) / name), str(Path(args.seed_saes) / name)]
        partner = Path(partners.get(name, Path(args.seed_saes) / name))
        record["cross_init"] = convergence.cross_init_record(main, files.load(partner), criterion)
        record["cross_init"]["partner"] = str(partner)
        out = Path(args.out_dir)
        # the figure's null: the cosines the thresholds are quantiles of
        io.write_parquet(cosines if block["thresholds_from"] == "resampling" else null, out / f"{name}_null.parquet")
        io.write_json(out / f"{name}.json", record)
        log.info("layer %d %s: thresholds %s", args.layer, name, thresholds.to_dict())


def _diff_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--a", required=True, help="cell, e.g. M0_D0")
    p.add_argument("--b", required=True, help="cell, e.g. M1_D1")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--calibration", required=True, help="folder of the layer's calibration JSONs")
    for cell in ("a", "b"):
        p.add_argument(f"--{cell}-saes", required=True, help=f"cell {cell}'s SAEs of this layer, one folder per config")
        p.add_argument(f"--{cell}-acts", required=True, help=f"cell {cell}'s activation stores (their eval split)")
        p.add_argument(f"--{cell}-samples", required=True, help=f"cell {cell}'s samples (its eval tokens' prompts)")
    p.add_argument("--out-dir", required=True)


MOST_MOVED = 20  # flagged features listed in a diff's JSON, most activation mass moved first (diff.ranked)


@verb("diff", "labelled diff of the SAEs of two cells (one layer): weights matched, presence tested", _diff_args)
def cmd_diff(args) -> None:
    """Labelled diff of every SAE config between two cells of one layer: matched weights
    (``diff.weight_diff``) and each feature's presence on the other cell's eval tokens
    (``presence``)."""

    from . import diff, io, models, presence
    from .grid import Cell, site_dir, warm_start_source
    from .sae import files

    spec = _spec(args)
    models.set_threads(args.threads)
    a, b = Cell.parse(args.a), Cell.parse(args.b)
    tokens = {}  # (cell, site) -> its eval tokens, read once per site

    def eval_of(cell: str, hook_point: str):
        site = site_dir(args.layer, hook_point)
        if (cell, site) not in tokens:
            acts = Path(getattr(args, f"{cell}_acts")) / site
            tokens[cell, site] = presence.read_eval_tokens(acts, getattr(args, f"{cell}_samples"))
        return tokens[cell, site]

    for name, block in spec["saes"].items():
        thresholds = diff.Thresholds(**io.read_json(Path(args.calibration) / f"{name}.json")["thresholds"])
        aligned = warm_start_source(spec, b, block.get("warm_start", "none")) == a
        table, summary = diff.compare(
            files.load(Path(args.a_saes) / name),
            files.load(Path(args.b_saes) / name),
            eval_of("a", block["hook_point"]),
            eval_of("b", block["hook_point"]),
            thresholds,
            aligned,
            spec["diff"]["norm_collapse"],
            spec["diff"]["absent_below"],
        )
        out = Path(args.out_dir)
        io.write_parquet(table, out / f"{name}.parquet")
        moved = diff.ranked(table, summary).head(MOST_MOVED)
        io.write_json(
            out / f"{name}.json",
            {"a": a.name, "b": b.name, "layer": args.layer, "sae": name, **summary,
             "most_moved": moved.to_dict("records")},
        )  # fmt: skip
        log.info("%s -> %s layer %d %s: %s", a.name, b.name, args.layer, name, summary["counts"])


def _evolution_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--diffs", nargs="+", required=True, help="every diff summary (JSON) of the layer")
    p.add_argument("--calibration", nargs="+", required=True, help="the layer's calibration JSONs, <sae>.json")
    p.add_argument("--saes", nargs="+", required=True, help="sae_weights.safetensors of every cell's SAEs")
    p.add_argument("--stats", nargs="+", required=True, help="stats.parquet of every cell's SAEs")
    p.add_argument("--nulls", nargs="+", required=True, help="the layer's resampling-null counts, <sae>.json")
    p.add_argument("--out-dir", required=True)


@verb("evolution", "lineages and counts per step along each branch (one layer)", _evolution_args)
def cmd_evolution(args) -> None:
    """Lineages and per-step counts along each branch, for every SAE config of one layer."""
    from . import evolution, io

    spec = _spec(args)
    result = evolution.run(spec, args.layer, args.diffs, args.calibration, args.saes, args.stats, args.nulls)
    for name, block in result.items():
        from . import grid

        for branch, part in block["branches"].items():
            lineages = Path(args.out_dir) / Path(grid.evolution_lineages(args.layer, name, branch)).name
            io.write_parquet(part.pop("lineages"), lineages)
        io.write_json(Path(args.out_dir) / f"{name}.json", block)


def _probe_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _cell(p, layer=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--model-dir", help="the cell's model: needed when its activations are not cached")
    p.add_argument("--acts-dir", required=True, help="the cell's activation stores (one folder per site)")
    p.add_argument("--saes-dir", required=True, help="the (cell, layer)'s SAEs, one folder per config")
    p.add_argument("--base-saes-dir", required=True, help="the base cell's SAEs of this layer")
    p.add_argument("--features-dir", required=True, help="the (cell, layer)'s feature statistics")
    p.add_argument(
        "--prompt-split",
        help="the prompt split table: probe only the samples of its feature-selection prompts",
    )
    p.add_argument("--out-dir", required=True, help="one folder per SAE config is written here")


@verb("probe", "sparse and difference-in-means probes of one (cell, layer)'s SAEs", _probe_args)
def cmd_probe(args) -> None:
    """Probes of every SAE of one (cell, layer) against every probed metric (``probes.write_cell``)."""
    from . import models, probes

    spec = _spec(args)
    probes.write_cell(
        spec,
        cell=f"{args.model}_{args.data}",
        layer=args.layer,
        samples_path=Path(args.samples),
        prompt_split=args.prompt_split,
        features_dir=Path(args.features_dir),
        acts_dir=Path(args.acts_dir),
        saes_dir=Path(args.saes_dir),
        base_saes_dir=Path(args.base_saes_dir),
        out_dir=Path(args.out_dir),
        model_dir=args.model_dir,
        place=models.placement(spec),
    )


def _adl_direction(path: str):
    """The lens's direction on the iteration's own texts (``data.direction`` of its adl.safetensors)."""
    from safetensors.numpy import load_file

    return load_file(path)["data.direction"].astype("float64")


def _intervene_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--experiment", required=True, choices=["ablation", "steering", "clamping"])
    p.add_argument("--cell", required=True, help="the cell whose SAE and probe give the features, e.g. M2_D2")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--sae", required=True, help="SAE config name")
    p.add_argument("--metric", required=True)
    p.add_argument("--model", required=True, help="the model that generates (ablation: Mi, steering: M0)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--base-dir", required=True, help="M0: the perplexity reference")
    p.add_argument("--sae-dir", required=True)
    p.add_argument("--probe", required=True, help="the probe's JSON (its table beside it)")
    p.add_argument("--stats", required=True, help="the SAE's feature stats.parquet")
    p.add_argument("--attribution", help="the fork attribution table (when interventions.select picks by attribution)")
    p.add_argument("--prompt-split", required=True, help="the prompt split (which prompts pick, which report)")
    p.add_argument("--diffmean", help="the probe's difference-in-means direction (.npy): a comparison method")
    p.add_argument(
        "--adl", help="the activation-difference lens of the cell's iteration (adl.safetensors): a comparison"
    )
    p.add_argument(
        "--crosscoder", help="the crosscoder of the cell's iteration (its run folder): its Mi-only latents compared"
    )
    p.add_argument(
        "--diff-sae", help="the diff-SAE of the cell's iteration (its run folder): its metric's latents compared"
    )
    p.add_argument("--out-dir", required=True)


@verb("intervene", "ablate / steer a cell's top probe features during generation, with controls", _intervene_args)
def cmd_intervene(args) -> None:
    """One causal experiment: edit a cell's top features (by probe or attribution) during generation,
    with controls."""
    import shutil

    import numpy as np
    import pandas as pd

    from . import crosscoder, interventions, io, metric_latents, models

    spec = _spec(args)
    models.set_threads(args.threads)
    place = models.placement(spec)
    opts = spec["interventions"]
    prompts = interventions.experiment_prompts(spec["prompts"], spec["wheres"], opts.get("max_prompts"))
    probe_json = json.loads(Path(args.probe).read_text())
    probe_table = Path(args.probe).with_suffix(".parquet")
    out = Path(args.out_dir)
    reason = interventions.skip_reason(
        args.experiment, opts, spec["scorers"], args.metric, args.probe, args.attribution or None
    )
    if reason is not None:  # every output says why nothing was run
        log.warning("%s %s layer %d: %s", args.experiment, args.cell, args.layer, reason)
        io.write_parquet(pd.DataFrame(), out / "generations.parquet")
        io.write_parquet(pd.DataFrame(), out / "scores.parquet")
        io.write_json(
            out / "effects.json",
            {
                "experiment": args.experiment,
                "cell": args.cell,
                "layer": args.layer,
                "sae": args.sae,
                "metric": args.metric,
                "model": args.model,
                "skipped": reason,
            },
        )
        return
    work = out.parent / f".{out.name}.work"
    generations, scores, result = interventions.run(
        args.experiment,
        Path(args.model_dir),
        Path(args.base_dir),
        Path(args.sae_dir),
        args.layer,
        spec["hook_point"],
        probe_json,
        pd.read_parquet(probe_table) if probe_table.exists() else None,
        pd.read_parquet(args.stats),
        prompts,
        opts,
        spec["scorers"],
        args.metric,
        spec["direction"],
        spec["metrics"],
        opts["sampling"],
        args.prompt_split,
        spec["separate"],
        place=place,
        progress=not args.no_progress,
        work_dir=work,
        attribution=pd.read_parquet(args.attribution) if args.attribution else None,
        directions={
            "diffmean": np.load(args.diffmean) if args.diffmean else None,
            "adl": _adl_direction(args.adl) if args.adl else None,
            "crosscoder": crosscoder.mi_only_direction(args.crosscoder, opts["k"]) if args.crosscoder else None,
            "diff_sae": (
                metric_latents.direction(args.diff_sae, args.metric, spec["direction"]) if args.diff_sae else None
            ),
        },
    )
    result.update(cell=args.cell, sae=args.sae, model=args.model)
    io.write_parquet(
        generations.assign(completion_ids=generations["completion_ids"].map(list)), out / "generations.parquet"
    )
    io.write_parquet(scores, out / "scores.parquet")
    io.write_json(out / "effects.json", result)
    shutil.rmtree(work, ignore_errors=True)
    report = result["report"] or {}
    log.info(
        "%s %s layer %d %s %s: effect %s [%s, %s] p=%s, null p=%s (%s draws), random %s, perplexity %+.1f%%, "
        "no-op identical %s",
        args.experiment,
        args.cell,
        args.layer,
        args.sae,
        args.metric,
        report.get("effect"),
        report.get("ci_low"),
        report.get("ci_high"),
        report.get("p"),
        (report.get("null") or {}).get("p"),
        (report.get("null") or {}).get("n_controls"),
        report.get("control_effect"),
        100 * (report.get("perplexity_change") or 0.0),
        result["noop"]["identical"],
    )


def _prompt_split_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--out", required=True, help="the split table (.csv)")


@verb("prompt-split", "split the causal tests' prompts: select features, condition, report", _prompt_split_args)
def cmd_prompt_split(args) -> None:
    """The prompt split, written before any probe, attribution or intervention runs."""
    from . import data, io, splits
    from .interventions import experiment_prompts

    spec = _spec(args)
    opts = spec["interventions"]
    sources = spec["sources"]
    data_prompts = None
    if sources["data"] is not None:
        path, where = sources["data"]
        data_prompts = data.select_prompts(data.load_prompts(path), where, str(path))
    path, wheres = sources["interventions"]
    asked = experiment_prompts(path, wheres, opts.get("max_prompts"))
    split = splits.make(data_prompts, asked, sources["separate"], opts["split"], opts["seed"])
    splits.check(split)
    with io.atomic_path(args.out) as tmp:
        split.to_csv(tmp, index=False)
    log.info(
        "prompt split: %s (%s)",
        splits.counts(split, sources["separate"], set(asked["prompt"])),
        "a separate report set" if sources["separate"] else "one prompt set split three ways",
    )


def _attribute_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--metric", required=True)
    p.add_argument("--model-dir", required=True, help="the cell's model")
    p.add_argument("--samples", required=True, help="the cell's scored samples")
    p.add_argument("--sae-dir", required=True)
    p.add_argument(
        "--prompt-split",
        default=None,
        help="the prompt split table (CSV); when given, only samples of feature-selection prompts are used",
    )
    p.add_argument("--out", required=True, help="table (.parquet); its summary goes beside it as .json")


@verb("attribute", "fork attribution of one SAE's features for one metric on its cell's samples", _attribute_args)
def cmd_attribute(args) -> None:
    """Fork attribution of one SAE's features for one metric (which features the model uses
    where two completions of a prompt part ways on the metric), checked on held-out forks
    against the full ablation (the summary's ``check``).

    Positions are left out as in SAE training: the spec's ``masking`` (``exclude_first_position``,
    ``exclude_special_tokens``, both true when absent, as ``activations``' defaults)."""
    import pandas as pd

    from . import attribution, io, models

    spec = _spec(args)
    models.set_threads(args.threads)
    opts = spec["interventions"]["attribution"]
    masking = spec.get("masking") or {}
    table, summary = attribution.run(
        args.model_dir,
        args.sae_dir,
        pd.read_parquet(args.samples),
        args.layer,
        spec["hook_point"],
        args.metric,
        spec["direction"],
        max_pairs=opts["max_pairs"],
        seed=spec["interventions"]["seed"],
        place=models.placement(spec),
        progress=not args.no_progress,
        prompt_split=args.prompt_split,
        check_features=opts.get("check_features", 50),
        check_forks=opts.get("check_forks", 32),
        exclude_first=masking.get("exclude_first_position", True),
        exclude_special=masking.get("exclude_special_tokens", True),
    )
    out = Path(args.out)
    io.write_parquet(table, out)
    io.write_json(out.with_suffix(".json"), summary)
    check = summary.get("check", {})
    log.info(
        "attribution %s layer %d %s: %d selection forks, top %s; held-out check: %s",
        args.sae_dir,
        args.layer,
        args.metric,
        summary["n_forks"],
        summary.get("top_features"),
        check.get("skipped")
        or f"{check.get('n_forks_heldout')} forks, Spearman {check.get('spearman')} {check.get('spearman_ci')}",
    )


def _probe_compare_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--probes", nargs="+", required=True, help="every probe summary (JSON) of the layer")
    p.add_argument("--diffs", nargs="*", default=[], help="every diff summary (JSON) of the layer")
    p.add_argument("--out", required=True)


@verb("probe-compare", "probe results across cells and metrics (one layer)", _probe_compare_args)
def cmd_probe_compare(args) -> None:
    """Probe results across cells (intra- and inter-stage, through the diffs' matching) and metrics."""
    from . import io, probes

    io.write_json(args.out, probes.compare_layer(_spec(args), args.layer, args.probes, args.diffs))


def _figure_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    from . import figures  # light: numpy, pandas and matplotlib load when a figure is drawn

    p.add_argument("kind", choices=sorted(figures.KINDS))
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="what the figure reads: features=, samples=, evolution=, null=, thresholds=, iterations=, "
        "or one NAME=PATH per panel",
    )
    p.add_argument("--title")
    p.add_argument("--out", required=True)


@verb("figure", "draw one figure from a stage's tables", _figure_args)
def cmd_figure(args) -> None:
    """One figure from a stage's tables; --spec carries the figure's own config block (and what it reads)."""
    from . import figures

    named = dict(item.split("=", 1) for item in args.input)
    figures.draw(args.kind, named, _spec(args), Path(args.out), args.title or "")


def _extract_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _cell(p)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--out-dir", required=True)


@verb("extract", "extract one cell's activations at every configured site", _extract_args)
def cmd_extract(args) -> None:
    from . import activations, models

    spec = _spec(args)
    models.set_threads(args.threads)
    job = {
        "model": args.model,
        "data": args.data,
        "layers": spec["layers"],
        "hook_points": spec["hook_points"],
        "activations": spec["activations"],
    }
    activations.extract(
        job, args.model_dir, args.samples, args.out_dir, place=models.placement(spec), progress=not args.no_progress
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _cell(p, layer=True)
    p.add_argument("--model-dir", help="the cell's model: needed when its activations are not cached")
    p.add_argument("--samples", help="the cell's samples: needed when its activations are not cached")
    p.add_argument("--acts-dir", required=True, help="the cell's activation stores (one folder per site)")
    p.add_argument("--out-dir", required=True, help="one folder per SAE config is written here")


def _training_groups(spec: dict, args, acts: Path):
    """(hook, target, names, store, target store, TrainSpecs) per site the trained configs read: configs
    sharing a site share one pass over it."""
    from . import models
    from .activations import open_stores
    from .grid import site_dir
    from .sae.train import spec_from_config

    groups: dict = {}
    for name, block in spec["saes"].items():
        if block.get("source", "train") == "pretrained":
            continue  # imported by its own rule
        groups.setdefault((block["hook_point"], block.get("target_hook_point")), []).append(name)
    place = models.placement(spec)
    for (hook, target), names in groups.items():
        folders = [acts / site_dir(args.layer, hook)] + ([acts / site_dir(args.layer, target)] if target else [])
        store, *paired = open_stores(folders, args.model_dir, args.samples, place)
        target_store = paired[0] if paired else None
        specs = [
            spec_from_config(
                name,
                spec["saes"][name],
                d_in=store.d_model,
                d_out=target_store.d_model if target_store else None,
                hook_name=store.manifest["hook_name"],
                target_hook_name=target_store.manifest["hook_name"] if target_store else "",
                model_name=args.model,
                warm_start=spec.get("warm_start", {}).get(name),
            )
            for name in names
        ]
        yield hook, target, names, store, target_store, specs


def _training_args(spec: dict, args, target_store) -> dict:
    """``sae.train.train``'s settings from the config's ``training`` block (the cells' and the null's)."""
    from . import models

    opts = spec["training"]
    return {
        "n_tokens": opts["tokens"],
        "batch_size": opts["batch_size"],
        "shuffle_buffer": opts["shuffle_buffer"],
        "seed": opts["seed"],
        "checkpoint_every": opts["checkpoint_every"],
        "epochs": opts["epochs"],
        "target_store": target_store,
        "progress": not args.no_progress,
        "place": models.placement(spec),
    }


@verb("train", "train the configured SAEs of one (cell, layer)", _train_args)
def cmd_train(args) -> None:
    """Train every configured SAE of one (cell, layer); configs sharing a site share one pass."""
    from . import models
    from .sae.train import train

    spec = _spec(args)
    models.set_threads(args.threads)
    for hook, target, names, store, target_store, specs in _training_groups(spec, args, Path(args.acts_dir)):
        train(
            store,
            specs,
            [Path(args.out_dir) / name for name in names],
            work_dir=Path(args.out_dir) / f".train_state-{hook}-{target or 'self'}",
            **_training_args(spec, args, target_store),
        )


def _train_null_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--pairs", type=int, required=True, help="prompt splits of the base cell's training data")
    p.add_argument("--split-seed", type=int, default=0, help="pair k splits the prompts with seed split_seed + k")


@verb(
    "train-null",
    "train the SAE configs on both halves of random prompt splits of a cell (the resampling null)",
    _train_null_args,
)
def cmd_train_null(args) -> None:
    """Pair k: the SAE configs trained on two disjoint prompt halves of the cell's training split
    (``nulls.train_pairs``), into ``<out>/pair<k>/{a,b}/<sae>``."""
    import pandas as pd

    from . import models, nulls

    spec = _spec(args)
    models.set_threads(args.threads)
    if not args.samples:
        raise SystemExit("train-null: --samples is required (the prompts the halves are drawn from)")
    samples = pd.read_parquet(args.samples)
    for _hook, _target, _names, store, target_store, specs in _training_groups(spec, args, Path(args.acts_dir)):
        nulls.train_pairs(
            store, samples, specs, args.out_dir, args.pairs, args.split_seed, **_training_args(spec, args, target_store)
        )


def _null_diffs_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--null-dir", required=True, help="the null pairs' SAEs (train-null's --out-dir)")
    p.add_argument("--pairs", type=int, required=True)
    p.add_argument("--calibration", help="the layer's calibration JSONs (only with diff.thresholds_from: seed_pair)")
    p.add_argument("--acts-dir", required=True, help="the base cell's activation stores (their eval split)")
    p.add_argument("--samples", required=True, help="the base cell's samples (its eval tokens' prompts)")
    p.add_argument("--split-seed", type=int, required=True, help="pair k halves the eval prompts with seed + k")
    p.add_argument("--out-dir", required=True)


@verb("null-diffs", "label counts of every resampling-null pair, as a step of the grid is labelled", _null_diffs_args)
def cmd_null_diffs(args) -> None:
    """Per SAE config: each null pair's diff, its matched cosines (``<sae>_cosines.parquet``: the
    thresholds' null when they come from resampling) and its label counts (``<sae>.json``). A
    feature is alive where it fires anywhere on the base cell's eval split: on the synthetic worlds,
    alive sets from halves of it made the null's 'changed' count too small (4 of 15 no-change
    worlds were called). The presence test compares two halves of its prompts (``nulls.pair_table``)."""
    import pandas as pd

    from . import io, models, nulls, presence
    from .diff import Thresholds
    from .grid import site_dir
    from .sae import files

    spec = _spec(args)
    models.set_threads(args.threads)
    names = list(spec["saes"])
    dirs = nulls.pair_dirs(args.null_dir, args.pairs, names)
    splits = io.read_json(nulls.splits_json(args.null_dir))
    block = spec["diff"]
    for i, name in enumerate(names):
        site = Path(args.acts_dir) / site_dir(args.layer, spec["saes"][name]["hook_point"])
        every = presence.read_eval_tokens(site, args.samples)
        tables = [
            nulls.pair_table(files.load(a[i]), files.load(b[i]), every, args.split_seed + k)
            for k, (a, b) in enumerate(dirs)
        ]
        fixed = None
        if block["thresholds_from"] == "seed_pair":
            fixed = Thresholds(**io.read_json(Path(args.calibration) / f"{name}.json")["thresholds"])
        pairs = nulls.null_counts(tables, block, fixed)
        for record, split in zip(pairs, splits["pairs"]):
            record["sample_tokens"] = split["tokens"]
        cosines = pd.concat(
            [t[0][["feature", "dec_cos_match"]].assign(pair=k) for k, t in enumerate(tables)], ignore_index=True
        )
        out = Path(args.out_dir)
        io.write_parquet(cosines, out / f"{name}_cosines.parquet")
        io.write_json(
            out / f"{name}.json",
            {
                "layer": args.layer,
                "sae": name,
                "pairs": pairs,
                "cell_tokens": splits["cell_tokens"],
                "thresholds_from": block["thresholds_from"],
            },
        )
        log.info("layer %d %s: null counts %s", args.layer, name, [{k: p[k] for k in nulls.LABELS} for p in pairs])


def _pair_args(p: argparse.ArgumentParser, tuned_model_required: bool) -> None:
    """The two cells of a same-token pair (M0Di, MiDi): activation sites, models, the shared samples."""
    _common(p)
    p.add_argument("--base-acts", required=True, help="the base cell's activation store of the site")
    p.add_argument("--tuned-acts", required=True, help="the tuned cell's activation store of the site")
    p.add_argument("--base-model-dir", help="the base model (needed when the activations are not cached)")
    p.add_argument(
        "--tuned-model-dir",
        required=tuned_model_required,
        help="the tuned model (needed when the activations are not cached"
        + ("; the logit lens reads it)" if tuned_model_required else ")"),
    )
    p.add_argument("--samples", required=True, help="the data both cells ran on, with its metrics")


def _same_token_args(p: argparse.ArgumentParser) -> None:
    _pair_args(p, tuned_model_required=True)
    p.add_argument("--layer", type=int, required=True, help="block index")
    p.add_argument("--out-dir", required=True)


@verb("diff-sae", "train an SAE on tuned - base activations of the same tokens and rank its latents", _same_token_args)
def cmd_diff_sae(args) -> None:
    import pandas as pd

    from . import diff_sae, models
    from .paired import open_pair
    from .sae.train import spec_from_config

    spec = _spec(args)
    models.set_threads(args.threads)
    place = models.placement(spec)
    model, tokenizer = place.load(args.tuned_model_dir)
    base, tuned = open_pair(
        args.base_acts, args.tuned_acts, args.base_model_dir, args.tuned_model_dir, args.samples, place,
        tuned_loaded=(model, tokenizer),
    )  # fmt: skip
    train_spec = spec_from_config(
        "diff_sae",
        spec["diff_sae"],
        d_in=tuned.d_model,
        d_out=None,
        hook_name=tuned.manifest["hook_name"],
        target_hook_name="",
        model_name=f"{Path(args.tuned_model_dir).name}-minus-{Path(args.base_model_dir or args.base_acts).name}",
        warm_start=None,
    )
    diff_sae.run(
        base,
        tuned,
        train_spec,
        spec["training"],
        Path(args.out_dir),
        pd.read_parquet(args.samples),
        spec["features"],
        model,
        tokenizer,
        place,
        progress=not args.no_progress,
    )


def _metric_latents_args(p: argparse.ArgumentParser) -> None:
    _pair_args(p, tuned_model_required=False)
    p.add_argument("--diff-sae", required=True, help="the diff-SAE's folder of this pair and layer")
    p.add_argument("--prompt-split", help="the causal tests' prompt split: only feature-selection prompts are read")
    p.add_argument("--out", required=True, help="the JSON to write")


@verb("metric-latents", "the diff-SAE latents behind each probed metric: chosen on train, reported on eval",
      _metric_latents_args)  # fmt: skip
def cmd_metric_latents(args) -> None:
    import pandas as pd

    from . import io, metric_latents, models, splits
    from .paired import DifferenceStore, open_pair

    spec = _spec(args)
    models.set_threads(args.threads)
    if io.read_json(Path(args.diff_sae) / "metrics.json").get("identical"):
        io.write_json(args.out, {"identical": True, "metrics": {}})
        log.info("%s: the two models' activations are identical; no latent to associate", args.diff_sae)
        return
    place = models.placement(spec)
    base, tuned = open_pair(
        args.base_acts, args.tuned_acts, args.base_model_dir, args.tuned_model_dir, args.samples, place
    )  # fmt: skip
    metric_latents.write(
        Path(args.diff_sae),
        DifferenceStore(base, tuned),
        splits.restrict_samples(pd.read_parquet(args.samples), args.prompt_split),
        spec["metrics"],
        {**spec["metric_latents"], "pooling": spec["pooling"]},
        Path(args.out),
    )


def _crosscoder_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--layer", type=int, required=True, help="block index")
    p.add_argument("--acts", nargs="+", required=True, help="each model's activation store of the site, M0 first")
    p.add_argument("--model-dirs", nargs="+", required=True, help="the models, in --acts order (logit lens, streaming)")
    p.add_argument("--names", nargs="+", help="model ids, in --acts order (default: the folders' names)")
    p.add_argument("--samples", required=True, help="the data every model ran on")
    p.add_argument("--out-dir", required=True)


@verb("crosscoder", "train a crosscoder on several models' activations of the same tokens", _crosscoder_args)
def cmd_crosscoder(args) -> None:
    """A crosscoder over M0 and one iteration (the same-token pair) or over M0..MX (every iteration at once)."""
    import pandas as pd

    from . import crosscoder, models
    from .activations import open_stores
    from .paired import PairedStore

    if len(args.acts) != len(args.model_dirs) or len(args.acts) < 2:
        raise SystemExit(
            f"error: {len(args.acts)} --acts and {len(args.model_dirs)} --model-dirs: expected two or more of each"
        )
    spec = _spec(args)
    opts = spec["crosscoder"]
    models.set_threads(args.threads)
    place = models.placement(spec)
    loaded = [place.load(folder) for folder in args.model_dirs]
    stores = [
        open_stores([acts], model_dir, args.samples, place, loaded=pair)[0]
        for acts, model_dir, pair in zip(args.acts, args.model_dirs, loaded)
    ]
    names = args.names or [Path(folder).name for folder in args.model_dirs]
    paired = PairedStore(stores, names=names)
    cfg = crosscoder.CrosscoderConfig(
        n_models=len(stores),
        d_in=paired.d_model,
        d_sae=opts["expansion_factor"] * paired.d_model,
        architecture=opts["architecture"],
        k=opts["k"],
        l1_coefficient=opts["l1_coefficient"],
        same_init=opts["same_init"],
        model_names=names,
        hook_name=stores[-1].manifest["hook_name"],
    )
    crosscoder.run(
        paired,
        cfg,
        Path(args.out_dir),
        spec["training"],
        opts,
        pd.read_parquet(args.samples),
        lens_models=[model for model, _ in loaded],
        tokenizer=loaded[-1][1],
        features_opts=spec["features"],
        device=place.device,
        progress=not args.no_progress,
        place=place,
    )


def _adl_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--base-model-dir", required=True)
    p.add_argument("--tuned-model-dir", required=True)
    p.add_argument("--samples", required=True, help="the iteration's data (its texts are the lens's second set)")
    p.add_argument("--prompts", required=True, help="unrelated text, one per line")
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--out-dirs", nargs="+", required=True, help="one folder per layer, in --layers order")


@verb("adl", "activation-difference lens of a tuned model against the base model", _adl_args)
def cmd_adl(args) -> None:
    import pandas as pd

    from . import lens, models

    spec = _spec(args)
    opts = spec["adl"]
    if len(args.layers) != len(args.out_dirs):
        raise SystemExit(f"error: {len(args.layers)} layers but {len(args.out_dirs)} --out-dirs")
    models.set_threads(args.threads)
    samples = pd.read_parquet(args.samples)
    text_sets = {
        "neutral": lens.neutral_texts(args.prompts)[: opts["max_texts"]],
        # the train split only: KL recovery patches the data direction in and measures on eval samples
        "data": samples[samples["split"] == "train"]
        .sort_values("sample_id")["text"]
        .astype(str)
        .tolist()[: opts["max_texts"]],
    }
    found = lens.write_adl(
        args.base_model_dir,
        args.tuned_model_dir,
        text_sets,
        args.layers,
        args.out_dirs,
        opts["n_positions"],
        opts["k"],
        opts["batch_size"],
        models.placement(spec),
        progress=not args.no_progress,
    )
    log.info("activation-difference lens, promoted tokens: %s", found)


def _token_kl_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--base-model-dir", required=True)
    p.add_argument("--tuned-model-dir", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--out-dir", required=True)


@verb("token-kl", "per-token KL between a tuned model and the base model on the data's eval split", _token_kl_args)
def cmd_token_kl(args) -> None:
    import pandas as pd

    from . import lens, models

    spec = _spec(args)
    opts = spec["kl"]
    models.set_threads(args.threads)
    record = lens.write_kl(
        args.base_model_dir,
        args.tuned_model_dir,
        pd.read_parquet(args.samples),
        args.out_dir,
        opts["max_samples"],
        opts["top_n"],
        opts["context_window"],
        opts["batch_size"],
        spec["max_length"],
        models.placement(spec),
        progress=not args.no_progress,
    )
    log.info("per-token KL: mean KL(Mi||M0) %.4g over %d tokens", record["mean_kl_tuned_base"], record["n_tokens"])


def _kl_recovery_args(p: argparse.ArgumentParser) -> None:
    _token_kl_args(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--crosscoder", help="the crosscoder's folder of this pair and layer")
    p.add_argument("--diff-sae", help="the diff-SAE's folder of this pair and layer")
    p.add_argument("--adl", help="the activation-difference lens's folder of this pair and layer")


@verb("kl-recovery", "the share of KL(Mi || M0) each method's directions close at a layer, beside random ones",
      _kl_recovery_args)  # fmt: skip
def cmd_kl_recovery(args) -> None:
    import pandas as pd

    from . import models, recovery

    spec = _spec(args)
    opts = spec["kl"]
    models.set_threads(args.threads)
    result = recovery.run(
        args.base_model_dir,
        args.tuned_model_dir,
        pd.read_parquet(args.samples),
        args.layer,
        Path(args.diff_sae) if args.diff_sae else None,
        Path(args.adl) if args.adl else None,
        Path(args.crosscoder) if args.crosscoder else None,
        Path(args.out_dir) / "recovery.json",
        top=spec["top"],
        n_random=opts["n_random"],
        max_samples=opts["recovery_samples"],
        batch_size=opts["batch_size"],
        max_length=spec["max_length"],
        seed=spec["seed"],
        place=models.placement(spec),
        progress=not args.no_progress,
    )
    log.info("KL recovery at layer %d: %s", args.layer, {k: v["recovery"] for k, v in result["targets"].items()})


def _diffing_record_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--pair", required=True, help="the same-token pair, M0_Di__Mi_Di")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--crosscoder", help="the crosscoder's folder of this pair and layer")
    p.add_argument("--diff-sae", help="the diff-SAE's folder of this pair and layer")
    p.add_argument("--adl", help="the activation-difference lens's folder of this pair and layer")
    p.add_argument("--kl", help="the per-token KL folder of this pair")
    p.add_argument("--kl-recovery", help="the KL recovery JSON of this pair and layer")
    p.add_argument("--metric-latents", help="the diff-SAE latents behind each metric (metric_latents.json)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--matches",
        help="also write every diff-SAE latent's best crosscoder match here (parquet; needs both methods)",
    )


@verb("diffing-record", "one record per same-token pair and layer: each method's top findings and agreement",
      _diffing_record_args)  # fmt: skip
def cmd_diffing_record(args) -> None:
    from . import diffing, io

    spec = _spec(args)
    folders = {method: getattr(args, method) for method in diffing.READERS if getattr(args, method)}
    if args.matches and not (args.crosscoder and args.diff_sae):
        raise SystemExit("error: --matches needs both --crosscoder and --diff-sae")
    record = diffing.record(
        args.pair, args.layer, folders, spec["top"], spec["agreement_cosine"], args.kl_recovery, args.metric_latents
    )
    if args.matches:
        matches = diffing.latent_matches(Path(args.diff_sae), Path(args.crosscoder))
        io.write_parquet(matches, args.matches)
        log.info("%s layer %d: best crosscoder matches of %d diff-SAE latents", args.pair, args.layer, len(matches))
    io.write_json(args.out, record)
    log.info("%s layer %d: %d cross-method agreements", args.pair, args.layer, len(record["agreement"]))


def _named_paths(items: list[str], flag: str) -> dict[str, Path]:
    """``NAME=PATH`` arguments as a dict; a malformed one is an error naming it."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: {flag} {item!r}: expected NAME=PATH")
        out[name] = Path(path)
    return out


def _dashboard_sae_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--cell", required=True, help="the SAE's cell, M<i>_D<j>")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--sae", required=True, help="the SAE config's name")
    p.add_argument("--features-dir", required=True, help="this SAE's feature folder")
    p.add_argument(
        "--cell-features",
        nargs="*",
        action="extend",
        default=[],
        help="CELL=DIR: feature folders of the lineages' cells",
    )
    p.add_argument(
        "--lineages", nargs="*", action="extend", default=[], help="BRANCH=PATH: the evolution's lineage tables"
    )
    p.add_argument("--probes", nargs="*", action="extend", default=[], help="METRIC=PATH: probe tables of this SAE")
    p.add_argument(
        "--attribution", nargs="*", action="extend", default=[], help="METRIC=PATH: attribution tables of this SAE"
    )
    p.add_argument("--interventions", nargs="*", action="extend", default=[], help="effects.json of the causal tests")
    p.add_argument("--sae-dir", help="the SAE itself: with --crosscoder / --diff-sae, the nearest same-token latents")
    p.add_argument("--crosscoder", help="the crosscoder folder of the cell's same-token pair and layer")
    p.add_argument("--diff-sae", help="the diff-SAE folder of the cell's same-token pair and layer")
    p.add_argument("--out", required=True, help="the document's JSON, <dashboard folder>/data/<name>.json")


@verb("dashboard-sae", "one SAE's dashboard document: every feature's row, pages for those that matter",
      _dashboard_sae_args)  # fmt: skip
def cmd_dashboard_sae(args) -> None:
    from . import dashboard

    spec = _spec(args)
    opts = spec["dashboard"]
    same_token = None
    if args.crosscoder or args.diff_sae:
        if not args.sae_dir:
            raise SystemExit(
                "error: --crosscoder / --diff-sae need --sae-dir (the SAE whose features they are matched to)"
            )
        base = args.cell.split("_")[0] == "M0"  # the pair's model 0 is M0, model 1 the tuned Mi
        same_token = dashboard.same_token_columns(
            Path(args.sae_dir), 0 if base else 1,
            Path(args.crosscoder) if args.crosscoder else None, Path(args.diff_sae) if args.diff_sae else None,
        )  # fmt: skip
    document = dashboard.sae_document(
        args.cell,
        args.layer,
        args.sae,
        Path(args.features_dir),
        cell_features=_named_paths(args.cell_features, "--cell-features"),
        lineages=_named_paths(args.lineages, "--lineages"),
        probes=_named_paths(args.probes, "--probes"),
        attribution=_named_paths(args.attribution, "--attribution"),
        interventions=[Path(p) for p in args.interventions],
        figure_links=spec.get("figure_links", []),
        same_token=same_token,
        max_pages=opts["max_pages"],
        n_top=opts["n_top"],
        n_lineage_examples=opts["lineage_examples"],
        window=opts["context_window"],
    )
    dashboard.write_sae(document, Path(args.out))
    log.info("%s: %d rows, %d pages", document["key"], len(document["rows"]), len(document["pages"]))


def _dashboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--saes", nargs="*", action="extend", default=[], help="every SAE's dashboard document (JSON)")
    p.add_argument("--out", required=True, help="the page, <dashboard folder>/index.html")


@verb("dashboard", "the dashboard's page over the SAEs' documents (all inline)", _dashboard_args)
def cmd_dashboard(args) -> None:
    from . import dashboard

    out = Path(args.out)
    if out.name != "index.html":
        raise SystemExit(f"error: --out {out}: expected <dashboard folder>/index.html (the documents lie in data/)")
    index = dashboard.write_index(out.parent, [Path(p) for p in args.saes])
    size = sum(f.stat().st_size for f in out.parent.rglob("*") if f.is_file())
    log.info(
        "dashboard: %d SAEs, page %.1f MB, %.1f MB in all", len(index["saes"]), out.stat().st_size / 1e6, size / 1e6
    )


def _export_neuronpedia_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features-dir", required=True, help="the SAE's feature folder (results/features/...)")
    p.add_argument("--sae-dir", required=True, help="the SAE in SAELens layout (results/saes/...)")
    p.add_argument("--model-id", required=True, help="Neuronpedia's model id, e.g. smollm2-135m-instruct")
    p.add_argument("--sae-id", required=True, help="the source set name, e.g. sae-diff-m2")
    p.add_argument("--features", type=int, nargs="*", help="feature indices (default: all)")
    p.add_argument("--batch-size", type=int, default=128, help="features per batch file")
    p.add_argument("--out-dir", required=True)


@verb("export-neuronpedia", "an SAE's features in SAEDashboard's Neuronpedia upload layout",
      _export_neuronpedia_args)  # fmt: skip
def cmd_export_neuronpedia(args) -> None:
    from . import dashboard_export

    summary = dashboard_export.neuronpedia(
        Path(args.features_dir), Path(args.sae_dir), Path(args.out_dir), args.model_id, args.sae_id,
        features=args.features, batch_size=args.batch_size,
    )  # fmt: skip
    log.info("exported %s to %s", summary, args.out_dir)


def _import_sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", required=True)
    p.add_argument("--format", default="auto", choices=["auto", "saelens", "sparsify", "gemma_scope"])
    p.add_argument("--transcoder", action="store_true")
    p.add_argument("--out", required=True)


@verb("import-sae", "copy a pretrained SAE into SAELens layout", _import_sae_args)
def cmd_import_sae(args) -> None:
    """Bring a pretrained SAE (SAELens, sparsify, Gemma Scope) into the results in SAELens layout."""
    from .sae import files

    sae = files.load_any(args.path, fmt=args.format, transcoder=args.transcoder)
    files.save(sae, args.out, extra={"imported_from": str(args.path), "format": args.format})


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _cell(p, layer=True)
    p.add_argument("--model-dir")
    p.add_argument("--samples")
    p.add_argument("--acts-dir", required=True, help="the cell's activation stores (one folder per site)")
    p.add_argument("--saes-dir", required=True, help="the (cell, layer)'s SAEs, one folder per config")
    p.add_argument("--out-dir", required=True, help="one <sae>.json and <sae>.loss_by_position.parquet per SAE")


@verb("evaluate", "evaluate the SAEs of one (cell, layer)", _evaluate_args)
def cmd_evaluate(args) -> None:
    """Evaluate the SAEs of one (cell, layer) on the cell's eval split, loading the model once."""
    from . import evaluate, models
    from .grid import site_dir

    spec = _spec(args)
    models.set_threads(args.threads)
    place = models.placement(spec)
    cell_acts = Path(args.acts_dir)
    activations = spec["activations"]
    options = {
        **spec["evaluation"],
        "max_length": activations["max_length"],
        "exclude_special_tokens": activations["exclude_special_tokens"],
        "exclude_first_position": activations["exclude_first_position"],
    }
    absorption_cfg = options.pop("absorption", {"enabled": False})
    needs_model = args.model_dir and (options["spliced"] or absorption_cfg["enabled"])
    loaded = place.load(args.model_dir) if needs_model else None
    extras = {name: {} for name in spec["saes"]}
    if absorption_cfg["enabled"]:
        with place.precision():
            extras = _absorption(spec, args, absorption_cfg, loaded, place.device)
    for name, block in spec["saes"].items():
        hook, target = block.get("hook_point", "resid_post"), block.get("target_hook_point")
        evaluate.evaluate_sae(
            Path(args.saes_dir) / name,
            cell_acts / site_dir(args.layer, hook),
            Path(args.out_dir) / f"{name}.json",
            model_dir=args.model_dir,
            samples_path=args.samples,
            layer=args.layer,
            target_store_dir=cell_acts / site_dir(args.layer, target) if target else None,
            options=options,
            place=place,
            progress=not args.no_progress,
            loaded=loaded,
            extra=extras[name],
        )


def _absorption(spec, args, cfg: dict, loaded, device) -> dict:
    """First-letter absorption of every residual-stream SAE of the (cell, layer), one model pass."""
    from . import absorption
    from .sae import files

    out: dict = {}
    saes = {}
    for name, block in spec["saes"].items():
        if block.get("hook_point", "resid_post") != "resid_post" or block.get("target_hook_point"):
            out[name] = {"absorption_skipped": "absorption is defined on residual-stream SAEs"}
        else:
            saes[name] = files.load_any(Path(args.saes_dir) / name)
    if saes:
        settings = absorption.AbsorptionConfig(
            max_words=cfg["max_words"], n_icl_examples=cfg["n_icl_examples"], seed=cfg["seed"]
        )
        try:
            scores = absorption.measure(*loaded, saes, args.layer, settings, device=device)
            out.update({name: {"absorption": value} for name, value in scores.items()})
            for name, value in scores.items():
                log.info(
                    "absorption %s: %d words, fraction score %.4f, full score %.4f",
                    name,
                    value["n_words"],
                    value["mean_absorption_fraction_score"],
                    value["mean_full_absorption_score"],
                )
        except absorption.AbsorptionSkipped as reason:
            out.update({name: {"absorption_skipped": str(reason)} for name in saes})
    return out


def _recon_on(sae_path, acts: str, batch_size: int = 4096, split: str = "eval") -> dict:
    """Reconstruction metrics of any supported SAE on a safetensors 'acts' file or a store folder."""
    import torch

    from . import evaluate
    from .activations import ActivationStore
    from .sae import files

    sae = files.load_any(sae_path)
    acts_path = Path(acts)
    if acts_path.is_dir():
        make = evaluate.store_batches(ActivationStore(acts_path), batch_size, split=split)
    else:
        from safetensors.torch import load_file

        if not acts_path.exists():
            raise FileNotFoundError(f"{acts_path}: not found (expected safetensors with 'acts' or a store folder)")
        tensors = load_file(str(acts_path))
        if "acts" not in tensors or tensors["acts"].dim() != 2 or tensors["acts"].shape[1] != sae.cfg.d_in:
            from .errors import ActivationStoreError

            raise ActivationStoreError(f"{acts_path}: expected a tensor 'acts' of shape [n, {sae.cfg.d_in}]")
        make = evaluate.tensor_batches(tensors["acts"].to(torch.float32), batch_size)
    return evaluate.json_ready(evaluate.reconstruction_metrics(sae, make))


def _eval_recon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="an SAE folder (SAELens, sparsify) or Gemma Scope params file")
    p.add_argument("--acts", required=True, help="safetensors with 'acts' [n, d_in], or an activation store folder")
    p.add_argument("--split", default="eval", help="store split to read (store folders only)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", help="also write the JSON here")


@verb("eval-recon", "reconstruction metrics of an SAE on given activations (prints JSON)", _eval_recon_args)
def cmd_eval_recon(args) -> None:
    """Reconstruction metrics of any SAELens-layout SAE on given activations; prints JSON."""
    from . import io

    metrics = _recon_on(args.sae, args.acts, args.batch_size, args.split)
    if args.out:
        io.write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2))


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="evaluation JSON, or an SAE folder / params file with --acts")
    p.add_argument("b")
    p.add_argument("--acts", help="activations both SAEs are measured on (safetensors 'acts' or store folder)")
    p.add_argument("--split", default="eval")
    p.add_argument("--name-a", default="A")
    p.add_argument("--name-b", default="B")
    p.add_argument("--out", required=True)


@verb("compare", "compare two SAEs: evaluation JSONs, or SAE folders with --acts", _compare_args)
def cmd_compare(args) -> None:
    """Two SAEs side by side with the better one per metric: evaluation JSONs, or two SAE
    folders measured here on the same activations (``--acts``)."""
    from . import evaluate, io

    if args.acts:
        a, b = _recon_on(args.a, args.acts, split=args.split), _recon_on(args.b, args.acts, split=args.split)
    else:
        a, b = io.read_json(args.a), io.read_json(args.b)
    rows, text = evaluate.compare(a, b, args.name_a, args.name_b)
    io.write_json(
        args.out,
        {"a": str(args.a), "b": str(args.b), "acts": args.acts, "metrics": rows, args.name_a: a, args.name_b: b},
    )
    Path(args.out).with_suffix(".txt").write_text(text)
    print(text, end="")


def _summary_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--models", nargs="*", default=[], help="model folders")
    p.add_argument("--samples", nargs="*", default=[], help="each data set's samples.parquet")
    p.add_argument("--iterations", help="iterations.json")
    p.add_argument("--evolution", nargs="*", default=[], help="evolution JSONs (one per layer and SAE)")
    p.add_argument("--probes", nargs="*", default=[], help="probe JSONs (one per cell, layer, SAE and metric)")
    p.add_argument("--interventions", nargs="*", default=[], help="every experiment's effects.json")
    p.add_argument("--manifests", nargs="*", default=[], help="activation manifest.json files")
    p.add_argument("--saes", nargs="*", default=[], help="sae_weights.safetensors of each SAE folder")
    p.add_argument("--evals", nargs="*", default=[], help="evaluation JSONs (<cell>/layer<L>/<sae>.json)")
    p.add_argument("--features", nargs="*", default=[], help="stats.parquet of each feature folder")
    p.add_argument("--benchmarks", nargs="*", default=[])
    p.add_argument("--figures", nargs="*", default=[], help="every figure of the run (listed in the summary)")
    p.add_argument("--diffing", nargs="*", default=[], help="the same-token diffing records (one per pair and layer)")
    p.add_argument("--table", help="also write the per-SAE summary table (CSV) here")
    p.add_argument("--wandb-out", help="log the run to W&B (config key wandb) and write its record here")
    p.add_argument("--out", required=True)


@verb("summary", "write results/summary.json", _summary_args)
def cmd_summary(args) -> None:
    from . import io, summary

    spec = _spec(args)
    result = summary.build(
        spec,
        models=args.models,
        samples=args.samples,
        iterations=args.iterations,
        evolution=args.evolution,
        probes=args.probes,
        interventions=args.interventions,
        manifests=args.manifests,
        saes=args.saes,
        evals=args.evals,
        features=args.features,
        benchmarks=args.benchmarks,
        figures=args.figures,
        diffing=args.diffing,
    )
    io.write_json(args.out, result)
    if args.table:
        with io.atomic_path(args.table) as tmp:
            summary.table(result).round(4).to_csv(tmp, index=False)
    tracking_cfg = spec.get("wandb", {"mode": "disabled"})
    if args.wandb_out and tracking_cfg["mode"] != "disabled":
        from . import tracking

        figures = [Path(f) for f in args.figures] if tracking_cfg["log_figures"] else []
        record = tracking.log_run(
            result,
            Path(args.table),
            figures,
            spec,
            Path(args.wandb_out).parent,
            tracking_cfg["mode"],
            tracking_cfg["project"],
            tracking_cfg.get("entity"),
            tracking_cfg.get("name"),
        )
        io.write_json(args.wandb_out, record)
        log.info("W&B %s run: %s (%d keys per step)", record["mode"], record["run_dir"], len(record["step_keys"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-diff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, (help_text, add_arguments, fn) in VERBS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .io import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    from . import progress

    # terminal lines say which job they come from: the verb and the grid point it works on
    point = [
        f"layer{value}" if key == "layer" else str(value)
        for key in ("experiment", "cell", "model", "data", "layer", "sae", "metric")
        if (value := getattr(args, key, None)) is not None
    ]
    progress.set_label(" ".join([args.verb, *point]))
    from .errors import USER_ERRORS

    start = time.perf_counter()
    try:
        args.fn(args)
    except USER_ERRORS as exc:
        print(f"sae-diff {args.verb}: {exc}", file=sys.stderr)
        return 2
    log.info("%s done in %.1f s", args.verb, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
