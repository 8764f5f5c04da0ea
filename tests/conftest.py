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


@pytest.fixture
def test_config() -> dict:
    with open(ROOT / "config" / "test.yaml") as fh:
        return copy.deepcopy(yaml.safe_load(fh))


TINY_SPEC = {"source": "random", "arch": "llama", "n_layers": 3, "d_model": 32, "n_heads": 4,
             "d_mlp": 64, "max_positions": 128, "alphabet": "ascii", "seed": 0, "dtype": "float32",
             "trust_remote_code": False}


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
