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


def _leaky_groups(n_groups=30, per_group=4, n_noise=20, seed=0):
    """Samples in groups (prompts) of ``per_group``; each group's samples share a signature
    feature (its own column, a group-specific random level plus a little noise) that fires on
    no other group, and the label is constant per group (half the groups high). Apart from the
    signature nothing differs between classes: sparse noise columns."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per_group)
    group_label = rng.permutation(np.arange(n_groups) % 2)
    y = group_label[groups]
    n = len(groups)
    signature = np.zeros((n, n_groups))
    level = rng.uniform(1.0, 3.0, n_groups)
    signature[np.arange(n), groups] = level[groups] + 0.1 * rng.random(n)
    noise = rng.exponential(1.0, (n, n_noise)) * (rng.random((n, n_noise)) < 0.3)
    x = np.concatenate([noise, signature], axis=1)[:, rng.permutation(n_noise + n_groups)]
    return x, y, groups


def test_grouped_folds_refuse_a_planted_prompt_leak():
    """Compared: the nested-CV AUROC with plain stratified folds by sample against folds grouped
    by prompt, on data whose only class signal is a per-prompt signature (``_leaky_groups``).
    Plain folds put a prompt's other samples in training, so the probe learns the signature's
    label and scores high; grouped folds never see a test prompt's signature in training, so
    the probe stays at chance. Three seeds; both margins are wide (plain >= 0.9, grouped
    within 0.12 of 0.5 on average, each run < 0.7)."""
    plain, grouped = [], []
    for seed in range(3):
        x, y, groups = _leaky_groups(seed=seed)
        plain.append(probes.nested_cv(x, y, ks=(10, 30), seed=seed)["auroc"])
        result = probes.nested_cv(x, y, ks=(10, 30), seed=seed, groups=groups)
        grouped.append(result["auroc"])
        assert result["fold_groups"] == "groups" and result["n_groups"] == 30
    assert min(plain) >= 0.9, plain
    assert abs(np.mean(grouped) - 0.5) <= 0.12 and max(grouped) < 0.7, grouped
    # the folds themselves: no prompt on both sides, outer or inner
    x, y, groups = _leaky_groups()
    for train, test in probes.folds(y, groups, 5, seed=0):
        assert not set(groups[train]) & set(groups[test])
        for itrain, ival in probes.folds(y[train], groups[train], 3, seed=1):
            assert not set(groups[train][itrain]) & set(groups[train][ival])
    # spearman_cv with grouped folds: the continuous version of the same leak
    v = y + 0.01 * np.random.default_rng(0).random(len(y))
    assert probes.spearman_cv(x, v, k=30) > 0.6
    assert abs(probes.spearman_cv(x, v, k=30, groups=groups)) < 0.3


def test_baselines_on_the_same_folds():
    """Compared: each baseline's AUROC against what its construction allows. The class signal
    lives in one direction of dense 'raw activations' spread over all dimensions (no single
    neuron carries much of it); the SAE-like features contain a planted feature. The
    difference-in-means direction and the dense probe recover the direction; random live
    features do not (dead columns, here planted with the signal, are never drawn); a baseline
    matrix of pure noise stays near chance. diffmean_direction is checked against the plain
    mean difference."""
    rng = np.random.default_rng(7)
    n, d = 160, 40
    groups = np.repeat(np.arange(40), 4)
    y = rng.permutation(np.arange(n) % 2)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    raw = rng.normal(size=(n, d)) + 2.5 * np.outer(y, direction)
    x, _, truth = planted(n=n, d=60, informative=(3,), strength=2.0, seed=1)
    x[:, 3] = 2.0 * y + rng.exponential(1.0, n)
    live = np.ones(60, dtype=bool)
    live[3] = False  # 'dead' in the stats: the random-feature baseline never draws it
    noise = rng.normal(size=(n, 50))
    out = probes.nested_cv(x, y, ks=(1, 5), seed=0, raw=raw, groups=groups, baselines={"noise": noise}, live=live)
    assert out["auroc"] > 0.8
    assert out["auroc_diffmean"] > 0.8 and out["auroc_raw_activations"] > 0.8
    assert out["auroc_random_features"] < 0.65 and abs(out["auroc_noise"] - 0.5) < 0.15
    assert 0.5 < out["auroc_raw_neurons"]
    w = probes.diffmean_direction(raw, y)
    assert w == pytest.approx(raw[y == 1].mean(0) - raw[y == 0].mean(0))
    assert probes.diffmean_direction(raw, np.zeros(n, dtype=int)) == pytest.approx(np.zeros(d))


def test_probe_verb_groups_by_prompt_restricts_to_the_split_and_writes_baselines(tmp_path):
    """Compared: the probe verb end to end on a tiny cell (store, SAE, features, samples, split)
    against references computed here: the init SAE it re-creates from the recorded seed equals
    the SAE saved untrained (same weights); the DiffMean direction it saves equals the plain
    high-minus-low mean of the prompt-pooled raw activations of the split's labelled samples;
    the summary names its folds, split size and every baseline AUROC."""
    import json

    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from sae_diff import cli, features
    from sae_diff.activations import ActivationStore, write_store
    from sae_diff.grid import site_dir
    from sae_diff.sae import files
    from sae_diff.sae.model import SAE, SAEConfig

    rng = np.random.default_rng(0)
    d_in, n_prompts, per = 8, 24, 4
    meta = {"sample_idx": [], "position": [], "in_prompt": [], "token_ids": []}
    rows, acts = [], []
    for s in range(n_prompts * per):
        prompt = s // per
        metric = float(prompt % 2) + 0.1 * rng.random()  # high / low by prompt: the prompt carries it
        length = 7
        meta["sample_idx"] += [s] * length
        meta["position"] += list(range(1, length + 1))
        meta["in_prompt"] += [p <= 3 for p in range(1, length + 1)]
        meta["token_ids"] += [0] * length
        a = rng.normal(size=(length, d_in))
        a[:3, 0] += 2.0 * (prompt % 2)  # the prompt tokens of high prompts
        acts.append(a)
        rows.append({"sample_id": s, "prompt_id": f"p{prompt}", "prompt": f"text {prompt}", "m": metric})
    acts = torch.from_numpy(np.concatenate(acts)).float()
    meta = {k: np.asarray(v) for k, v in meta.items()}
    site = site_dir(1, "resid_post")
    write_store(tmp_path / "acts" / site, acts, split="train", shard_tokens=100, meta=meta)
    store = ActivationStore(tmp_path / "acts" / site)
    samples = pd.DataFrame(rows)
    samples.to_parquet(tmp_path / "samples.parquet")
    kept_prompts = [f"p{i}" for i in range(n_prompts) if i % 4 != 3]  # 18 prompts select features
    split = pd.DataFrame(
        {
            "source": "data",
            "prompt_id": [f"p{i}" for i in range(n_prompts)],
            "prompt": [f"text {i}" for i in range(n_prompts)],
            "unit": [f"p{i}" for i in range(n_prompts)],
            "stratum": "all",
            "part": ["select_features" if f"p{i}" in kept_prompts else "report" for i in range(n_prompts)],
        }
    )
    split.to_csv(tmp_path / "split.csv", index=False)

    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=32, k=4))
    sae.initialize(acts[: probes.INIT_SAMPLE], seed=5)  # what the trainer does (scale 1)
    for folder in ("saes", "base"):
        files.save(sae, tmp_path / folder / "topk", extra={"training": {"seed": 5, "scale": 1.0, "scale_out": 1.0}})
    init, note = probes.init_sae(tmp_path / "saes" / "topk", store)
    assert "seed 5" in note
    for key, value in sae.state_dict().items():
        assert torch.allclose(init.state_dict()[key], value, atol=1e-6), key
    result = features.run(sae, store, samples["sample_id"].to_numpy(), progress=False)
    (tmp_path / "features" / "topk").mkdir(parents=True)
    save_file(
        {k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in result.pooled.items()},
        str(tmp_path / "features" / "topk" / "pooled.safetensors"),
    )
    pd.concat([result.stats, features.weight_columns(sae)], axis=1).to_parquet(
        tmp_path / "features" / "topk" / "stats.parquet"
    )
    opts = {
        "pooling": "prompt", "quantiles": [0.25, 0.75], "thresholds": {"m": {"low": 0.5, "high": 0.5}},
        "ks": [1, 5], "selector": "dim",
        "n_folds": 3, "n_permutations": 100, "fdr": 0.05, "rounds": 1, "stop_auroc": 0.55,
        "min_per_class": 5, "seed": 0,
    }  # fmt: skip
    spec = {"probes": opts, "saes": {"topk": {}}, "metrics": ["m"], "device": "cpu"}
    args = [
        "probe", "--spec", json.dumps(spec), "--model", "M1", "--data", "D1", "--layer", "1",
        "--samples", str(tmp_path / "samples.parquet"), "--acts-dir", str(tmp_path / "acts"),
        "--saes-dir", str(tmp_path / "saes"), "--base-saes-dir", str(tmp_path / "base"),
        "--features-dir", str(tmp_path / "features"), "--prompt-split", str(tmp_path / "split.csv"),
        "--out-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert cli.main(args) in (0, None)
    summary = json.loads((tmp_path / "out" / "topk" / "m.json").read_text())
    assert summary["fold_groups"] == "prompt_id" and summary["pooling"] == "prompt"
    assert summary["n_samples_split"] == len(kept_prompts) * per and summary["n_groups"] == len(kept_prompts)
    for key in ("auroc", "auroc_init_sae", "auroc_random_directions", "auroc_diffmean", "auroc_raw_neurons",
                "auroc_raw_activations", "auroc_random_features"):  # fmt: skip
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["auroc_diffmean"] > 0.8  # the prompt tokens carry the label
    assert summary["auroc_init_sae"] == pytest.approx(summary["auroc"], abs=0.02)  # the SAE saved is its init
    # the reference direction: prompt tokens (positions 1-3) of the kept samples, high minus low
    kept = samples[samples["prompt_id"].isin(kept_prompts)]
    y = probes.labels(kept["m"].to_numpy(), low=0.5, high=0.5)
    raw = np.stack([acts.numpy()[(meta["sample_idx"] == s) & meta["in_prompt"]].mean(0) for s in kept["sample_id"]])
    want = raw[y == 1].mean(0) - raw[y == 0].mean(0)
    got = np.load(tmp_path / "out" / "topk" / "m.diffmean.npy")
    assert got.dtype == np.float32 and got.shape == (d_in,)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert summary["diffmean_norm"] == pytest.approx(float(np.linalg.norm(want)), rel=1e-4)
