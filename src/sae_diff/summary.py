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

from .config import Cell, config_hash, site_dir
from .io import read_json

# rule name -> stage name reported under headline.timings
STAGES = {
    "prepare_model": "models",
    "make_data": "data",
    "score_data": "scoring",
    "extract_activations": "activations",
    "train_sae": "saes",
    "evaluate_saes": "evaluation",
}
EVAL_KEYS = ("explained_variance", "fvu", "explained_variance_legacy", "mse", "cossim", "l0", "l1", "l2_ratio",
             "relative_reconstruction_bias", "dead_fraction", "ce_loss_clean", "ce_loss_with_sae",
             "ce_loss_with_ablation", "ce_loss_score", "kl_div_with_sae", "kl_div_score", "spliced_skipped",
             "absorption_skipped")
ABSORPTION_KEYS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                   "probe_test_accuracy", "n_words")
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


def sae_summary(cell_dir: Path, cfg: dict) -> dict:
    """Per layer and SAE: shape, training tokens and the last logged training statistics."""
    import json

    out: dict = {}
    for layer in cfg["layers"]:
        for name in cfg.get("saes", {}):
            folder = cell_dir / f"layer{layer}" / name
            if not (folder / "sae_diff.json").exists():
                continue
            ours = read_json(folder / "sae_diff.json")
            log_path = folder / "train_log.jsonl"
            rows = [json.loads(line) for line in log_path.read_text().splitlines() if line] if log_path.exists() else []
            last = rows[-1] if rows else {}
            out.setdefault(f"layer{layer}", {})[name] = {
                "path": str(folder), "architecture": ours["config"]["architecture"],
                "d_in": ours["config"]["d_in"], "d_sae": ours["config"]["d_sae"],
                "k": ours["config"]["k"] if ours["config"]["architecture"] in ("topk", "batchtopk", "matryoshka") else None,
                "hook_name": ours["config"]["hook_name"],
            }
            if "training" in ours:
                out[f"layer{layer}"][name]["n_tokens"] = ours["training"]["n_tokens"]
                out[f"layer{layer}"][name]["train_final"] = {k: last.get(k) for k in ("fvu", "l0", "dead_fraction", "loss")}
            else:
                out[f"layer{layer}"][name]["imported_from"] = ours.get("imported_from")
            eval_path = cell_dir.parent.parent / "eval" / cell_dir.name / f"layer{layer}" / f"{name}.json"
            if eval_path.exists():
                evaluation = read_json(eval_path)
                out[f"layer{layer}"][name]["eval"] = {k: evaluation[k] for k in EVAL_KEYS if k in evaluation}
                out[f"layer{layer}"][name]["eval"]["path"] = str(eval_path)
                if "absorption" in evaluation:
                    out[f"layer{layer}"][name]["eval"]["absorption"] = {
                        k: evaluation["absorption"][k] for k in ABSORPTION_KEYS}
                if "groups" in evaluation:
                    out[f"layer{layer}"][name]["eval"]["groups"] = evaluation["groups"]
    return out


def build(cfg: dict, results: str | Path, cells: list[Cell], benchmarks: list[str | Path]) -> dict:
    """Assemble the summary from the files the run produced under ``results``."""
    results = Path(results)
    models = {}
    for model_dir in sorted((results / "models").glob("M*")):
        info_path = model_dir / "sae_diff_model.json"
        if info_path.exists():
            info = read_json(info_path)
            models[model_dir.name] = {"path": str(model_dir), "source": info["source"],
                                      "n_layers": info.get("n_layers"), "d_model": info.get("d_model")}
    data = {}
    for samples in sorted((results / "data").glob("D*/samples.parquet")):
        data[samples.parent.name] = data_summary(samples)
    cell_block = {}
    for cell in cells:
        sites = {}
        for layer in cfg["layers"]:
            for hook in cfg["hook_points"]:
                manifest_path = results / "activations" / cell.name / site_dir(layer, hook) / "manifest.json"
                if not manifest_path.exists():
                    continue
                manifest = read_json(manifest_path)
                sites[site_dir(layer, hook).replace("/", ".")] = {
                    "layer": layer, "hook_point": hook, "hook_name": manifest["hook_name"],
                    "d_model": manifest["d_model"], "dtype": manifest["dtype"],
                    "n_tokens": manifest["n_tokens"], "n_shards": len(manifest["shards"]),
                    "manifest": str(manifest_path),
                }
        cell_block[cell.name] = {"model": cell.model, "data": cell.data, "activations": sites}
        saes = sae_summary(results / "saes" / cell.name, cfg)
        if saes:
            cell_block[cell.name]["saes"] = saes
    headline = {"timings": stage_timings(benchmarks)}
    return {
        "headline": headline,
        "run": {"config_hash": config_hash(cfg), "versions": package_versions(),
                "layers": cfg["layers"], "hook_points": cfg["hook_points"],
                "branches": cfg["grid"]["branches"]},
        "models": models,
        "data": data,
        "cells": cell_block,
    }
