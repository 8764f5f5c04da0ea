"""The diff-SAE latents behind a metric: Spearman ρ and its prompt-block permutation p-values against
scipy and a plain loop; a planted latent is chosen on train and called on eval, and with nothing
planted the calls stay at the nominal rate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from sae_diff import features, metric_latents, probes
from sae_diff.stats import spearman_columns


def test_spearman_columns_equal_scipy_with_ties():
    """Every column's ρ against scipy.stats.spearmanr (average ranks), with tied values and a constant column."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    x[:, 2] = np.round(x[:, 2])  # ties
    x[:, 5] = 1.0  # constant: ρ = 0 here (scipy: nan)
    v = np.round(rng.normal(size=40), 1)
    rho = spearman_columns(x, v)
    for j in range(5):
        assert rho[j] == pytest.approx(spearmanr(x[:, j], v).statistic, abs=1e-12)
    assert rho[5] == 0.0


def test_block_permutation_moves_whole_groups_of_one_size():
    """Each group's samples land, in order, on the places of one group of the same size; a size no
    other group has stays put; the result is a permutation."""
    groups = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 4 + ["d"] * 4 + ["e"] * 2)
    rng = np.random.default_rng(3)
    moved = 0
    for _ in range(20):
        perm = metric_latents.block_permutation(groups, rng)
        moved += not np.array_equal(perm, np.arange(len(groups)))
        assert sorted(perm) == list(range(len(groups)))
        for g in np.unique(groups):
            source = groups[perm[groups == g]]
            assert len(set(source)) == 1 and (source == g).sum() in (0, len(source))
            assert (groups == source[0]).sum() == (groups == g).sum()
        assert (perm[groups == "b"] == np.flatnonzero(groups == "b")).all()
        assert (perm[groups == "e"] == np.flatnonzero(groups == "e")).all()
    assert moved >= 15  # 3 groups of size 4: 5 of 6 arrangements move something
    # 3! arrangements of the size-4 groups, the others fixed
    assert 10 ** metric_latents.log10_arrangements(groups) == pytest.approx(6)


def test_permutation_pvalues_equal_a_plain_loop():
    """p = (1 + #{|ρ_null| ≥ |ρ|}) / (1 + n), each null ρ from scipy on the block-permuted metric,
    the permutations drawn in the same order from the same seed."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(14), [4] * 8 + [3] * 5 + [2])  # unequal sizes, one group alone in its size
    x = rng.normal(size=(len(groups), 3))
    v = x[:, 0] + rng.normal(size=len(groups))
    rho, p = metric_latents.permutation_pvalues(x, v, groups, n_permutations=300, seed=7)
    draws = np.random.default_rng(7)
    perms = [metric_latents.block_permutation(groups, draws) for _ in range(300)]
    assert all((perm[groups == 13] == np.flatnonzero(groups == 13)).all() for perm in perms)
    for j in range(3):
        observed = spearmanr(x[:, j], v).statistic
        null = np.array([spearmanr(x[:, j], v[perm]).statistic for perm in perms])
        assert rho[j] == pytest.approx(observed, abs=1e-12)
        assert p[j] == pytest.approx((1 + (np.abs(null) >= abs(observed) - 1e-12).sum()) / 301)


def _world(seed: int, planted: bool, n_prompts: int = 60, per_prompt: int = 4, width: int = 200):
    """Pooled latents of ``n_prompts`` prompts x ``per_prompt`` samples; a prompt effect shared by
    its samples in every latent and the metric (so samples of one prompt are not independent); with
    ``planted``, latent 17 also carries the metric's own variation."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_prompts), per_prompt)
    values = rng.normal(size=n_prompts)[groups] + rng.normal(size=len(groups))
    x = rng.normal(size=(n_prompts, width))[groups] + rng.normal(size=(len(groups), width))
    if planted:
        x[:, 17] += 1.5 * values
    held_out = np.isin(groups, rng.permutation(n_prompts)[: n_prompts // 4])
    return x, values, ~held_out, held_out, groups


def test_a_planted_latent_is_chosen_on_train_and_called_on_eval():
    """The latent that carries the metric ranks first on train and is called on eval in every replicate."""
    for seed in range(5):
        x, values, train, held_out, groups = _world(seed, planted=True)
        found = metric_latents.associate(x, values, train, held_out, groups, 5, 500, 0.05, seed)
        assert found["latents"][0]["latent"] == 17 and found["latents"][0]["called"]
        assert found["n_train"] == train.sum() and found["n_eval"] == held_out.sum()


def test_nothing_planted_calls_at_the_nominal_rate():
    """With no latent tied to the metric (prompt effects in both, the clustering the block permutation
    keeps), the best-of-200 latents chosen on train are called on eval in at most a few of 20 replicates
    (BH at 0.05 over 5 latents: ≤ 5% of replicates expected)."""
    calls = []
    for seed in range(20):
        x, values, train, held_out, groups = _world(100 + seed, planted=False)
        calls.append(metric_latents.associate(x, values, train, held_out, groups, 5, 500, 0.05, seed)["n_called"])
    assert sum(c > 0 for c in calls) <= 3, calls


def test_missing_metric_values_are_dropped_and_too_few_skip():
    x, values, train, held_out, groups = _world(0, planted=True)
    values[:8] = np.nan
    found = metric_latents.associate(x, values, train, held_out, groups, 5, 200, 0.05, 0)
    assert found["n_train"] + found["n_eval"] == np.isfinite(values).sum()
    few = metric_latents.associate(x, values, train, held_out & (np.arange(len(values)) < 11), groups, 5, 200, 0.05, 0)
    assert few["latents"] == [] and "skipped" in few and few["n_called"] == 0


def test_too_few_eval_prompts_to_reach_the_fdr_is_skipped_not_silent():
    """Two eval prompts allow 2 arrangements: no p below 0.5, so nothing could ever be called; the
    result says so instead of reporting 0 called."""
    x, values, train, _, groups = _world(0, planted=True)
    held_out = np.isin(groups, [0, 1])
    found = metric_latents.associate(x, values, train & ~held_out, held_out, groups, 5, 200, 0.05, 0)
    assert "too few eval prompts" in found["skipped"] and found["latents"] == []
    assert 10 ** found["log10_arrangements"] == pytest.approx(2)


def test_direction_sums_the_called_latents_signed_and_weighted(tmp_path):
    """direction = s · Σ_called sign(ρ_eval) · mean_act · W_dec row, against a plain float64 sum over
    the hand-picked rows; latents chosen but not called are left out; down flips it; a metric without
    a call gives zeros, one never associated None."""
    import json

    import torch

    from sae_diff.sae import files
    from sae_diff.sae.model import SAE, SAEConfig

    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=12, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))
    files.save(sae, tmp_path / "sae")
    mean_act = np.linspace(0.5, 2.0, 12)
    (tmp_path / "features").mkdir()
    pd.DataFrame({"feature": np.arange(12), "mean_act": mean_act}).to_parquet(tmp_path / "features/stats.parquet")
    rows = [
        {"latent": 3, "rho_eval": 0.6, "called": True},
        {"latent": 9, "rho_eval": -0.5, "called": True},
        {"latent": 1, "rho_eval": 0.7, "called": False},
    ]
    record = {"metrics": {"m": {"latents": rows}, "quiet": {"latents": [rows[2]]}}}
    (tmp_path / "metric_latents.json").write_text(json.dumps(record))
    w = files.load(tmp_path / "sae").W_dec.detach().double().numpy()
    expected = mean_act[3] * w[3] - mean_act[9] * w[9]
    np.testing.assert_allclose(metric_latents.direction(tmp_path, "m"), expected, rtol=1e-12)
    np.testing.assert_allclose(metric_latents.direction(tmp_path, "m", "down"), -expected, rtol=1e-12)
    assert not metric_latents.direction(tmp_path, "quiet").any()
    assert metric_latents.direction(tmp_path, "other") is None


def test_write_reads_only_the_kept_samples_and_finds_the_planted_latent(tmp_path):
    """write() on a diff-SAE folder: the metric's ``where`` keeps one language, samples outside the
    table given (the prompt split's) and samples with no pooled token are left out, the planted
    latent is called, and the random directions are pooled from the same store the same way."""
    import json

    import torch
    from safetensors.numpy import save_file

    from sae_diff.activations import ActivationStore, write_store
    from sae_diff.paired import DifferenceStore

    n_prompts, per_prompt, tokens, width = 48, 4, 6, 20
    n = n_prompts * per_prompt
    rng = np.random.default_rng(0)
    prompt = np.repeat(np.arange(n_prompts), per_prompt)
    values = rng.normal(size=n_prompts)[prompt] + rng.normal(size=n)
    samples = pd.DataFrame(
        {
            "sample_id": np.arange(n),
            "prompt_id": prompt,
            "split": np.where(prompt % 4 == 0, "eval", "train"),
            "language": np.where(prompt % 3 == 0, "fr", "en"),
            "m": values,
        }
    )
    pooled_x = rng.normal(size=(n, width))
    pooled_x[:, 3] += 2.0 * values
    counts = np.full(n, tokens - 2, dtype=np.int64)
    counts[:4] = 0  # the first prompt's samples: nothing to pool
    folder = tmp_path / "diff_sae"
    (folder / "features").mkdir(parents=True)
    save_file(
        {"sample_id": np.arange(n), "mean": pooled_x.astype(np.float32), "n_completion_tokens": counts},
        str(folder / "features" / "pooled.safetensors"),
    )
    meta = {
        "sample_idx": torch.as_tensor(np.repeat(np.arange(n), tokens)),
        "position": torch.as_tensor(np.tile(np.arange(tokens), n), dtype=torch.int32),
        "in_prompt": torch.as_tensor(np.tile(np.arange(tokens) < 2, n)),
    }
    base = torch.randn(n * tokens, 8, generator=torch.Generator().manual_seed(1))
    stores = [
        ActivationStore(write_store(tmp_path / name, acts, meta=meta, shard_tokens=256))
        for name, acts in (("m0", base), ("m1", base + 0.3 * torch.randn_like(base)))
    ]
    readable = samples[samples["prompt_id"] != 5]  # a prompt the prompt split keeps out
    opts = {"pooling": "mean", "top": 3, "n_permutations": 300, "fdr": 0.05, "seed": 0, "random_draws": 4}
    where = {"m": {"language": ["en"]}}
    store = DifferenceStore(*stores)
    out = metric_latents.write(folder, store, readable, where, opts, tmp_path / "o.json")
    found = out["metrics"]["m"]
    kept = (samples["language"] == "en") & (samples["prompt_id"] != 5) & (counts > 0)
    assert found["n_train"] == (kept & (samples["split"] == "train")).sum()
    assert found["n_eval"] == (kept & (samples["split"] == "eval")).sum()
    assert out["n_without_tokens"] == 4 and out["width"] == width and out["random_draws"] == 4
    assert found["latents"][0]["latent"] == 3 and found["latents"][0]["called"]
    # the null: draw d is as many random directions of seed + d, pooled over the same kept rows
    # and chosen / reported as the latents are (recomputed here draw by draw from the store)
    null = found["random_directions"]
    assert null["draws"] == 4 and len(null["abs_rho_eval"]) == 3
    rows = np.flatnonzero(np.isin(np.arange(n), readable["sample_id"]) & (counts > 0))
    table = samples.iloc[rows].reset_index(drop=True)
    keep = (table["language"] == "en").to_numpy()
    expected = []
    for d in range(4):
        encoder = {"r": probes.random_directions(store, width, d)}
        pooled = features.pool_tokens(store, np.arange(n), "mean", encoder)["r"][rows].astype(np.float64)
        expected.append(metric_latents.associate(
            pooled, table["m"].to_numpy(), keep & (table["split"] == "train").to_numpy(),
            keep & (table["split"] == "eval").to_numpy(), table["prompt_id"].astype(str).to_numpy(), 3, 300, 0.05, 0,
        )["n_called"])  # fmt: skip
    assert null["n_called"] == expected
    assert null["p"] == (1 + sum(c >= found["n_called"] for c in expected)) / 5
    assert json.loads((tmp_path / "o.json").read_text()) == out


def test_random_null_counts_rank_p_and_median_rho_against_plain_loops():
    """random_null over hand-made draws: the counts per draw, the rank p of the observed count
    ((1 + draws calling at least as many) / (1 + draws), by a plain loop) and per rank the median
    |ρ| (numpy's median of the plain per-draw lists); a skipped metric (no latents) gives no ρ."""
    rng = np.random.default_rng(3)
    draws = []
    for _ in range(9):
        rhos = rng.uniform(-0.6, 0.6, size=4)
        draws.append({"n_called": int(rng.integers(0, 3)), "latents": [{"rho_eval": r} for r in rhos]})
    for observed in (0, 1, 2, 3):
        null = metric_latents.random_null(draws, observed)
        at_least = 0
        for draw in draws:
            at_least += draw["n_called"] >= observed
        assert null["p"] == pytest.approx((1 + at_least) / 10)
        assert null["n_called"] == [draw["n_called"] for draw in draws] and null["draws"] == 9
    per_rank = [[abs(draw["latents"][i]["rho_eval"]) for draw in draws] for i in range(4)]
    assert null["abs_rho_eval"] == pytest.approx([sorted(v)[4] for v in per_rank])  # the 5th of 9
    skipped = metric_latents.random_null([{"n_called": 0, "latents": []}] * 3, 0)
    assert skipped == {"draws": 3, "n_called": [0, 0, 0], "p": 1.0, "abs_rho_eval": []}
