"""Features across iterations: lineages chained through matched features, and what happened
to them at each step (same, changed, died, born, reverted).

A branch is a chain of cells (MXDX: M0D0 → M1D1 → ...; M0DX: M0D0 → M0D1 → ...). Each step
is labelled by ``diff.step_labels`` (thresholds from the resampling null, died / born by the
presence test); a lineage
follows a feature from the cell where it first appears for as long as it keeps a
counterpart. It is 'reverted' at the first step where, after having changed, its decoder
is again within the 'same' threshold of its origin.
"""

from __future__ import annotations

import functools

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
    "died_absent",
    "died_norm_collapse",
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
            if partner[f] < 0 or int(partner[f]) in newborn:
                # no counterpart to follow, or the one it matches is absent from A's tokens (born):
                # the lineage ends here, and the counterpart starts its own
                if lab != "inactive":
                    count[lab] += 1
                continue
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


def run(spec: dict, layer: int, diffs: list, calibrations: list, saes: list, stats: list, nulls: list) -> dict:
    """Evolution of every trained SAE config of ``layer``, from exactly the files its rule lists:
    the layer's diff summaries (each names its cells and SAE; the table is beside it), the
    calibration JSONs (``<sae>.json``), the SAE weights and feature statistics of every cell
    (found by their place in the layout, ``grid.cell_layer_name``), and the resampling null's
    counts (``<sae>.json`` of the null-diffs rule).

    Every label count is put beside the null (``nulls.versus``): per step of each branch, per branch,
    and for the model effect (M0Di vs MiDi) and the data effect (M0D0 vs M0Di) summed over
    iterations. Each SAE's convergence (``convergence``) is recorded, and a layer whose SAEs have
    not converged is flagged ``unconverged``."""
    from pathlib import Path

    from . import convergence, grid
    from . import nulls as nulllib
    from .diff import unit_rows
    from .io import read_json
    from .sae import files

    diff_of = {}
    for path in map(Path, diffs):
        summary = read_json(path)
        diff_of[(summary["a"], summary["b"], summary["sae"])] = (summary, path.with_suffix(".parquet"))
    calibration_of = {Path(path).stem: read_json(path) for path in calibrations}
    null_of = {Path(path).stem: read_json(path) for path in nulls}
    sae_folder = {(c, n): Path(path).parent for path in saes for c, _, n in [grid.cell_layer_name(path)]}
    stats_file = {(c, n): Path(path) for path in stats for c, _, n in [grid.cell_layer_name(path)]}
    criterion = convergence.Criterion.from_config(spec["diff"]["convergence"])
    out = {}
    # a cell's decoder, read once: M0's cells sit in both branches' chains
    decoder_of = functools.cache(lambda folder: unit_rows(files.load(folder).W_dec))
    for name in spec["saes"]:
        calibration = calibration_of[name]
        thresholds = Thresholds(**calibration["thresholds"])
        null_pairs = null_of[name]["pairs"]
        block = {
            "layer": layer,
            "sae": name,
            "thresholds": thresholds.to_dict(),
            "thresholds_from": calibration.get("thresholds_from", "seed_pair"),
            "seed_baseline_changed_fraction": calibration["changed_fraction"],
            "null": {"pairs": len(null_pairs), "counts": null_pairs, "cell_tokens": null_of[name].get("cell_tokens")},
            "convergence": _convergence(spec, name, sae_folder, calibration.get("cross_init"), criterion),
            "branches": {},
            "intra": [],
            "cells": {},
        }
        block["unconverged"] = not block["convergence"]["converged"]
        block["model_effect"] = _effect(grid.model_effect_pairs(spec), diff_of, name, null_pairs)
        block["data_effect"] = _effect(grid.data_effect_pairs(spec), diff_of, name, null_pairs)
        for branch in spec["grid"]["branches"]:
            chain = grid.branch_cells(spec, branch)
            steps, born, step_counts = [], [], []
            for a, b in zip(chain, chain[1:]):
                summary, table = diff_of[(a.name, b.name, name)]
                steps.append(pd.read_parquet(table))
                born.append(np.asarray(summary["born"], dtype=np.int64))
                step_counts.append({"from": a.name, "to": b.name, **nulllib.versus(summary["counts"], null_pairs)})
            decoders = [decoder_of(sae_folder[(c.name, name)]) for c in chain]
            cell_stats = [pd.read_parquet(stats_file[(c.name, name)]) for c in chain]
            table, counts = lineages([c.name for c in chain], steps, born, decoders, cell_stats, thresholds)
            totals = {k: int(sum(c[k] for c in counts)) for k in COUNT_KEYS}
            summed = {k: sum(s[k]["observed"] for s in step_counts) for k in nulllib.LABELS}
            block["branches"][branch] = {
                "cells": [c.name for c in chain],
                "steps": counts,
                "totals": totals,
                "steps_vs_null": step_counts,
                "totals_vs_null": nulllib.versus(summed, null_pairs, len(step_counts)) if step_counts else {},
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


def _convergence(spec: dict, name: str, sae_folder: dict, cross_init: dict | None, criterion) -> dict:
    """Every cell's SAE of this config (held-out FVU drop, cosine to its init or warm start) and the
    base cell's cross-init check, with the layer's verdict."""
    from dataclasses import asdict

    from . import convergence, grid

    mode = spec["saes"][name].get("warm_start", "none")
    cells = {}
    for (cell, sae), folder in sorted(sae_folder.items()):
        if sae != name:
            continue
        source = grid.warm_start_source(spec, grid.Cell.parse(cell), mode)
        start = sae_folder.get((source.name, name)) if source is not None else None
        cells[cell] = convergence.sae_record(folder, criterion, start)
    return {
        "criterion": asdict(criterion),
        "cells": cells,
        "cross_init": cross_init,
        **convergence.layer_verdict(cells, cross_init),
    }


def _effect(pairs: list, diff_of: dict, name: str, null_pairs: list[dict]) -> dict | None:
    """Label counts of these diff pairs, each and summed, against the null of such a sum."""
    from . import nulls as nulllib

    if not pairs:
        return None
    each = [{"a": a.name, "b": b.name, **diff_of[(a.name, b.name, name)][0]["counts"]} for a, b in pairs]
    summed = {k: sum(int(e.get(k, 0)) for e in each) for k in nulllib.LABELS}
    return {"pairs": each, "labels": nulllib.versus(summed, null_pairs, len(each))}


HEADLINE_LABELS = ("born", "died", "changed", "same")


def _effect_headline(effect: dict | None) -> dict:
    if not effect:
        return {}
    keys = ("observed", "null_low", "null_high", "excess", "called")
    return {label: {k: effect["labels"][label][k] for k in keys} for label in HEADLINE_LABELS}


def headline(blocks: dict, sae_order: list[str]) -> dict:
    """``headline.evolution`` for the first SAE config (in config order) of each layer, led by the
    model effect (same data, other model: M0Di vs MiDi summed over iterations) against the
    resampling null, then the data effect (M0D0 vs M0Di), whether the layer's SAEs converged, the
    number of null pairs, and per layer the branch totals (each label with the null beside it in
    ``vs_null``) and the seed-baseline changed fraction (mean over layers)."""
    if not blocks:
        return {}
    out = {"model_effect": {}, "data_effect": {}, "converged": {}, "null_pairs": None}
    baseline, n_pairs = [], []
    for (layer, _name), block in sorted(blocks.items(), key=lambda kv: (kv[0][0], sae_order.index(kv[0][1]))):
        key = f"layer{layer}"
        if key in out:
            continue
        out["model_effect"][key] = _effect_headline(block.get("model_effect"))
        out["data_effect"][key] = _effect_headline(block.get("data_effect"))
        out["converged"][key] = bool(block["convergence"]["converged"])
        n_pairs.append(block["null"]["pairs"])
        out[key] = {
            branch: {k: part["totals"][k] for k in ("born", "died", "changed", "reverted", "same")}
            for branch, part in block["branches"].items()
        }
        out[key]["sae"] = block["sae"]
        out[key]["unconverged"] = bool(block["unconverged"])
        out[key]["vs_null"] = {branch: part["totals_vs_null"] for branch, part in block["branches"].items()}
        baseline.append(block["seed_baseline_changed_fraction"])
    out["null_pairs"] = min(n_pairs) if n_pairs else None
    if baseline:
        out["seed_baseline_changed_fraction"] = float(np.mean(baseline))
    return out
