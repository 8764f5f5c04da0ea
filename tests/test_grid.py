"""The results layout: one function per artifact, usable with ids and with wildcard placeholders."""

from __future__ import annotations

import pytest

from sae_diff import grid
from sae_diff.grid import Cell


def test_paths_take_ids_or_wildcard_placeholders():
    """Compared: each path built from ids against the same path built from the rule's placeholders
    and formatted by str.format (what Snakemake does with a wildcard pattern)."""
    ids = {"cell": "M2_D2", "layer": 12, "sae": "topk", "metric": "female_ratio", "experiment": "steering"}
    for build, keys in [
        (grid.sae_weights, ("cell", "layer", "sae")),
        (grid.feature_stats, ("cell", "layer", "sae")),
        (grid.eval_json, ("cell", "layer", "sae")),
        (grid.probe_json, ("cell", "layer", "sae", "metric")),
        (grid.attribution_table, ("cell", "layer", "sae", "metric")),
        (grid.intervention_dir, ("experiment", "cell", "layer", "sae", "metric")),
    ]:
        pattern = build(*("{" + k + "}" for k in keys))
        assert pattern.format(**ids) == build(*(ids[k] for k in keys))
        assert pattern.startswith("results/") and "{" in pattern
    assert (
        grid.sae_dir(Cell("M0", "D0"), 3, "topk")
        == grid.sae_dir("M0_D0", 3, "topk")
        == "results/saes/M0_D0/layer3/topk"
    )
    assert grid.attribution_summary("M1_D1", 2, "topk", "m") == "results/attribution/M1_D1/layer2/topk/m.json"


def test_figure_paths_keep_the_wildcards_not_given():
    assert grid.figure("statistics") == "results/figures/features/{cell}/layer{layer}/{sae}/statistics.png"
    assert grid.figure("statistics", cell=Cell("M1", "D1"), layer=6) == (
        "results/figures/features/M1_D1/layer6/{sae}/statistics.png"
    )
    with pytest.raises(KeyError):
        grid.figure("no_such_kind")


def test_cell_layer_name_reads_back_what_the_layout_wrote():
    """Compared: (cell, layer, SAE) recovered from a path against the ids the path was built from."""
    assert grid.cell_layer_name(grid.sae_weights("M3_D2", 12, "jump_relu")) == ("M3_D2", 12, "jump_relu")
    assert grid.cell_layer_name("/abs/run/" + grid.feature_stats("M0_D4", 0, "topk")) == ("M0_D4", 0, "topk")
    assert grid.cell_layer_name(grid.eval_json("M1_D1", 6, "topk"), per_sae_folder=False) == ("M1_D1", 6, "topk")
    assert grid.cell_layer_name(grid.eval_loss_by_position("M1_D1", 6, "topk"), per_sae_folder=False)[2] == "topk"
    with pytest.raises(ValueError, match="expected <cell>/layer<L>/<sae>"):
        grid.cell_layer_name("results/probes/comparison_layer1.json")
