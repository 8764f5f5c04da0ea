"""A change planted in a (tiny, random) model on purpose, diffed on the same texts: the model-level
case of the planted-change proof at CI size (bench/planted_sae_diff.py runs it on SmolLM2).

M1 = M0 with a fixed direction added to the input embedding of one trigger character; M1c = an
exact copy of M0 (the identical-model control). All three read the same texts; each cell's SAE is
trained as a cell's is (M1c's with another data-order seed, as the calibration partner is); both
pairs are labelled by ``diff.compare`` with the presence test paired on the same tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import activations, diff, presence
from sae_diff.activations import ActivationStore
from sae_diff.sae.train import TrainSpec, train

TRIGGER = "q"
LAYER = 1
WORDS = ["bread", "dawn", "miner", "quiet", "quill", "soup", "judge", "plane", "queen", "wire", "mill", "squad"]


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 9)))) for _ in range(n)]


def _edited_copy(source, out, trigger: str, scale: float, seed: int):
    """``source`` with ``scale`` times its mean embedding norm added along a fixed random direction
    to the trigger's input embedding; returns that direction."""
    from sae_diff import models

    model, tokenizer = models.load(source)
    (trigger_id,) = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    embedding = model.get_input_embeddings().weight
    direction = torch.from_numpy(np.random.default_rng([seed, 17]).standard_normal(embedding.shape[1])).float()
    direction /= direction.norm()
    with torch.no_grad():
        embedding[trigger_id] += scale * embedding.norm(dim=1).mean() * direction
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return trigger_id


def _sae(store: ActivationStore, out, order_seed: int):
    from sae_diff.sae import files
    from sae_diff.sae.model import SAEConfig

    config = SAEConfig(architecture="topk", d_in=store.d_model, d_sae=4 * store.d_model, k=4)
    spec = TrainSpec(name="topk", sae=config, lr=3e-3, warmup_steps=5)
    train(store, [spec], [out], n_tokens=10**9, batch_size=64, shuffle_buffer=4096, seed=order_seed,
          checkpoint_every=0, epochs=8, progress=False)  # fmt: skip
    return files.load(out)


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory):
    import shutil

    work = tmp_path_factory.mktemp("planted_model")
    texts = _texts(160, seed=0)
    table = pd.DataFrame(
        {
            "sample_id": np.arange(len(texts)),
            "prompt": [f"p{i // 2}" for i in range(len(texts))],
            "prompt_text": "",
            "text": texts,
            "split": ["eval" if i % 4 == 0 else "train" for i in range(len(texts))],
        }
    )
    samples_path = work / "samples.parquet"
    table.to_parquet(samples_path)
    trigger_id = _edited_copy(tiny_model_dir, work / "M1", TRIGGER, scale=3.0, seed=0)
    shutil.copytree(tiny_model_dir, work / "M1c")
    opts = {"dtype": "float32", "batch_size": 16, "max_length": 64, "shard_tokens": 4096,
            "exclude_special_tokens": True, "exclude_first_position": True}  # fmt: skip
    stores, tokens, saes = {}, {}, {}
    for name, folder in (("M0", tiny_model_dir), ("M1", work / "M1"), ("M1c", work / "M1c")):
        job = {"model": name, "data": "D0", "layers": [LAYER], "hook_points": ["resid_post"], "activations": opts}
        activations.extract(job, folder, samples_path, work / "acts" / name, progress=False)
        stores[name] = ActivationStore(work / "acts" / name / f"layer{LAYER}")
        tokens[name] = presence.eval_tokens(stores[name], table)
        saes[name] = _sae(stores[name], work / "saes" / name, order_seed=1 if name == "M1c" else 0)
    seed_partner = _sae(stores["M0"], work / "saes" / "M0_seed", order_seed=1)
    thresholds, _ = diff.calibration(saes["M0"], seed_partner, 0.05, 0.001)
    return {"stores": stores, "tokens": tokens, "saes": saes, "thresholds": thresholds, "trigger_id": trigger_id}


def _compare(planted, other: str):
    return diff.compare(
        planted["saes"]["M0"], planted["saes"][other], planted["tokens"]["M0"], planted["tokens"][other],
        planted["thresholds"], False, 0.1, 0.5,
    )  # fmt: skip


def test_the_planted_change_is_born_on_trigger_tokens(planted):
    """The planted pair is paired (same texts) and has births; the most-moved flagged feature
    (``diff.ranked``) is a born feature of M1 whose top activations fall on the trigger character,
    and whose decoder points along the change as it arrives at the layer (the mean M1 − M0
    difference on trigger tokens) far beyond chance (~0.18 for a random direction in 32
    dimensions). The issue's 0.7 is not asserted: at this size the born features reach 0.53–0.67
    (the trigger's own direction shares their decoders); bench/planted_sae_diff.py reports it on
    SmolLM2. (Run by hand with the edit at scale 0, the same construction had no births.)"""
    table, summary = _compare(planted, "M1")
    assert summary["paired_tokens"] and summary["counts"]["born"] >= 1
    top = diff.ranked(table, summary).iloc[0]
    assert top["label"] == "born" and top["side"] == "b"
    ids = planted["stores"]["M1"].all("eval", key="token_ids").numpy()
    with torch.no_grad():
        acts = planted["saes"]["M1"].encode(planted["tokens"]["M1"].acts)[:, int(top["feature"])].numpy()
    best = np.argsort(-acts)[:20]
    assert (ids[best[acts[best] > 0]] == planted["trigger_id"]).mean() >= 0.8
    on_trigger = torch.from_numpy(ids == planted["trigger_id"])
    arrived = (planted["stores"]["M1"].all("eval") - planted["stores"]["M0"].all("eval")).double()[on_trigger].mean(0)
    decoder = diff.unit_rows(planted["saes"]["M1"].W_dec)[int(top["feature"])]
    assert abs(decoder @ (arrived / arrived.norm()).numpy()) >= 0.5


def test_the_identical_model_control_has_no_deaths_or_births(planted):
    """M1c = M0 byte for byte, its SAE trained with another data-order seed: on the same tokens
    every feature keeps its mass, so nothing died or was born; what is not 'same' is at most the
    5% the seed-pair thresholds allow (plus sampling noise at 128 features)."""
    table, summary = _compare(planted, "M1c")
    assert summary["paired_tokens"]
    assert summary["counts"].get("died", 0) == 0 and summary["counts"]["born"] == 0
    live = int((table["label"] != "inactive").sum())
    assert summary["counts"].get("changed", 0) / live <= 0.1


def test_the_planted_example_is_what_planted_json_says():
    """config/examples/planted.yaml's shipped M1 (resources/examples/planted) against its base, the
    given example's M0, in float64: the input-embedding rows of the trigger characters moved by
    exactly added_norm · u (planted.json), every other tensor byte-identical; the config validates;
    the texts hold the triggers. (The whole run and its scores: bench/planted_given.py.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    folder = root / "resources" / "examples" / "planted"
    planted = json.loads((folder / "planted.json").read_text())
    base = load_file(root / planted["base"] / "model.safetensors")
    tuned = load_file(folder / "M1" / "model.safetensors")
    assert base.keys() == tuned.keys()
    name = "model.embed_tokens.weight"
    moved = (tuned[name].double() - base[name].double()).numpy()
    u = np.asarray(planted["direction"])
    assert abs(np.linalg.norm(u) - 1) < 1e-6
    for token_id in planted["token_ids"]:
        np.testing.assert_allclose(moved[token_id], planted["added_norm"] * u, atol=1e-5)
    others = np.setdiff1d(np.arange(len(moved)), planted["token_ids"])
    assert not moved[others].any()
    assert all(torch.equal(base[key], tuned[key]) for key in base if key != name)
    texts = pd.read_csv(folder / "D0.csv")["text"]
    assert all(texts.str.contains(t).sum() >= 20 for t in planted["triggers"])
    checked = subprocess.run(
        [sys.executable, "-m", "sae_diff", "validate", str(root / "config" / "examples" / "planted.yaml")],
        capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
