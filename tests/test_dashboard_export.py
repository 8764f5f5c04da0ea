"""The Neuronpedia / SAEDashboard export against the tables it is made from: tiny hand-made
inputs checked field by field, the features stage's own output checked for the sums that must
hold, and (where ``sae-dashboard`` is installed) SAEDashboard's data classes and converter
reading and rewriting the same data."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import dashboard_export, features
from sae_diff.errors import DataError
from sae_diff.sae import files
from sae_diff.sae.model import SAE, SAEConfig

# NeuronpediaDashboardFeature.to_dict's keys, in its order (sae_dashboard/neuronpedia/neuronpedia_dashboard.py)
FEATURE_KEYS = [
    "feature_index",
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "frac_nonzero",
    "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "n_prompts_total",
    "n_tokens_in_prompt",
    "dataset",
    "decoder_weights_dist",
    "activations",
    "vector",
]
ACTIVATION_KEYS = [
    "bin_min",
    "bin_max",
    "bin_contains",
    "tokens",
    "values",
    "qualifying_token_index",
    "dfa_values",
    "dfa_maxValue",
    "dfa_targetIndex",
]
N_TOKENS = 200  # eval tokens the hand-made frequencies are over


def _example(tokens, acts, at, sample_id=7):
    return {
        "sample_id": sample_id,
        "position": 10 + at,
        "activation": acts[at],
        "tokens": tokens,
        "acts": acts,
        "at": at,
    }


def _view(top: float, counts: list[int], n: list[int], seed: int) -> dict:
    """A token_examples.json entry: 20-bin histogram over (0, top], top and interval examples."""
    rng = np.random.default_rng(seed)

    def ex(value):
        acts = [0.0, round(float(value), 4), round(float(value) / 2, 4)]
        return _example([" the", "ĠCat", "\u00e9t\u00e9"], acts, 1, int(rng.integers(0, 99)))

    edges = np.linspace(0.0, top, 21)
    intervals = []
    for i, k in enumerate(n):
        lo, hi = top * i / 4, top * (i + 1) / 4
        intervals.append(
            {
                "label": f"{25 * i}–{25 * (i + 1)}% of max",
                "n": k,
                "examples": [ex((lo + hi) / 2) for _ in range(min(2, k))],
            }
        )
    return {
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts},
        "top": [ex(top), ex(top * 0.9)],
        "intervals": intervals,
    }


def _inputs(tmp_path: Path, logit_lens: bool = True, hook: str = "blocks.3.hook_resid_post"):
    """An SAE (d_in 5, d_sae 4) with known decoder rows, its stats.parquet (feature 2 dead)
    and its token examples."""
    sae = SAE(SAEConfig(architecture="topk", d_in=5, d_sae=4, k=2, hook_name=hook, model_name="M"))
    w_dec = torch.tensor(
        [
            [0.5, -2.0, 1.0, 0.25, 0.0],
            [-1.0, -0.5, -0.25, -3.0, -0.125],
            [1.0, 2.0, 3.0, 4.0, 5.0],
            [0.0, 4.0, -1.0, 2.0, 3.0],
        ]
    )
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
    sae_dir = files.save(sae, tmp_path / "sae")
    counts = {0: [3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 1: [1] * 20, 3: [0] * 19 + [4]}
    fire = {j: sum(c) for j, c in counts.items()} | {2: 0}
    top = {0: 2.5, 1: 0.75, 3: 3.0}
    stats = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "fire_count": [fire[j] for j in range(4)],
            "freq": [fire[j] / N_TOKENS for j in range(4)],
            "max_act": [top.get(j, np.nan) for j in range(4)],
            "dead": [False, False, True, False],
        }
    )
    if logit_lens:
        stats["promoted"] = [np.array([f" up{j}", f"UP{j}"], dtype=object) for j in range(4)]
        stats["promoted_logit"] = [np.array([3.1234567, 1.5 + j]) for j in range(4)]
        stats["suppressed"] = [np.array([f" down{j}", "Ġx"], dtype=object) for j in range(4)]
        stats["suppressed_logit"] = [np.array([-4.0000049, -2.0]) for _ in range(4)]
    features_dir = tmp_path / "features"
    features_dir.mkdir()
    stats.to_parquet(features_dir / "stats.parquet", index=False)
    n = {0: [3, 1, 0, 2], 1: [5, 5, 5, 5], 3: [0, 0, 0, 4]}
    views = {str(j): _view(top[j], counts[j], n[j], seed=j) for j in (0, 1, 3)}
    features.write_token_examples(features_dir, views)
    return SimpleNamespace(sae_dir=sae_dir, features_dir=features_dir, stats=stats, views=views, w_dec=w_dec.numpy())


def _batches(folder: Path) -> list[dict]:
    paths = sorted(folder.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in paths]


def test_fields_equal_the_tables(tmp_path):
    data = _inputs(tmp_path)
    out = tmp_path / "np"
    summary = dashboard_export.neuronpedia(
        data.features_dir, data.sae_dir, out, "m-id", "res-sd", dataset="d/s", n_prompts_total=9, n_tokens_in_prompt=32
    )
    assert summary == {"features": 3, "batches": 1, "skipped": 1}
    (batch,) = _batches(out)
    assert {k: v for k, v in batch.items() if k != "features"} == {
        "model_id": "m-id",
        "layer": 3,
        "sae_set": "res-sd",
        "sae_id_suffix": None,
    }
    assert [f["feature_index"] for f in batch["features"]] == [0, 1, 3]
    stats = data.stats.set_index("feature")
    for feature in batch["features"]:
        j = feature["feature_index"]
        row, view = stats.loc[j], data.views[str(j)]
        assert list(feature) == FEATURE_KEYS
        assert feature["frac_nonzero"] == row["freq"]
        assert feature["pos_str"] == list(row["promoted"])
        assert feature["pos_values"] == np.round(row["promoted_logit"], 5).tolist()
        assert feature["neg_str"] == list(row["suppressed"])
        assert feature["neg_values"] == [-4.0, -2.0]
        edges = np.asarray(view["histogram"]["edges"])
        assert feature["freq_hist_data_bar_heights"] == view["histogram"]["counts"]
        assert feature["freq_hist_data_bar_values"] == pytest.approx((edges[:-1] + edges[1:]) / 2, abs=1e-5)
        assert sum(feature["freq_hist_data_bar_heights"]) == row["fire_count"]
        # neuron alignment: the 3 largest decoder entries and their share of the row's L1 norm
        w = data.w_dec[j]
        order = np.argsort(-w, kind="stable")[:3]
        assert feature["neuron_alignment_indices"] == order.tolist()
        assert feature["neuron_alignment_values"] == w[order].tolist()  # exact: rounded in float64
        assert feature["neuron_alignment_l1"] == pytest.approx(np.abs(w[order]) / np.abs(w).sum(), abs=1e-5)
        for key in dashboard_export.EMPTY_FIELDS:
            assert feature[key] == [], key
        assert (feature["n_prompts_total"], feature["n_tokens_in_prompt"], feature["dataset"]) == (9, 32, "d/s")
        # activations: the top group, then the intervals from the highest down
        expected = [(e, -1, row["max_act"], -1) for e in view["top"]]
        for i in reversed(range(4)):
            interval = view["intervals"][i]
            bounds = (row["max_act"] * i / 4, row["max_act"] * (i + 1) / 4, interval["n"] / N_TOKENS)
            expected += [(e, *bounds) for e in interval["examples"]]
        assert len(feature["activations"]) == len(expected)
        for act, (example, low, high, contains) in zip(feature["activations"], expected):
            assert list(act) == ACTIVATION_KEYS
            assert act["bin_min"] == pytest.approx(low) and act["bin_max"] == pytest.approx(high)
            assert act["bin_contains"] == pytest.approx(contains)
            assert act["tokens"] == example["tokens"]
            assert act["values"] == example["acts"]
            assert act["qualifying_token_index"] == example["at"]
            assert (act["dfa_values"], act["dfa_maxValue"], act["dfa_targetIndex"]) == ([], 0, -1)
    # the interval fractions add up to the feature's firing frequency
    for feature in batch["features"]:
        firsts = {a["bin_min"]: a["bin_contains"] for a in feature["activations"] if a["bin_min"] >= 0}
        n = sum(i["n"] for i in data.views[str(feature["feature_index"])]["intervals"] if i["examples"])
        assert sum(firsts.values()) == pytest.approx(n / N_TOKENS)

    skipped = json.loads((out / "skipped_indexes.json").read_text())
    assert skipped == {
        "model_id": "m-id",
        "layer": "3",
        "sae_set": "res-sd",
        "log_sparsity": -6,
        "skipped_indexes": [2],
    }
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["model_id"] == "m-id" and settings["layer"] == 3 and settings["n_features_at_a_time"] == 128
    assert (settings["n_quantiles"], settings["top_acts_group_size"], settings["quantile_group_size"]) == (4, 2, 2)
    assert (out / ".written-by-sae-diff").exists()


def test_batches_split_as_the_runner_splits_them(tmp_path):
    """np.array_split into ceil(n / batch_size) batches; a subset; dead features on request."""
    data = _inputs(tmp_path)
    out = tmp_path / "np"
    dashboard_export.neuronpedia(data.features_dir, data.sae_dir, out, "m", "s", batch_size=2, sae_id_suffix="x")
    batches = _batches(out)
    assert [[f["feature_index"] for f in b["features"]] for b in batches] == [[0, 1], [3]]
    assert all(b["sae_id_suffix"] == "x" for b in batches)
    # rebuilt in place (the folder is ours), with a subset and the dead feature included
    summary = dashboard_export.neuronpedia(
        data.features_dir, data.sae_dir, out, "m", "s", features=[3, 2, 3], batch_size=1, include_dead=True
    )
    assert summary == {"features": 2, "batches": 2, "skipped": 0}
    batches = _batches(out)
    assert [[f["feature_index"] for f in b["features"]] for b in batches] == [[2], [3]]
    dead = batches[0]["features"][0]
    assert dead["activations"] == [] and dead["freq_hist_data_bar_heights"] == [] and dead["frac_nonzero"] == 0
    assert dead["neuron_alignment_indices"] == [4, 3, 2]
    assert json.loads((out / "skipped_indexes.json").read_text())["skipped_indexes"] == []


def test_without_the_logit_lens_and_with_an_explicit_layer(tmp_path):
    data = _inputs(tmp_path, logit_lens=False, hook="model.layers.5.output")
    with pytest.raises(DataError, match=r"cfg\.json: hook name 'model\.layers\.5\.output'.*layer="):
        dashboard_export.neuronpedia(data.features_dir, data.sae_dir, tmp_path / "np", "m", "s")
    dashboard_export.neuronpedia(data.features_dir, data.sae_dir, tmp_path / "np", "m", "s", layer=5)
    (batch,) = _batches(tmp_path / "np")
    assert batch["layer"] == 5
    for feature in batch["features"]:
        assert feature["pos_str"] == feature["pos_values"] == feature["neg_str"] == feature["neg_values"] == []


def test_missing_or_stale_inputs_are_named(tmp_path):
    data = _inputs(tmp_path)
    out = tmp_path / "np"
    run = lambda **kw: dashboard_export.neuronpedia(data.features_dir, data.sae_dir, out, "m", "s", **kw)
    views = dict(data.views)

    del views["3"]
    features.write_token_examples(data.features_dir, views)
    with pytest.raises(DataError, match=r"token_examples\.parquet: feature 3 .*has no entry"):
        run()
    run(features=[0, 1])  # the stale feature is not asked for

    views["3"] = dict(data.views["3"], histogram={"edges": [0, 1], "counts": [5]})
    features.write_token_examples(data.features_dir, views)
    with pytest.raises(
        DataError, match=r"token_examples\.parquet feature 3: histogram counts 5 firings, stats\.parquet 4"
    ):
        run()

    (data.features_dir / features.TOKEN_EXAMPLES).unlink()
    with pytest.raises(FileNotFoundError, match=r"token_examples\.parquet: missing"):
        run()

    stats = data.stats.drop(columns=["max_act"])
    stats.to_parquet(data.features_dir / "stats.parquet", index=False)
    with pytest.raises(DataError, match=r"stats\.parquet: columns \['max_act'\] missing"):
        run()
    data.stats.iloc[:3].to_parquet(data.features_dir / "stats.parquet", index=False)
    with pytest.raises(DataError, match=r"stats\.parquet: 3 rows .*d_sae=4"):
        run()
    data.stats.to_parquet(data.features_dir / "stats.parquet", index=False)
    with pytest.raises(ValueError, match=r"features \[4\]: outside the SAE's 0\.\.3"):
        run(features=[4])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not written by sae-diff"):
        dashboard_export.neuronpedia(data.features_dir, data.sae_dir, mine, "m", "s")
    assert (mine / "notes.txt").read_text() == "keep"


def test_the_features_stage_output_exports_whole(tmp_path):
    """The real feature pass on a tiny store: every live feature is exported with its whole
    histogram, its examples and interval fractions that add up to its firing frequency."""
    from sae_diff.activations import ActivationStore, write_store

    rng = np.random.default_rng(0)
    meta = {"sample_idx": [], "position": [], "in_prompt": [], "token_ids": []}
    for s in range(12):
        length = int(rng.integers(5, 10))
        meta["sample_idx"] += [100 + s] * length
        meta["position"] += list(range(1, length + 1))
        meta["in_prompt"] += [p <= 2 for p in range(1, length + 1)]
        meta["token_ids"] += list(rng.integers(0, 30, size=length))
    meta = {k: np.asarray(v) for k, v in meta.items()}
    acts = torch.from_numpy(rng.normal(size=(len(meta["position"]), 6))).float()
    store = ActivationStore(write_store(tmp_path / "store", acts, split="eval", shard_tokens=40, meta=meta))
    sae = SAE(SAEConfig(architecture="topk", d_in=6, d_sae=16, k=2, hook_name="blocks.1.hook_resid_post"))
    sae.initialize(acts, seed=0)
    result = features.run(sae.eval(), store, np.arange(100, 112), n_examples=3, context_window=2, progress=False)
    sae_dir = files.save(sae, tmp_path / "sae")
    folder = tmp_path / "features"
    folder.mkdir()
    result.stats.to_parquet(folder / "stats.parquet", index=False)
    features.write_token_examples(folder, result.token_examples)

    summary = dashboard_export.neuronpedia(folder, sae_dir, tmp_path / "np", "m", "s", batch_size=5)
    live = result.stats.loc[~result.stats["dead"]]
    assert summary["features"] == len(live) and summary["skipped"] == 16 - len(live)
    exported = [f for b in _batches(tmp_path / "np") for f in b["features"]]
    assert [f["feature_index"] for f in exported] == live["feature"].tolist()
    for feature, (_, row) in zip(exported, live.iterrows()):
        view = result.token_examples[feature["feature_index"]]
        assert sum(feature["freq_hist_data_bar_heights"]) == row["fire_count"]
        assert feature["frac_nonzero"] == pytest.approx(row["fire_count"] / store.n_tokens("eval"))
        n_examples = len(view["top"]) + sum(len(i["examples"]) for i in view["intervals"])
        assert len(feature["activations"]) == n_examples
        top = feature["activations"][0]
        assert max(top["values"]) == pytest.approx(row["max_act"], abs=1e-4)
        assert top["values"][top["qualifying_token_index"]] == max(top["values"])
        contains = {a["bin_min"]: a["bin_contains"] for a in feature["activations"] if a["bin_min"] >= 0}
        with_examples = sum(i["n"] for i in view["intervals"] if i["examples"])
        assert sum(contains.values()) == pytest.approx(with_examples / store.n_tokens("eval"))


def _runner_feature_data(data, settings):
    """The same tables fed through SAEDashboard's own data classes, as its runner fills them
    (titles in the runner's formats, token ids through a vocabulary of our strings)."""
    from sae_dashboard.components import (
        ActsHistogramData,
        FeatureTablesData,
        LogitsHistogramData,
        LogitsTableData,
        SequenceData,
        SequenceGroupData,
        SequenceMultiGroupData,
    )
    from sae_dashboard.feature_data import FeatureData

    vocab: dict[str, int] = {}
    ids = lambda strings: [vocab.setdefault(s, len(vocab)) for s in strings]
    seq = lambda e: SequenceData(token_ids=ids(e["tokens"]), feat_acts=e["acts"], qualifying_token_index=e["at"] + 1)
    out = {}
    for j, row in data.stats.set_index("feature").iterrows():
        if row["dead"]:
            continue
        view, w = data.views[str(j)], torch.as_tensor(data.w_dec[j])
        aligned = w.topk(3)
        edges = np.asarray(view["histogram"]["edges"])
        top = row["max_act"]
        groups = [SequenceGroupData(f"TOP ACTIVATIONS<br>MAX = {top:.3f}", [seq(e) for e in view["top"]])]
        for i in reversed(range(len(view["intervals"]))):
            interval = view["intervals"][i]
            lo, hi, pct = top * i / 4, top * (i + 1) / 4, interval["n"] / N_TOKENS
            title = f"INTERVAL {lo:.3f} - {hi:.3f}<br>CONTAINS {pct:.3%}"
            groups.append(SequenceGroupData(title, [seq(e) for e in interval["examples"]]))
        out[int(j)] = FeatureData(
            feature_tables_data=FeatureTablesData(
                neuron_alignment_indices=aligned.indices.tolist(),
                neuron_alignment_values=aligned.values.tolist(),
                neuron_alignment_l1=(aligned.values.abs() / w.abs().sum()).tolist(),
            ),
            acts_histogram_data=ActsHistogramData(
                bar_heights=view["histogram"]["counts"],
                bar_values=((edges[:-1] + edges[1:]) / 2).tolist(),
                title=f"ACTIVATIONS<br>DENSITY = {row['freq']:.3%}",
            ),
            logits_table_data=LogitsTableData(
                bottom_token_ids=ids(row["suppressed"]),
                bottom_logits=list(row["suppressed_logit"]),
                top_token_ids=ids(row["promoted"]),
                top_logits=list(row["promoted_logit"]),
            ),
            logits_histogram_data=LogitsHistogramData(),
            sequence_data=SequenceMultiGroupData(groups),
        )
    return out, {i: s for s, i in vocab.items()}


def _same(ours, theirs, path="batch"):
    """Equal structure and strings; numbers within the converter's rounding (3 decimals in
    release 0.8.0, 5 later) and its titles' 3-decimal formats."""
    if isinstance(ours, dict):
        assert list(ours) == list(theirs), path
        for key in ours:
            _same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{path}[{i}]")
    elif isinstance(ours, (int, float)) and not isinstance(ours, bool):
        assert ours == pytest.approx(theirs, abs=1e-3), path
    else:
        assert ours == theirs, path


def test_sae_dashboard_reads_and_rewrites_it(tmp_path):
    """SAEDashboard's data classes load every file, and its converter, given the same tables
    through its FeatureData classes, writes the batch we wrote."""
    pytest.importorskip("sae_dashboard", reason="sae-dashboard is not installed (not in our lock)")
    from sae_dashboard.neuronpedia.neuronpedia_converter import NeuronpediaConverter
    from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig

    data = _inputs(tmp_path)
    out = tmp_path / "np"
    dashboard_export.neuronpedia(data.features_dir, data.sae_dir, out, "m-id", "res-sd", dataset="d/s")
    (ours,) = _batches(out)
    loaded = NeuronpediaDashboardBatch(**ours)
    assert loaded.to_dict() == ours  # every key known to the data classes, nothing lost
    assert [f.feature_index for f in loaded.features] == [0, 1, 3]
    assert all(len(f.activations) > 0 for f in loaded.features)
    settings = json.loads((out / "run_settings.json").read_text())
    np_cfg = NeuronpediaRunnerConfig(**settings)

    feature_data, vocab = _runner_feature_data(data, settings)
    model = SimpleNamespace(cfg=SimpleNamespace(d_vocab=len(vocab)))  # what to_str_tokens_safe reads
    vis = SimpleNamespace(feature_data_dict=feature_data)
    theirs = json.loads(NeuronpediaConverter.convert_to_np_json(model, vis, np_cfg, vocab))
    _same(ours, theirs)


def test_sae_dashboard_bulk_export_reads_it(tmp_path):
    """SAEDashboard's (post-0.8.0) bulk-import converter turns the batches into Neuronpedia rows."""
    export = pytest.importorskip(
        "sae_dashboard.neuronpedia.neuronpedia_export", reason="sae-dashboard with neuronpedia_export not installed"
    )
    import gzip

    data = _inputs(tmp_path)
    out = tmp_path / "np"
    dashboard_export.neuronpedia(data.features_dir, data.sae_dir, out, "m-id", "res-sd", batch_size=2)
    cfg = export.NeuronpediaExportConfig(
        saedashboard_output_dir=str(out),
        exports_dir=str(tmp_path / "exports"),
        creator_name="me",
        creator_id="c1",
        release_id="r",
        release_title="R",
        url="",
        model_name="m-id",
        neuronpedia_source_set_id="res-sd",
        neuronpedia_source_set_description="d",
        hf_weights_repo_id="x/y",
        hf_weights_path="x/y/z",
        hook_point="hook_resid_post",
        layer_num=3,
        prompts_huggingface_dataset_path="d/s",
        n_prompts_total=0,
        n_tokens_in_prompt=0,
    )
    folder = Path(export.export_neuronpedia_dashboards(cfg))
    assert folder.name == "3-res-sd"
    rows = lambda kind: [
        json.loads(line)
        for p in sorted((folder / kind).glob("*.jsonl.gz"))
        for line in gzip.open(p).read().splitlines()
    ]
    assert sorted(int(f["index"]) for f in rows("features")) == [0, 1, 3]
    batches = _batches(out)
    n_acts = sum(len(f["activations"]) for b in batches for f in b["features"])
    assert len(rows("activations")) == n_acts
    by_feature = {int(f["index"]): f for f in rows("features")}
    assert by_feature[3]["maxActApprox"] == pytest.approx(3.0)
