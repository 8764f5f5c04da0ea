"""Weights & Biases tracking of a finished run, offline by default.

Per cell (one W&B step per cell, in grid order) and layer, the metrics users of seed 000
know: ``layer_{N}/{group}_l0``, ``_dead_features``, ``_mean_activation``, ``_rank``,
``_info_content``, ``rank_difference``, ``aligned_features``, ``alignment_ratio``,
``mean_similarity``, ``gender_bias_correlation``, plus FVU, CE score and probe AUROCs; then
the evolution counts, the iteration means, every figure as an image and the summary table.
The first SAE config uses these names; others are prefixed with their name.

Offline runs land under ``results/wandb/`` and sync later with ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def _slug(value) -> str:
    return str(value).strip().lower().replace(" ", "_")


def cell_metrics(summary: dict, cell: str, sae_order: list[str]) -> dict:
    """The flat {key: number} dict logged for one cell."""
    out: dict = {}
    block = summary["cells"][cell]
    probes = summary.get("probes", {}).get(cell, {})
    for layer_key, saes in block.get("saes", {}).items():
        n = layer_key.removeprefix("layer")
        for name, sae in saes.items():
            prefix = f"layer_{n}/" if sae_order and name == sae_order[0] else f"{name}/layer_{n}/"
            ev = sae.get("eval", {})
            for key in ("fvu", "l0", "dead_fraction", "ce_loss_score", "kl_div_score"):
                if isinstance(ev.get(key), (int, float)):
                    out[prefix + key] = ev[key]
            features = sae.get("features", {})
            for _column, values in features.get("groups", {}).items():
                for value, stats in values.items():
                    for key, logged in (
                        ("l0", "l0"),
                        ("dead_features", "dead_features"),
                        ("mean_activation", "mean_activation"),
                        ("rank", "rank"),
                        ("info_content", "info_content"),
                    ):
                        if stats.get(key) is not None:
                            out[f"{prefix}{_slug(value)}_{logged}"] = stats[key]
                if len(values) == 2:
                    ranks = [v["rank"] for v in values.values()]
                    out.setdefault(prefix + "rank_difference", abs(ranks[0] - ranks[1]))
            alignment = features.get("alignment", {})
            for key in ("aligned_features", "alignment_ratio", "mean_similarity"):
                if alignment.get(key) is not None:
                    out[prefix + key] = alignment[key]
            correlation = features.get("bias_correlation", {}).get("gender_bias_correlation")
            if correlation is not None:
                out[prefix + "gender_bias_correlation"] = correlation
            for metric, probe in probes.get(layer_key, {}).get(name, {}).items():
                for key in ("auroc", "auroc_random_features", "auroc_raw_activations"):
                    if probe.get(key) is not None:
                        out[f"{prefix}probe_{metric}_{key}"] = probe[key]
    return out


def run_summary(summary: dict) -> dict:
    """Keys for the run's W&B summary: evolution counts, iteration means and shift, intervention
    effects, timings."""
    out: dict = {}
    head = summary.get("headline", {})
    evolution = head.get("evolution", {})
    if "seed_baseline_changed_fraction" in evolution:
        out["evolution/seed_baseline_changed_fraction"] = evolution["seed_baseline_changed_fraction"]
    if evolution.get("null_pairs") is not None:
        out["evolution/null_pairs"] = evolution["null_pairs"]
    for layer_key, converged in evolution.get("converged", {}).items():
        out[f"layer_{layer_key.removeprefix('layer')}/evolution/converged"] = converged
    for effect in ("model_effect", "data_effect"):
        for layer_key, labels in evolution.get(effect, {}).items():
            for label, block in labels.items():
                for key in ("observed", "excess", "null_low", "null_high", "called"):
                    out[f"layer_{layer_key.removeprefix('layer')}/evolution/{effect}_{label}_{key}"] = block[key]
    for layer_key, branches in evolution.items():
        if not layer_key.startswith("layer"):
            continue
        n = layer_key.removeprefix("layer")
        for branch, counts in branches.items():
            if branch in ("MXDX", "M0DX"):  # not vs_null: its excess is logged through the effects above
                for label, value in counts.items():
                    out[f"layer_{n}/evolution/{branch}_{label}"] = value
    iterations = head.get("iterations")
    if iterations:
        for model, mean in iterations["means"].items():
            out[f"iterations/{iterations['metric']}_{model}"] = mean
        for key, value in iterations.get("shift", {}).items():
            out[f"iterations/shift_{key}"] = value
    for experiment in ("steering", "ablation"):
        for metric, block in head.get(experiment, {}).items():
            n = block["layer"]
            for key in ("effect", "ci_low", "ci_high", "p", "control_effect", "perplexity_change"):
                out[f"layer_{n}/{experiment}/{metric}_{key}"] = block[key]
    for stage, seconds in head.get("timings", {}).items():
        out[f"timings/{stage}_s"] = seconds
    return out


def log_run(
    summary: dict,
    table_csv: Path,
    figures: list[Path],
    cfg: dict,
    out_dir: Path,
    mode: str,
    project: str,
    entity: str | None = None,
    name: str | None = None,
) -> dict:
    """Log the run to W&B; returns {run_dir, keys} (the keys logged per step and in the summary)."""
    import os

    import pandas as pd
    import wandb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    order = cfg.get("sae_order", list(cfg.get("saes", {})))
    run = wandb.init(
        mode=mode,
        dir=str(out_dir),
        project=project,
        entity=entity,
        name=name or f"sae-diff-{summary['run']['config_hash']}",
        config=cfg,
        reinit="finish_previous",
    )
    step_keys: set[str] = set()
    for step, cell in enumerate(summary["cells"]):
        metrics = cell_metrics(summary, cell, order)
        step_keys |= set(metrics)
        run.log({**metrics, "cell_index": step}, step=step)
    final = run_summary(summary)
    for key, value in final.items():
        run.summary[key] = value
    images = {
        f"figures/{Path(p).relative_to(Path(p).parents[len(Path(p).parts) - 3]).with_suffix('')}": wandb.Image(str(p))
        for p in figures
    }
    table = pd.read_csv(table_csv)
    run.log({**images, "summary_table": wandb.Table(dataframe=table)}, step=len(summary["cells"]))
    run_dir = Path(run.dir).parent
    run.finish()
    return {
        "mode": mode,
        "run_dir": str(run_dir),
        "step_keys": sorted(step_keys),
        "summary_keys": sorted(final),
        "images": sorted(images),
    }


# --------------------------------------------------------------------------- reading offline runs


def read_records(path: str | Path):
    """The protobuf records of an offline ``run-*.wandb`` file (LevelDB log format, W&B header).

    Yields wandb_internal_pb2.Record; used to check what a run logged without a server.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        space = block - pos % block
        if space < 7:  # a block's tail too short for a header is padding
            pos += space
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        if length == 0 and kind == 0:
            break
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += 7 + length
        pending += payload
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def logged_keys(path: str | Path) -> dict[str, set[str]]:
    """{history: keys logged with run.log, summary: keys set in run.summary, config: config keys}."""
    out = {"history": set(), "summary": set(), "config": set()}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "summary":
            out["summary"] |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
        elif kind == "config":
            out["config"] |= {item.key or "/".join(item.nested_key) for item in record.config.update}
    return out


def values(path: str | Path, key: str) -> list:
    """Every value logged under ``key`` in the history, in order."""
    found = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == key:
                    found.append(json.loads(item.value_json))
    return found
