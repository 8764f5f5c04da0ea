"""Convergence checks of an SAE against plain references: the regenerated init, the held-out FVU
curve written during training, the random-dictionary MMCS, and the verdicts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from sae_diff import convergence, diff
from sae_diff.activations import ActivationStore, write_store
from sae_diff.io import write_json
from sae_diff.sae import files
from sae_diff.sae.model import SAE, SAEConfig
from sae_diff.sae.train import TrainSpec, train

CRITERION = convergence.Criterion(max_fvu_drop=0.05, max_init_cos=0.5, min_cross_init=0.5)


def test_init_decoder_is_the_decoder_initialize_draws():
    sae = SAE(SAEConfig(architecture="topk", d_in=12, d_sae=40, k=3))
    for seed in (0, 7):
        sae.initialize(None, seed=seed)
        np.testing.assert_allclose(convergence.init_decoder(sae, seed), sae.W_dec.detach().double().numpy(), atol=1e-6)
        assert convergence.init_cosine(sae, convergence.init_decoder(sae, seed)) == pytest.approx(1.0, abs=1e-6)
    assert abs(convergence.init_cosine(sae, convergence.init_decoder(sae, 1))) < 0.2  # another seed: unrelated rows


def test_fvu_drop_is_the_relative_drop_over_the_last_quarter():
    curve = [(s, 1.0 / (1 + s)) for s in range(0, 100, 10)] + [(99, 0.01)]
    # the last quarter of 100 steps starts at step 74: the first point at or after it is step 80
    assert convergence.fvu_drop(curve) == pytest.approx((1 / 81 - 0.01) / 0.01)
    assert convergence.fvu_drop([(0, 0.5)]) is None


def test_random_mmcs_is_the_best_one_to_one_matching():
    """Against brute force over every permutation (6 rows): the Hungarian MMCS is the best mean cosine."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 6, 4))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = a @ b.T
    best = max(np.mean(cos[np.arange(6), list(p)]) for p in itertools.permutations(range(6)))
    assert np.nanmean(diff.match(a, b)[1]) == pytest.approx(best)
    floor = convergence.random_mmcs(64, 16, seed=1)
    assert 0.2 < floor < 0.8  # a positive floor: matching alone makes random dictionaries look alike
    assert convergence.cross_init_score(floor, floor) == 0 and convergence.cross_init_score(1.0, floor) == 1


def _two_split_store(folder, train_acts, eval_acts):
    """A store with a train and an eval split (write_store writes one split; the manifests are merged)."""
    write_store(folder / "train", train_acts, split="train")
    write_store(folder / "eval", eval_acts, split="eval")
    manifest = json.loads((folder / "train" / "manifest.json").read_text())
    other = json.loads((folder / "eval" / "manifest.json").read_text())
    for entry in other["shards"]:
        (folder / "eval" / entry["file"]).rename(folder / "train" / entry["file"])
    manifest["shards"] += other["shards"]
    for key in ("n_tokens", "n_sequences"):
        manifest[key]["eval"] = other[key]["eval"]
    write_json(folder / "train" / "manifest.json", manifest)
    return ActivationStore(folder / "train")


def test_training_writes_a_held_out_curve_whose_last_point_is_the_saved_sae(tmp_path):
    """The held-out FVU logged at the last step equals the FVU of the saved SAE (raw activations,
    float64) on the same first eval tokens; ``steps`` trains exactly that many steps."""
    rng = np.random.default_rng(0)
    dictionary = rng.standard_normal((20, 8))
    make = lambda n: torch.from_numpy(  # noqa: E731
        (np.maximum(rng.standard_normal((n, 20)) - 1.0, 0) @ dictionary).astype(np.float32)
    )
    store = _two_split_store(tmp_path / "acts", make(3000), make(600))
    spec = TrainSpec(name="s", sae=SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4), lr=0.01, warmup_steps=2)
    train(store, [spec], [tmp_path / "s"], n_tokens=3000, batch_size=100, shuffle_buffer=1000, epochs=2,
          checkpoint_every=0, progress=False, steps=45)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    curve = convergence.read_curve(tmp_path / "s")
    assert rows[-1]["step"] == 44 and len(curve) >= 20
    sae = files.load(tmp_path / "s").double()
    x = store.all("eval")[:2048].double()
    with torch.no_grad():
        fvu = ((sae(x) - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()).item()
    assert curve[-1][1] == pytest.approx(fvu, rel=1e-4)
    record = convergence.sae_record(tmp_path / "s", CRITERION)
    assert record["fvu_drop"] == pytest.approx(convergence.fvu_drop(curve))
    assert record["init_cos"] == pytest.approx(
        float((diff.unit_rows(sae.W_dec) * convergence.init_decoder(sae, 0)).sum(1).mean())
    )
    assert record["converged"] == (record["fvu_flat"] and record["left_init"])


def test_layer_verdict_names_what_failed():
    ok = {"fvu_flat": True, "left_init": True}
    verdict = convergence.layer_verdict({"M0_D0": ok, "M1_D1": {"fvu_flat": False, "left_init": True}}, None)
    assert not verdict["converged"] and verdict["reasons"] == ["M1_D1: held-out FVU still dropping"]
    verdict = convergence.layer_verdict({"M0_D0": ok}, {"converged": False})
    assert verdict["reasons"] == ["cross-init MMCS too close to random dictionaries"]
    assert convergence.layer_verdict({"M0_D0": ok}, {"converged": True})["converged"]
