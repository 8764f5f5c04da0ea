"""Probes on synthetic data: planted features are recovered, pure noise stays at chance under
nested CV (while selecting on all the data first would not), and the p- and q-values match
scipy's references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sae_diff import probes


def planted(n=240, d=200, informative=(3, 17, 42, 99, 150), strength=1.2, seed=0):
    """Sparse non-negative 'features'; the planted ones fire more on class 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.exponential(1.0, (n, d)) * (rng.random((n, d)) < 0.3)
    for j in informative:
        x[:, j] += strength * y * rng.exponential(1.0, n) + 0.3 * y
    return x, y, set(informative)


def test_labels_by_quantiles_and_absolute_thresholds():
    v = np.array([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, np.nan, 0.2])
    assert probes.labels(v).tolist() == [0, 0, 0, -1, 1, 1, -1, -1]  # q25 = 0: ties at a cut-off join that side
    assert probes.labels(v, low=0.1, high=0.9).tolist() == [0, 0, 0, -1, 1, 1, -1, -1]
    assert probes.labels(np.array([1.0, 1.0, 1.0])).tolist() == [0, 0, 0]  # no spread: nobody is high
    mostly_one = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5])  # q25 = q75 = 1
    assert probes.labels(mostly_one).tolist() == [1, 1, 1, 1, 1, 0, 0]
    mostly_zero = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5])  # q25 = q75 = 0
    assert probes.labels(mostly_zero).tolist() == [0, 0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("selector", ["dim", "l1"])
def test_planted_features_are_recovered(selector):
    x, y, truth = planted()
    found = set(probes.SELECTORS[selector](x, y, len(truth)).tolist())
    precision = len(found & truth) / len(found)
    recall = len(found & truth) / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (found, truth)
    result = probes.nested_cv(x, y, selector=selector)
    assert result["auroc"] > 0.8 and result["auroc"] > result["auroc_random_features"] + 0.2


def test_difference_in_means_fdr_recovers_planted_features():
    x, y, truth = planted()
    d, p = probes.permutation_pvalues(x, y, n_permutations=3000, seed=1)  # BH over 200 needs p < 1e-3
    q = probes.benjamini_hochberg(p)
    found = set(np.nonzero(q < 0.05)[0].tolist())
    assert len(found & truth) / len(truth) >= 0.9 and len(found & truth) / max(len(found), 1) >= 0.9


def test_nested_cv_on_noise_stays_at_chance_and_a_leaky_selection_does_not():
    honest, leaky = [], []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        x = rng.exponential(1.0, (100, 400)) * (rng.random((100, 400)) < 0.3)
        y = rng.integers(0, 2, 100)
        honest.append(probes.nested_cv(x, y, ks=(5, 10, 20), seed=seed)["auroc"])
        leaky.append(probes.nested_cv(x, y, ks=(5, 10, 20), seed=seed, leaky=True)["auroc"])
    assert abs(np.mean(honest) - 0.5) <= 0.05, honest
    assert np.mean(leaky) > 0.6, leaky  # selection on every sample leaks the test labels


def test_permutation_p_against_scipy_and_bh_against_scipy():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    x = rng.normal(size=(60, 3))
    x[:, 0] += 0.7 * y
    d, p = probes.permutation_pvalues(x, y, n_permutations=4000, seed=0)
    for j in range(3):

        def cohen(a, b):
            s = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
            return (a.mean() - b.mean()) / s

        ref = stats.permutation_test(
            (x[y == 1, j], x[y == 0, j]),
            cohen,
            n_resamples=4000,
            random_state=j,
            alternative="two-sided",
            permutation_type="independent",
        )
        assert d[j] == pytest.approx(cohen(x[y == 1, j], x[y == 0, j]), rel=1e-10)
        assert p[j] == pytest.approx(ref.pvalue, abs=0.02)
    ps = rng.random(50) ** 2
    assert probes.benjamini_hochberg(ps) == pytest.approx(stats.false_discovery_control(ps, method="bh"), rel=1e-12)


def test_iterative_annotation_peels_planted_features_then_stops():
    x, y, truth = planted(strength=1.5)
    rows, rounds = probes.iterative_annotation(x, y, k=5, max_rounds=4)
    assert set(rows.loc[rows["round"] == 0, "feature"]) == truth
    assert rounds[0]["auroc"] > 0.8
    assert rounds[-1]["auroc"] <= 0.55 or len(rounds) == 4


def test_spearman_cv_and_correlation_ci():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 50))
    v = x[:, 7] * 2 + rng.normal(size=200) * 0.5
    assert probes.spearman_cv(x, v, k=3) > 0.8
    noise = [probes.spearman_cv(rng.normal(size=(200, 50)), v, k=3, seed=s) for s in range(4)]
    assert abs(np.mean(noise)) < 0.12, noise  # selection inside the folds: no signal from noise
    out = probes.spearman_with_ci(x[:, 7], v)
    assert out["ci_low"] <= out["rho"] <= out["ci_high"] and out["rho"] == pytest.approx(
        stats.spearmanr(x[:, 7], v).statistic
    )
    assert probes.jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)


def test_compare_layer_reads_the_files_it_is_given(tmp_path):
    """Compared: probes.compare_layer on probe and diff files (handed over in shuffled order, one
    probe skipped: JSON without a table) against compare_cells / compare_metrics called directly."""
    import json

    import pandas as pd

    from sae_diff import grid

    rng = np.random.default_rng(3)
    n, k = 12, 3

    def probe_table():
        smd = rng.normal(size=n)
        top = np.zeros(n, dtype=bool)
        top[np.argsort(-np.abs(smd))[:k]] = True
        return pd.DataFrame({"feature": np.arange(n), "smd": smd, "freq": rng.random(n), f"top{k}": top})

    spec = {
        "saes": {"topk": {}},
        "probes": {"ks": [1, k]},
        "metrics": ["m1", "m2"],
        "cells": ["M0_D0", "M1_D1"],
        "diff_saes": ["topk"],
        "grid": {"branches": ["MXDX"]},
        "data": {"D0": {}, "D1": {}},
    }
    tables, probe_files = {}, []
    for cell in spec["cells"]:
        for metric in spec["metrics"]:
            path = tmp_path / grid.probe_json(cell, 1, "topk", metric)
            path.parent.mkdir(parents=True, exist_ok=True)
            block = {"cell": cell, "layer": 1, "sae": "topk", "metric": metric, "auroc": float(rng.random())}
            if (cell, metric) == ("M1_D1", "m2"):
                block = {**block, "skipped": "too few labelled samples"}
            else:
                tables[(cell, metric)] = probe_table()
                tables[(cell, metric)].to_parquet(path.with_suffix(".parquet"))
            path.write_text(json.dumps(block))
            probe_files.append(str(path))
    diff_table = pd.DataFrame({"match": rng.permutation(n), "dec_cos_match": rng.random(n)})
    diff_path = tmp_path / grid.diff_json("M0_D0", "M1_D1", 1, "topk")
    diff_path.parent.mkdir(parents=True)
    diff_table.to_parquet(diff_path.with_suffix(".parquet"))
    diff_path.write_text(json.dumps({"a": "M0_D0", "b": "M1_D1", "layer": 1, "sae": "topk"}))

    out = probes.compare_layer(spec, 1, probe_files[::-1], [str(diff_path)])
    assert out["layer"] == 1 and out["k"] == k
    assert [(r["cell"], r["metric"], r["skipped"]) for r in out["auroc"]] == [
        ("M0_D0", "m1", None),
        ("M1_D1", "m1", None),
        ("M0_D0", "m2", None),
        ("M1_D1", "m2", "too few labelled samples"),
    ]
    (pair,) = out["cells"]  # m2 has no table in M1_D1: only m1 is compared across cells
    expected = probes.compare_cells(tables[("M0_D0", "m1")], tables[("M1_D1", "m1")], diff_table, k)
    assert pair["metric"] == "m1" and pair["jaccard_top"] == expected["jaccard_top"]
    assert pair["importance_spearman"] == expected["importance_spearman"]
    assert out["metrics"] == {
        "topk": {"M0_D0": probes.compare_metrics({m: tables[("M0_D0", m)] for m in ("m1", "m2")}, k)}
    }
