"""Preference rounds: pair building by hand-checked cases, and TRL's DPO on a tiny random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from sae_diff import finetune
from sae_diff.errors import DataError


def _samples(rows):
    """rows: (prompt_id, text, score, split)"""
    return pd.DataFrame(
        [
            {
                "sample_id": i,
                "prompt_id": p,
                "prompt_text": f"<|user|>p{p}<|assistant|>",
                "text": t,
                "m": s,
                "split": split,
            }
            for i, (p, t, s, split) in enumerate(rows)
        ]
    )


def _pairs_as_tuples(pairs):
    return sorted(zip(pairs["prompt_id"], pairs["chosen"], pairs["rejected"]))


def test_pairs_within_prompts_drop_ties_and_respect_margin():
    table = _samples(
        [
            (0, "a", 1.0, "train"),
            (0, "b", 0.0, "train"),
            (0, "c", 1.0, "train"),
            (1, "d", 0.5, "train"),
            (1, "e", 0.4, "train"),
            (2, "f", 0.9, "eval"),
            (2, "g", 0.1, "eval"),
        ]
    )  # eval prompts never give pairs
    pairs = finetune.build_pairs(table, "m", "up")
    # a and c tie (dropped); no pair ever mixes prompts
    assert _pairs_as_tuples(pairs) == [(0, "a", "b"), (0, "c", "b"), (1, "d", "e")]
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()
    # a margin of 0.2 drops the 0.1 gap of prompt 1
    assert _pairs_as_tuples(finetune.build_pairs(table, "m", "up", margin=0.2)) == [(0, "a", "b"), (0, "c", "b")]
    # direction down swaps chosen and rejected
    assert _pairs_as_tuples(finetune.build_pairs(table, "m", "down")) == [(0, "b", "a"), (0, "b", "c"), (1, "e", "d")]
    # split=None uses every prompt
    assert (2, "f", "g") in _pairs_as_tuples(finetune.build_pairs(table, "m", split=None))


def test_pairs_only_from_the_target_population():
    table = _samples([(0, "a", 1.0, "train"), (0, "b", 0.0, "train"), (1, "c", 1.0, "train"), (1, "d", 0.0, "train")])
    table["language"] = ["en", "en", "fr", "fr"]
    assert _pairs_as_tuples(finetune.build_pairs(table, "m", where={"language": ["en"]})) == [(0, "a", "b")]
    with pytest.raises(DataError, match="where.lang"):
        finetune.build_pairs(table, "m", where={"lang": ["en"]})


def test_missing_scores_dropped_or_ranked_worst():
    table = _samples([(0, "x", np.nan, "train"), (0, "y", 0.0, "train"), (0, "z", np.nan, "train")])
    assert finetune.build_pairs(table, "m", missing="drop").empty
    worst = finetune.build_pairs(table, "m", missing="worst")
    # a scored text beats each unscored one; the two unscored ones tie
    assert _pairs_as_tuples(worst) == [(0, "y", "x"), (0, "y", "z")]


def test_max_per_prompt_keeps_the_largest_gaps():
    table = _samples([(0, "a", 1.0, "train"), (0, "b", 0.7, "train"), (0, "c", 0.0, "train")])
    pairs = finetune.build_pairs(table, "m", max_per_prompt=2)
    assert _pairs_as_tuples(pairs) == [(0, "a", "c"), (0, "b", "c")]  # gaps 1.0 and 0.7, not 0.3


def test_identical_texts_never_pair_and_bad_arguments_are_named():
    table = _samples([(0, "same", 1.0, "train"), (0, "same", 0.0, "train")])
    assert finetune.build_pairs(table, "m").empty
    with pytest.raises(DataError, match="target metric 'nope'"):
        finetune.build_pairs(table, "nope")
    with pytest.raises(DataError, match="direction"):
        finetune.build_pairs(table, "m", direction="sideways")


DPO_SPEC = dict(
    beta=0.1,
    learning_rate=3e-3,
    steps=6,
    batch_size=4,
    gradient_accumulation=1,
    max_length=64,
    seed=0,
    warmup_steps=0,
    checkpoint_every=0,
    gradient_checkpointing=False,
    lora=dict(enabled=False, r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
)


def _planted_pairs(n=8):
    """Chosen texts say 'she', rejected ones 'he': a preference the tiny model can learn."""
    rows = []
    for p in range(n):
        rows += [(p, f"she went to work {p}", 1.0, "train"), (p, f"he went to work {p}", 0.0, "train")]
    return finetune.build_pairs(_samples(rows), "m")


def _log(folder):
    return [json.loads(line) for line in (folder / "dpo_log.jsonl").read_text().splitlines()]


def test_dpo_loss_decreases_and_the_round_is_deterministic(tiny_model_dir, tmp_path):
    pairs = _planted_pairs()
    a = finetune.dpo(tiny_model_dir, tiny_model_dir, pairs, DPO_SPEC, tmp_path / "A", progress=False)
    b = finetune.dpo(tiny_model_dir, tiny_model_dir, pairs, DPO_SPEC, tmp_path / "B", progress=False)
    losses = [row["loss"] for row in _log(tmp_path / "A") if "loss" in row]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at step 1
    assert losses[-1] < losses[0] - 0.05
    assert a["loss_last"] == b["loss_last"]
    wa = load_file(tmp_path / "A" / "model.safetensors")
    wb = load_file(tmp_path / "B" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa), "same seed, same weights"
    assert any(not (wa[k] == base[k]).all() for k in wa), "the round changed the model"
    assert len(pd.read_parquet(tmp_path / "A" / "pairs.parquet")) == len(pairs)
    assert not list(tmp_path.glob(".*dpo-work")), "the work folder is removed after a round"


def test_dpo_with_lora_saves_merged_full_weights(tiny_model_dir, tmp_path):
    from sae_diff import models

    spec = dict(DPO_SPEC, learning_rate=1e-2, lora=dict(DPO_SPEC["lora"], enabled=True))
    finetune.dpo(tiny_model_dir, tiny_model_dir, _planted_pairs(), spec, tmp_path / "L", progress=False)
    weights = load_file(tmp_path / "L" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert set(weights) == set(base), "no adapter tensors: the LoRA update is merged"
    changed = [k for k in weights if not (weights[k] == base[k]).all()]
    assert changed and all("embed" not in k for k in changed)
    model, _ = models.load(tmp_path / "L")  # a plain HF folder, like any other model
    assert model is not None
    with pytest.raises(DataError, match="lora.enabled"):
        finetune.dpo(tiny_model_dir, tmp_path / "L", _planted_pairs(), spec, tmp_path / "X", progress=False)


def test_dpo_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    """kill -9 right after the step-4 checkpoint, rerun: it resumes and ends where an uninterrupted run does."""
    spec = dict(DPO_SPEC, checkpoint_every=2)
    pairs = _planted_pairs()
    pairs.to_parquet(tmp_path / "pairs.parquet")
    finetune.dpo(tiny_model_dir, tiny_model_dir, pairs, spec, tmp_path / "full", progress=False)
    script = (
        f"import pandas as pd; from sae_diff import finetune; "
        f"finetune.dpo({str(tiny_model_dir)!r}, {str(tiny_model_dir)!r}, "
        f"pd.read_parquet({str(tmp_path / 'pairs.parquet')!r}), "
        f"{spec!r}, {str(tmp_path / 'cut')!r}, progress=False)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "SAE_DIFF_KILL_AFTER_DPO_STEP": "4"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "cut").exists(), "nothing half-written at the target"
    record = finetune.dpo(tiny_model_dir, tiny_model_dir, pairs, spec, tmp_path / "cut", progress=False)
    assert record["resumed"]
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    for key in full:
        assert np.allclose(full[key].numpy(), resumed[key].numpy(), atol=1e-6), key


def test_empty_pairs_is_a_clear_error(tiny_model_dir, tmp_path):
    empty = finetune.build_pairs(_samples([(0, "a", 1.0, "train")]), "m")
    with pytest.raises(DataError, match="no preference pairs"):
        finetune.dpo(tiny_model_dir, tiny_model_dir, empty, DPO_SPEC, tmp_path / "E", progress=False)
