"""The pickers behind ``headline`` in summary.json, each on small hand-made blocks with expected
values worked out by hand (the interventions headline has its own tests)."""

from __future__ import annotations

import pytest

from sae_diff import evolution, iterations, summary

# ----------------------------------------------------------------------------- evolution.headline


def _versus(observed: int) -> dict:
    return {"observed": observed, "null_mean": 1.0, "null_low": 0.0, "null_high": 2.0, "excess": observed - 1.0,
            "outside": observed > 2, "called": observed > 2}  # fmt: skip


def _evolution_block(layer: int, sae: str, base: int, seed_fraction: float) -> dict:
    """An evolution JSON's parts the headline reads: per branch ``totals`` (with extra counts the
    headline leaves out) and the totals against the null, the seed-pair baseline, the model and data
    effects, the convergence verdict and the null's size."""
    totals = {"same": base, "changed": base + 1, "died": base + 2, "born": base + 3, "reverted": base + 4}
    effect = {label: _versus(base + i) for i, label in enumerate(("same", "changed", "died", "born"))}
    return {
        "layer": layer,
        "sae": sae,
        "seed_baseline_changed_fraction": seed_fraction,
        "null": {"pairs": 5 + layer},
        "convergence": {"converged": layer == 6},
        "unconverged": layer != 6,
        "model_effect": {"pairs": [], "labels": effect},
        "data_effect": None,
        "branches": {
            "MXDX": {"steps": [], "totals": {**totals, "inactive": 99, "died_absent": 98}, "totals_vs_null": {"x": 1}},
            "M0DX": {"steps": [], "totals": {k: 10 * v for k, v in totals.items()}, "totals_vs_null": {"y": 2}},
        },
    }


def test_evolution_headline_takes_the_first_sae_in_config_order_per_layer():
    """Compared: the whole headline. Layer 6 has SAEs "a" (inserted first, first by name) and "b";
    sae_order ["b", "a"] picks "b". Layer 12 has only "a". Layers come in numeric order (6 before 12,
    where string order would put 12 first). The seed baseline is the mean over the picked blocks only:
    (0.1 + 0.3) / 2 = 0.2 (layer 6's "a" has 0.9 and is not picked). The counts are the five labels
    of each branch's totals, nothing else. The model effect leads, with the four labels against the
    null (keys observed, null_low, null_high, excess, called); a layer without data-effect pairs has
    an empty block; null_pairs is the smallest null of the picked blocks."""
    blocks = {
        (12, "a"): _evolution_block(12, "a", base=100, seed_fraction=0.3),
        (6, "a"): _evolution_block(6, "a", base=0, seed_fraction=0.9),
        (6, "b"): _evolution_block(6, "b", base=50, seed_fraction=0.1),
    }
    out = evolution.headline(blocks, ["b", "a"])
    keys = ("observed", "null_low", "null_high", "excess", "called")
    effect = lambda base: {  # noqa: E731
        label: {k: _versus(base + i)[k] for k in keys}
        for i, label in enumerate(("born", "died", "changed", "same")[::-1])
    }
    assert out == {
        "model_effect": {"layer6": effect(50), "layer12": effect(100)},
        "data_effect": {"layer6": {}, "layer12": {}},
        "converged": {"layer6": True, "layer12": False},
        "null_pairs": 11,
        "layer6": {
            "MXDX": {"born": 53, "died": 52, "changed": 51, "reverted": 54, "same": 50},
            "M0DX": {"born": 530, "died": 520, "changed": 510, "reverted": 540, "same": 500},
            "sae": "b",
            "unconverged": False,
            "vs_null": {"MXDX": {"x": 1}, "M0DX": {"y": 2}},
        },
        "layer12": {
            "MXDX": {"born": 103, "died": 102, "changed": 101, "reverted": 104, "same": 100},
            "M0DX": {"born": 1030, "died": 1020, "changed": 1010, "reverted": 1040, "same": 1000},
            "sae": "a",
            "unconverged": True,
            "vs_null": {"MXDX": {"x": 1}, "M0DX": {"y": 2}},
        },
        "seed_baseline_changed_fraction": pytest.approx(0.2),
    }
    assert list(out)[:4] == ["model_effect", "data_effect", "converged", "null_pairs"]
    assert list(out["model_effect"]["layer6"]) == ["born", "died", "changed", "same"]


def test_evolution_headline_of_nothing_is_empty():
    """Compared: the headline of no blocks: empty, with no baseline key (never a faked 0 or NaN)."""
    assert evolution.headline({}, ["a"]) == {}


# ---------------------------------------------------------------------------- iterations.headline


def _iterations_summary(shift: bool = True, where: bool = True) -> dict:
    """An iterations.json's parts the headline reads, with extra keys it must leave out."""
    per_iteration = {
        "M0": {
            "data": "D0",
            "all": {"n": 10, "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6},
            "eval": {"n": 3, "mean": 0.9, "ci_low": 0.8, "ci_high": 1.0},
        },
        "M1": {
            "data": "D1",
            "all": {"n": 12, "mean": 0.25, "ci_low": 0.2, "ci_high": 0.35},
            "eval": {"n": 4, "mean": 0.1, "ci_low": 0.0, "ci_high": 0.2},
        },
    }
    block = {"metric": "score", "per_iteration": per_iteration}
    if where:
        block["where"] = {"language": ["en"]}
    if shift:
        block["shift"] = {
            "from": "M0",
            "to": "M1",
            "all": {"diff": -0.25, "ci_low": -0.4, "ci_high": -0.1, "p": 0.02, "n_before": 10, "significant": True},
            "eval": {"diff": -0.8, "ci_low": -1.0, "ci_high": -0.6, "p": 0.5},
        }
    return {"target": {"metric": "score", "direction": "down"}, "metrics": {}, "target_metric": block}


def test_iterations_headline_reads_the_all_samples_part():
    """Compared: the whole headline. Means and CIs per model are the "all" part (not "eval"):
    M0 0.5 [0.4, 0.6], M1 0.25 [0.2, 0.35]; the shift keeps diff, ci_low, ci_high and p of "all";
    the direction comes from the target, the population ("where") from the target metric's block."""
    assert iterations.headline(_iterations_summary()) == {
        "metric": "score",
        "direction": "down",
        "where": {"language": ["en"]},
        "means": {"M0": 0.5, "M1": 0.25},
        "ci": {"M0": [0.4, 0.6], "M1": [0.2, 0.35]},
        "shift": {"diff": -0.25, "ci_low": -0.4, "ci_high": -0.1, "p": 0.02},
    }


def test_iterations_headline_without_shift_population_or_target():
    """Compared: no "shift" key without a shift block, "where" None without a population, and no
    headline (None) without a target metric or with no iteration in it."""
    out = iterations.headline(_iterations_summary(shift=False, where=False))
    assert "shift" not in out and out["where"] is None and out["means"] == {"M0": 0.5, "M1": 0.25}
    assert iterations.headline({"target": {}, "metrics": {}}) is None
    empty = _iterations_summary()
    empty["target_metric"]["per_iteration"] = {}
    assert iterations.headline(empty) is None


# ------------------------------------------------------------------------- summary.probes_headline


def _probe(auroc: float, n_top: int = 12) -> dict:
    return {
        "auroc": auroc,
        "auroc_random_features": auroc - 0.3,
        "auroc_raw_activations": auroc - 0.1,
        "top_features": list(range(100, 100 + n_top)),
        "chosen_k": 5,
    }


def _probes_cfg(branches: list[str]) -> dict:
    return {
        "models": {"M0": {}, "M1": {}, "M2": {}},
        "data": {"D0": {}, "D1": {}, "D2": {}},
        "layers": [12, 6],
        "saes": {"a": {}, "b": {}},
        "sae_order": ["b", "a"],
        "grid": {"branches": branches},
    }


def _probe_blocks() -> dict:
    """{cell: {layer{L}: {sae: {metric: probe JSON}}}}: the picked spot and decoys around it."""
    return {
        "M2_D2": {
            "layer12": {
                "b": {"score": _probe(0.9), "table_only": {"skipped": "no labels"}},
                "a": {"score": _probe(0.8)},
            },
            "layer6": {"b": {"score": _probe(0.7)}},
        },
        "M0_D2": {"layer12": {"b": {"score": _probe(0.6)}, "a": {"score": _probe(0.55)}}},
    }


def test_probes_headline_picks_last_mxdx_cell_deepest_layer_first_sae():
    """Compared: the whole headline. MXDX over D0..D2 ends at M2_D2; the deepest layer is 12 (the
    largest, not the last listed); sae_order ["b", "a"] picks "b". Its "score" probe gives the AUROCs
    (0.9, random 0.9 - 0.3, raw 0.9 - 0.1) and the first 10 of its 12 top features; the skipped
    "table_only" probe (no AUROC) is left out."""
    out = summary.probes_headline(_probe_blocks(), _probes_cfg(["MXDX", "M0DX"]))
    assert out == {
        "score": {
            "cell": "M2_D2",
            "layer": "layer12",
            "sae": "b",
            "top_features": list(range(100, 110)),
            "auroc": 0.9,
            "auroc_random_features": pytest.approx(0.6),
            "auroc_raw_activations": pytest.approx(0.8),
        }
    }


def test_probes_headline_without_mxdx_or_without_the_first_sae():
    """Compared: the picked (cell, SAE, AUROC). Without MXDX the chain is every cell, last M0_D2 (0.6);
    when "b" has no probe at the spot the next SAE in order, "a", is taken (0.8); with no probe at the
    spot the headline is empty."""
    out = summary.probes_headline(_probe_blocks(), _probes_cfg(["M0DX"]))
    assert (out["score"]["cell"], out["score"]["sae"], out["score"]["auroc"]) == ("M0_D2", "b", 0.6)
    blocks = _probe_blocks()
    del blocks["M2_D2"]["layer12"]["b"]
    out = summary.probes_headline(blocks, _probes_cfg(["MXDX"]))
    assert (out["score"]["cell"], out["score"]["sae"], out["score"]["auroc"]) == ("M2_D2", "a", 0.8)
    del blocks["M2_D2"]["layer12"]
    assert summary.probes_headline(blocks, _probes_cfg(["MXDX"])) == {}


# -------------------------------------------------------------------------- summary.stage_timings

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _benchmark(root, rule: str, name: str, *seconds: float):
    """A Snakemake benchmark TSV: one row per repeat."""
    path = root / rule / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{s}\t0:00:01\t1\t1\t1\t1\t0\t0\t0\t1\n" for s in seconds))
    return path


def test_stage_timings_sum_jobs_per_stage(tmp_path):
    """Compared: the whole {stage: seconds}. Rule names map to stages (extract_activations ->
    activations: 1.5 + 2.25 = 3.75; prepare_model -> models: 4.0; attribute -> attribution); the rows
    of one file (benchmark repeats) add up: 0.1234 + 0.2 = 0.3234, rounded to 3 decimals 0.323; a rule
    not in STAGES keeps its own name (0.5). Stages in order of first appearance."""
    files = [
        _benchmark(tmp_path, "extract_activations", "M0_D0", 1.5),
        _benchmark(tmp_path, "prepare_model", "M0", 4.0),
        _benchmark(tmp_path, "extract_activations", "M1_D1", 2.25),
        _benchmark(tmp_path, "attribute", "M1_D1_layer6_topk_score", 0.1234, 0.2),
        _benchmark(tmp_path, "my_rule", "x", 0.5),
    ]
    out = summary.stage_timings(files)
    assert out == {"activations": 3.75, "models": 4.0, "attribution": 0.323, "my_rule": 0.5}
    assert list(out) == ["activations", "models", "attribution", "my_rule"]
    assert summary.stage_timings([str(files[1])]) == {"models": 4.0}  # str paths too
    assert summary.stage_timings([]) == {}
