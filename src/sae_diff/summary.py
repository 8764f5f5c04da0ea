"""results/summary.json: every cell and artifact of the run, with its key numbers.

The file starts with ``headline`` (fixed keys, see docs/summary.md); a key whose stage has
not run is absent, never faked. Stage wall times come from Snakemake's benchmark files.
"""

from __future__ import annotations

import csv
import importlib.metadata
import math
import platform
from pathlib import Path

import pandas as pd

from . import grid
from .config import config_hash
from .grid import cells as all_cells
from .grid import site_dir
from .io import read_json

# rule name -> stage name reported under headline.timings
STAGES = {
    "prepare_model": "models",
    "make_data": "data",
    "score_data": "scoring",
    "extract_activations": "activations",
    "finetune_dpo": "dpo",
    "train_sae": "saes",
    "evaluate_saes": "evaluation",
    "feature_stats": "features",
    "train_seed_sae": "calibration",
    "train_null_saes": "calibration",  # the resampling null: thresholds and intervals come from it
    "null_diffs": "calibration",
    "diff_saes": "diffs",
    "probes": "probes",
    "attribute": "attribution",
    "intervene": "interventions",
    "crosscoder": "diffing",
    "diff_sae": "diffing",
    "metric_latents": "diffing",
    "adl": "diffing",
    "token_kl": "diffing",
    "kl_recovery": "diffing",
}
EVAL_KEYS = (
    "explained_variance",
    "fvu",
    "explained_variance_legacy",
    "mse",
    "cossim",
    "l0",
    "l1",
    "l2_ratio",
    "relative_reconstruction_bias",
    "dead_fraction",
    "ce_loss_clean",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "ce_loss_score",
    "kl_div_with_sae",
    "kl_div_score",
    "spliced_skipped",
    "absorption_skipped",
)
ABSORPTION_KEYS = (
    "mean_absorption_fraction_score",
    "mean_full_absorption_score",
    "mean_num_split_features",
    "probe_test_accuracy",
    "n_words",
)
VERSIONED = ["sae-diff", "torch", "transformers", "snakemake", "numpy", "pandas", "safetensors"]


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def stage_timings(benchmark_files: list[str | Path]) -> dict:
    """Sum of job wall seconds per stage, from Snakemake ``benchmark:`` TSV files."""
    totals: dict[str, float] = {}
    for path in benchmark_files:
        path = Path(path)
        rule = path.parent.name
        with open(path) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        seconds = sum(float(r["s"]) for r in rows)
        stage = STAGES.get(rule, rule)
        totals[stage] = round(totals.get(stage, 0.0) + seconds, 3)
    return totals


def _finite(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def data_summary(samples_path: Path) -> dict:
    from .data import describe, example_rows

    table = pd.read_parquet(samples_path)
    out = {"path": str(samples_path), **describe(table)}
    metrics = {}
    for column in table.columns:
        if column in ("sample_id", "prompt_id", "n", "template") or not pd.api.types.is_numeric_dtype(table[column]):
            continue
        values = table[column].astype(float)
        metrics[column] = {"mean": _finite(float(values.mean())), "n_defined": int(values.notna().sum())}
    out["metrics"] = metrics
    out["examples"] = example_rows(table, 3)
    return out


def _layout_key(path: Path, per_sae_folder: bool = True) -> tuple[str, str, str]:
    """(cell, "layer{L}", SAE name) of a per-SAE file from its place in the layout."""
    cell, layer, name = grid.cell_layer_name(path, per_sae_folder)
    return cell, f"layer{layer}", name


def sae_summary(cell: str, cfg: dict, folders: dict, evals: dict, features: dict) -> dict:
    """Per layer and SAE of one cell: shape, training tokens and the last logged training statistics.

    ``folders``, ``evals`` and ``features`` map (cell, "layer{L}", SAE name) to the SAE folder, its
    evaluation JSON and its feature-statistics folder (see :func:`build`); a missing key is skipped."""
    import json

    out: dict = {}
    for layer in cfg["layers"]:
        for name in cfg.get("saes", {}):
            key = (cell, f"layer{layer}", name)
            folder = folders.get(key)
            if folder is None or not (folder / "sae_diff.json").exists():
                continue
            ours = read_json(folder / "sae_diff.json")
            log_path = folder / "train_log.jsonl"
            rows = [json.loads(line) for line in log_path.read_text().splitlines() if line] if log_path.exists() else []
            last = rows[-1] if rows else {}
            out.setdefault(f"layer{layer}", {})[name] = {
                "path": str(folder),
                "architecture": ours["config"]["architecture"],
                "d_in": ours["config"]["d_in"],
                "d_sae": ours["config"]["d_sae"],
                "k": ours["config"]["k"]
                if ours["config"]["architecture"] in ("topk", "batchtopk", "matryoshka")
                else None,
                "hook_name": ours["config"]["hook_name"],
            }
            if "training" in ours:
                out[f"layer{layer}"][name]["n_tokens"] = ours["training"]["n_tokens"]
                out[f"layer{layer}"][name]["train_final"] = {
                    k: last.get(k) for k in ("fvu", "l0", "dead_fraction", "loss")
                }
            else:
                out[f"layer{layer}"][name]["imported_from"] = ours.get("imported_from")
            eval_path = evals.get(key)
            if eval_path is not None:
                evaluation = read_json(eval_path)
                out[f"layer{layer}"][name]["eval"] = {k: evaluation[k] for k in EVAL_KEYS if k in evaluation}
                out[f"layer{layer}"][name]["eval"]["path"] = str(eval_path)
                if "absorption" in evaluation:
                    out[f"layer{layer}"][name]["eval"]["absorption"] = {
                        k: evaluation["absorption"][k] for k in ABSORPTION_KEYS
                    }
                if "groups" in evaluation:
                    out[f"layer{layer}"][name]["eval"]["groups"] = evaluation["groups"]
            feature_dir = features.get(key)
            if feature_dir is not None:
                stats = pd.read_parquet(
                    feature_dir / "stats.parquet", columns=["dead", "prompt_only", "completion_only"]
                )
                out[f"layer{layer}"][name]["features"] = {
                    "path": str(feature_dir),
                    "n_live": int((~stats["dead"]).sum()),
                    "prompt_only": int(stats["prompt_only"].sum()),
                    "completion_only": int(stats["completion_only"].sum()),
                    **read_json(feature_dir / "groups.json"),
                }
    return out


def build(
    cfg: dict,
    *,
    models: list[str | Path] = (),
    samples: list[str | Path] = (),
    iterations: str | Path | None = None,
    evolution: list[str | Path] = (),
    probes: list[str | Path] = (),
    interventions: list[str | Path] = (),
    manifests: list[str | Path] = (),
    saes: list[str | Path] = (),
    evals: list[str | Path] = (),
    features: list[str | Path] = (),
    benchmarks: list[str | Path] = (),
    figures: list[str | Path] = (),
    diffing: list[str | Path] = (),
) -> dict:
    """Assemble the summary from exactly the files the ``summary`` rule lists, never a folder search.

    A JSON that names what it describes is placed by its content: an activation ``manifest.json``
    (cell, layer, hook_point), an evolution JSON (layer, sae), a probe JSON (cell, layer, sae, metric),
    an ``effects.json`` (experiment, cell, layer, sae, metric). The rest is placed by its position:
    ``models`` are model folders (named by the folder), ``samples`` are ``<D>/samples.parquet``,
    ``saes`` are ``<cell>/layer<L>/<sae>/sae_weights.safetensors`` (the SAE folder is their parent),
    ``evals`` are ``<cell>/layer<L>/<sae>.json``, ``features`` are ``<cell>/layer<L>/<sae>/stats.parquet``
    (the feature folder is their parent). ``iterations`` is ``iterations.json`` or None.
    """
    model_block = {}
    for model_dir in sorted(map(Path, models)):
        info_path = model_dir / "sae_diff_model.json"
        if info_path.exists():
            info = read_json(info_path)
            model_block[model_dir.name] = {
                "path": str(model_dir),
                "source": info["source"],
                "n_layers": info.get("n_layers"),
                "d_model": info.get("d_model"),
            }
    data = {}
    for samples_path in sorted(map(Path, samples)):
        data[samples_path.parent.name] = data_summary(samples_path)
    sites_found = {}
    for manifest_path in map(Path, manifests):
        manifest = read_json(manifest_path)
        sites_found[(manifest["cell"], int(manifest["layer"]), manifest["hook_point"])] = (manifest_path, manifest)
    sae_folders = {_layout_key(path): path.parent for path in map(Path, saes)}
    eval_files = {_layout_key(path, per_sae_folder=False): path for path in map(Path, evals)}
    feature_dirs = {_layout_key(path): path.parent for path in map(Path, features)}
    cell_block = {}
    for cell in all_cells(cfg):
        sites = {}
        for layer in cfg["layers"]:
            for hook in cfg["hook_points"]:
                if (cell.name, layer, hook) not in sites_found:
                    continue
                manifest_path, manifest = sites_found[(cell.name, layer, hook)]
                sites[site_dir(layer, hook).replace("/", ".")] = {
                    "layer": layer,
                    "hook_point": hook,
                    "hook_name": manifest["hook_name"],
                    "d_model": manifest["d_model"],
                    "dtype": manifest["dtype"],
                    "n_tokens": manifest["n_tokens"],
                    "n_shards": len(manifest["shards"]),
                    "manifest": str(manifest_path),
                }
        cell_block[cell.name] = {"model": cell.model, "data": cell.data, "activations": sites}
        cell_saes = sae_summary(cell.name, cfg, sae_folders, eval_files, feature_dirs)
        if cell_saes:
            cell_block[cell.name]["saes"] = cell_saes
    headline = {}
    iterations_path = Path(iterations) if iterations else None
    iterations_block = None
    if iterations_path is not None:
        from .iterations import headline as iterations_headline

        iterations_block = read_json(iterations_path)
        shifted = iterations_headline(iterations_block)
        if shifted:
            headline["iterations"] = shifted
    evolution_blocks = {}
    for path in sorted(map(Path, evolution)):
        block = read_json(path)
        evolution_blocks[(block["layer"], block["sae"])] = block
    if evolution_blocks:
        from .evolution import headline as evolution_headline

        headline["evolution"] = evolution_headline(evolution_blocks, cfg.get("sae_order", list(cfg["saes"])))
    probe_blocks = {}
    for path in sorted(map(Path, probes)):
        block = read_json(path)
        probe_blocks.setdefault(block["cell"], {}).setdefault(f"layer{block['layer']}", {}).setdefault(
            block["sae"], {}
        )[block["metric"]] = {k: v for k, v in block.items() if k not in ("cell", "layer", "sae")}
    if probe_blocks:
        headline["probes"] = probes_headline(probe_blocks, cfg)
    all_intervention_blocks = [read_json(path) for path in sorted(map(Path, interventions))]
    intervention_blocks = [block for block in all_intervention_blocks if "skipped" not in block]
    skipped_interventions = [
        {key: block.get(key) for key in ("experiment", "cell", "layer", "sae", "metric", "skipped")}
        for block in all_intervention_blocks
        if "skipped" in block
    ]
    if intervention_blocks:
        from .effects import headline as interventions_headline

        headline.update(interventions_headline(intervention_blocks, cfg))
    if diffing:
        from .diffing import headline as diffing_headline

        headline["diffing"] = diffing_headline([read_json(path) for path in sorted(map(Path, diffing))])
    headline["timings"] = stage_timings(benchmarks)
    for info in model_block.values():
        dpo = _dpo_record(Path(info["path"]))
        if dpo:
            info["dpo"] = dpo
    return {
        "headline": headline,
        "run": {
            "config_hash": config_hash(cfg),
            "versions": package_versions(),
            "layers": cfg["layers"],
            "hook_points": cfg["hook_points"],
            "branches": cfg["grid"]["branches"],
        },
        "models": model_block,
        "data": data,
        "cells": cell_block,
        **({"iterations": {"path": str(iterations_path), **iterations_block}} if iterations_block else {}),
        **(
            {"evolution": {f"layer{layer}": {name: block} for (layer, name), block in evolution_blocks.items()}}
            if evolution_blocks
            else {}
        ),
        **({"probes": probe_blocks} if probe_blocks else {}),
        **({"interventions": _interventions_block(intervention_blocks)} if intervention_blocks else {}),
        # experiments that did not run, each with its reason (never silently absent)
        **({"interventions_skipped": skipped_interventions} if skipped_interventions else {}),
        **({"figures": _figures_by_kind(figures)} if figures else {}),
    }


def probes_headline(blocks: dict, cfg: dict) -> dict:
    """``headline.probes``: per metric, the last iteration's own cell (MX_DX), the deepest layer and the
    first SAE config: its top features and nested-CV AUROC against the two baselines."""
    from .grid import branch_cells

    chain = branch_cells(cfg, "MXDX") if "MXDX" in cfg["grid"]["branches"] else all_cells(cfg)
    cell, layer = chain[-1].name, f"layer{max(cfg['layers'])}"
    order = cfg.get("sae_order", list(cfg["saes"]))
    saes = blocks.get(cell, {}).get(layer, {})
    name = next((n for n in order if n in saes), None)
    out = {}
    for metric, block in (saes.get(name, {}) if name else {}).items():
        if "auroc" not in block:
            continue
        out[metric] = {
            "cell": cell,
            "layer": layer,
            "sae": name,
            "top_features": block["top_features"][:10],
            "auroc": block["auroc"],
            "auroc_random_features": block["auroc_random_features"],
            "auroc_raw_activations": block["auroc_raw_activations"],
        }
    return out


def _interventions_block(blocks: list[dict]) -> dict:
    """{experiment: {cell: {layer{L}: {sae: {metric: the report-half numbers and the controls}}}}}."""
    out: dict = {}
    for block in blocks:
        out.setdefault(block["experiment"], {}).setdefault(block["cell"], {}).setdefault(
            f"layer{block['layer']}", {}
        ).setdefault(block["sae"], {})[block["metric"]] = {
            "model": block.get("model"),
            "select": block.get("select", "probe"),
            "features": block["features"],
            "random_features": block["random_features"],
            "alphas": block.get("alphas"),
            "noop_identical": block["noop"]["identical"],
            "report": block["report"],
            "selection": block.get("selection"),
        }
    return out


def _figures_by_kind(paths) -> dict:
    """Figure paths grouped by their stage folder (iterations, saes, eval, features, evolution, probes,
    interventions)."""
    out: dict = {}
    for path in map(str, paths):
        parts = Path(path).parts
        kind = parts[parts.index("figures") + 1] if "figures" in parts else "other"
        out.setdefault(kind, []).append(path)
    return out


def _dpo_record(model_dir: Path) -> dict | None:
    path = model_dir / "dpo.json"
    if not path.exists():
        return None
    record = read_json(path)
    return {k: record.get(k) for k in ("n_pairs", "steps", "loss_first", "loss_last", "reward_accuracy_last")}


def table(summary: dict) -> pd.DataFrame:
    """One row per (cell, layer, SAE): the numbers a reader scans first (the report's summary table)."""
    rows = []
    probes = summary.get("probes", {})
    for cell, block in summary["cells"].items():
        for layer, saes in block.get("saes", {}).items():
            for name, sae in saes.items():
                ev = sae.get("eval", {})
                row = {
                    "cell": cell,
                    "layer": layer,
                    "sae": name,
                    "d_sae": sae["d_sae"],
                    "fvu": ev.get("fvu"),
                    "l0": ev.get("l0"),
                    "dead_fraction": ev.get("dead_fraction"),
                    "ce_loss_score": ev.get("ce_loss_score"),
                    "kl_div_score": ev.get("kl_div_score"),
                    "live_features": sae.get("features", {}).get("n_live"),
                }
                for metric, probe in probes.get(cell, {}).get(layer, {}).get(name, {}).items():
                    row[f"auroc_{metric}"] = probe.get("auroc")
                    row[f"auroc_{metric}_random"] = probe.get("auroc_random_features")
                    row[f"auroc_{metric}_raw"] = probe.get("auroc_raw_activations")
                rows.append(row)
    return pd.DataFrame(rows)


SCHEMA_PATH = Path(__file__).parent / "schemas" / "summary.schema.yaml"


def validate(summary: dict) -> None:
    """Check a summary against its JSON schema; raises jsonschema.ValidationError naming the key."""
    import yaml
    from jsonschema import Draft202012Validator

    with open(SCHEMA_PATH) as fh:
        Draft202012Validator(yaml.safe_load(fh)).validate(summary)
