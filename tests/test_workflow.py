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
    assert planned(dry) == {"all": 1, "prepare_model": 2, "make_data": 2, "score_data": 2,
                            "extract_activations": 3, "train_sae": 3, "evaluate_saes": 3, "summary": 1}
    result = snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_summary_lists_every_cell_and_site(finished_run):
    summary = json.loads((finished_run / "results" / "summary.json").read_text())
    assert list(summary)[0] == "headline"
    assert set(summary["headline"]["timings"]) == {"models", "data", "scoring", "activations", "saes", "evaluation"}
    assert all(v > 0 for v in summary["headline"]["timings"].values())
    assert set(summary["cells"]) == {"M0_D0", "M0_D1", "M1_D1"}
    for cell in summary["cells"].values():
        assert set(cell["activations"]) == {"layer1", "layer1.mlp_out"}
        for site in cell["activations"].values():
            assert site["n_tokens"]["train"] > 0 and site["n_tokens"]["eval"] > 0
            assert site["dtype"] == "float16" and site["d_model"] == 32
    assert summary["data"]["D0"]["n_samples"] == 16
    assert "female_ratio" in summary["data"]["D0"]["metrics"]
    assert len(summary["data"]["D0"]["examples"]) == 3 and {"prompt", "text"} <= set(summary["data"]["D0"]["examples"][0])
    assert summary["run"]["versions"]["torch"]


def test_logs_per_rule(finished_run):
    logs = finished_run / "logs"
    assert (logs / "prepare_model" / "M1.log").exists()
    assert (logs / "extract_activations" / "M1_D1.log").read_text().count("extract") >= 1
    assert "evaluate done" in (logs / "evaluate_saes" / "M0_D1_layer1.log").read_text()


def test_rerun_is_a_no_op(finished_run):
    assert planned(snakemake(finished_run, "-n")) == {}


def _variant(workdir: Path, change) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    change(cfg)
    path = workdir / "variant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_scorer_change_reruns_scoring_only(finished_run):
    path = _variant(finished_run, lambda c: c["scorers"].pop())
    assert planned(snakemake(finished_run, "-n", configfile=path)) == {"all": 1, "score_data": 2, "summary": 1}


def test_activation_dtype_change_reruns_extraction_only(finished_run):
    path = _variant(finished_run, lambda c: c["activations"].update(dtype="float32"))
    assert planned(snakemake(finished_run, "-n", configfile=path)) == {
        "all": 1, "extract_activations": 3, "train_sae": 3, "evaluate_saes": 3, "summary": 1}


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
    assert planned(snakemake(finished_run, "-n", configfile=path)) == {"all": 1, "train_sae": 3, "evaluate_saes": 3,
                                                                       "summary": 1}


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
    assert planned(snakemake(finished_run, "-n", configfile=path)) == {"all": 1, "import_sae": 3, "evaluate_saes": 3,
                                                                       "summary": 1}
    target = "results/saes/M1_D1/layer1/mine/sae_weights.safetensors"
    result = snakemake(finished_run, "--cores", "1", target, configfile=path)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    ours = load_file(str(finished_run / target))
    theirs = load_file(str(external / "M1_D1" / "layer1" / "topk" / "sae_weights.safetensors"))
    assert all((ours[k] == theirs[k]).all() for k in theirs)
