"""The activation-difference lens and per-token KL (sae_diff.lens) on tiny random models built in
memory: a base model, a perturbed copy (every weight moved by seeded noise) and a *planted*
copy whose only change is a bias b on block 1's MLP output, so that h_tuned - h_base is b at
(1, mlp_out) and (1, resid_post) and 0 below, and adding b to the base model's block-1 output
closes the whole KL. Each test says what it compares against what."""

from __future__ import annotations

import copy
import types

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sae_diff import features, lens, models, scorers

from .conftest import ROOT, TINY_SPEC

LAYER = 1  # the planted block
TEXTS = ["The river flows north.", "Salt in water.", "ab", "Snow on the hills above the lake tonight."]
SAMPLES = pd.DataFrame(
    {
        "sample_id": [10, 11, 12, 13],
        "prompt_text": ["", "<|user|>hi<|assistant|>", "", ""],
        "text": ["the cat sat on the mat", "hello world", "abc", "Rain is expected later today."],
    }
)
SPECIAL = {0, 1, 2, 3, 4, 5}  # the tiny tokenizer's all_special_ids (checked below)


@pytest.fixture(scope="module")
def tok():
    tokenizer = models.build_char_tokenizer("ascii")
    assert set(tokenizer.all_special_ids) == SPECIAL
    return tokenizer


def _perturbed(model, scale=0.3, seed=1):
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.parameters():
            param.add_(
                torch.randn(param.shape, generator=generator).to(param.dtype) * scale * param.std().clamp_min(1e-6)
            )
    return out.eval()


def _planted(model, bias):
    """The model with ``bias`` added to block LAYER's MLP output (a new bias on down_proj)."""
    out = copy.deepcopy(model)
    down = out.model.layers[LAYER].mlp.down_proj
    down.bias = torch.nn.Parameter(bias.to(down.weight.dtype).clone())
    return out.eval()


@pytest.fixture(scope="module")
def trio(tok):
    """(base, perturbed, planted, bias), float32."""
    base = models.build_random_model(dict(TINY_SPEC), tok)
    bias = torch.randn(TINY_SPEC["d_model"], generator=torch.Generator().manual_seed(7)) * 2.0
    return base, _perturbed(base), _planted(base, bias), bias


@pytest.fixture(scope="module")
def trio64(trio):
    base, perturbed, planted, bias = trio
    return copy.deepcopy(base).double(), copy.deepcopy(perturbed).double(), copy.deepcopy(planted).double(), bias


def _direct_difference(base, tuned, tok, texts, layers, n_positions):
    """Per position: sum and count of h_tuned - h_base at resid_post of ``layers``, each model run
    on the whole text (not cut) with output_hidden_states, in the models' dtype, then float64."""
    sums = {layer: np.zeros((n_positions, TINY_SPEC["d_model"])) for layer in layers}
    counts = np.zeros(n_positions)
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            hb = base(input_ids=ids, output_hidden_states=True).hidden_states
            ht = tuned(input_ids=ids, output_hidden_states=True).hidden_states
        m = min(n_positions, ids.shape[1])
        for layer in layers:  # hidden_states[layer + 1] is block layer's output (not the last block: normed)
            sums[layer][:m] += (ht[layer + 1][0, :m].double() - hb[layer + 1][0, :m].double()).numpy()
        counts[:m] += 1
    return sums, counts


def test_activation_difference_matches_a_direct_float64_computation(trio, trio64, tok):
    """mean / count / mean_all of activation_difference (batched, right-padded, cut to 5 tokens,
    stopped after the deepest block) against h_tuned - h_base from full unbatched forwards with
    output_hidden_states in float64: to 1e-12 with float64 models, 1e-5 with float32 ones."""
    sites = [(0, "resid_post"), (1, "resid_post")]
    base64, tuned64 = trio64[0], trio64[1]
    sums, counts = _direct_difference(base64, tuned64, tok, TEXTS, [0, 1], 5)
    for (base, tuned), atol in (((base64, tuned64), 1e-12), ((trio[0], trio[1]), 1e-5)):
        out = lens.activation_difference(base, tuned, tok, TEXTS, sites, n_positions=5, batch_size=3, progress=False)
        for layer, hook in sites:
            got = out[(layer, hook)]
            assert got["mean"].dtype == np.float64 and got["mean"].shape == (5, TINY_SPEC["d_model"])
            np.testing.assert_array_equal(got["count"], counts)
            np.testing.assert_allclose(got["mean"], sums[layer] / counts[:, None], rtol=0, atol=atol)
            np.testing.assert_allclose(got["mean_all"], sums[layer].sum(0) / counts.sum(), rtol=0, atol=atol)
            assert np.abs(got["mean"]).max() > 1e-3  # the models do differ
    # "ab" is <bos> a b: 3 tokens; position 0 (BOS) is counted for every text
    assert list(counts) == [4, 4, 4, 3, 3]


def test_activation_difference_stops_after_the_deepest_block(trio, tok):
    """With sites at layers 0 and 1 of a 3-block model, block 2 never runs (either model)."""
    base, tuned = trio[0], trio[1]
    calls = []
    handles = [models.blocks(m)[2].register_forward_hook(lambda *_: calls.append(1)) for m in (base, tuned)]
    try:
        lens.activation_difference(base, tuned, tok, TEXTS, [(0, "resid_post"), (1, "mlp_out")], progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


def test_identical_models_give_exactly_zero(trio, tok):
    """A model against its own deep copy: activation difference exactly 0 at every site, and
    per-token KL exactly 0 both ways (the same float32 logits on the same ids)."""
    base = trio[0]
    twin = copy.deepcopy(base)
    sites = [(0, "resid_post"), (1, "mlp_out"), (2, "resid_post")]
    out = lens.activation_difference(base, twin, tok, TEXTS, sites, progress=False)
    for site in sites:
        assert np.all(out[site]["mean"] == 0) and np.all(out[site]["mean_all"] == 0)
    kl = lens.per_token_kl(base, twin, tok, SAMPLES, progress=False)
    assert len(kl) and (kl["kl_tuned_base"] == 0).all() and (kl["kl_base_tuned"] == 0).all()


def test_planted_bias_is_the_activation_difference_at_every_position(trio64, tok):
    """Planted model (b on block 1's MLP output): the ADL mean at (1, mlp_out) and (1, resid_post)
    equals b at every position (closed form; float64 models, 1e-12), and is exactly 0 at
    (0, resid_post), below the change."""
    base, _, planted, bias = trio64
    sites = [(0, "resid_post"), (1, "mlp_out"), (1, "resid_post")]
    out = lens.activation_difference(base, planted, tok, TEXTS, sites, n_positions=5, progress=False)
    assert np.all(out[(0, "resid_post")]["mean"] == 0)
    expected = np.broadcast_to(bias.double().numpy(), (5, TINY_SPEC["d_model"]))
    for site in sites[1:]:
        np.testing.assert_allclose(out[site]["mean"], expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(out[site]["mean_all"], bias.double().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(out[site]["tuned_mean"] - out[site]["base_mean"], expected, rtol=0, atol=1e-12)


def _direct_kl(base, tuned, tok, samples):
    """Per kept token (special tokens and position 0 left out): sum p (log p - log q) of the next-token
    distributions, p = tuned, q = base, from full unbatched float64 forwards; ids built by hand
    (prompt with <bos>, then the text without special tokens)."""
    rows = []
    for sample_id, prompt, text in zip(samples["sample_id"], samples["prompt_text"], samples["text"]):
        ids = tok(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        ids = ids + tok(text, add_special_tokens=not ids)["input_ids"]
        with torch.no_grad():
            lt = tuned(input_ids=torch.tensor([ids])).logits[0].double()
            lb = base(input_ids=torch.tensor([ids])).logits[0].double()
        lp, lq = torch.log_softmax(lt, -1), torch.log_softmax(lb, -1)
        kl_tb = (lp.exp() * (lp - lq)).sum(-1)
        kl_bt = (lq.exp() * (lq - lp)).sum(-1)
        for position, token in enumerate(ids):
            if position > 0 and token not in SPECIAL:
                rows.append((sample_id, position, token, float(kl_tb[position]), float(kl_bt[position])))
    return pd.DataFrame(rows, columns=["sample_idx", "position", "token_id", "kl_tuned_base", "kl_base_tuned"])


def test_per_token_kl_matches_a_direct_float64_computation(trio, trio64, tok):
    """per_token_kl (float32 models, batched) against sum p (log p - log q) in torch.double from
    unbatched float64 forwards: the same tokens in the same order, KL (~1.5e-3 here) to 2e-6
    absolute -- float32 log-probabilities (~ -4.6) each carry ~5e-7 -- and to 1e-12 relative with
    the float64 models."""
    expected = _direct_kl(trio64[0], trio64[1], tok, SAMPLES)
    assert (expected["kl_tuned_base"] > 1e-4).all()
    for (base, tuned), rtol, atol in (((trio[0], trio[1]), 0, 2e-6), ((trio64[0], trio64[1]), 1e-12, 0)):
        got = lens.per_token_kl(base, tuned, tok, SAMPLES, batch_size=3, progress=False)
        keys = ["sample_idx", "position", "token_id"]
        pd.testing.assert_frame_equal(got[keys], expected[keys])
        for column in lens.KL_COLUMNS:
            np.testing.assert_allclose(got[column], expected[column], rtol=rtol, atol=atol)
    # the prompt's tokens are flagged and its special tokens left out
    second = got[got["sample_idx"] == 11]
    assert second["in_prompt"].sum() == 2 and not second["token_id"].isin(SPECIAL).any()


def test_kl_with_the_identity_patch_equals_per_token_kl(trio, tok):
    """kl_with_patch with patch(h_base, h_tuned) = h_base, at any site, equals per_token_kl
    exactly (same tokens, bit-identical KL)."""
    base, tuned = trio[0], trio[1]
    plain = lens.per_token_kl(base, tuned, tok, SAMPLES, batch_size=2, progress=False)
    for layer, hook in [(1, "resid_post"), (0, "mlp_out")]:
        patched = lens.kl_with_patch(base, tuned, tok, SAMPLES, layer, hook, lambda hb, ht: hb, 2, progress=False)
        pd.testing.assert_frame_equal(patched, plain, check_exact=True)


def test_patching_the_planted_bias_closes_all_of_the_kl(trio, tok):
    """Planted model vs base: splicing the tuned hidden state into the base model at
    (1, resid_post) gives KL exactly 0 (everything above is the same computation) and recovery
    1; adding b there gives KL ~ 0 (float32 rounding of (x + m) + b vs x + (m + b)) and recovery
    > 0.999; splicing at layer 0, below the change, changes nothing (recovery 0 exactly)."""
    base, _, planted, bias = trio
    before = lens.per_token_kl(base, planted, tok, SAMPLES, progress=False)
    assert before["kl_tuned_base"].mean() > 1e-3

    spliced = lens.kl_with_patch(base, planted, tok, SAMPLES, LAYER, "resid_post", lambda hb, ht: ht, progress=False)
    assert (spliced["kl_tuned_base"] == 0).all() and (spliced["kl_base_tuned"] == 0).all()
    assert lens.kl_recovery(before, spliced) == 1.0

    added = lens.kl_with_patch(
        base, planted, tok, SAMPLES, LAYER, "resid_post", lambda hb, ht: hb + bias, progress=False
    )
    assert lens.kl_recovery(before, added) > 0.999
    assert added["kl_tuned_base"].max() < 1e-3 * before["kl_tuned_base"].mean()

    below = lens.kl_with_patch(base, planted, tok, SAMPLES, 0, "resid_post", lambda hb, ht: ht, progress=False)
    pd.testing.assert_frame_equal(below, before, check_exact=True)
    assert lens.kl_recovery(before, below) == 0.0


def test_kl_recovery_arithmetic_and_checks():
    """kl_recovery = 1 - mean(after) / mean(before) on arrays; NaN for zero KL; tables that list
    different tokens are refused."""
    assert lens.kl_recovery([2.0, 2.0], [0.5, 1.5]) == pytest.approx(0.5)
    assert lens.kl_recovery([1.0], [2.0]) == pytest.approx(-1.0)
    assert np.isnan(lens.kl_recovery([0.0, 0.0], [0.0, 0.0]))
    a = pd.DataFrame({"sample_idx": [0, 0], "position": [1, 2], "kl_tuned_base": [1.0, 1.0]})
    with pytest.raises(ValueError, match="same tokens"):
        lens.kl_recovery(a, a.assign(position=[1, 3]))


def _norm_by_hand(model, v):
    """The final norm written out in float64: RMSNorm v / sqrt(mean v^2 + eps) * g, or LayerNorm
    (v - mean) / sqrt(var + eps) * g + beta."""
    norm = models.final_norm(model)
    v = v.double()
    g = norm.weight.detach().double()
    if isinstance(norm, torch.nn.LayerNorm):
        centred = v - v.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * g + norm.bias.detach().double()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_lens_matches_a_direct_unembedding(tok, arch):
    """logit_lens (normalise=final_norm) against W_U applied by hand to the hand-written final
    norm in float64 (norm scale and LayerNorm bias made random first): the same top and bottom
    token ids, logits to 1e-4, decoded tokens and probabilities consistent."""
    model = models.build_random_model(dict(TINY_SPEC, arch=arch), tok)
    norm = models.final_norm(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=generator))
    vectors = torch.randn(3, TINY_SPEC["d_model"], generator=generator) * 4
    table = lens.logit_lens(vectors.numpy(), model, tok, k=5)
    logits = _norm_by_hand(model, vectors) @ model.get_output_embeddings().weight.detach().double().T
    for i, row in table.iterrows():
        order = torch.argsort(logits[i], descending=True)
        assert row["promoted_id"] == order[:5].tolist()
        assert row["suppressed_id"] == order.flip(0)[:5].tolist()
        np.testing.assert_allclose(row["promoted_logit"], logits[i, order[:5]].numpy(), atol=1e-4)
        np.testing.assert_allclose(row["suppressed_logit"], logits[i, order.flip(0)[:5]].numpy(), atol=1e-4)
        assert row["promoted"] == [tok.decode([t]) for t in row["promoted_id"]]
        np.testing.assert_allclose(row["promoted_prob"], torch.softmax(logits[i], 0)[order[:5]].numpy(), atol=1e-6)


def test_logit_lens_gamma_agrees_with_the_feature_logit_lens(trio, tok):
    """logit_lens(normalise='gamma') reads rows as features.logit_lens reads SAE decoder rows."""
    model = trio[0]
    rows = torch.randn(4, TINY_SPEC["d_model"], generator=torch.Generator().manual_seed(5))
    ours = lens.logit_lens(rows, model, tok, k=4, normalise="gamma")
    theirs = features.logit_lens(types.SimpleNamespace(W_dec=rows), model, tok, k=4)
    assert list(ours["promoted"]) == list(theirs["promoted"])
    assert list(ours["suppressed"]) == list(theirs["suppressed"])
    np.testing.assert_allclose(np.array(list(ours["promoted_logit"])), np.array(list(theirs["promoted_logit"])))


def test_top_aligned_ranks_latents_by_cosine():
    """top_aligned against cosines computed by hand on a planted decoder: parallel rows first
    (whatever their norm), then the nearly parallel one, the antiparallel and zero rows last."""
    d = np.zeros(4)
    d[0] = 1.0
    decoder = np.array([[0, 1, 0, 0], [-1, 0, 0, 0], [3, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0.5, 0, 0, 0]])
    table = lens.top_aligned(torch.tensor(d), decoder, k=4)
    assert list(table["latent"]) == [2, 5, 3, 0]
    np.testing.assert_allclose(table["cosine"], [1.0, 1.0, 1 / np.sqrt(2), 0.0])
    assert len(lens.top_aligned(d, decoder, k=100)) == len(decoder)


def test_top_kl_contexts_mark_the_largest_kl_tokens(trio, tok):
    """The rows come out by decreasing KL, each context holds its token between the marks at the
    right place (checked against the tokenized sample by hand)."""
    base, tuned = trio[0], trio[1]
    table = lens.per_token_kl(base, tuned, tok, SAMPLES, progress=False)
    top = lens.top_kl_contexts(table, tok, SAMPLES, n=5, window=2)
    assert len(top) == 5 and top["kl_tuned_base"].is_monotonic_decreasing
    assert top["kl_tuned_base"].iloc[0] == table["kl_tuned_base"].max()
    for row in top.itertuples():
        sample = SAMPLES[SAMPLES["sample_id"] == row.sample_idx].iloc[0]
        ids = tok(sample["prompt_text"], add_special_tokens=True)["input_ids"] if sample["prompt_text"] else []
        ids = ids + tok(sample["text"], add_special_tokens=not ids)["input_ids"]
        left = "".join(tok.decode([t]) for t in ids[max(0, row.position - 2) : row.position])
        right = "".join(tok.decode([t]) for t in ids[row.position + 1 : row.position + 3])
        assert row.context == f"{left}⟦{row.token}⟧{right}"


def test_neutral_texts_are_neutral_and_readable_by_the_tiny_model(tmp_path, tok):
    """The shipped neutral texts: about 120, every character in the tiny ascii alphabet, no
    gendered word (scorers.count_gender_words) and no profession of the demo's prompt list.
    A missing or empty file is a clear error."""
    texts = lens.neutral_texts()
    assert 100 <= len(texts) <= 150 and len(set(texts)) == len(texts)
    alphabet = set(models.ALPHABETS["ascii"])
    professions = yaml.safe_load((ROOT / "resources" / "prompts" / "professions.yaml").read_text())
    professions = {p.lower() for p in professions["languages"]["en"]["fillers"]["profession"]}
    for text in texts:
        assert set(text) <= alphabet, text
        assert scorers.count_gender_words(text, "en") == (0, 0), text
        words = " " + " ".join(w.strip(".,'").lower() for w in text.split()) + " "
        assert not [p for p in professions if f" {p} " in words or f" {p}s " in words], text
    with pytest.raises(FileNotFoundError, match="no such text file"):
        lens.neutral_texts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no texts"):
        lens.neutral_texts(empty)


def test_kl_with_patches_equals_one_kl_with_patch_per_patch(trio, tok):
    """One pass with several patches (base run once to the layer, the blocks above rerun per patch)
    against kl_with_patch called once per patch, on a perturbed model: the same KL per token."""
    base, perturbed, _, _ = trio
    v = torch.randn(TINY_SPEC["d_model"], generator=torch.Generator().manual_seed(3))
    patches = {
        "identity": lambda hb, ht: hb,
        "add": lambda hb, ht: hb + v,
        "tuned": lambda hb, ht: ht,
        "half": lambda hb, ht: 0.5 * (hb + ht),
    }
    before, after = lens.kl_with_patches(base, perturbed, tok, SAMPLES, 0, patches, batch_size=3, progress=False)
    reference = lens.per_token_kl(base, perturbed, tok, SAMPLES, batch_size=3, progress=False)
    pd.testing.assert_frame_equal(before, reference)
    for name, patch in patches.items():
        one = lens.kl_with_patch(base, perturbed, tok, SAMPLES, 0, "resid_post", patch, batch_size=3, progress=False)
        np.testing.assert_allclose(after[name], one["kl_tuned_base"].to_numpy(), rtol=1e-5, atol=1e-7)
    assert lens.kl_recovery(before, after["identity"]) == pytest.approx(0.0, abs=1e-6)
