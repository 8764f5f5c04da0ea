"""Writes that never destroy what the tool did not write, and artifacts that prove their integrity."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sae_diff import io
from sae_diff.errors import DataError
from sae_diff.sae import files
from sae_diff.sae.model import SAE, SAEConfig


def test_atomic_dir_refuses_a_users_folder_and_keeps_it_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "thesis.txt").write_text("three years of work")
    with pytest.raises(DataError, match=r"out: exists and was not written by sae-diff"):
        with io.atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("x")
    assert (target / "thesis.txt").read_text() == "three years of work" and not (target / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_atomic_dir_replaces_its_own_folders_and_empty_ones(tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # empty: nothing to lose
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / io.OWNER_MARKER).exists()
    with io.atomic_dir(target) as tmp:  # ours: replaced whole
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == sorted([io.OWNER_MARKER, "b.txt"])


def test_prepare_model_cli_refuses_to_replace_a_users_folder(tmp_path):
    target = tmp_path / "my_models"
    target.mkdir()
    (target / "notes.md").write_text("mine")
    spec = {
        "models": {
            "M0": {
                "source": "random",
                "arch": "llama",
                "n_layers": 1,
                "d_model": 8,
                "n_heads": 2,
                "d_mlp": 16,
                "seed": 0,
            }
        }
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_diff",
            "prepare-model",
            "--spec",
            json.dumps(spec),
            "--model",
            "M0",
            "--out",
            str(target),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "exists and was not written by sae-diff" in proc.stderr and str(target) in proc.stderr
    assert (target / "notes.md").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["notes.md"]


def _saved_sae(tmp_path):
    sae = SAE(SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4))
    sae.initialize(torch.randn(128, 16, generator=torch.Generator().manual_seed(0)), seed=0)
    return files.save(sae, tmp_path / "sae"), sae


def test_sae_weights_carry_a_checksum_that_load_verifies(tmp_path):
    folder, sae = _saved_sae(tmp_path)
    back = files.load(folder)
    assert torch.equal(back.W_dec, sae.W_dec)  # intact: loads exactly
    weights = folder / "sae_weights.safetensors"
    raw = bytearray(weights.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 256] = bytes(256)  # 256 bytes overwritten inside the tensors
    weights.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"sae_weights.safetensors: corrupted .*train_sae"):
        files.load(folder)


def test_a_truncated_sae_file_is_a_named_error(tmp_path):
    folder, _ = _saved_sae(tmp_path)
    record = json.loads((folder / files.OURS).read_text())
    record.pop("sha256")  # e.g. an SAE written before checksums
    (folder / files.OURS).write_text(json.dumps(record))
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match=r"sae_weights.safetensors: not a readable safetensors file"):
        files.load(folder)


def test_folders_written_before_the_marker_are_still_ours(tmp_path):
    """An SAE folder from an earlier sae-diff (sae_diff.json, no marker) is rebuilt, not refused."""
    target = tmp_path / "sae"
    target.mkdir()
    (target / "sae_diff.json").write_text("{}")
    (target / "cfg.json").write_text("{}")
    with io.atomic_dir(target) as tmp:
        (tmp / "cfg.json").write_text('{"new": true}')
    assert json.loads((target / "cfg.json").read_text()) == {"new": True} and not (target / "sae_diff.json").exists()


def test_training_refuses_a_users_folder_before_it_trains(tmp_path):
    """The check runs at the start of the job, not after hours of training."""
    from sae_diff.sae import train as train_lib

    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="exists and was not written by sae-diff"):
        train_lib.train(store=None, specs=[], out_dirs=[target], n_tokens=1)  # fails before reading the store
    assert (target / "notes.md").read_text() == "mine"
