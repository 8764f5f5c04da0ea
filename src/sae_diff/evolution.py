"""Features across iterations: lineages chained through matched features, and what happened
to them at each step (same, changed, died, born, reverted).

A branch is a chain of cells (MXDX: M0D0 → M1D1 → ...; M0DX: M0D0 → M0D1 → ...). Each step
is labelled by ``diff.step_labels`` with thresholds calibrated on a seed pair; a lineage
follows a feature from the cell where it first appears for as long as it keeps a
counterpart. It is 'reverted' at the first step where, after having changed, its decoder
is again within the 'same' threshold of its origin.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .diff import Thresholds

COUNT_KEYS = (
    "same",
    "changed",
    "died",
    "born",
    "reverted",
    "inactive",
    "died_silent",
    "died_norm_collapse",
    "died_unmatched",
)


def lineages(
    cells: list[str],
    steps: list[pd.DataFrame],
    born: list[np.ndarray],
    decoders: list[np.ndarray],
    stats: list[pd.DataFrame],
    thresholds: Thresholds,
) -> tuple[pd.DataFrame, list[dict]]:
    """cells: the branch's cells in order; steps[t]: labelled diff of cells[t] → cells[t+1];
    born[t]: features of cells[t+1] born at that step; decoders: unit decoder rows per cell;
    stats: per-cell feature statistics (freq, enc_norm, optional threshold).

    Returns one row per lineage (its feature, label and cosines in every cell) and the counts per step.
    """
    n_cells = len(cells)
    rows = []
    active = []  # lineage indices still followed
    for f in range(len(decoders[0])):
        rows.append(
            {
                "origin_cell": cells[0],
                "origin_feature": f,
                "features": {cells[0]: f},
                "labels": {},
                "cos_prev": {},
                "cos_origin": {cells[0]: 1.0},
                "changed_once": False,
                "reverted_at": None,
            }
        )
        active.append(len(rows) - 1)
    counts = []
    for t in range(n_cells - 1):
        a, b = cells[t], cells[t + 1]
        step = steps[t]
        label = step["label"].to_numpy()
        partner = step["match"].to_numpy()
        cos = step["dec_cos_match"].to_numpy(dtype=np.float64)
        reason = step["died_reason"].to_numpy()
        count = dict.fromkeys(COUNT_KEYS, 0)
        still = []
        newborn = set(int(g) for g in born[t])
        for i in active:
            lineage = rows[i]
            f = lineage["features"][a]
            lab = label[f]
            lineage["labels"][b] = lab
            if lab == "died":
                count["died"] += 1
                count[f"died_{reason[f]}"] += 1
                continue
            if lab == "inactive" and (partner[f] < 0 or int(partner[f]) in newborn):
                continue  # a feature that never fired ends here; its counterpart, if live, is born
            g = int(partner[f])
            lineage["features"][b] = g
            lineage["cos_prev"][b] = float(cos[f])
            origin = decoders[cells.index(lineage["origin_cell"])][lineage["origin_feature"]]
            to_origin = float(origin @ decoders[t + 1][g])
            lineage["cos_origin"][b] = to_origin
            count[lab] += 1
            if lineage["changed_once"] and lineage["reverted_at"] is None and to_origin >= thresholds.same:
                lineage["reverted_at"] = b
                count["reverted"] += 1
            if lab == "changed":
                lineage["changed_once"] = True
            still.append(i)
        for g in born[t]:
            rows.append(
                {
                    "origin_cell": b,
                    "origin_feature": int(g),
                    "features": {b: int(g)},
                    "labels": {b: "born"},
                    "cos_prev": {},
                    "cos_origin": {b: 1.0},
                    "changed_once": False,
                    "reverted_at": None,
                }
            )
            still.append(len(rows) - 1)
        count["born"] = int(len(born[t]))
        counts.append({"from": a, "to": b, **count})
        active = still
    return _lineage_table(rows, cells, stats), counts


def _lineage_table(rows: list[dict], cells: list[str], stats: list[pd.DataFrame]) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "lineage": np.arange(len(rows)),
            "origin_cell": [r["origin_cell"] for r in rows],
            "origin_feature": [r["origin_feature"] for r in rows],
            "reverted_at": [r["reverted_at"] for r in rows],
        }
    )
    for c, cell in enumerate(cells):
        feature = np.array([r["features"].get(cell, -1) for r in rows], dtype=np.int64)
        out[f"feature_{cell}"] = feature
        out[f"label_{cell}"] = [r["labels"].get(cell, "origin" if r["origin_cell"] == cell else "") for r in rows]
        out[f"cos_prev_{cell}"] = [r["cos_prev"].get(cell, np.nan) for r in rows]
        out[f"cos_origin_{cell}"] = [r["cos_origin"].get(cell, np.nan) for r in rows]
        for column in ("freq", "enc_norm", "threshold"):
            if column in stats[c].columns:
                values = stats[c][column].to_numpy(dtype=np.float64)
                out[f"{column}_{cell}"] = np.where(feature >= 0, values[np.clip(feature, 0, None)], np.nan)
    return out


def cell_summary(stats: pd.DataFrame) -> dict:
    """How thresholds, norms and firing rates sit in one cell (live features)."""
    live = stats[~stats["dead"]]
    out = {
        "n_features": int(len(stats)),
        "n_live": int(len(live)),
        "freq_median": float(live["freq"].median()) if len(live) else None,
        "enc_norm_median": float(stats["enc_norm"].median()),
    }
    if "threshold" in stats.columns:
        out["threshold_median"] = float(stats["threshold"].median())
    return out


def run(spec: dict, layer: int, diffs: list, calibrations: list, saes: list, stats: list) -> dict:
    """Evolution of every trained SAE config of ``layer``, from exactly the files its rule lists:
    the layer's diff summaries (each names its cells and SAE; the table is beside it), the
    calibration JSONs (``<sae>.json``), and the SAE weights and feature statistics of every cell
    (found by their place in the layout, ``grid.cell_layer_name``)."""
    from pathlib import Path

    from . import grid
    from .diff import unit_rows
    from .io import read_json
    from .sae import files

    diff_of = {}
    for path in map(Path, diffs):
        summary = read_json(path)
        diff_of[(summary["a"], summary["b"], summary["sae"])] = (summary, path.with_suffix(".parquet"))
    calibration_of = {Path(path).stem: read_json(path) for path in calibrations}
    sae_folder = {(c, n): Path(path).parent for path in saes for c, _, n in [grid.cell_layer_name(path)]}
    stats_file = {(c, n): Path(path) for path in stats for c, _, n in [grid.cell_layer_name(path)]}
    out = {}
    for name in spec["saes"]:
        calibration = calibration_of[name]
        thresholds = Thresholds(**calibration["thresholds"])
        block = {
            "layer": layer,
            "sae": name,
            "thresholds": thresholds.to_dict(),
            "seed_baseline_changed_fraction": calibration["changed_fraction"],
            "branches": {},
            "intra": [],
            "cells": {},
        }
        for branch in spec["grid"]["branches"]:
            chain = grid.branch_cells(spec, branch)
            steps, born = [], []
            for a, b in zip(chain, chain[1:]):
                summary, table = diff_of[(a.name, b.name, name)]
                steps.append(pd.read_parquet(table))
                born.append(np.asarray(summary["born"], dtype=np.int64))
            decoders = [unit_rows(files.load(sae_folder[(c.name, name)]).W_dec) for c in chain]
            cell_stats = [pd.read_parquet(stats_file[(c.name, name)]) for c in chain]
            table, counts = lineages([c.name for c in chain], steps, born, decoders, cell_stats, thresholds)
            totals = {k: int(sum(c[k] for c in counts)) for k in COUNT_KEYS}
            block["branches"][branch] = {
                "cells": [c.name for c in chain],
                "steps": counts,
                "totals": totals,
                "lineages": table,
            }
            for cell, one in zip(chain, cell_stats):
                block["cells"].setdefault(cell.name, cell_summary(one))
        for a, b, kind in grid.diff_pairs(spec):
            if kind == "intra":
                summary, _ = diff_of[(a.name, b.name, name)]
                block["intra"].append(
                    {"base": a.name, "iteration": b.name, **summary["counts"], "mmcs": summary["mmcs"]}
                )
        out[name] = block
    return out


def headline(blocks: dict, sae_order: list[str]) -> dict:
    """``headline.evolution``: {layer: {branch: {born, died, changed, reverted, same}}} for the first SAE
    config (in config order) of each layer, and the seed-baseline changed fraction (mean over layers)."""
    out, baseline = {}, []
    for (layer, _name), block in sorted(blocks.items(), key=lambda kv: (kv[0][0], sae_order.index(kv[0][1]))):
        key = f"layer{layer}"
        if key in out:
            continue
        out[key] = {
            branch: {k: part["totals"][k] for k in ("born", "died", "changed", "reverted", "same")}
            for branch, part in block["branches"].items()
        }
        out[key]["sae"] = block["sae"]
        baseline.append(block["seed_baseline_changed_fraction"])
    if baseline:
        out["seed_baseline_changed_fraction"] = float(np.mean(baseline))
    return out
