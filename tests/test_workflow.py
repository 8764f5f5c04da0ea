"""The whole DAG through Snakemake on config/test.yaml (tiny random models), and what reruns when."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sae_diff.experiments import DIRECTION_COMPARISONS

from .workflow_run import ROOT, planned, reruns, snakemake

pytestmark = pytest.mark.slow


def test_summary_lists_every_cell_and_site(finished_run):
    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    assert list(summary)[0] == "headline"
    assert set(summary["headline"]["timings"]) == {
        "models",
        "dpo",
        "data",
        "scoring",
        "activations",
        "saes",
        "evaluation",
        "features",
        "calibration",
        "diffs",
        "probes",
        "attribution",
        "interventions",
        "diffing",
    }
    assert all(v > 0 for v in summary["headline"]["timings"].values())
    assert set(summary["cells"]) == {"M0_D0", "M0_D1", "M1_D1"}
    for cell in summary["cells"].values():
        assert set(cell["activations"]) == {"layer1", "layer1.mlp_out"}
        for site in cell["activations"].values():
            assert site["n_tokens"]["train"] > 0 and site["n_tokens"]["eval"] > 0
            assert site["dtype"] == "float16" and site["d_model"] == 32
    assert summary["data"]["D0"]["n_samples"] == 24  # 8 prompts x 3 samples
    assert "female_ratio" in summary["data"]["D0"]["metrics"]
    assert len(summary["data"]["D0"]["examples"]) == 3 and {"prompt", "text"} <= set(
        summary["data"]["D0"]["examples"][0]
    )
    assert summary["run"]["versions"]["torch"]


def test_dpo_round_and_iterations(finished_run):
    """M1 is made by a DPO round on D0's pairs; iterations.json and the headline report the target metric."""
    results = finished_run / "results"
    record = json.loads((results / "models" / "M1" / "dpo.json").read_text())
    assert record["n_pairs"] > 0 and record["loss_last"] < record["loss_first"]
    pairs = __import__("pandas").read_parquet(results / "models" / "M1" / "pairs.parquet")
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()
    iterations = json.loads((results / "iterations.json").read_text())
    assert iterations["target"] == {"metric": "n_chars", "direction": "up"}
    assert set(iterations["metrics"]["n_chars"]["per_iteration"]) == {"M0", "M1"}
    head = json.loads((results / "summary.json").read_text())["headline"]["iterations"]
    assert head["metric"] == "n_chars" and set(head["means"]) == {"M0", "M1"}
    assert head["shift"]["ci_low"] <= head["shift"]["diff"] <= head["shift"]["ci_high"]
    assert (results / "figures" / "iterations" / "target_metric.png").stat().st_size > 10_000


def test_dpo_setting_change_reruns_the_round_and_everything_after(finished_run):
    path = _variant(finished_run, lambda c: c["iterations"]["dpo"].update(beta=0.2))
    reruns(
        planned(snakemake(finished_run, "-n", configfile=path)),
        {
            "finetune_dpo": 1,
            "make_data": 1,
            "score_data": 1,
            "iterations": 1,
            "extract_activations": 2,
            "train_sae": 2,
            "evaluate_saes": 2,
        },  # M1_D1 and M0_D1: D1 changes
        never=("prepare_model",),
    )


def test_logs_per_rule(finished_run):
    logs = finished_run / "logs"
    assert (logs / "prepare_model" / "M0.log").exists()
    assert "preference pairs" in (logs / "finetune_dpo" / "M1.log").read_text()
    assert (logs / "extract_activations" / "M1_D1.log").read_text().count("extract") >= 1
    assert "evaluate done" in (logs / "evaluate_saes" / "M0_D1_layer1.log").read_text()


def test_rerun_is_a_no_op(finished_run):
    assert planned(snakemake(finished_run, "-n")) == {}


def _variant(workdir: Path, change) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    change(cfg)
    path = workdir / "variant.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # a user's edit keeps the config's order
    return path


def _reordered(value, reverse: bool):
    if isinstance(value, dict):
        return {key: _reordered(value[key], reverse) for key in sorted(value, reverse=reverse)}
    return value


def test_reordered_config_keys_plan_nothing_but_the_headline_sae(finished_run, tmp_path):
    """The same config re-saved with its keys sorted (what yaml.safe_dump does) or reversed: no
    job's params depend on the order of a mapping, except that the first SAE of `saes` is the
    one the headline reports, so sorting topk, relu into relu, topk reruns the summary alone."""
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    assert list(cfg["saes"]) == ["topk", "relu"]
    for reverse, expected in ((True, {}), (False, {"summary": 1, "all": 1})):
        path = tmp_path / f"reordered_{reverse}.yaml"
        path.write_text(yaml.safe_dump(_reordered(cfg, reverse), sort_keys=False))
        assert planned(snakemake(finished_run, "-n", configfile=path)) == expected, reverse


def test_scorer_change_reruns_scoring_and_what_reads_scores(finished_run):
    # D1 is generated by M1, made from D0's scores: changing the scorers reruns the round too
    path = _variant(finished_run, lambda c: c["scorers"].pop(0))
    reruns(
        planned(snakemake(finished_run, "-n", configfile=path)),
        {"score_data": 2, "iterations": 1, "finetune_dpo": 1, "make_data": 1, "extract_activations": 2},
        never=("prepare_model",),
    )


def test_activation_dtype_change_reruns_extraction_only(finished_run):
    path = _variant(finished_run, lambda c: c["activations"].update(dtype="float32"))
    reruns(
        planned(snakemake(finished_run, "-n", configfile=path)),
        {"extract_activations": 3, "train_sae": 3, "evaluate_saes": 3, "feature_stats": 3, "train_seed_sae": 1},
        never=("prepare_model", "finetune_dpo", "make_data", "score_data"),
    )


def test_sae_outputs_and_warm_start(finished_run):
    from sae_diff.sae import files

    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    assert summary["headline"]["timings"]["saes"] > 0
    for cell in ("M0_D0", "M0_D1", "M1_D1"):
        block = summary["cells"][cell]["saes"]["layer1"]
        assert block["topk"]["d_sae"] == 128 and block["topk"]["train_final"]["l0"] == 4.0
        assert block["relu"]["d_sae"] == 64 and block["relu"]["k"] is None
        folder = finished_run / block["topk"]["path"]
        curve = finished_run / "results" / "figures" / "saes" / cell / "layer1" / "topk_training.png"
        assert curve.stat().st_size > 10_000 and (folder / "train_log.jsonl").exists()
        assert files.load(folder).cfg.hook_name == "blocks.1.hook_resid_post"
    log = (finished_run / "logs" / "train_sae" / "M1_D1_layer1.log").read_text()
    assert "train done" in log


def test_evaluation_outputs(finished_run):
    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    for cell in ("M0_D0", "M0_D1", "M1_D1"):
        for name in ("topk", "relu"):
            ev = summary["cells"][cell]["saes"]["layer1"][name]["eval"]
            assert 0 < ev["explained_variance"] <= 1 and ev["fvu"] == pytest.approx(1 - ev["explained_variance"])
            assert ev["ce_loss_clean"] <= ev["ce_loss_with_ablation"] and ev["ce_loss_score"] == ev["ce_loss_score"]
            assert set(ev["groups"]["prompt_id"]) <= {str(i) for i in range(8)}
            figures = finished_run / "results" / "figures" / "eval" / cell / "layer1"
            assert (figures / f"{name}_density.png").stat().st_size > 10_000
            assert (figures / f"{name}_loss_by_position.png").stat().st_size > 10_000
    assert summary["cells"]["M1_D1"]["saes"]["layer1"]["topk"]["eval"]["l0"] == 4.0
    # the tiny character tokenizer has no words: absorption is skipped with the reason, not faked
    assert "text tokenizer" in summary["cells"]["M1_D1"]["saes"]["layer1"]["topk"]["eval"]["absorption_skipped"]


def test_training_config_change_reruns_training_only(finished_run):
    path = _variant(finished_run, lambda c: c["saes"]["relu"].update(l1_coefficient=0.1))
    reruns(
        planned(snakemake(finished_run, "-n", configfile=path)),
        {"train_sae": 3, "train_seed_sae": 1, "evaluate_saes": 3, "feature_stats": 3},
        never=("prepare_model", "finetune_dpo", "make_data", "score_data", "extract_activations"),
    )


def test_diffing_training_change_reruns_the_same_token_dictionaries_only(finished_run):
    """diffing.training lays its keys over the training block for the crosscoders and diff-SAEs
    alone: the cells' SAEs, their nulls and the activations stay as they are."""
    path = _variant(finished_run, lambda c: c["diffing"].update(training={"epochs": 3}))
    reruns(
        planned(snakemake(finished_run, "-n", configfile=path)),
        {"crosscoder": 1, "diff_sae": 1},
        never=("extract_activations", "train_sae", "train_null_saes", "train_seed_sae", "feature_stats"),
    )


def test_features_diffs_and_evolution(finished_run):
    import pandas as pd

    results = finished_run / "results"
    stats = pd.read_parquet(results / "features" / "M1_D1" / "layer1" / "topk" / "stats.parquet")
    assert len(stats) == 128 and {
        "freq",
        "seq_freq",
        "act_q90",
        "position_q50",
        "prompt_only",
        "promoted",
        "enc_norm",
    } <= set(stats.columns)
    examples = json.loads((results / "features" / "M1_D1" / "layer1" / "topk" / "examples.json").read_text())
    live = stats.loc[~stats["dead"], "feature"]
    assert set(map(int, examples)) == set(live) and all(len(v) <= 3 for v in examples.values())
    calibration = json.loads((results / "calibration" / "layer1" / "topk.json").read_text())
    assert 0 < calibration["thresholds"]["new"] <= calibration["thresholds"]["same"] < 1
    # the seed pair's changed fraction counts the features that fire on M0_D0's eval tokens
    base_stats = pd.read_parquet(results / "features" / "M0_D0" / "layer1" / "topk" / "stats.parquet")
    assert calibration["n_features"] == int((base_stats["fire_count"] > 0).sum()) > 0
    step = json.loads((results / "diff" / "M0_D0__M1_D1" / "layer1" / "topk.json").read_text())
    assert step["aligned"] is True  # M1_D1's topk SAE warm-starts from M0_D0's
    summary = json.loads((results / "summary.json").read_text())
    head = summary["headline"]["evolution"]
    assert set(head["layer1"]) == {"MXDX", "M0DX", "sae", "unconverged", "vs_null"} and head["layer1"]["sae"] == "topk"
    assert set(head["layer1"]["MXDX"]) == {"born", "died", "changed", "reverted", "same"}
    assert 0 <= head["seed_baseline_changed_fraction"] <= 1
    # every count against the resampling null: the model effect (M0_D1 vs M1_D1) equals that diff's
    # counts, its interval is the null pairs' (nulls.versus on the null-diffs JSON)
    from sae_diff import nulls

    null = json.loads((results / "nulls" / "layer1" / "topk.json").read_text())
    assert head["null_pairs"] == len(null["pairs"]) == 5 and calibration["thresholds_from"] == "resampling"
    # died / born by the presence test: paired on the same texts through two models, unpaired across data
    intra_diff = json.loads((results / "diff" / "M0_D1__M1_D1" / "layer1" / "topk.json").read_text())
    assert intra_diff["paired_tokens"] is True and step["paired_tokens"] is False
    moved = [abs(r["shift"]) for r in intra_diff["most_moved"]]
    assert moved == sorted(moved, reverse=True) and {r["label"] for r in intra_diff["most_moved"]} <= {
        "died",
        "changed",
        "born",
    }
    table = pd.read_parquet(results / "diff" / "M0_D1__M1_D1" / "layer1" / "topk.parquet")
    died = table["label"] == "died"
    assert (table.loc[died & (table["died_reason"] == "absent"), "presence_high"] < intra_diff["absent_below"]).all()
    assert not (table.loc[table["label"].isin(["same", "changed"]), "presence_high"] < intra_diff["absent_below"]).any()
    intra = intra_diff["counts"]
    expected = nulls.versus(intra, null["pairs"])
    for label in ("born", "died", "changed", "same"):
        got = head["model_effect"]["layer1"][label]
        assert got == {k: expected[label][k] for k in ("observed", "null_low", "null_high", "excess", "called")}
    assert set(head["data_effect"]["layer1"]) == {"born", "died", "changed", "same"}
    # the tiny SAEs have not converged, and the summary and the figure say so
    assert head["converged"] == {"layer1": False} and head["layer1"]["unconverged"] is True
    evolution_block = json.loads((results / "evolution" / "layer1" / "topk.json").read_text())
    assert evolution_block["convergence"]["reasons"] and evolution_block["convergence"]["cross_init"]["mmcs_random"] > 0
    block = summary["cells"]["M0_D1"]["saes"]["layer1"]["topk"]["features"]
    assert block["n_live"] == int(
        (~pd.read_parquet(results / "features" / "M0_D1" / "layer1" / "topk" / "stats.parquet")["dead"]).sum()
    )
    for kind in ("statistics.png", "embeddings.png", "coactivation_prompt_id_top.png"):
        assert (results / "figures" / "features" / "M0_D1" / "layer1" / "topk" / kind).stat().st_size > 10_000
    assert (results / "figures" / "evolution" / "layer1" / "topk_similarity_MXDX.png").stat().st_size > 10_000


def test_probes_outputs_and_headline(finished_run):
    import pandas as pd

    results = finished_run / "results"
    table = pd.read_parquet(results / "probes" / "M1_D1" / "layer1" / "topk" / "n_chars.parquet")
    assert len(table) == 128 and {
        "smd",
        "p",
        "q",
        "l1_entry",
        "importance",
        "rank",
        "round",
        "top1",
        "top3",
        "cos_to_base",
    } <= set(table.columns)
    assert ((table["q"] >= table["p"] - 1e-12) & (table["q"] <= 1)).all()
    head = json.loads((results / "summary.json").read_text())["headline"]["probes"]["n_chars"]
    assert head["cell"] == "M1_D1" and head["sae"] == "topk"
    for key in ("auroc", "auroc_random_features", "auroc_raw_activations"):
        assert 0 <= head[key] <= 1
    comparison = json.loads((results / "probes" / "comparison_layer1.json").read_text())
    assert {r["kind"] for r in comparison["cells"]} == {"step", "intra"}
    assert (results / "figures" / "probes" / "layer1" / "topk_n_chars_auroc.png").stat().st_size > 10_000


def test_summary_validates_against_its_schema(finished_run):
    import jsonschema

    from sae_diff import summary as summary_lib

    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    summary_lib.validate(summary)
    assert list(summary["headline"]) == [
        "iterations",
        "evolution",
        "probes",
        "steering",
        "ablation",
        "diffing",
        "timings",
    ]
    broken = json.loads(json.dumps(summary))
    broken["headline"]["evolution"]["layer1"]["MXDX"]["born"] = -1
    with pytest.raises(jsonschema.ValidationError):
        summary_lib.validate(broken)


def test_wandb_offline_run_has_the_seed_keys(finished_run):
    from sae_diff import tracking

    record = json.loads((finished_run / "results" / "wandb" / "run.json").read_text())
    assert record["mode"] == "offline"
    (log_file,) = (finished_run / record["run_dir"]).glob("run-*.wandb")
    keys = tracking.logged_keys(log_file)
    for key in (
        "layer_1/fvu",
        "layer_1/ce_loss_score",
        "layer_1/0_l0",
        "layer_1/0_dead_features",
        "layer_1/0_mean_activation",
        "layer_1/0_rank",
        "layer_1/0_info_content",
        "layer_1/probe_n_chars_auroc",
        "layer_1/probe_n_chars_auroc_raw_activations",
        "relu/layer_1/fvu",
    ):
        assert key in keys["history"], key
    # media are logged as nested keys (path, type, ...)
    assert any(k.startswith("figures/evolution/layer1/topk_counts/") for k in keys["history"])
    assert any(k.startswith("summary_table/") for k in keys["history"])
    for key in (
        "layer_1/evolution/MXDX_born",
        "layer_1/evolution/model_effect_changed_excess",
        "layer_1/evolution/converged",
        "evolution/null_pairs",
        "iterations/shift_diff",
        "timings/saes_s",
        "layer_1/steering/n_chars_effect",
        "layer_1/ablation/n_chars_control_effect",
    ):
        assert key in keys["summary"], key
    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    fvu = [summary["cells"][c]["saes"]["layer1"]["topk"]["eval"]["fvu"] for c in summary["cells"]]
    assert tracking.values(log_file, "layer_1/fvu") == pytest.approx(fvu)


def test_report_renders(finished_run):
    result = snakemake(finished_run, "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    html = (finished_run / "results" / "report.html").read_text(errors="ignore")
    assert len(html) > 100_000 and "Evolution" in html and "summary_table.csv" in html


@pytest.mark.parametrize(
    "kind, rule, n",
    [
        ("embeddings", "figure_embeddings", 6),
        ("training", "figure_training", 6),
        ("loss_by_position", "figure_loss_by_position", 6),
        ("dose_response", "figure_dose_response", 4),
    ],
)
def test_figure_style_change_reruns_only_that_figure(finished_run, kind, rule, n):
    path = _variant(finished_run, lambda c: c.setdefault("figures", {}).update({kind: {"dpi": 80}}))
    assert planned(snakemake(finished_run, "-n", configfile=path)) == {rule: n, "summary": 1, "all": 1}


def test_same_token_diffing_outputs_and_headline(finished_run):
    """M1 against M0 on D1: every method wrote its files, the record joins them, and
    headline.diffing carries each method's block under M1 / layer1 with the issue's keys."""
    import pandas as pd

    results = finished_run / "results" / "diffing"
    pair = "M0_D1__M1_D1"
    crosscoder = pd.read_parquet(results / "crosscoder" / pair / "layer1" / "latents.parquet")
    assert len(crosscoder) == 32 * 8 and {"delta_norm", "class", "scaling_label", "promoted_m0", "promoted_m1"} <= set(
        crosscoder
    )
    # each model with the crosscoder's reconstruction (from both models' activations) spliced in
    cc_metrics = json.loads((results / "crosscoder" / pair / "layer1" / "metrics.json").read_text())
    assert cc_metrics["spliced"]["n_samples"] > 0
    for model in ("m0", "m1"):
        row = cc_metrics["models"][model]
        assert row["n_positions"] > 0 and row["kl_div_with_spliced"] >= -1e-6 and row["kl_div_with_ablation"] > 0
        assert {"ce_loss_clean", "ce_loss_with_spliced", "ce_loss_with_ablation", "ce_loss_score"} <= set(row)
    diff_sae = pd.read_parquet(results / "diff_sae" / pair / "layer1" / "latents.parquet")
    assert diff_sae["rank"].tolist() == list(range(1, len(diff_sae) + 1))
    tokens = pd.read_parquet(results / "kl" / pair / "tokens.parquet")
    assert (tokens[["kl_tuned_base", "kl_base_tuned"]] >= -1e-6).all().all() and len(tokens) > 0
    recovery = json.loads((results / "kl" / pair / "layer1" / "recovery.json").read_text())
    assert len(recovery["targets"]["diff_sae_top"]["null"]) == 10
    headline = json.loads((finished_run / "results" / "summary.json").read_text())["headline"]["diffing"]
    assert set(headline) == {"crosscoder", "diff_sae", "adl", "kl"}
    block = headline["crosscoder"]["M1"]["layer1"]
    assert block["n_mi_only"] + block["n_shared"] + block["n_m0_only"] + block["n_other"] == 256
    # the latents the change rides on, in the crosscoder's own moved order (M1 is another random model)
    moved = pd.read_parquet(results / "crosscoder" / pair / "layer1" / "latents.parquet").dropna(subset=["moved_rank"])
    moved = moved.sort_values("moved_rank")  # by hand: the test does not use crosscoder.ranked_moved
    assert block["top_moved"] and block["top_moved"] == moved["latent"].head(len(block["top_moved"])).tolist()
    assert block["n_moved"] == len(moved)
    assert headline["diff_sae"]["M1"]["layer1"]["top"][:3] == diff_sae["latent"].head(3).tolist()
    assert len(headline["adl"]["M1"]["layer1"]["top"]) == 5  # diffing.adl.k in config/test.yaml
    assert "diff_sae_top" in headline["kl"]["M1"]["layer1"]["recovery"]
    # the diff-SAE latents behind n_chars (the probed metric): D1's 2 eval prompts (at most 3 samples
    # each; a completion with no token is left out) allow at most 2 arrangements, so no p-value could
    # reach the fdr: skipped with that reason, not "0 called"
    behind = json.loads((results / "diff_sae" / pair / "layer1" / "metric_latents.json").read_text())
    found = behind["metrics"]["n_chars"]
    assert behind["pooling"] == "max" and 0 < found["n_eval"] <= 6 and found["n_eval_groups"] == 2
    assert "too few eval prompts" in found["skipped"] and found["latents"] == [] and found["n_called"] == 0
    metric = headline["diff_sae"]["M1"]["layer1"]["metric"]["n_chars"]
    assert metric["chosen"] == [] and metric["skipped"] == found["skipped"]
    assert set(headline["crosscoder"]["M1"]["layer1"]["ce_loss_score"]) == {"m0", "m1"}
    # every diff-SAE latent's best crosscoder match beside the record
    matches = pd.read_parquet(results / "records" / pair / "layer1.diff_sae_matches.parquet")
    assert sorted(matches["latent"]) == sorted(diff_sae["latent"]) and matches["match"].notna().all()
    assert matches["match_class"].isin(["mi_only", "shared", "m0_only", "other"]).all()
    assert matches["mi_only_match"].notna().all() == (block["n_mi_only"] > 0)
    assert (finished_run / "results" / "figures" / "diffing" / pair / "layer1.png").stat().st_size > 10_000


def _n_called(results, metric: str) -> int:
    """How many diff-SAE latents of M1 against M0 (layer 1) were called for ``metric``."""
    path = results / "diffing/diff_sae/M0_D1__M1_D1/layer1/metric_latents.json"
    return json.loads(path.read_text())["metrics"][metric]["n_called"]


def test_interventions_outputs_and_headline(finished_run):
    """Every experiment wrote its generations, scores and effects; the no-op splice reproduced
    the plain greedy generations; the headline carries the fixed keys."""
    import pandas as pd

    results = finished_run / "results"
    for experiment in ("ablation", "steering"):
        for cell in ("M1_D1", "M0_D1"):
            folder = results / "interventions" / experiment / cell / "layer1" / "topk" / "n_chars"
            effects = json.loads((folder / "effects.json").read_text())
            assert effects["noop"]["identical"] and effects["noop"]["n"] == 8
            assert effects["model"] == ("M1" if experiment == "ablation" else "M0")
            scores = pd.read_parquet(folder / "scores.parquet")
            generations = pd.read_parquet(folder / "generations.parquet")
            assert len(scores) == len(generations) and {"n_chars", "perplexity_base", "repetition"} <= set(scores)
            conditions = set(generations["condition"])
            assert {"plain", "noop", "features", "random"} <= conditions
            # ablation picks by fork attribution (demo default), steering by the probe
            assert effects["select"] == ("attribution" if experiment == "ablation" else "probe")
            single = f"feature_{effects['features'][0]}"
            assert {single, f"random_{effects['features'][0]}"} <= conditions
            assert effects["report"]["condition"] in {"features", single}
            assert ("flipped" in conditions) == (experiment == "steering")
            assert set(generations["half"]) == {"select", "report"}
            # the report half: a random null of 6 edits (config), half feature sets, half directions
            # of the reported edit's size; the difference in means (and, steering, prompting) beside it
            null = effects["report"]["null"]
            assert null["n_controls"] == 6 and null["features"]["n"] == 3 and null["directions"]["n"] == 3
            assert 1 / 7 <= null["p"] <= 1
            assert {c for c in conditions if c.startswith("null_")} == {
                f"null_{kind}_{i:03d}" for kind in ("feature", "direction") for i in range(3)
            }
            assert ("prompting" in conditions) == (experiment == "steering") and "diffmean" in conditions
            cross = json.loads((results / "diffing/crosscoder/M0_D1__M1_D1/layer1/metrics.json").read_text())
            assert ("crosscoder" in conditions) == (cross["classes"]["mi_only"] > 0)
            assert ("diff_sae" in conditions) == (_n_called(results, "n_chars") > 0)
            # the projection each comparison's mean-ablation sets, read for every direction ablated
            for name in DIRECTION_COMPARISONS:
                level = effects[f"{name}_level"]
                assert (level is not None) == (experiment == "ablation" and name in conditions), (name, level)
            reported = generations[generations["half"] == "report"]
            assert set(reported["condition"]) >= {"diffmean"} | {c for c in conditions if c.startswith("null_")}
            # the split: tiny.txt selects features, tiny_heldout.txt picks and reports; no prompt in both
            assert effects["split"] == {"select_features": 8, "select_condition": 4, "report": 4}
            assert set(generations["prompt"].str.removesuffix(" Answer at length.")) <= set(
                (ROOT / "resources/prompts/tiny_heldout.txt").read_text().splitlines()
            )
            figure = results / "figures" / "interventions" / experiment / cell / "layer1" / "topk_n_chars.png"
            assert figure.stat().st_size > 10_000
    for cell in ("M1_D1", "M0_D1"):  # the ablated features are the attribution table's top ones
        attribution = results / "attribution" / cell / "layer1" / "topk" / "n_chars"
        table = pd.read_parquet(attribution.with_suffix(".parquet"))
        summary = json.loads(attribution.with_suffix(".json").read_text())
        assert summary["n_forks"] > 0 and len(table) == 128 and table["attribution"].abs().sum() > 0
        ablation = json.loads(
            (results / "interventions" / "ablation" / cell / "layer1" / "topk" / "n_chars" / "effects.json").read_text()
        )
        # ranked by t = mean / standard error over the selection forks (interventions.attribution.rank_by)
        positive = table[table["t"] > 0].sort_values("t", ascending=False, kind="stable")["feature"].tolist()
        assert ablation["features"] == positive[: len(ablation["features"])]
    head = json.loads((results / "summary.json").read_text())["headline"]
    for experiment in ("steering", "ablation"):
        block = head[experiment]["n_chars"]
        assert block["selected_by"] == ("attribution" if experiment == "ablation" else "probe")
        assert block["cell"] == "M1_D1" and block["ci_low"] <= block["effect"] <= block["ci_high"]
        assert 0 < block["p"] <= 1 and block["perplexity_change"] > -1
        assert block["n_controls"] == 6 and 1 / 7 <= block["null_p"] <= 1 and block["paired"]
        assert block["family_size"] == 4 and block["p"] <= block["q"] <= 1  # 2 experiments x 2 cells
        assert block["split"] == {"select_features": 8, "select_condition": 4, "report": 4}
        # the lens's direction of M1 against M0 on D1 (rule adl) is a comparison method too
        assert set(block["baselines"]) == {"diffmean", "adl", "crosscoder", "diff_sae", "prompting"}
        assert block["baselines"]["adl"] is not None
        # and the crosscoder's Mi-only latents, where it found any (a zero direction is not steered)
        found = json.loads((results / "diffing/crosscoder/M0_D1__M1_D1/layer1/metrics.json").read_text())
        assert (block["baselines"]["crosscoder"] is not None) == (found["classes"]["mi_only"] > 0)
        # and the diff-SAE's latents behind the metric, where any was called
        assert (block["baselines"]["diff_sae"] is not None) == (_n_called(results, "n_chars") > 0)
        assert (block["baselines"]["prompting"] is None) == (experiment == "ablation")


def test_interventions_setting_change_reruns_interventions_only(finished_run):
    path = _variant(finished_run, lambda c: c["interventions"].update(alphas=[1, 4]))
    jobs = planned(snakemake(finished_run, "-n", configfile=path))
    # the dashboard's documents of the two tested cells show the tests' results
    want = {"intervene": 4, "figure_dose_response": 4, "summary": 1, "dashboard_sae": 2, "dashboard": 1, "all": 1}
    assert jobs == want, jobs


def test_lint_is_clean():
    result = snakemake(ROOT, "--lint")
    assert result.returncode == 0 and "Congratulations" in result.stdout + result.stderr, result.stdout


def test_pretrained_saes_are_imported(finished_run):
    """SAEs the user already has (here: copies of trained ones) enter the grid through import_sae,
    from a folder whose name holds a space, ';', '$(...)' and backticks: the path reaches the
    command as one quoted argument and nothing in it runs."""
    import shutil

    external = finished_run / "external SAEs;$(touch pwned_dollar);`touch pwned_tick`"
    shutil.copytree(finished_run / "results" / "saes", external, dirs_exist_ok=True)
    path = _variant(
        finished_run,
        lambda c: c["saes"].update(
            mine={"source": "pretrained", "path": str(external / "{model}_{data}" / "layer{layer}" / "topk")}
        ),
    )
    jobs = planned(snakemake(finished_run, "-n", configfile=path))
    reruns(
        jobs,
        {"import_sae": 3, "evaluate_saes": 3, "feature_stats": 3},
        never=("prepare_model", "finetune_dpo", "make_data", "extract_activations", "train_sae"),
    )
    assert "train_seed_sae" not in jobs  # a pretrained SAE has no seed pair: it is not diffed
    target = "results/saes/M1_D1/layer1/mine/sae_weights.safetensors"
    result = snakemake(finished_run, "--cores", "1", target, configfile=path)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    ours = load_file(str(finished_run / target))
    theirs = load_file(str(external / "M1_D1" / "layer1" / "topk" / "sae_weights.safetensors"))
    assert all((ours[k] == theirs[k]).all() for k in theirs)
    assert not list(finished_run.rglob("pwned*")) and not list(ROOT.glob("pwned*"))


def test_protein_example_runs_end_to_end(tmp_path):
    """config/examples/protein.yaml on its tiny random GPT-2 (amino-acid tokenizer): one DPO round,
    scored by alignment identity and ProtParam, through to summary.json (its causal tests, SAE
    diffs and dashboard are the test config's, tested on that run: CI has 20 minutes)."""
    cfg = yaml.safe_load((ROOT / "config" / "examples" / "protein.yaml").read_text())
    cfg["iterations"]["rounds"] = 1
    cfg["grid"] = {"branches": ["MXDX"]}
    cfg["dashboard"] = {"enabled": False}  # the dashboard is tested on config/test.yaml's run
    cfg["diff"] = {"enabled": False}  # so are the SAE diffs and their null (CI has 20 minutes)
    cfg["interventions"] = {**cfg.get("interventions", {}), "enabled": False}  # and the causal tests
    path = tmp_path / "protein.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "--cores", "2", configfile=path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["models"]["M1"]["source"] == "dpo" and summary["models"]["M1"]["dpo"]["n_pairs"] > 0
    assert summary["headline"]["iterations"]["metric"] == "identity"
    for metric in ("identity", "gravy", "pI", "instability"):
        assert metric in summary["data"]["D1"]["metrics"]
    assert 0 < summary["data"]["D0"]["metrics"]["identity"]["mean"] < 1
    assert set(summary["cells"]) == {"M0_D0", "M1_D1"}
    assert summary["cells"]["M1_D1"]["saes"]["layer1"]["topk"]["eval"]["fvu"] < 1


def test_uncached_activations_give_the_same_saes_features_and_probes(finished_run, tmp_path):
    """activations.cache: false (large data sets): extraction stores the eval split only, and
    training, feature statistics and the probes compute the train split from the model as they
    read it; SAE weights, statistics and probe results equal the cached run's."""
    import shutil

    import pandas as pd
    from safetensors.torch import load_file

    work = tmp_path / "run"
    shutil.copytree(finished_run, work, symlinks=True)
    path = _variant(work, lambda c: c["activations"].update(cache=False))
    site = "layer1"
    targets = [f"results/probes/M0_D0/{site}/{name}/n_chars.json" for name in ("topk", "relu")]
    reruns(
        planned(snakemake(work, "-n", *targets, configfile=path)),
        {"extract_activations": 1, "train_sae": 1, "feature_stats": 1, "probes": 1},
        never=("prepare_model", "finetune_dpo", "make_data", "score_data", "evaluate_saes"),
    )
    result = snakemake(work, "--cores", "2", *targets, configfile=path)
    assert result.returncode == 0, result.stderr[-3000:]
    acts = work / "results" / "activations" / "M0_D0" / site
    on_disk = [p.name for p in acts.glob("*.safetensors")]
    assert on_disk and all(name.startswith("eval-") for name in on_disk)
    manifest = json.loads((acts / "manifest.json").read_text())
    assert manifest["n_tokens"]["train"] > 0 and not any(
        e.get("cached", True) for e in manifest["shards"] if e["split"] == "train"
    )
    for name in ("topk", "relu"):
        sae = f"results/saes/M0_D0/{site}/{name}/sae_weights.safetensors"
        ours, cached = load_file(str(work / sae)), load_file(str(finished_run / sae))
        assert ours.keys() == cached.keys() and all((ours[k] == cached[k]).all() for k in ours), name
        stats = f"results/features/M0_D0/{site}/{name}/stats.parquet"
        pd.testing.assert_frame_equal(pd.read_parquet(work / stats), pd.read_parquet(finished_run / stats))
        probe = f"results/probes/M0_D0/{site}/{name}/n_chars.json"
        assert json.loads((work / probe).read_text()) == json.loads((finished_run / probe).read_text())


def test_a_users_model_folder_edited_in_place_reruns_its_conversion(finished_run, tmp_path):
    """A model the user brings (source: hf, a local folder) is tracked by its files' sizes and
    times: editing a file inside reruns prepare_model (Snakemake alone sees only the folder)."""
    import shutil

    user_model = tmp_path / "my checkpoint"
    shutil.copytree(finished_run / "results" / "models" / "M0", user_model)
    path = _variant(tmp_path, lambda c: c["models"].update(M0={"source": "hf", "path": str(user_model)}))
    target = "results/models/M0"
    built = snakemake(tmp_path, "--cores", "1", target, configfile=path)
    assert built.returncode == 0, built.stderr[-2000:]
    assert planned(snakemake(tmp_path, "-n", target, configfile=path)) == {}
    config_json = user_model / "config.json"
    config_json.write_text(config_json.read_text())  # the same bytes, written again in place
    assert planned(snakemake(tmp_path, "-n", target, configfile=path)) == {"prepare_model": 1}


def test_dashboard_pages_from_the_stage_tables(finished_run):
    """make run's dashboard: one document per SAE, every feature a row, pages for the probed and
    labelled features with their lineage over the MXDX branch; the page holds every document
    inline. A change to the page's template reruns only rule dashboard (the documents stay)."""
    from sae_diff import dashboard

    site = finished_run / "results" / "dashboard"
    html = (site / "index.html").read_text()
    for cell in ("M0_D0", "M0_D1", "M1_D1"):
        for name, d_sae in (("topk", 128), ("relu", 64)):
            document = json.loads((site / "data" / f"{cell}__layer1__{name}.json").read_text())
            assert document["schema"] == dashboard.SCHEMA and len(document["rows"]) == d_sae
            assert f'data-key="{cell}/layer1/{name}"' in html
            assert document["pages"], (cell, name)
            columns = [c["name"] for c in document["columns"]]
            assert "probe_rank_n_chars" in columns and "label_MXDX" in columns[2:] or cell == "M0_D1"
    m1 = json.loads((site / "data" / "M1_D1__layer1__topk.json").read_text())
    page = next(p for p in m1["pages"].values() if p["lineages"])
    steps = page["lineages"][0]["steps"]
    assert [s["cell"] for s in steps] == ["M0_D0", "M1_D1"] and steps[-1]["feature"] == page["feature"]
    assert all(len(e["tokens"]) == len(e["acts"]) for e in page["top"]) and sum(page["histogram"]["counts"]) > 0
    template = dashboard.TEMPLATE.read_text()
    dashboard.TEMPLATE.write_text(template.replace("</style>", "table{}</style>", 1))  # a style change
    try:
        assert planned(snakemake(finished_run, "-n")) == {"dashboard": 1, "all": 1}
    finally:
        dashboard.TEMPLATE.write_text(template)
