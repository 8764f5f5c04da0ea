"""Group statistics against hand computations and planted structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import groups


def test_cohens_d_against_the_textbook_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (40, 3)), rng.normal(0.0, 1.0, (25, 3))
    d = groups.cohens_d(a, b)
    for j in range(3):
        x, y = a[:, j], b[:, j]
        s = np.sqrt(((len(x) - 1) * np.var(x, ddof=1) + (len(y) - 1) * np.var(y, ddof=1)) / (len(x) + len(y) - 2))
        assert d[j] == pytest.approx((x.mean() - y.mean()) / s, rel=1e-12)
    assert np.isnan(groups.cohens_d(np.ones((5, 1)), np.ones((5, 1)))[0])  # no spread: undefined, not 0/0


def test_effective_rank_and_information_against_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 30)) + 0.01 * rng.normal(size=(200, 30))  # rank ~3
    ratio = PCA().fit(x).explained_variance_ratio_
    assert groups.effective_rank(x, 0.95) == int(np.argmax(np.cumsum(ratio) >= 0.95) + 1)
    assert groups.effective_rank(x, 0.95) <= 3
    p = ratio[ratio > 0]
    assert groups.information_content(x) == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-6)
    iso = rng.normal(size=(5000, 8))  # isotropic: about log2(8) = 3 bits
    assert groups.information_content(iso) == pytest.approx(3.0, abs=0.02)
    assert groups.effective_rank(np.ones((10, 4))) == 0


def _pooled(x, l0, act, n_tokens):
    x = torch.as_tensor(x, dtype=torch.float32)
    return {
        "mean": x,
        "max": x,
        "l0_sum": torch.as_tensor(l0, dtype=torch.float64),
        "act_sum": torch.as_tensor(act, dtype=torch.float64),
        "n_tokens": torch.as_tensor(n_tokens),
    }


def test_per_group_l0_dead_and_mean_activation_by_hand():
    x = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    table = pd.DataFrame({"language": ["en", "en", "fr"]})
    out = groups.per_group(_pooled(x, [4, 6, 9], [2.0, 4.0, 3.0], [2, 3, 3]), table, "language")
    assert out["en"]["l0"] == pytest.approx(10 / 5) and out["fr"]["l0"] == pytest.approx(3.0)
    assert out["en"]["dead_features"] == 2 and out["fr"]["dead_features"] == 2
    assert out["en"]["mean_activation"] == pytest.approx(6.0 / (5 * 3))
    assert out["en"]["n_samples"] == 2


def test_planted_alignment_and_bias_correlation():
    rng = np.random.default_rng(2)
    pairs, d = 60, 8
    shared = rng.gamma(2.0, 1.0, (pairs, 4))  # features 0-3 follow the pair in both languages
    en = np.concatenate([shared + 0.05 * rng.random((pairs, 4)), rng.random((pairs, 4))], axis=1)
    fr = np.concatenate([shared + 0.05 * rng.random((pairs, 4)), rng.random((pairs, 4))], axis=1)
    gender = np.where(np.arange(pairs) % 2 == 0, "female", "male")
    bias = np.linspace(-1, 1, d)  # the same gender effect in both languages
    en[gender == "female"] += bias.clip(0)
    fr[gender == "female"] += bias.clip(0)
    table = pd.DataFrame(
        {"language": ["en"] * pairs + ["fr"] * pairs, "pair_id": list(range(pairs)) * 2, "gender": list(gender) * 2}
    )
    x = np.concatenate([en, fr])
    xa, xb, both = groups.paired_matrices(x, table, "language", "pair_id", "en", "fr")
    order = np.array(both, dtype=int)  # pair ids, sorted as strings
    assert len(both) == pairs and np.allclose(xa, en[order]) and np.allclose(xb, fr[order])
    en, fr = en[order], fr[order]
    out = groups.alignment(xa, xb, threshold=0.5)
    r_ref = [np.corrcoef(en[:, j], fr[:, j])[0, 1] for j in range(d)]
    assert out["r"] == pytest.approx(r_ref, rel=1e-9)
    assert out["aligned_features"] >= 4 and out["alignment_ratio"] == pytest.approx(out["aligned_features"] / d)
    corr = groups.bias_correlation(x, table, "language", "gender", "female", "male")
    assert corr["gender_bias_correlation"] > 0.9
    bias_block = groups.group_bias(x, table, "gender", "female", "male", top=3)
    assert [j for j, _ in bias_block["top_female"]][0] == d - 1


def test_coactivation_matrix_is_the_class_mean():
    rng = np.random.default_rng(3)
    x = rng.random((30, 6))
    table = pd.DataFrame({"profession": rng.choice(["nurse", "pilot", "chef"], 30)})
    matrix, stats = groups.coactivation(x, table, "profession", top=2)
    ref = pd.DataFrame(x).groupby(table["profession"].to_numpy()).mean().sort_index().to_numpy()
    assert np.allclose(matrix, ref)
    nurse = stats["classes"].index("nurse")
    contrast = matrix[nurse] - np.delete(matrix, nurse, axis=0).mean(axis=0)
    assert stats["per_class"]["nurse"]["top_vs_others"][0][0] == int(np.argmax(contrast))
