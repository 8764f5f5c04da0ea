"""The same-token record (sae_diff.diffing): agreement across methods by |cosine|, the lens's
aligned latents, the all-iterations crosscoder's per-iteration counts, and the headline layout,
each against a hand computation on planted vectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sae_diff import diffing


def test_agreement_finds_exactly_the_pairs_above_the_cosine():
    """Two methods share one direction (cos 0.8 by construction) and nothing else."""
    rng = np.random.default_rng(0)
    d = 64
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    w = rng.normal(size=d)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    shared = 0.8 * u + 0.6 * w  # cos(shared, u) = 0.8 exactly
    a = (["a1", "a2"], np.stack([u, rng.normal(size=d)]))
    b = (["b1", "b2"], np.stack([rng.normal(size=d), -shared * 3.0]))
    found = diffing.agreement({"x": a, "y": b}, 0.7)
    assert found == [{"x": "a1", "y": "b2", "cosine": pytest.approx(-0.8)}]
    assert diffing.agreement({"x": a, "y": b}, 0.81) == []
    best = diffing.best_matches(a, b)
    assert best[0]["match"] == "b2" and best[0]["cosine"] == pytest.approx(-0.8)


def test_aligned_latents_rank_by_absolute_cosine():
    d = 8
    eye = np.eye(d)
    lens = (["neutral"], eye[:1] * 2.0)
    decoder = np.stack([eye[1], -eye[0] * 0.5, 0.6 * eye[0] + 0.8 * eye[1]])
    out = diffing.aligned_latents({"adl": lens, "diff_sae": ([10, 11, 12], decoder)}, k=2)
    assert [row["latent"] for row in out["neutral"]["diff_sae"]] == [11, 12]
    assert [row["cosine"] for row in out["neutral"]["diff_sae"]] == pytest.approx([-1.0, 0.6])


def test_all_iterations_block_counts_latents_new_in_each_iteration(tmp_path, monkeypatch):
    """Decoder norms per model (M0, M1, M2) by hand: latent 0 shared, 1 appears at M1, 2 at M2,
    3 fades out of M2; Δnorm = ½((‖d^i‖ − ‖d^0‖)/max + 1), Mi-only above 0.9, M0-only below 0.1."""
    table = pd.DataFrame(
        {
            "latent": [0, 1, 2, 3],
            "norm_m0": [1.0, 0.05, 0.01, 1.0],
            "norm_m1": [1.0, 1.0, 0.02, 1.0],
            "norm_m2": [1.0, 1.0, 1.0, 0.05],
            "mi_only_rank": [np.nan, 1.0, 2.0, np.nan],
            "scaling_label": ["not_mi_only", "genuine", "genuine", "not_mi_only"],
        }
    )
    table.to_parquet(tmp_path / "latents.parquet")
    block = {"top": [1, 2], "n_mi_only": 2, "n_shared": 1, "n_m0_only": 1, "n_other": 0}
    monkeypatch.setattr(diffing, "crosscoder_block", lambda folder, top: (dict(block), ([], np.zeros((0, 0)))))
    out, _ = diffing.all_iterations_block(tmp_path, 10)
    assert out["n_models"] == 3
    assert out["per_iteration"] == {
        "M1": {"n_mi_only_vs_m0": 1, "n_m0_only_vs_mi": 0},
        "M2": {"n_mi_only_vs_m0": 2, "n_m0_only_vs_mi": 1},
    }
    assert out["emerged_at"] == {"M1": 1, "M2": 1}


def test_headline_is_keyed_by_iteration_then_layer():
    records = [
        {
            "pair": "M0_D2__M2_D2",
            "layer": 12,
            "methods": {"adl": {"top": ["her"]}, "kl": {"top": ["she"]}},
            "agreement": [{"adl": "data", "diff_sae": 7, "cosine": 0.9}],
        },
        {"pair": "all_D2", "layer": 12, "methods": {"crosscoder": {"top": [3]}}, "agreement": []},
    ]
    out = diffing.headline(records)
    assert out["adl"]["M2"]["layer12"] == {"top": ["her"], "agrees_with": records[0]["agreement"]}
    assert out["kl"]["M2"]["layer12"]["agrees_with"] == []
    assert out["crosscoder_all"]["layer12"]["data"] == "D2"
