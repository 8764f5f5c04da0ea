"""The summary verb on exact file lists, and the CLI's one-line errors (headline pickers and stage
timings: tests/test_headline.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _write_json(path: Path, block: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(block))
    return path


def _tiny_run(root: Path) -> tuple[dict, dict]:
    """A made-up run of two cells (M0_D0, M1_D1; layer 3, SAE topk) and the file lists its summary
    rule would pass, plus decoys in the same folders that no list names."""
    import pandas as pd

    cfg = {
        "models": {"M0": {"source": "random"}, "M1": {"source": "dpo"}},
        "data": {"D0": {"source": "table"}, "D1": {"source": "generate"}},
        "layers": [3],
        "hook_points": ["resid_post"],
        "saes": {"topk": {"source": "train"}},
        "grid": {"branches": ["MXDX"]},
    }
    r = root / "results"
    for model in ("M0", "M1", "M9"):  # M9: a stale folder of another run
        _write_json(r / "models" / model / "sae_diff_model.json", {"source": "random", "n_layers": 4, "d_model": 8})
    _write_json(
        r / "models" / "M1" / "dpo.json",
        {"n_pairs": 6, "steps": 3, "loss_first": 0.7, "loss_last": 0.5, "reward_accuracy_last": 1.0, "extra": 0},
    )
    for data in ("D0", "D9"):
        (r / "data" / data).mkdir(parents=True)
        pd.DataFrame(
            {
                "sample_id": [0, 1],
                "prompt": ["p0", "p1"],
                "text": ["t0", "t1"],
                "split": ["train", "eval"],
                "score": [1.0, 3.0],
            }
        ).to_parquet(r / "data" / data / "samples.parquet")
    manifest = {"hook_name": "blocks.3.hook_resid_post", "d_model": 8, "dtype": "float16", "shards": ["a", "b"]}
    manifests = [
        _write_json(
            r / "activations" / "M0_D0" / "layer3" / "manifest.json",
            {"cell": "M0_D0", "layer": 3, "hook_point": "resid_post", "n_tokens": {"train": 5}, **manifest},
        ),
        # placed by its content (cell, layer, hook_point), wherever it lies
        _write_json(
            root / "elsewhere" / "manifest.json",
            {"cell": "M1_D1", "layer": 3, "hook_point": "resid_post", "n_tokens": {"train": 7}, **manifest},
        ),
    ]
    sae_config = {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4, "hook_name": "blocks.3.hook_resid_post"}
    sae_folder = r / "saes" / "M0_D0" / "layer3" / "topk"
    _write_json(sae_folder / "sae_diff.json", {"config": sae_config, "training": {"n_tokens": 1000}})
    (sae_folder / "train_log.jsonl").write_text(
        json.dumps({"fvu": 0.5, "l0": 4.0, "dead_fraction": 0.2, "loss": 1.0})
        + "\n"
        + json.dumps({"fvu": 0.25, "l0": 4.0, "dead_fraction": 0.1, "loss": 0.5})
        + "\n"
    )
    (sae_folder / "sae_weights.safetensors").write_bytes(b"")
    decoy_sae = r / "saes" / "M1_D1" / "layer3" / "topk"  # trained, but not listed: not summarized
    _write_json(decoy_sae / "sae_diff.json", {"config": sae_config, "training": {"n_tokens": 1}})
    (decoy_sae / "sae_weights.safetensors").write_bytes(b"")
    eval_json = _write_json(r / "eval" / "M0_D0" / "layer3" / "topk.json", {"sae": "topk", "fvu": 0.3, "l0": 3.5})
    _write_json(r / "eval" / "M1_D1" / "layer3" / "topk.json", {"sae": "topk", "fvu": 9.9})  # not listed
    feature_dir = r / "features" / "M0_D0" / "layer3" / "topk"
    feature_dir.mkdir(parents=True)
    pd.DataFrame(
        {"dead": [True, False, False], "prompt_only": [False, True, False], "completion_only": [False, False, True]}
    ).to_parquet(feature_dir / "stats.parquet")
    _write_json(feature_dir / "groups.json", {"pooling": "mean"})
    probe = {"auroc": 0.75, "auroc_random_features": 0.5, "auroc_raw_activations": 0.6, "top_features": [3, 1]}
    probe_json = _write_json(
        r / "probes" / "M1_D1" / "layer3" / "topk" / "score.json",
        {"cell": "M1_D1", "layer": 3, "sae": "topk", "metric": "score", **probe},
    )
    effects = _write_json(
        r / "interventions" / "ablation" / "M1_D1" / "layer3" / "topk" / "score" / "effects.json",
        {"experiment": "ablation", "cell": "M1_D1", "layer": 3, "sae": "topk", "metric": "score", "skipped": "why"},
    )
    iterations = _write_json(r / "iterations.json", {"target": {}, "iterations": ["M0", "M1"], "metrics": {}})
    bench = r / "benchmarks" / "prepare_model" / "M0.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\n2.5\t0:00:02\n")
    files = {
        "--models": [r / "models" / "M1", r / "models" / "M0"],
        "--samples": [r / "data" / "D0" / "samples.parquet"],
        "--iterations": [iterations],
        "--evolution": [],
        "--probes": [probe_json],
        "--interventions": [effects],
        "--manifests": manifests,
        "--saes": [sae_folder / "sae_weights.safetensors"],
        "--evals": [eval_json],
        "--features": [feature_dir / "stats.parquet"],
        "--benchmarks": [bench],
        "--figures": [r / "figures" / "probes" / "M1_D1" / "layer3" / "topk_score_importance.png"],
    }
    return cfg, files


def _summary_cli(cfg: dict, files: dict, out: Path) -> dict:
    command = [sys.executable, "-m", "sae_diff", "summary", "--spec", json.dumps(cfg), "--out", str(out)]
    for flag, paths in files.items():
        command += [flag, *map(str, paths)]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_summary_reads_exactly_the_listed_files(tmp_path):
    """Compared: the summary's entries against the listed files only. Models sorted by folder (M9,
    not listed, absent) with M1's dpo record; only the listed samples; each manifest placed by its
    content (M1_D1's lies outside the layout); the SAE, its eval and features placed by their folders
    (M1_D1's SAE and eval exist but are not listed: absent); the probe in the headline and the
    skipped experiment under interventions_skipped; timings and figures from their lists."""
    cfg, files = _tiny_run(tmp_path)
    result = _summary_cli(cfg, files, tmp_path / "summary.json")
    r = tmp_path / "results"
    assert list(result["models"]) == ["M0", "M1"]
    assert result["models"]["M1"]["dpo"] == {
        "n_pairs": 6,
        "steps": 3,
        "loss_first": 0.7,
        "loss_last": 0.5,
        "reward_accuracy_last": 1.0,
    }
    assert list(result["data"]) == ["D0"] and result["data"]["D0"]["n_samples"] == 2
    assert result["data"]["D0"]["metrics"]["score"] == {"mean": 2.0, "n_defined": 2}
    cells = result["cells"]
    assert list(cells) == ["M0_D0", "M1_D1"]
    assert cells["M0_D0"]["activations"]["layer3"]["n_tokens"] == {"train": 5}
    assert cells["M0_D0"]["activations"]["layer3"]["n_shards"] == 2
    assert cells["M1_D1"]["activations"]["layer3"]["manifest"] == str(tmp_path / "elsewhere" / "manifest.json")
    sae = cells["M0_D0"]["saes"]["layer3"]["topk"]
    assert sae["path"] == str(r / "saes" / "M0_D0" / "layer3" / "topk")
    assert (sae["d_sae"], sae["k"], sae["n_tokens"]) == (32, 4, 1000)
    assert sae["train_final"] == {"fvu": 0.25, "l0": 4.0, "dead_fraction": 0.1, "loss": 0.5}
    assert sae["eval"] == {"fvu": 0.3, "l0": 3.5, "path": str(r / "eval" / "M0_D0" / "layer3" / "topk.json")}
    assert sae["features"] == {
        "path": str(r / "features" / "M0_D0" / "layer3" / "topk"),
        "n_live": 2,
        "prompt_only": 1,
        "completion_only": 1,
        "pooling": "mean",
    }
    assert "saes" not in cells["M1_D1"]
    assert result["headline"]["probes"]["score"]["auroc"] == 0.75
    assert result["headline"]["probes"]["score"]["cell"] == "M1_D1"
    assert result["probes"]["M1_D1"]["layer3"]["topk"]["score"]["metric"] == "score"
    assert result["interventions_skipped"] == [
        {"experiment": "ablation", "cell": "M1_D1", "layer": 3, "sae": "topk", "metric": "score", "skipped": "why"}
    ]
    assert "interventions" not in result and "evolution" not in result
    assert result["iterations"]["path"] == str(r / "iterations.json") and "iterations" not in result["headline"]
    assert result["headline"]["timings"] == {"models": 2.5}
    assert result["figures"] == {"probes": [str(files["--figures"][0])]}


def test_summary_with_empty_lists(tmp_path):
    """Compared: a summary given no files (every list empty, no iterations): the configured cells
    with no activations and no SAEs, no models or data, only timings (empty) in the headline."""
    cfg, files = _tiny_run(tmp_path)
    empty = {flag: [] for flag in files if flag != "--iterations"}
    result = _summary_cli(cfg, empty, tmp_path / "summary.json")
    assert result["headline"] == {"timings": {}}
    assert result["models"] == {} and result["data"] == {}
    assert result["cells"] == {
        "M0_D0": {"model": "M0", "data": "D0", "activations": {}},
        "M1_D1": {"model": "M1", "data": "D1", "activations": {}},
    }
    assert not {"iterations", "evolution", "probes", "interventions", "interventions_skipped", "figures"} & set(result)


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
