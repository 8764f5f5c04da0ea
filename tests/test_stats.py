"""Paired statistics against plain references: exact sign-flip enumeration, a float64 loop, and
simulated nulls."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sae_diff.stats import bootstrap_shift, paired_shift


def test_paired_shift_against_exact_sign_flip_enumeration():
    """Compared: the mean difference against a float64 loop, and the Monte Carlo sign-flip p
    against the exact p over all 2^12 sign patterns (within Monte Carlo error)."""
    rng = np.random.default_rng(0)
    before = rng.normal(0.5, 0.3, 12)
    after = before + rng.normal(0.15, 0.2, 12)
    out = paired_shift(before, after, n_boot=20000, seed=1)
    d = [float(a) - float(b) for a, b in zip(after, before)]
    observed = sum(d) / len(d)
    exact = np.mean(
        [
            abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= abs(observed) - 1e-12
            for signs in itertools.product((-1, 1), repeat=len(d))
        ]
    )
    assert out["diff"] == pytest.approx(observed, abs=1e-12)
    assert out["p"] == pytest.approx(exact, abs=0.01)
    assert out["ci_low"] < observed < out["ci_high"] and out["paired"] and out["n_pairs"] == 12


def test_undefined_pairs_drop_out_and_their_rate_is_reported():
    """A prompt undefined on either side leaves the difference; the undefined shares are counted."""
    before = np.array([0.0, 1.0, np.nan, 0.5, 0.5])
    after = np.array([0.5, np.nan, np.nan, 1.0, 0.0])
    out = paired_shift(before, after, n_boot=500)
    assert out["n_pairs"] == 3 and out["n_units"] == 5
    assert out["diff"] == pytest.approx((0.5 + 0.5 - 0.5) / 3)
    assert out["undefined_before"] == pytest.approx(0.2) and out["undefined_after"] == pytest.approx(0.4)
    assert out["undefined_change"] == pytest.approx(0.2)
    empty = paired_shift(np.array([np.nan]), np.array([1.0]))
    assert empty["diff"] is None and empty["n_pairs"] == 0 and empty["undefined_change"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one length"):
        paired_shift(np.zeros(3), np.zeros(4))


def test_pairing_finds_a_small_consistent_shift_that_unpaired_statistics_miss():
    """Constructed: prompts differ a lot among themselves, the edit moves each by +0.05."""
    rng = np.random.default_rng(2)
    before = rng.normal(0.0, 1.0, 30)
    after = before + 0.05 + rng.normal(0, 0.01, 30)
    assert paired_shift(before, after, seed=0)["p"] < 0.001
    assert bootstrap_shift(before, after, seed=0)["p"] > 0.5


def test_paired_shift_rejects_at_most_the_nominal_rate_under_the_null():
    """Placebo: 300 simulated nulls (after = before + symmetric noise); rejections at p < 0.05
    stay at the nominal 5% (binomial upper bound), and a planted +0.5 shift is found every time."""
    rng = np.random.default_rng(3)
    null_p, planted_p = [], []
    for i in range(300):
        before = rng.normal(0, 1, 20)
        noise = rng.standard_t(3, 20) * 0.3
        null_p.append(paired_shift(before, before + noise, n_boot=400, seed=i)["p"])
        planted_p.append(paired_shift(before, before + noise + 0.5, n_boot=400, seed=i)["p"])
    assert np.mean(np.array(null_p) < 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 300)
    assert np.mean(np.array(planted_p) < 0.05) > 0.95


def test_cluster_statistics_against_references():
    """Compared: the cluster mean against the plain mean of the defined values; its CI width,
    with equal clusters, against the normal interval of the cluster means (1.96 sd / sqrt(C));
    the paired cluster shift against the difference of the shared clusters' means by hand, and
    its permutation p against the exact p over all 2^C swaps of which side a cluster's samples
    are on."""
    import itertools

    from sae_diff.stats import cluster_mean, paired_cluster_shift

    rng = np.random.default_rng(4)
    n_clusters, per = 40, 4
    clusters = np.repeat(np.arange(n_clusters), per)
    values = np.repeat(rng.normal(0, 1.0, n_clusters), per) + rng.normal(0, 0.3, n_clusters * per)
    out = cluster_mean(np.append(values, np.nan), np.append(clusters, 99), n_boot=8000, seed=0)
    assert out["mean"] == pytest.approx(values.mean(), rel=1e-12) and out["n_clusters"] == n_clusters
    means = values.reshape(n_clusters, per).mean(1)
    half = 1.96 * means.std(ddof=1) / np.sqrt(n_clusters)
    assert out["ci_high"] - out["ci_low"] == pytest.approx(2 * half, rel=0.12)
    c = 8
    before = rng.normal(0, 1, (c, 3))
    after = before + 0.4 + rng.normal(0, 0.5, (c, 3))
    ids = np.repeat(np.arange(c), 3)
    extra_ids = np.append(ids, 50)  # a cluster only the after side has drops out
    got = paired_cluster_shift(before.ravel(), ids, np.append(after.ravel(), 9.0), extra_ids, n_boot=20000, seed=1)
    assert got["diff"] == pytest.approx(after.mean() - before.mean(), rel=1e-12) and got["n_clusters"] == c
    observed = after.mean() - before.mean()
    exact = []
    for swap in itertools.product([False, True], repeat=c):
        s = np.array(swap)[:, None]
        exact.append(np.where(s, before, after).mean() - np.where(s, after, before).mean())
    p_exact = np.mean(np.abs(exact) >= abs(observed) - 1e-12)
    assert got["p"] == pytest.approx(p_exact, abs=0.01)


def test_paired_cluster_shift_holds_its_level_under_the_null():
    """200 simulated pairs of data sets from one model: 30 prompts x 4 samples, a strong
    prompt effect shared by both sides. The paired cluster test (a prompt's samples swapped
    together) rejects at most the nominal 5%, within binomial noise."""
    from sae_diff.stats import paired_cluster_shift

    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(200):
        prompt = np.repeat(rng.normal(0, 1.0, 30), 4)
        ids = np.repeat(np.arange(30), 4)
        a = prompt + rng.normal(0, 0.5, 120)
        b = prompt + rng.normal(0, 0.5, 120)
        rejections += paired_cluster_shift(a, ids, b, ids, n_boot=500, seed=1)["p"] <= 0.05
    assert rejections / 200 <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 200)
