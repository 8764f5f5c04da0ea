"""Reconstruction metrics against plain float64 formulas on fresh random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_diff import evaluate
from sae_diff.sae.model import SAE, SAEConfig


@pytest.fixture
def sae_and_data():
    torch.manual_seed(3)
    sae = SAE(SAEConfig(architecture="topk", d_in=16, d_sae=48, k=5))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
        sae.W_dec[7:10] = 0  # a few features whose decoder is zero: still counted as firing
    x = torch.randn(1000, 16) * torch.linspace(0.5, 3, 16) + 2.0
    return sae, x


def test_metrics_match_float64_formulas(sae_and_data):
    sae, x = sae_and_data
    got = evaluate.reconstruction_metrics(sae, evaluate.tensor_batches(x, batch_size=137))
    with torch.no_grad():
        f = sae.encode(x).double()
        xh = sae.decode(f.float()).double()
    X = x.double()
    rss = (X - xh).pow(2).sum(-1)
    total_var = X.var(dim=0, unbiased=False).sum()  # = mean ‖x‖² - ‖mean x‖²
    assert got["explained_variance"] == pytest.approx(float(1 - rss.mean() / total_var), rel=1e-9)
    assert got["fvu"] == pytest.approx(float(rss.mean() / total_var), rel=1e-9)
    legacy = (1 - rss / (X - X.mean(0)).pow(2).sum(-1)).mean()
    assert got["explained_variance_legacy"] == pytest.approx(float(legacy), rel=1e-9)
    assert got["mse"] == pytest.approx(float(rss.mean()), rel=1e-9)
    assert got["cossim"] == pytest.approx(float(torch.nn.functional.cosine_similarity(X, xh, dim=-1).mean()), rel=1e-9)
    assert got["l0"] == pytest.approx(float((f != 0).sum(-1).double().mean()), rel=1e-12)
    assert got["l1"] == pytest.approx(float(f.abs().sum(-1).mean()), rel=1e-9)
    assert got["l2_ratio"] == pytest.approx(float((xh.norm(dim=-1) / X.norm(dim=-1)).mean()), rel=1e-9)
    assert got["relative_reconstruction_bias"] == pytest.approx(
        float(xh.pow(2).sum(-1).mean() / (X * xh).sum(-1).mean()), rel=1e-9
    )
    density = (f != 0).double().mean(0).numpy()
    np.testing.assert_allclose(got["feature_density"], density, rtol=0, atol=1e-15)
    assert got["n_dead"] == int((density == 0).sum()) and got["n_tokens"] == 1000


def test_batch_size_does_not_change_the_numbers(sae_and_data):
    sae, x = sae_and_data
    a = evaluate.reconstruction_metrics(sae, evaluate.tensor_batches(x, batch_size=1000))
    b = evaluate.reconstruction_metrics(sae, evaluate.tensor_batches(x, batch_size=64))
    for key in ("explained_variance", "explained_variance_legacy", "mse", "l0", "relative_reconstruction_bias"):
        assert a[key] == pytest.approx(b[key], rel=1e-9)


def test_perfect_and_zero_reconstruction():
    sae = SAE(SAEConfig(architecture="relu", d_in=4, d_sae=4))
    with torch.no_grad():
        sae.W_enc_T.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    x = torch.rand(50, 4) + 0.1  # positive: the identity SAE reconstructs exactly
    perfect = evaluate.reconstruction_metrics(sae, evaluate.tensor_batches(x))
    assert perfect["explained_variance"] == pytest.approx(1.0) and perfect["cossim"] == pytest.approx(1.0)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.mean(0))
    mean_only = evaluate.reconstruction_metrics(sae, evaluate.tensor_batches(x))
    assert mean_only["explained_variance"] == pytest.approx(0.0, abs=1e-9)  # predicting the mean explains nothing


def test_log_density_histogram():
    density = np.array([0.0, 0.0, 1e-3, 1e-2, 1e-1])
    hist = evaluate.log_density_histogram(density, bins=3)
    assert hist["n_dead"] == 2 and sum(hist["counts"]) == 3
    assert hist["edges"][0] == pytest.approx(-3) and hist["edges"][-1] == pytest.approx(-1)


# --------------------------------------------------------------------------- spliced


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gpt2_dir"])
def test_continue_from_reproduces_the_clean_forward(fixture, request):
    from sae_diff import models

    model, tok = models.load(request.getfixturevalue(fixture))
    ids = tok(["a nurse and a pilot", "the judge"], return_tensors="pt", padding=True)
    for layer in (0, 1, 2):
        with torch.no_grad(), models.branch_point(model, layer) as state:
            clean = model(**ids, use_cache=False).logits
            again = models.continue_from(model, layer, state["hidden"], state)
        torch.testing.assert_close(again, clean, rtol=1e-6, atol=1e-6)


def _hand_ce(model, tok, sae, texts, layer):
    """Three independent full forwards, the block output replaced by a hook; CE and KL by hand."""
    import pandas as pd

    from sae_diff import models
    from sae_diff.activations import tokenize

    seqs = tokenize(
        tok,
        pd.DataFrame({"sample_id": range(len(texts)), "prompt_text": "", "text": texts, "split": "eval"}),
        64,
        True,
        True,
    )
    totals = {"clean": 0.0, "sae": 0.0, "abl": 0.0, "kl_sae": 0.0, "kl_abl": 0.0}
    count = 0
    for s in seqs:
        ids = torch.tensor([s.ids])
        keep = torch.from_numpy(s.keep)

        def run(edit):
            def hook(_m, _i, out):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                h[0, keep] = edit(h[0, keep])
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

            handle = models.blocks(model)[layer].register_forward_hook(hook)
            try:
                with torch.no_grad():
                    return torch.log_softmax(model(ids).logits[0].double(), -1)
            finally:
                handle.remove()

        clean = run(lambda h: h)
        spliced = run(lambda h: sae(h))
        ablated = run(lambda h: torch.zeros_like(h))
        for t in range(len(s.ids) - 1):
            if not s.keep[t]:
                continue
            nxt = s.ids[t + 1]
            totals["clean"] -= float(clean[t, nxt])
            totals["sae"] -= float(spliced[t, nxt])
            totals["abl"] -= float(ablated[t, nxt])
            p = clean[t].exp()
            totals["kl_sae"] += float((p * (clean[t] - spliced[t])).sum())
            totals["kl_abl"] += float((p * (clean[t] - ablated[t])).sum())
            count += 1
    mean = {k: v / count for k, v in totals.items()}
    return mean, count


def test_spliced_ce_and_kl_scores_match_a_hand_computation(tiny_model_dir):
    import pandas as pd

    from sae_diff import models

    model, tok = models.load(tiny_model_dir)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=8))
    sae.initialize(torch.randn(100, 32) * 0.1)
    texts = ["a nurse walks in", "the pilot flies home at dawn", "judges rule", "x y z"]
    table = pd.DataFrame({"sample_id": range(4), "prompt_text": "", "text": texts, "split": "eval"})
    for layer in (0, 2):
        got, per_position = evaluate.spliced_metrics(model, tok, sae, table, layer, batch_size=3)
        hand, count = _hand_ce(model, tok, sae, texts, layer)
        assert got["n_positions"] == count
        assert got["ce_loss_clean"] == pytest.approx(hand["clean"], rel=1e-5)
        assert got["ce_loss_with_sae"] == pytest.approx(hand["sae"], rel=1e-5)
        assert got["ce_loss_with_ablation"] == pytest.approx(hand["abl"], rel=1e-5)
        score = (hand["abl"] - hand["sae"]) / (hand["abl"] - hand["clean"])
        assert got["ce_loss_score"] == pytest.approx(score, rel=1e-4)
        assert got["kl_div_score"] == pytest.approx(1 - hand["kl_sae"] / hand["kl_abl"], rel=1e-4)
        assert int(per_position["n"].sum()) == count
        weighted = (per_position["ce_clean"] * per_position["n"]).sum() / count
        assert weighted == pytest.approx(hand["clean"], rel=1e-6)


def test_group_metrics_by_hand(tmp_path):
    import pandas as pd

    from sae_diff.activations import ActivationStore, write_store

    torch.manual_seed(1)
    sae = SAE(SAEConfig(architecture="relu", d_in=6, d_sae=10))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    acts = torch.randn(40, 6)
    store = ActivationStore(write_store(tmp_path / "s", acts, split="eval", shard_tokens=15))
    # write_store gives token i sample_idx i; samples alternate between two languages
    table = pd.DataFrame({"sample_id": range(40), "language": ["en", "fr"] * 20})
    got = evaluate.group_metrics(sae, store, table, ["language", "missing_column"])
    with torch.no_grad():
        f = sae.encode(acts)
    for lang, rows in (("en", slice(0, None, 2)), ("fr", slice(1, None, 2))):
        part = f[rows]
        assert got["language"][lang]["n_tokens"] == 20
        assert got["language"][lang]["l0"] == pytest.approx(float((part != 0).sum(-1).float().mean()))
        assert got["language"][lang]["dead_features"] == int(((part != 0).sum(0) == 0).sum())
        assert got["language"][lang]["mean_activation"] == pytest.approx(float(part.double().mean()), rel=1e-6)
    assert set(got) == {"language"}


def test_compare_names_the_better_sae():
    a = {"fvu": 0.2, "l0": 30.0, "ce_loss_score": 0.9, "relative_reconstruction_bias": 0.95}
    b = {"fvu": 0.3, "l0": 20.0, "ce_loss_score": 0.95, "relative_reconstruction_bias": 1.2}
    rows, text = evaluate.compare(a, b, "ours", "ref")
    assert rows["fvu"]["better"] == "ours" and rows["l0"]["better"] == "ref"
    assert rows["ce_loss_score"]["better"] == "ref" and rows["relative_reconstruction_bias"]["better"] == "ours"
    assert "fvu" in text and "ours" in text.splitlines()[1]
