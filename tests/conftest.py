"""Shared fixtures: a tiny random model prepared once per session, and config helpers."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def slurm_session(request, tmp_path_factory):
    """The SLURM test's run (tests/slurm_session.py), started before the first test when the session
    holds a SLURM test: it mostly waits on the cluster, so the rest of the suite runs meanwhile."""
    if not any(item.get_closest_marker("slurm") for item in request.session.items):
        yield None
        return
    from .slurm_session import SlurmRun

    folder = Path(os.environ.get("SAE_DIFF_SLURM_DIR") or tmp_path_factory.mktemp("slurm"))
    run = SlurmRun(folder, tmp_path_factory.mktemp("slurm_run"))
    try:
        run.start()
        yield run
    finally:
        run.stop()


@pytest.fixture
def test_config() -> dict:
    with open(ROOT / "config" / "test.yaml") as fh:
        return copy.deepcopy(yaml.safe_load(fh))


TINY_SPEC = {
    "source": "random",
    "arch": "llama",
    "n_layers": 3,
    "d_model": 32,
    "n_heads": 4,
    "d_mlp": 64,
    "max_positions": 128,
    "alphabet": "ascii",
    "seed": 0,
    "dtype": "float32",
    "trust_remote_code": False,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sae_diff import models

    out = tmp_path_factory.mktemp("models") / "M0"
    models.prepare("M0", {"M0": dict(TINY_SPEC)}, out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    from sae_diff import models

    out = tmp_path_factory.mktemp("models") / "G0"
    models.prepare("M0", {"M0": dict(TINY_SPEC, arch="gpt2")}, out)
    return out


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The whole DAG of config/test.yaml, run once per session with 2 local cores."""
    from .workflow_run import planned, snakemake

    workdir = tmp_path_factory.mktemp("run")
    dry = snakemake(workdir, "-n")
    assert dry.returncode == 0, dry.stderr
    assert planned(dry) == {
        "all": 1,
        "prepare_model": 1,
        "finetune_dpo": 1,
        "make_data": 2,
        "score_data": 2,
        "iterations": 1,
        "extract_activations": 3,
        "train_sae": 3,
        "evaluate_saes": 3,
        "feature_stats": 3,
        "train_seed_sae": 1,
        "train_null_saes": 1,
        "null_diffs": 1,
        "calibrate": 1,
        "diff_saes": 3,
        "evolution": 1,
        "probes": 3,
        "probe_comparison": 1,
        "figure_iterations": 1,
        "figure_statistics": 6,
        "figure_embeddings": 6,
        "figure_coactivation": 6,
        "figure_evolution": 2,
        "figure_similarity": 4,
        "figure_probe_importance": 6,
        "figure_probe_auroc": 2,
        "figure_probe_overlap": 2,
        "figure_training": 6,
        "figure_density": 6,
        "figure_loss_by_position": 6,
        "intervene": 4,
        "figure_dose_response": 4,
        "attribute": 2,
        "prompt_split": 1,
        "crosscoder": 1,
        "diff_sae": 1,
        "metric_latents": 1,
        "adl": 1,
        "token_kl": 1,
        "kl_recovery": 1,
        "diffing_record": 1,
        "figure_diffing": 1,
        "summary": 1,
        "dashboard_sae": 6,
        "dashboard": 1,
    }
    result = snakemake(workdir, "--cores", "2", timeout=1500)  # ~4 min on 2 idle cores; bounded, not tight
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture
def write_samples(tmp_path):
    """A samples table of the given texts (every third without a prompt, every fourth in eval)."""
    import numpy as np
    import pandas as pd

    def write(texts: list[str]) -> Path:
        table = pd.DataFrame(
            {
                "sample_id": np.arange(len(texts)),
                "prompt_text": [f"<|user|>p{i}<|assistant|>" if i % 3 else "" for i in range(len(texts))],
                "text": texts,
                "split": ["eval" if i % 4 == 0 else "train" for i in range(len(texts))],
            }
        )
        path = tmp_path / "samples.parquet"
        table.to_parquet(path)
        return path

    return write
