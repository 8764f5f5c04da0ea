"""The presence test behind "died" and "born" (sae_diff.presence): masses and intervals against plain
float64 loops, its calls on planted absences, and its silence where nothing changed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import presence
from sae_diff.sae.model import SAE, SAEConfig


def _tokens(acts: np.ndarray, cluster: np.ndarray, cell: int = 0) -> presence.Tokens:
    n = len(acts)
    identity = np.stack([np.full(n, cell), np.arange(n), np.zeros(n, dtype=np.int64)], axis=1).astype(np.int64)
    return presence.Tokens(torch.from_numpy(acts.astype(np.float32)), np.asarray(cluster, dtype=np.int64), identity)


def test_cluster_mass_against_a_dense_float64_sum():
    """Compared: each cluster's summed activation per feature, through the SAE's own encoder, against
    encoding every token on its own and adding in a float64 loop."""
    rng = np.random.default_rng(0)
    sae = SAE(SAEConfig(architecture="relu", d_in=8, d_sae=12))
    with torch.no_grad():
        sae.W_enc_T.normal_()
        sae.b_enc.normal_()
    acts = rng.standard_normal((300, 8))
    cluster = rng.integers(0, 17, 300)
    cluster[:17] = np.arange(17)  # every cluster holds a token
    mass, n = presence.cluster_mass(sae, _tokens(acts, cluster))
    expected = np.zeros((17, 12))
    with torch.no_grad():
        for row, c in zip(acts, cluster):
            expected[c] += sae.encode(torch.tensor(row[None], dtype=torch.float32))[0].double().numpy()
    np.testing.assert_allclose(mass, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n, np.bincount(cluster, minlength=17))


@pytest.mark.parametrize("paired", [False, True])
def test_ratio_interval_against_a_plain_bootstrap_loop(paired):
    """Compared: the presence ratio (mean activation per token on the other tokens over own) and its
    percentile interval, against a loop over the same multinomial draws in float64 that rebuilds each
    resample cluster by cluster, picks the 2.5% and 97.5% order statistics by hand, and counts a
    resample without own mass as unbounded."""
    rng = np.random.default_rng(3)
    c_own, c_other, d = 9, 9 if paired else 13, 5
    own = (rng.gamma(1.0, 1.0, (c_own, d)) * (rng.random((c_own, d)) > 0.3), rng.integers(3, 9, c_own).astype(float))
    own[0][:, 4] = 0
    own[0][2, 4] = 5.0  # feature 4 lives in one cluster: unbounded in the resamples that miss it
    other = (rng.gamma(1.0, 0.5, (c_other, d)), rng.integers(3, 9, c_other).astype(float))
    got = presence.ratio_interval(own, other, paired, seed=7, n_boot=50)

    draws = np.random.default_rng(7)
    w_own = draws.multinomial(c_own, np.full(c_own, 1 / c_own), size=50)
    w_other = w_own if paired else draws.multinomial(c_other, np.full(c_other, 1 / c_other), size=50)
    for f in range(d):
        ratios = []
        for r in range(50):
            m_own = sum(w_own[r, c] * own[0][c, f] for c in range(c_own)) / sum(
                w_own[r, c] * own[1][c] for c in range(c_own)
            )
            m_other = sum(w_other[r, c] * other[0][c, f] for c in range(c_other)) / sum(
                w_other[r, c] * other[1][c] for c in range(c_other)
            )
            ratios.append(m_other / m_own if m_own > 0 else float("inf"))
        ratios.sort()
        low, high = ratios[int(np.floor(0.025 * 49))], ratios[int(np.ceil(0.975 * 49))]
        point = (other[0][:, f].sum() / other[1].sum()) / (own[0][:, f].sum() / own[1].sum())
        assert got["presence"][f] == pytest.approx(point, rel=1e-12)
        assert got["presence_low"][f] == pytest.approx(low, rel=1e-12)
        assert got["presence_high"][f] == pytest.approx(high, rel=1e-12) or (high == np.inf == got["presence_high"][f])
    assert got["presence_high"][4] == np.inf  # one cluster: never absent


def _world(rng, n_clusters, d_sae, scale_other=None):
    """Per-cluster masses of d_sae features that fire in ~half the clusters, for two independent
    samples of clusters; ``scale_other`` multiplies the other sample's mass per feature."""

    def sample():
        mass = rng.gamma(1.0, 1.0, (n_clusters, d_sae)) * (rng.random((n_clusters, d_sae)) < 0.5)
        return mass, rng.integers(20, 60, n_clusters).astype(float)

    own, other = sample(), sample()
    if scale_other is not None:
        other = (other[0] * scale_other, other[1])
    return own, other


def test_nothing_is_absent_where_nothing_changed_and_a_removed_feature_is():
    """Two independent samples of the same world: no feature's interval lies below 0.25 (at 400
    features); features whose mass the other sample keeps at 5% are all absent, at 50% none."""
    rng = np.random.default_rng(11)
    scale = np.ones(400)
    scale[:20], scale[20:40] = 0.05, 0.5
    own, other = _world(rng, 60, 400, scale)
    frame = presence.ratio_interval(own, other, paired=False, seed=0)
    absent = presence.absent(frame, 0.25)
    assert absent[:20].all()
    assert not absent[20:].any()


def test_paired_tokens_tell_a_small_change_that_unpaired_ones_cannot():
    """The same prompts through two models (paired): a feature that keeps 30% of its mass on every
    prompt is told below 0.5 with its prompts drawn together; drawn apart (as for two samples of
    texts) its interval is wider."""
    rng = np.random.default_rng(2)
    mass = rng.gamma(0.5, 1.0, (40, 3)) * (rng.random((40, 3)) < 0.3)
    n = rng.integers(20, 60, 40).astype(float)
    own, other = (mass, n), (mass * np.array([0.3, 1.0, 1.0]), n)
    paired = presence.ratio_interval(own, other, paired=True, seed=0)
    apart = presence.ratio_interval(own, other, paired=False, seed=0)
    np.testing.assert_allclose(paired["presence_low"], paired["presence_high"], rtol=1e-9)  # exact on every resample
    assert paired["presence"][0] == pytest.approx(0.3)
    assert (apart["presence_high"] - apart["presence_low"]).min() > 0.1


def test_eval_tokens_cluster_by_prompt_and_halves_are_disjoint(tmp_path):
    """The eval split read once: tokens grouped by the samples' prompt (two samples of one prompt
    share a cluster); halves hold disjoint prompts; two reads of one store are the same tokens."""
    from sae_diff.activations import ActivationStore, write_store

    rng = np.random.default_rng(0)
    n = 200
    sample = np.sort(rng.integers(0, 20, n))
    acts = torch.from_numpy(rng.standard_normal((n, 4)).astype(np.float32))
    meta = {
        "sample_idx": torch.from_numpy(sample),
        "position": torch.from_numpy(np.arange(n).astype(np.int32)),
        "token_ids": torch.from_numpy(rng.integers(0, 50, n).astype(np.int32)),
    }
    write_store(tmp_path / "store", acts, shard_tokens=64, meta=meta, split="eval")
    samples = pd.DataFrame({"sample_id": np.arange(20), "prompt": [f"p{i // 2}" for i in range(20)]})
    store = ActivationStore(tmp_path / "store")
    tokens = presence.eval_tokens(store, samples)
    assert tokens.n_clusters == len(np.unique(sample // 2))
    for c in range(tokens.n_clusters):
        assert len(np.unique(tokens.identity[tokens.cluster == c, 0] // 2)) == 1
    torch.testing.assert_close(tokens.acts, acts, rtol=0, atol=0)
    assert tokens.same_as(presence.eval_tokens(store, samples))
    a, b = presence.halves(tokens, seed=1)
    assert not set(a.identity[:, 0] // 2) & set(b.identity[:, 0] // 2)
    assert not a.same_as(b)
    with pytest.raises(ValueError, match=r"sample\(s\) \[18, 19\] have no row"):
        presence.eval_tokens(store, samples[samples["sample_id"] < 18])
