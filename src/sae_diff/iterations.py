"""What the iterations did to the metrics: per-iteration means with bootstrap CIs and the M0 -> MX shift.

Di is what Mi generated, so the mean of a metric over Di is Mi's behaviour. Samples whose
metric is undefined (NaN: e.g. ``female_ratio`` of a text with no gendered word) are left
out and counted. Every iteration generates several samples from each of the same prompts, so
the statistics are by prompt: CIs resample whole prompts, and the shift pairs each prompt's
samples under M0 with its samples under MX (a prompt is known by its text: the data stage
numbers prompts per data set).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .stats import bootstrap_mean, bootstrap_shift, cluster_mean, paired_cluster_shift


def _clusters(table: pd.DataFrame) -> np.ndarray | None:
    """Each sample's prompt (its text; else its id), or None when the table has neither."""
    for column in ("prompt", "prompt_id"):
        if column in table.columns:
            return table[column].astype(str).to_numpy()
    return None


def _mean(table: pd.DataFrame, metric: str, seed: int) -> dict:
    values = table[metric].to_numpy(dtype=float)
    clusters = _clusters(table)
    return bootstrap_mean(values, seed=seed) if clusters is None else cluster_mean(values, clusters, seed=seed)


def _shift(before: pd.DataFrame, after: pd.DataFrame, metric: str, seed: int) -> dict:
    """``after`` against ``before``, paired by prompt where both know their prompts (and share
    some); otherwise two independent samples."""
    cb, ca = _clusters(before), _clusters(after)
    if cb is not None and ca is not None and set(cb) & set(ca):
        return paired_cluster_shift(before[metric], cb, after[metric], ca, seed=seed)
    return {**bootstrap_shift(before[metric], after[metric], seed=seed), "paired": False}


def metric_block(tables: dict[str, pd.DataFrame], metric: str, seed: int = 0) -> dict:
    """Per iteration: mean with CI over all samples and over held-out prompts; the first -> last shift."""
    ids = [d for d in tables if metric in tables[d].columns]
    per = {}
    for d in ids:
        table = tables[d]
        per["M" + d[1:]] = {
            "data": d,
            "n_samples": int(len(table)),
            "all": _mean(table, metric, seed),
            "eval": _mean(table[table["split"] == "eval"], metric, seed),
        }
    block = {"per_iteration": per}
    if len(ids) > 1:
        before, after = tables[ids[0]], tables[ids[-1]]
        block["shift"] = {
            "from": "M" + ids[0][1:],
            "to": "M" + ids[-1][1:],
            "all": _shift(before, after, metric, seed),
            "eval": _shift(before[before["split"] == "eval"], after[after["split"] == "eval"], metric, seed),
        }
    return block


def summarize(
    tables: dict[str, pd.DataFrame], metrics: list[str], target: dict | None, seed: int = 0, n_examples: int = 4
) -> dict:
    """tables: data id (D0..DX, in order) -> scored samples.

    Returns {target, iterations, metrics: {metric: block over all samples}, target_metric: the
    target's block over its population (``target.where``), examples: {Mi: [...]}}; each block
    also reports the held-out prompts alone (``eval``: never used for preference pairs).
    """
    from .data import select

    out: dict = {
        "target": target,
        "iterations": ["M" + d[1:] for d in tables],
        "metrics": {m: metric_block(tables, m, seed) for m in metrics},
        "examples": {},
    }
    if target:
        population = {d: select(t, target.get("where"), f"samples of {d}") for d, t in tables.items()}
        out["target_metric"] = {
            "metric": target["metric"],
            "where": target.get("where"),
            **metric_block(population, target["metric"], seed),
        }
    shown = [target["metric"]] if target else []
    for d, table in tables.items():
        held_out = table[table["split"] == "eval"]
        pool = held_out if len(held_out) else table
        if "prompt_id" in pool.columns:  # one generation per prompt: different prompts side by side
            pool = pool.drop_duplicates("prompt_id")
        rows = pool.head(n_examples)
        keep = ["prompt", "text", *[m for m in shown if m in table.columns]]
        out["examples"]["M" + d[1:]] = [
            {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
            for row in rows[keep].to_dict("records")
        ]
    return out


def headline(summary: dict) -> dict | None:
    """The ``headline.iterations`` block: the target metric's means per model (over its
    population) and the M0 -> MX shift."""
    block = summary.get("target_metric")
    if not block or not block["per_iteration"]:
        return None
    shift = block.get("shift", {}).get("all")
    out = {
        "metric": block["metric"],
        "direction": summary["target"].get("direction"),
        "where": block.get("where"),
        "means": {m: v["all"]["mean"] for m, v in block["per_iteration"].items()},
        "ci": {m: [v["all"]["ci_low"], v["all"]["ci_high"]] for m, v in block["per_iteration"].items()},
    }
    if shift:
        out["shift"] = {k: shift[k] for k in ("diff", "ci_low", "ci_high", "p")}
    return out
