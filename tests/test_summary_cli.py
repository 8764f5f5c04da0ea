"""Stage timings from Snakemake benchmark files, and the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sae_diff import summary


def test_stage_timings_sum_jobs_per_stage(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    files = []
    for rule, name, seconds in [
        ("extract_activations", "M0_D0", 1.5),
        ("extract_activations", "M1_D1", 2.25),
        ("prepare_model", "M0", 4.0),
    ]:
        path = tmp_path / rule / f"{name}.tsv"
        path.parent.mkdir(exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:01\t1\t1\t1\t1\t0\t0\t0\t1\n")
        files.append(path)
    assert summary.stage_timings(files) == {"activations": 3.75, "models": 4.0}


def test_cli_reports_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {M0: {source: random}}\ndata: {D0: {source: table, path: nowhere.csv}}\nlayers: [0]\n")
    proc = subprocess.run([sys.executable, "-m", "sae_diff", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.D0.path = 'nowhere.csv': expected an existing file" in lines[0]


def test_cli_validate_good_config(root):
    proc = subprocess.run(
        [sys.executable, "-m", "sae_diff", "validate", str(root / "config" / "test.yaml")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert proc.returncode == 0 and "3 cells" in proc.stdout


@pytest.mark.parametrize("verb", ["prepare-model", "make-data", "score", "extract", "summary"])
def test_every_rule_verb_has_help(verb):
    assert subprocess.run([sys.executable, "-m", "sae_diff", verb, "--help"], capture_output=True).returncode == 0


def test_eval_recon_and_compare_clis(tmp_path):
    """Outside numbers: any SAE on given activations, and two SAEs compared on the same ones."""
    import json

    import torch
    from safetensors.torch import save_file

    from sae_diff import evaluate
    from sae_diff.sae import files
    from sae_diff.sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    acts = torch.randn(300, 12) + 1
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    for name, k in (("small", 2), ("large", 8)):
        sae = SAE(SAEConfig(architecture="topk", d_in=12, d_sae=48, k=k))
        sae.initialize(acts, seed=1)
        files.save(sae.eval(), tmp_path / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_diff",
            "eval-recon",
            "--sae",
            str(tmp_path / "small"),
            "--acts",
            str(tmp_path / "acts.safetensors"),
            "--out",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    expected = evaluate.reconstruction_metrics(files.load(tmp_path / "small"), evaluate.tensor_batches(acts))
    assert printed["explained_variance"] == pytest.approx(expected["explained_variance"], rel=1e-9)
    assert json.loads((tmp_path / "m.json").read_text()) == printed
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_diff",
            "compare",
            str(tmp_path / "small"),
            str(tmp_path / "large"),
            "--acts",
            str(tmp_path / "acts.safetensors"),
            "--name-a",
            "k2",
            "--name-b",
            "k8",
            "--out",
            str(tmp_path / "cmp.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert result["metrics"]["l0"]["better"] == "k2" and result["metrics"]["fvu"]["better"] == "k8"
    assert "k8 (lower)" in (tmp_path / "cmp.txt").read_text()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_diff",
            "eval-recon",
            "--sae",
            str(tmp_path / "small"),
            "--acts",
            str(tmp_path / "nope.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope.safetensors: not found" in bad.stderr
