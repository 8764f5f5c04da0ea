"""The whole DAG through Snakemake on config/test.yaml (tiny random models), and what reruns when."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 300):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile or ROOT / "config" / "test.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def reruns(jobs: dict, counts: dict, never: tuple[str, ...]) -> None:
    """The planned jobs include ``counts`` exactly and none of the ``never`` rules (upstream of the change)."""
    for rule, count in counts.items():
        assert jobs.get(rule) == count, (rule, jobs)
    assert not set(jobs) & set(never), jobs


def planned(result) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)
            if m.group(1) != "total"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    dry = snakemake(workdir, "-n")
    assert dry.returncode == 0, dry.stderr
    assert planned(dry) == {
        "all": 1, "prepare_model": 1, "finetune_dpo": 1, "make_data": 2, "score_data": 2, "iterations": 1,
        "extract_activations": 3, "train_sae": 3, "evaluate_saes": 3, "feature_stats": 3, "train_seed_sae": 1,
        "calibrate": 1, "diff_saes": 3, "evolution": 1, "probes": 3, "probe_comparison": 1, "figure_iterations": 1,
        "figure_statistics": 6, "figure_embeddings": 6, "figure_coactivation": 6, "figure_evolution": 2,
        "figure_similarity": 4, "figure_probe_importance": 6, "figure_probe_auroc": 2, "figure_probe_overlap": 2,
        "summary": 1}
    result = snakemake(workdir, "--cores", "2", timeout=1200)   # ~2.5 min on 2 idle cores; bounded, not tight
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_summary_lists_every_cell_and_site(finished_run):
    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    assert list(summary)[0] == "headline"
    assert set(summary["headline"]["timings"]) == {"models", "dpo", "data", "scoring", "activations", "saes",
                                                   "evaluation", "features", "calibration", "diffs", "probes"}
    assert all(v > 0 for v in summary["headline"]["timings"].values())
    assert set(summary["cells"]) == {"M0_D0", "M0_D1", "M1_D1"}
    for cell in summary["cells"].values():
        assert set(cell["activations"]) == {"layer1", "layer1.mlp_out"}
        for site in cell["activations"].values():
            assert site["n_tokens"]["train"] > 0 and site["n_tokens"]["eval"] > 0
            assert site["dtype"] == "float16" and site["d_model"] == 32
    assert summary["data"]["D0"]["n_samples"] == 24      # 8 prompts x 3 samples
    assert "female_ratio" in summary["data"]["D0"]["metrics"]
    assert len(summary["data"]["D0"]["examples"]) == 3 and {"prompt", "text"} <= set(summary["data"]["D0"]["examples"][0])
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
    reruns(planned(snakemake(finished_run, "-n", configfile=path)), {
        "finetune_dpo": 1, "make_data": 1, "score_data": 1, "iterations": 1,
        "extract_activations": 2, "train_sae": 2, "evaluate_saes": 2},     # M1_D1 and M0_D1: D1 changes
        never=("prepare_model",))


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
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))   # a user's edit keeps the config's order
    return path


def test_scorer_change_reruns_scoring_and_what_reads_scores(finished_run):
    # D1 is generated by M1, made from D0's scores: changing the scorers reruns the round too
    path = _variant(finished_run, lambda c: c["scorers"].pop(0))
    reruns(planned(snakemake(finished_run, "-n", configfile=path)), {
        "score_data": 2, "iterations": 1, "finetune_dpo": 1, "make_data": 1, "extract_activations": 2},
        never=("prepare_model",))


def test_activation_dtype_change_reruns_extraction_only(finished_run):
    path = _variant(finished_run, lambda c: c["activations"].update(dtype="float32"))
    reruns(planned(snakemake(finished_run, "-n", configfile=path)), {
        "extract_activations": 3, "train_sae": 3, "evaluate_saes": 3, "feature_stats": 3, "train_seed_sae": 1},
        never=("prepare_model", "finetune_dpo", "make_data", "score_data"))


def test_sae_outputs_and_warm_start(finished_run):
    from sae_diff.sae import files

    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    assert summary["headline"]["timings"]["saes"] > 0
    for cell in ("M0_D0", "M0_D1", "M1_D1"):
        block = summary["cells"][cell]["saes"]["layer1"]
        assert block["topk"]["d_sae"] == 128 and block["topk"]["train_final"]["l0"] == 4.0
        assert block["relu"]["d_sae"] == 64 and block["relu"]["k"] is None
        folder = finished_run / block["topk"]["path"]
        assert (folder / "training_curve.png").stat().st_size > 10_000
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
    reruns(planned(snakemake(finished_run, "-n", configfile=path)), {
        "train_sae": 3, "train_seed_sae": 1, "evaluate_saes": 3, "feature_stats": 3},
        never=("prepare_model", "finetune_dpo", "make_data", "score_data", "extract_activations"))


def test_features_diffs_and_evolution(finished_run):
    import pandas as pd

    results = finished_run / "results"
    stats = pd.read_parquet(results / "features" / "M1_D1" / "layer1" / "topk" / "stats.parquet")
    assert len(stats) == 128 and {"freq", "seq_freq", "act_q90", "position_q50", "prompt_only", "promoted",
                                  "enc_norm"} <= set(stats.columns)
    examples = json.loads((results / "features" / "M1_D1" / "layer1" / "topk" / "examples.json").read_text())
    live = stats.loc[~stats["dead"], "feature"]
    assert set(map(int, examples)) == set(live) and all(len(v) <= 3 for v in examples.values())
    calibration = json.loads((results / "calibration" / "layer1" / "topk.json").read_text())
    assert 0 < calibration["thresholds"]["new"] <= calibration["thresholds"]["same"] < 1
    step = json.loads((results / "diff" / "M0_D0__M1_D1" / "layer1" / "topk.json").read_text())
    assert step["aligned"] is True          # M1_D1's topk SAE warm-starts from M0_D0's
    summary = json.loads((results / "summary.json").read_text())
    head = summary["headline"]["evolution"]
    assert set(head["layer1"]) == {"MXDX", "M0DX", "sae"} and head["layer1"]["sae"] == "topk"
    assert set(head["layer1"]["MXDX"]) == {"born", "died", "changed", "reverted", "same"}
    assert 0 <= head["seed_baseline_changed_fraction"] <= 1
    block = summary["cells"]["M0_D1"]["saes"]["layer1"]["topk"]["features"]
    assert block["n_live"] == int((~pd.read_parquet(
        results / "features" / "M0_D1" / "layer1" / "topk" / "stats.parquet")["dead"]).sum())
    for kind in ("statistics.png", "embeddings.png", "coactivation_prompt_id_top.png"):
        assert (results / "figures" / "features" / "M0_D1" / "layer1" / "topk" / kind).stat().st_size > 10_000
    assert (results / "figures" / "evolution" / "layer1" / "topk_similarity_MXDX.png").stat().st_size > 10_000


def test_probes_outputs_and_headline(finished_run):
    import pandas as pd

    results = finished_run / "results"
    table = pd.read_parquet(results / "probes" / "M1_D1" / "layer1" / "topk" / "n_chars.parquet")
    assert len(table) == 128 and {"smd", "p", "q", "l1_entry", "importance", "rank", "round", "top1", "top3",
                                  "cos_to_base"} <= set(table.columns)
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
    assert list(summary["headline"]) == ["iterations", "evolution", "probes", "timings"]
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
    for key in ("layer_1/fvu", "layer_1/ce_loss_score", "layer_1/0_l0", "layer_1/0_dead_features",
                "layer_1/0_mean_activation", "layer_1/0_rank", "layer_1/0_info_content",
                "layer_1/probe_n_chars_auroc", "layer_1/probe_n_chars_auroc_raw_activations", "relu/layer_1/fvu"):
        assert key in keys["history"], key
    # media are logged as nested keys (path, type, ...)
    assert any(k.startswith("figures/evolution/layer1/topk_counts/") for k in keys["history"])
    assert any(k.startswith("summary_table/") for k in keys["history"])
    for key in ("layer_1/evolution/MXDX_born", "iterations/shift_diff", "timings/saes_s"):
        assert key in keys["summary"], key
    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    fvu = [summary["cells"][c]["saes"]["layer1"]["topk"]["eval"]["fvu"] for c in summary["cells"]]
    assert tracking.values(log_file, "layer_1/fvu") == pytest.approx(fvu)


def test_report_renders(finished_run):
    result = snakemake(finished_run, "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    html = (finished_run / "results" / "report.html").read_text(errors="ignore")
    assert len(html) > 100_000 and "Evolution" in html and "summary_table.csv" in html


def test_figure_style_change_reruns_only_that_figure(finished_run):
    path = _variant(finished_run, lambda c: c.setdefault("figures", {}).update(embeddings={"dpi": 80}))
    assert planned(snakemake(finished_run, "-n", configfile=path)) == {"figure_embeddings": 6, "summary": 1, "all": 1}


def test_lint_is_clean():
    result = snakemake(ROOT, "--lint")
    assert result.returncode == 0 and "Congratulations" in result.stdout + result.stderr, result.stdout


def test_pretrained_saes_are_imported(finished_run):
    """SAEs the user already has (here: copies of trained ones) enter the grid through import_sae."""
    import shutil

    external = finished_run / "external"
    shutil.copytree(finished_run / "results" / "saes", external, dirs_exist_ok=True)
    path = _variant(finished_run, lambda c: c["saes"].update(
        mine={"source": "pretrained", "path": str(external / "{model}_{data}" / "layer{layer}" / "topk")}))
    jobs = planned(snakemake(finished_run, "-n", configfile=path))
    reruns(jobs, {"import_sae": 3, "evaluate_saes": 3, "feature_stats": 3},
           never=("prepare_model", "finetune_dpo", "make_data", "extract_activations", "train_sae"))
    assert "train_seed_sae" not in jobs      # a pretrained SAE has no seed pair: it is not diffed
    target = "results/saes/M1_D1/layer1/mine/sae_weights.safetensors"
    result = snakemake(finished_run, "--cores", "1", target, configfile=path)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    ours = load_file(str(finished_run / target))
    theirs = load_file(str(external / "M1_D1" / "layer1" / "topk" / "sae_weights.safetensors"))
    assert all((ours[k] == theirs[k]).all() for k in theirs)


def test_protein_example_runs_end_to_end(tmp_path):
    """config/examples/protein.yaml on its tiny random GPT-2 (amino-acid tokenizer): one DPO round,
    scored by alignment identity and ProtParam, through to summary.json."""
    cfg = yaml.safe_load((ROOT / "config" / "examples" / "protein.yaml").read_text())
    cfg["iterations"]["rounds"] = 1
    cfg["grid"] = {"branches": ["MXDX"]}
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
