"""The resampling null of the SAE diffs: its store view, prompt splits, interval and calls against
plain references, and the synthetic worlds (planted changes found, nothing found where nothing changed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import diff, nulls, synthetic
from sae_diff.activations import ActivationStore, SampleSubset, write_store


def _store(tmp_path, n=500, d=6, shard_tokens=128, seed=0):
    rng = np.random.default_rng(seed)
    acts = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    sample = torch.from_numpy(np.sort(rng.integers(0, 40, n)))
    write_store(tmp_path / "store", acts, shard_tokens=shard_tokens, meta={"sample_idx": sample})
    return ActivationStore(tmp_path / "store"), acts, sample


def test_sample_subset_keeps_exactly_the_chosen_samples_up_to_the_cap(tmp_path):
    """The view's tokens equal the reference: the rows of the chosen samples in store order, the
    first ``max_tokens`` of them; the manifest's count and every other column follow."""
    store, acts, sample = _store(tmp_path)
    keep = np.arange(0, 40, 3)
    chosen = np.isin(sample.numpy(), keep)
    for cap in (None, 50, int(chosen.sum()) + 10):
        view = SampleSubset(store, keep, max_tokens=cap)
        expected = acts[torch.from_numpy(chosen)][: cap if cap is not None else None]
        got = view.all("train")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert view.n_tokens("train") == len(expected)
        assert set(view.all("train", key="sample_idx").tolist()) <= set(keep.tolist())
        batches = torch.cat(list(view.iter_batches(16, shuffle_buffer=64, seed=1)))
        assert len(batches) == len(expected)  # the shuffled stream reads the view, not the store
    assert store.n_tokens("train") == len(acts)  # the store itself is untouched


def _samples(n_prompts, per_prompt=3, split="train"):
    return pd.DataFrame(
        {
            "sample_id": np.arange(n_prompts * per_prompt),
            "prompt": np.repeat([f"p{i}" for i in range(n_prompts)], per_prompt),
            "split": split,
        }
    )


def test_prompt_splits_are_distinct_halvings_of_whole_prompts():
    samples = _samples(10)
    prompt_of = dict(zip(samples["sample_id"], samples["prompt"]))
    splits = nulls.prompt_splits(samples, "train", 5, seed=3)
    seen = set()
    for a, b in splits:
        pa, pb = {prompt_of[i] for i in a}, {prompt_of[i] for i in b}
        assert not pa & pb and len(pa) == len(pb) == 5  # disjoint, equal halves of the prompts
        assert len(a) == 15 and len(b) == 15  # every sample of a chosen prompt comes along
        key = frozenset((frozenset(pa), frozenset(pb)))
        assert key not in seen
        seen.add(key)
    # four prompts have three halvings: a fourth pair cannot be drawn
    with pytest.raises(ValueError, match="only 3 different prompt halvings"):
        nulls.prompt_splits(_samples(4), "train", 4, seed=0)
    # three prompts: single samples are the units instead; fewer than four samples is an error
    a, b = nulls.prompt_splits(_samples(3), "train", 1, seed=0)[0]
    assert len(a) == len(b) == 4 and not set(a) & set(b)
    with pytest.raises(ValueError, match="needs at least 4"):
        nulls.prompt_splits(_samples(1), "train", 1, seed=0)


def test_prediction_interval_is_the_t_formula_and_covers_new_draws():
    """Against the float64 formula n·x̄ ± t(0.975, N−1)·σ·sqrt(n + n²/N) with σ² = max(s², r(1 − r/n_total)),
    r = (Σx + 1)/N (a Poisson floor without n_total), and by
    simulation: a new draw (or a sum of two) of a spread-out count falls inside it 95% of the time,
    and one of a small Poisson count (where s² often comes out too small) at least 95%."""
    from scipy import stats

    rng = np.random.default_rng(0)
    for draws, n_total in (
        (rng.normal(40, 9, 7), None),
        (np.array([1.0, 0, 2, 1, 1, 0, 1]), None),
        (rng.normal(80, 1, 7), 96),
    ):
        for n_terms in (1, 2, 3):
            mean, low, high = nulls.prediction_interval(draws, n_terms, n_total=n_total)
            rate = (draws.sum() + 1) / len(draws)
            sigma = np.sqrt(max(draws.var(ddof=1), rate * (1 - rate / (n_total or np.inf))))
            half = stats.t.ppf(0.975, 6) * sigma * np.sqrt(n_terms + n_terms**2 / 7)
            assert mean == pytest.approx(n_terms * draws.mean())
            assert (low, high) == pytest.approx((max(0, n_terms * draws.mean() - half), n_terms * draws.mean() + half))
    for n_terms in (1, 2):
        hits = poisson_hits = 0
        for _ in range(4000):
            null, new = rng.normal(200, 40, 5), rng.normal(200, 40, n_terms).sum()  # variance 1600 >> mean 200
            _, low, high = nulls.prediction_interval(null, n_terms)
            hits += low <= new <= high
            null, new = rng.poisson(2, 5), rng.poisson(2, n_terms).sum()
            _, low, high = nulls.prediction_interval(null, n_terms)
            poisson_hits += new <= high  # the side a 'changed' count is called on
        assert abs(hits / 4000 - 0.95) < 0.012
        assert poisson_hits / 4000 >= 0.95


def test_five_zero_draws_do_not_make_one_feature_a_finding():
    """All five null pairs count 0 born: one born feature is inside the interval (the add-one floor)."""
    pairs = [{"same": 90, "changed": 3, "died": 2, "born": 0} for _ in range(5)]
    assert not nulls.versus({"same": 90, "changed": 3, "died": 2, "born": 1}, pairs)["born"]["called"]


def test_versus_calls_only_on_the_side_of_change():
    pairs = [{"same": s, "changed": c, "died": 5, "born": 5} for s, c in [(80, 4), (82, 5), (78, 6), (81, 5), (79, 5)]]
    quiet = nulls.versus({"same": 120, "changed": 0, "died": 5, "born": 5}, pairs)
    assert quiet["same"]["outside"] and not quiet["same"]["called"]  # more same than the null: no change claimed
    loud = nulls.versus({"same": 40, "changed": 20, "died": 5, "born": 5}, pairs)
    assert loud["same"]["called"] and loud["changed"]["called"]
    assert loud["changed"]["excess"] == pytest.approx(20 - 5)
    assert not loud["died"]["called"]


def test_null_counts_label_each_pair_with_thresholds_from_the_others():
    """Pair k's counts equal diff.step_labels with diff.calibrate on the other pairs' cosines pooled
    (leave one out: the thresholds never see the pair they label), a feature alive where it fires on
    either half of the eval split, absent where its presence interval lies below absent_below."""
    rng = np.random.default_rng(1)

    def frame():
        own = rng.poisson(4, 30) * (rng.random(30) > 0.1) * 0.1
        high = rng.uniform(0, 1, 30)
        return pd.DataFrame(
            {
                "presence": high / 2,
                "presence_low": high / 4,
                "presence_high": high,
                "own_mass": own,
                "other_mass": rng.poisson(4, 30) * (rng.random(30) > 0.1) * 0.1,
            }
        )

    pairs = []
    for _ in range(4):
        table = pd.DataFrame(
            {
                "feature": np.arange(30),
                "match": rng.permutation(30),
                "dec_cos_match": np.clip(rng.normal(0.8, 0.15, 30), -1, 1),
                "enc_norm": 1.0,
                "enc_norm_match": rng.uniform(0.05, 1.0, 30),
            }
        )
        pairs.append((table, frame(), frame()))
    block = {"same_quantile": 0.2, "new_quantile": 0.05, "norm_collapse": 0.1, "absent_below": 0.3}
    counts = nulls.null_counts(pairs, block)
    for k, (table, on_b, on_a) in enumerate(pairs):
        others = np.concatenate([t["dec_cos_match"].to_numpy() for j, (t, _, _) in enumerate(pairs) if j != k])
        thresholds = diff.calibrate(others, 0.2, 0.05)
        alive_a = (on_b["own_mass"] + on_b["other_mass"]).to_numpy() > 0
        alive_b = (on_a["own_mass"] + on_a["other_mass"]).to_numpy() > 0
        absent_a = (on_b["presence_high"].to_numpy() < 0.3) & (on_b["own_mass"].to_numpy() > 0)
        absent_b = (on_a["presence_high"].to_numpy() < 0.3) & (on_a["own_mass"].to_numpy() > 0)
        labelled, born = diff.step_labels(table, thresholds, alive_a, alive_b, absent_a, absent_b, 0.1)
        expected = diff.count_labels(labelled, born)
        for key in nulls.COUNT_KEYS:
            assert counts[k][key] == expected.get(key, 0), (k, key)
        assert expected.get("died", 0) > 0 and expected["born"] > 0  # the case exercises both


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Five seed replicates of the synthetic worlds at CI size, six features each rotated, removed and
    added of 48 (bench/planted.py runs the full size and 2, 4 and 8 of each)."""
    out = []
    for seed in range(5):
        world = synthetic.World(
            seed=seed, tokens=4096, eval_tokens=1024, epochs=3, prompts=24, n_rotated=6, n_removed=6, n_added=6
        )
        out.append(synthetic.run(world, tmp_path_factory.mktemp(f"world{seed}")))
    return out


def test_no_change_and_placebo_stay_inside_the_null(worlds):
    """A disjoint sample of the same world, and one with isotropic noise of the planted change's norm:
    the counts of every label are called (outside the null on the side of change) at most at the
    nominal 5% rate over 5 replicates x 4 labels x 2 worlds."""
    calls = [
        (i, name, label)
        for i, run in enumerate(worlds)
        for name in ("no_change", "placebo")
        for label, r in run["worlds"][name]["counts"].items()
        if r["called"]
    ]
    assert len(calls) <= 2, calls


def test_planted_changes_are_found_and_untouched_features_are_not(worlds):
    """Features rotated, removed and added: every replicate's step is called (more changed, or fewer
    same, than the null); A's latents
    tied to a touched feature are told from the rest by their matched cosine (AUROC ≥ 0.9, pooled);
    untouched latents are labelled 'changed' at most at twice the nominal rate (pooled)."""
    planted = [run["worlds"]["planted"] for run in worlds]
    assert all(any(r["called"] for r in p["counts"].values()) for p in planted)
    assert np.nanmean([p["auroc"] for p in planted]) >= 0.9
    untouched = sum(p["n_untouched_latents"] for p in planted)
    changed = sum(p["untouched_changed"] for p in planted)
    assert changed / untouched <= 2 * planted[0]["nominal_rate"], (changed, untouched)


def test_removed_features_die_by_the_presence_test_and_untouched_ones_do_not(worlds):
    """The presence test on the planted world: 'died' and 'born' are called (above the null) in at
    least 4 of 5 replicates; at least half of A's latents tied to a removed feature are labelled
    died (they keep some mass on B's tokens through their encoder's interference with the other
    features: 48 features in 24 dimensions); no latent tied to an untouched feature is."""
    planted = [run["worlds"]["planted"] for run in worlds]
    assert sum(p["counts"]["died"]["called"] for p in planted) >= 4
    assert sum(p["counts"]["born"]["called"] for p in planted) >= 4
    removed = sum(p["n_removed_latents"] for p in planted)
    assert sum(p["removed_died"] for p in planted) >= 0.5 * removed, removed
    assert sum(p["untouched_died"] for p in planted) == 0


def test_tokens_per_sample_against_the_views_own_counts(tmp_path):
    """Compared: the per-sample token counts train_pairs caps the halves with (one read of the
    split) against SampleSubset's own count of each half, and a plain bincount of the store."""
    store, _, sample = _store(tmp_path)
    counts = nulls._tokens_per_sample(store)
    np.testing.assert_array_equal([counts.get(i, 0) for i in range(40)], np.bincount(sample.numpy(), minlength=40)[:40])
    for half in (np.arange(0, 40, 2), np.arange(1, 40, 5)):
        assert sum(counts.get(int(i), 0) for i in half) == SampleSubset(store, half).n_tokens("train")
