"""Feature statistics against a dense reference: every token encoded at once in float64 and
each statistic computed by its textbook definition with numpy, feature by feature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import features
from sae_diff.activations import ActivationStore, write_store
from sae_diff.sae.model import SAE, SAEConfig


def _sae(d_in=12, d_sae=40, k=3, seed=0):
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k))
    sae.initialize(torch.randn(256, d_in, generator=torch.Generator().manual_seed(seed)), seed=seed)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(d_sae, generator=torch.Generator().manual_seed(seed + 1)) * 0.3)
    return sae.eval()


def _store(tmp_path, d_in=12, n_samples=30, seed=0):
    """Samples of 6-14 tokens at positions 1.., the first 4 tokens of each the prompt."""
    rng = np.random.default_rng(seed)
    meta = {"sample_idx": [], "position": [], "in_prompt": [], "token_ids": []}
    for s in range(n_samples):
        length = int(rng.integers(6, 15))
        meta["sample_idx"] += [100 + s] * length
        meta["position"] += list(range(1, length + 1))
        meta["in_prompt"] += [p <= 4 for p in range(1, length + 1)]
        meta["token_ids"] += list(rng.integers(0, 50, size=length))
    acts = torch.from_numpy(rng.normal(size=(len(meta["position"]), d_in))).float()
    meta = {k: np.asarray(v) for k, v in meta.items()}
    store = write_store(tmp_path / "store", acts, split="eval", shard_tokens=50, meta=meta)
    return ActivationStore(store), acts, meta


def test_firing_statistics_match_dense_reference(tmp_path):
    sae = _sae()
    store, acts, meta = _store(tmp_path)
    sample_ids = np.arange(100, 130)
    result = features.run(sae, store, sample_ids, batch_size=17, n_examples=3, progress=False)
    with torch.no_grad():
        dense = sae.encode(acts).double().numpy()  # [tokens, d_sae]
    samples, positions, in_prompt = meta["sample_idx"], meta["position"], meta["in_prompt"]
    first = {s: positions[samples == s].min() for s in np.unique(samples)}
    last = {s: positions[samples == s].max() for s in np.unique(samples)}
    rel = np.array([(p - first[s]) / (last[s] - first[s]) for s, p in zip(samples, positions)])
    stats = result.stats.set_index("feature")
    for j in range(dense.shape[1]):
        on = dense[:, j] > 0
        row = stats.loc[j]
        assert row["fire_count"] == on.sum()
        assert row["freq"] == pytest.approx(on.mean())
        assert row["seq_freq"] == pytest.approx(len(np.unique(samples[on])) / 30)
        assert bool(row["dead"]) == (not on.any())
        if not on.any():
            assert np.isnan(row["mean_act"])
            continue
        values = np.sort(dense[on, j])
        assert row["mean_act"] == pytest.approx(values.mean(), rel=1e-5)
        assert row["max_act"] == pytest.approx(values.max(), rel=1e-5)
        for q in (0.5, 0.9, 0.99):
            assert row[f"act_q{int(q * 100)}"] == pytest.approx(np.quantile(values, q, method="lower"), rel=1e-5)
        assert row["mean_position"] == pytest.approx(positions[on].mean())
        assert row["position_q50"] == np.quantile(positions[on], 0.5, method="lower")
        assert row["mean_rel_position"] == pytest.approx(rel[on].mean())
        assert row["prompt_fires"] == (on & in_prompt).sum()
        assert bool(row["prompt_only"]) == bool((on & in_prompt).sum() == on.sum())
        assert bool(row["completion_only"]) == bool((on & in_prompt).sum() == 0)
        # top examples: the highest activations, in order, the token marked in its context
        top = result.examples[j]
        assert [e["activation"] for e in top] == pytest.approx(sorted(dense[on, j], reverse=True)[:3], rel=1e-5)
        assert all(features.MARK[0] in e["context"] for e in top)


def test_token_examples_match_the_dense_encoding(tmp_path):
    """The dashboard's per-token view against the dense encoding of every eval token: each
    example's window holds the context's tokens and exactly the feature's activation on each
    (0 where it did not fire); the histogram counts every firing; interval examples fall in
    their interval; the top examples are the largest activations."""
    sae = _sae()
    store, acts, meta = _store(tmp_path)
    result = features.run(
        sae, store, np.arange(100, 130), batch_size=17, n_examples=3, context_window=2, progress=False
    )
    with torch.no_grad():
        dense = sae.encode(acts).double().numpy()
    samples, positions, tokens = meta["sample_idx"], meta["position"], meta["token_ids"]
    assert set(result.token_examples) == set(np.flatnonzero((dense > 0).any(0)).tolist())
    for j, view in result.token_examples.items():
        on = dense[:, j] > 0
        assert sum(view["histogram"]["counts"]) == on.sum()
        assert view["histogram"]["edges"][-1] == pytest.approx(dense[on, j].max(), rel=1e-4)
        assert [e["activation"] for e in view["top"]] == pytest.approx(sorted(dense[on, j], reverse=True)[:3], rel=1e-3)
        top = dense[on, j].max()
        for i, interval in enumerate(view["intervals"]):
            assert len(interval["examples"]) == min(features.PER_INTERVAL, interval["n"])
            low, high = i * top / features.INTERVALS, (i + 1) * top / features.INTERVALS
            for example in interval["examples"]:
                assert low - 1e-4 <= example["activation"] <= high + 1e-4
        for example in view["top"] + [e for interval in view["intervals"] for e in interval["examples"]]:
            rows = np.flatnonzero((samples == example["sample_id"]) & (np.abs(positions - example["position"]) <= 2))
            assert example["tokens"] == [f"[{t}]" for t in tokens[rows]]
            assert example["acts"] == pytest.approx(dense[rows, j], abs=1e-3)
            assert positions[rows][example["at"]] == example["position"]
    # the stage's files give the same views back (float32 activations)
    features.write_token_examples(tmp_path, result.token_examples)
    back = features.read_token_examples(tmp_path)
    assert set(back) == {str(j) for j in result.token_examples}
    for j, view in result.token_examples.items():
        got = back[str(j)]
        assert got["histogram"]["counts"] == view["histogram"]["counts"]
        assert got["histogram"]["edges"] == pytest.approx(view["histogram"]["edges"], rel=1e-6)
        for ours, theirs in zip(got["top"] + got["intervals"], view["top"] + view["intervals"]):
            ours = ours["examples"] if "examples" in ours else [ours]
            theirs = theirs["examples"] if "examples" in theirs else [theirs]
            assert [e["tokens"] for e in ours] == [e["tokens"] for e in theirs]
            assert [e["acts"] for e in ours] == [pytest.approx(e["acts"], rel=1e-6) for e in theirs]
    one = next(iter(result.token_examples))
    assert set(features.read_token_examples(tmp_path, [one])) == {str(one)}


def test_pooled_activations_over_completion_tokens(tmp_path):
    sae = _sae()
    store, acts, meta = _store(tmp_path)
    result = features.run(sae, store, np.arange(100, 130), progress=False)
    with torch.no_grad():
        dense = sae.encode(acts).double().numpy()
    for row, s in enumerate(range(100, 130)):
        tokens = meta["sample_idx"] == s
        completion = tokens & ~meta["in_prompt"]
        assert result.pooled["max"][row].numpy() == pytest.approx(dense[completion].max(0), rel=1e-5, abs=1e-6)
        assert result.pooled["mean"][row].numpy() == pytest.approx(dense[completion].mean(0), rel=1e-5, abs=1e-6)
        assert float(result.pooled["l0_sum"][row]) == (dense[tokens] > 0).sum()
        assert float(result.pooled["n_tokens"][row]) == tokens.sum()


def test_unknown_sample_is_named(tmp_path):
    store, _, _ = _store(tmp_path)
    with pytest.raises(ValueError, match="sample 100 is not in the cell's sample table"):
        features.run(_sae(), store, np.arange(200, 230), progress=False)


def test_logit_lens_against_dense_product(tiny_model_dir):
    from sae_diff import models

    model, tokenizer = models.load(tiny_model_dir)
    d = model.config.hidden_size
    sae = _sae(d_in=d, d_sae=24)
    table = features.logit_lens(sae, model, tokenizer, k=5, chunk=7)
    gamma = models.final_norm(model).weight.detach().double()
    unembed = model.get_output_embeddings().weight.detach().double()
    logits = (sae.W_dec.detach().double() * gamma) @ unembed.T
    for j in range(24):
        expected = torch.argsort(logits[j], descending=True)[:5]
        assert table.loc[j, "promoted"] == [tokenizer.decode([int(i)]) for i in expected]
        assert table.loc[j, "promoted_logit"] == pytest.approx(logits[j, expected].tolist(), rel=1e-4)
        assert table.loc[j, "suppressed_logit"][0] == pytest.approx(float(logits[j].min()), rel=1e-4)


def test_weight_columns(tmp_path):
    sae = _sae()
    cols = features.weight_columns(sae)
    assert cols["enc_norm"].to_numpy() == pytest.approx(np.linalg.norm(sae.W_enc_T.detach().double().numpy(), axis=1))
    assert isinstance(cols, pd.DataFrame) and len(cols) == sae.cfg.d_sae


def _store_from_zero(tmp_path, d_in=12, n_samples=12, seed=3):
    """Like _store, but the store kept position 0 (a prompt token), and one sample has no
    prompt token after position 0, one no completion token: they pool to zeros."""
    rng = np.random.default_rng(seed)
    meta = {"sample_idx": [], "position": [], "in_prompt": [], "token_ids": []}
    for s in range(n_samples):
        length = int(rng.integers(5, 10))
        n_prompt = {0: 1, 1: length}.get(s, 3)  # sample 0: prompt = position 0 only; sample 1: prompt only
        meta["sample_idx"] += [100 + s] * length
        meta["position"] += list(range(length))
        meta["in_prompt"] += [p < n_prompt for p in range(length)]
        meta["token_ids"] += list(rng.integers(0, 50, size=length))
    acts = torch.from_numpy(rng.normal(size=(len(meta["position"]), d_in))).float()
    acts[np.asarray(meta["position"]) == 0] += 50.0  # a loud first position: excluding it matters
    meta = {k: np.asarray(v) for k, v in meta.items()}
    store = write_store(tmp_path / "store0", acts, split="eval", shard_tokens=13, meta=meta)
    return ActivationStore(store), acts, meta


def test_poolings_match_numpy_reference(tmp_path):
    """Compared: every pooling (max / mean over completion tokens, prompt = mean over prompt
    tokens at positions > 0, before_scored = mean over completion tokens before each sample's
    cut-off), of the SAE features (features.run) and of the raw activations and an encoder
    (features.pool_tokens / pool_raw), against numpy means / maxima over the positions picked
    by hand from the store's metadata; samples without such tokens give zeros."""
    sae = _sae()
    store, acts, meta = _store_from_zero(tmp_path)
    ids = np.arange(100, 112)
    # cut-offs: mid-completion, none (the whole completion), at the first completion token (nothing)
    cutoffs = np.array([5, features.NO_CUTOFF, 3, 4, 6, features.NO_CUTOFF, 3, 7, 8, 5, 4, 6])
    result = features.run(sae, store, ids, batch_size=7, progress=False, cutoffs=cutoffs)
    with torch.no_grad():
        dense = sae.encode(acts).double().numpy()
    raw = acts.double().numpy()
    for how in ("max", "mean", "prompt", "before_scored"):
        cut = cutoffs[::-1] if how == "before_scored" else None
        pooled = features.pool_tokens(store, ids[::-1], how, {"sae": sae.encode}, batch_size=5, cutoffs=cut)
        assert features.pool_raw(store, ids[::-1], how, cutoffs=cut) == pytest.approx(pooled["raw"])
        for row, s in enumerate(ids):
            tokens = meta["sample_idx"] == s
            if how == "prompt":
                picked = tokens & meta["in_prompt"] & (meta["position"] > 0)
            elif how == "before_scored":
                picked = tokens & ~meta["in_prompt"] & (meta["position"] < cutoffs[row])
            else:
                picked = tokens & ~meta["in_prompt"]
            reduce = (lambda a: a.max(0)) if how == "max" else (lambda a: a.mean(0))
            want_sae = reduce(dense[picked]) if picked.any() else np.zeros(dense.shape[1])
            want_raw = reduce(raw[picked]) if picked.any() else np.zeros(raw.shape[1])
            assert result.pooled[how][row].numpy() == pytest.approx(want_sae, rel=1e-5, abs=1e-5), (how, s)
            back = len(ids) - 1 - row  # pool_tokens rows follow the (reversed) ids it was given
            assert pooled["raw"][back] == pytest.approx(want_raw, rel=1e-6, abs=1e-6), (how, s)
            assert pooled["sae"][back] == pytest.approx(want_sae, rel=1e-5, abs=1e-5), (how, s)
        if how == "prompt":
            assert float(result.pooled["n_prompt_tokens"][0]) == 0 and not result.pooled["prompt"][0].any()
    assert not result.pooled["before_scored"][6].any()  # cut at its first completion token: nothing
    with pytest.raises(ValueError, match="needs each sample's scored_cutoff"):
        features.pool_raw(store, ids, "before_scored")
    with pytest.raises(ValueError, match="unknown pooling 'first'"):
        features.pool_raw(store, ids, "first")
    with pytest.raises(ValueError, match="sample 100 is not in the cell's sample table"):
        features.pool_raw(store, ids[1:], "mean")


def test_first_scored_positions_against_the_store_tokenization(tiny_model_dir):
    """Compared: the position of the first gendered word's first token against a hand count on
    the tiny model's character-level tokenizer (prompt tokens with BOS, then one token per
    character of the completion): English and French lexicons, a curly apostrophe before the
    word, a word inside a longer word that must not count, no prompt text (the completion then
    takes the BOS), and no gendered word at all (NO_CUTOFF)."""
    from sae_diff import models
    from sae_diff.activations import tokenize

    _, tokenizer = models.load(tiny_model_dir)
    table = pd.DataFrame(
        {
            "sample_id": [0, 1, 2, 3, 4],
            "split": "train",
            "prompt_text": ["Write: ", "Ecris: ", "Go ", "", "Go "],
            "text": ["Then she left", "Puis elle part", "The chef’s his", "A man", "Nothing here"],
            "language": ["en", "fr", "en", "en", "en"],
        }
    )
    got = features.first_scored_positions(table, tokenizer)
    bos = 1
    want = [
        bos + len("Write: ") + len("Then "),
        bos + len("Ecris: ") + len("Puis "),
        bos + len("Go ") + len("The chef’s "),  # 'chef' holds no 'he': whole words only
        bos + len("A "),
        features.NO_CUTOFF,
    ]
    assert got.tolist() == want
    # the same positions index the store's tokenization of prompt + completion
    sequences = tokenize(tokenizer, table, 128, exclude_special=False, exclude_first=False)
    assert tokenizer.decode(sequences[0].ids[got[0] : got[0] + 3]) == "she"
    assert tokenizer.decode(sequences[3].ids[got[3] : got[3] + 3]) == "man"
