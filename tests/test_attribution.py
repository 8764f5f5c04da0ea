"""Fork attribution: the forks found in the data, the attribution against finite differences of
the actual ablation in float64, position 0 and special tokens left out as in SAE training, the
t-statistic against numpy, the full ablation against two hand-run forwards, and the held-out
check end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import attribution, models
from sae_diff.editing import _first, _replace_first
from sae_diff.sae.model import SAE, SAEConfig

SPECIAL = [0, 1, 2, 3, 4, 5]  # the tiny tokenizer's all_special_ids (checked below)


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    model, tokenizer = models.load(tiny_model_dir)
    return model.double().eval(), tokenizer


def _samples():
    return pd.DataFrame(
        {
            "prompt_id": [0, 0, 0, 1, 1, 2],
            "prompt_text": ["<|user|>tell<|assistant|>"] * 3 + ["<|user|>more<|assistant|>"] * 2 + ["<|user|>x"],
            "text": ["abcx", "abdy", "abcz", "qq", "rs", "solo"],
            "m": [1.0, 0.0, np.nan, 0.2, 0.7, 1.0],
        }
    )


def test_forks_cut_pairs_at_their_first_differing_token(tiny64):
    _, tok = tiny64
    up = attribution.forks(_samples(), "m", "up", tok)
    # prompt 0: only (abcx, abdy) has two metric values; prompt 1: (rs better than qq); prompt 2: alone
    assert [(f.prompt_id, f.shared) for f in up] == [(0, 2), (1, 0)]
    first = up[0]
    prompt = tok("<|user|>tell<|assistant|>", add_special_tokens=True)["input_ids"]
    ab = tok("ab", add_special_tokens=False)["input_ids"]
    assert first.context == prompt + ab
    assert tok.decode([first.better]) == "c" and tok.decode([first.worse]) == "d" and first.gap == 1.0
    assert tok.decode([up[1].better]) == "r"
    down = attribution.forks(_samples(), "m", "down", tok)
    assert tok.decode([down[0].better]) == "d" and tok.decode([down[1].better]) == "q"
    assert len(attribution.forks(_samples(), "m", "up", tok, max_pairs=1)) == 1


def _margin(model, sae, fork, feature=None, eps=0.0, layer=1, hook="resid_post", keep=None):
    """m = log p(better) - log p(worse) with eps * f_j(x) d_j removed at every kept position
    (``keep``; default: all but position 0 and special tokens) at the hook point, by hand."""
    if keep is None:
        keep = attribution.kept_positions(fork.context, SPECIAL)
    mask = torch.as_tensor(keep, dtype=torch.float64)

    def edit(_module, _inputs, output):
        x = _first(output)
        acts = sae.encode(x[0])[:, feature] * mask
        return _replace_first(output, x - eps * acts[None, :, None] * sae.W_dec[feature])

    site = models.hook_module(model, layer, hook)
    handle = site.register_forward_hook(edit) if feature is not None else None
    try:
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=torch.tensor([fork.context])).logits[0, -1], -1)
    finally:
        if handle is not None:
            handle.remove()
    return float(log_p[fork.better] - log_p[fork.worse])


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_attribution_equals_the_derivative_of_the_ablated_margin(tiny64, arch):
    """Σ_p f_j d_j·∂m/∂x_p (one backward for all features) equals the central finite difference
    (m(-ε) - m(+ε)) / 2ε of removing ε·f_j·d_j at every position, with the model in float64."""
    model, tok = tiny64
    d = model.config.hidden_size
    sae = SAE(SAEConfig(architecture=arch, d_in=d, d_sae=24, k=5), dtype=torch.float64)
    sae.initialize(torch.randn(128, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64), seed=0)
    with torch.no_grad():
        sae.b_enc.add_(0.3)  # many features fire
    sae.eval()
    forks = attribution.forks(_samples(), "m", "up", tok)
    flags = [p.requires_grad for p in model.parameters()]
    assert sorted(tok.all_special_ids) == SPECIAL
    scores = attribution.attribute(model, sae, 1, "resid_post", forks, special_ids=SPECIAL)
    assert [p.requires_grad for p in model.parameters()] == flags  # the model is left as it was
    assert scores.shape == (len(forks), 24)
    # transformers computes RoPE's cos/sin in float32 even in a float64 model (~1e-7 noise in m),
    # so ε stays large (that noise / 2ε ~ 5e-5) and the tolerance is 1e-4; a wrong sign, position or
    # feature would be off by the attribution itself (up to ~0.5 here)
    eps = 1e-3
    checked = 0
    for i, fork in enumerate(forks):
        for j in range(24):
            numeric = (_margin(model, sae, fork, j, -eps) - _margin(model, sae, fork, j, eps)) / (2 * eps)
            assert scores[i, j] == pytest.approx(numeric, rel=1e-3, abs=1e-4), (i, j)
            checked += abs(numeric) > 1e-6
    assert checked > 10  # not vacuous: many features move the margin


def _sae(d, d_sae=24, arch="relu", seed=0, shift=0.3):
    sae = SAE(SAEConfig(architecture=arch, d_in=d, d_sae=d_sae, k=5), dtype=torch.float64)
    sae.initialize(torch.randn(128, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), seed=seed)
    with torch.no_grad():
        sae.b_enc.add_(shift)  # many features fire
    return sae.eval()


def _random_forks(n, vocab, seed, special=3, length=9):
    """Fresh random contexts with a special token inside (position 3) and random better/worse."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(6, vocab, (length + i,), generator=gen).tolist()
        ids[3] = special
        better, worse = torch.randint(6, vocab, (2,), generator=gen).tolist()
        out.append(attribution.Fork(i, ids, better, worse if worse != better else better + 1, 1.0, 0))
    return out


def test_kept_positions_leave_out_position_0_and_special_tokens():
    keep = attribution.kept_positions([1, 7, 4, 8, 9], special_ids=[1, 4])
    assert keep.tolist() == [False, True, False, True, True]
    assert attribution.kept_positions([7, 8], special_ids=[]).tolist() == [False, True]
    assert attribution.kept_positions([7, 8], special_ids=[], exclude_first=False).tolist() == [True, True]


def test_a_feature_that_fires_only_at_position_0_gets_no_attribution_and_no_ablation_effect(tiny64):
    model, _ = tiny64
    fork = _random_forks(1, model.config.vocab_size, seed=3)[0]
    held = {}
    site = models.hook_module(model, 1, "resid_post")
    handle = site.register_forward_hook(lambda _m, _i, out: held.update(x=_first(out)[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([fork.context]))
    handle.remove()
    x = held["x"]
    # feature 0 reads x_0's direction with a threshold between x_0 and every later position;
    # feature 1 fires everywhere
    sae = _sae(model.config.hidden_size, d_sae=2, shift=0.0)
    direction = x[0] / x[0].norm()
    later = (x[1:] @ direction).max()
    assert later < 0.9 * x[0].norm()  # the construction's premise
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc_T[0] = direction
        sae.b_enc[0] = -(x[0].norm() + later) / 2
        sae.b_enc[1] = 100.0
    acts = sae.encode(x)
    assert acts[0, 0] > 0 and (acts[1:, 0] == 0).all() and (acts[:, 1] > 0).all()
    kept = attribution.attribute(model, sae, 1, "resid_post", [fork], special_ids=SPECIAL)
    every = attribution.attribute(model, sae, 1, "resid_post", [fork], special_ids=[], exclude_first=False)
    assert kept[0, 0] == 0.0 and kept[0, 1] != 0.0
    assert abs(every[0, 0]) > 1e-6  # not vacuous: counted at position 0, it would have an attribution
    effect = attribution.ablation_effects(model, sae, 1, "resid_post", [fork], [0, 1], special_ids=SPECIAL)
    assert effect[0, 0] == 0.0 and effect[0, 1] != 0.0


def test_t_statistic_and_rank_match_numpy():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.1, 1.0, size=(7, 12)) * rng.uniform(0.1, 3, size=12)
    scores[:, 4] = 0.0  # never fires
    scores[:, 9] = 0.25  # fires identically everywhere: se 0
    pairs = [attribution.Fork(i, [1], 2, 3, 1.0, 0) for i in range(7)]
    table = attribution.table(scores, pairs)
    mean = scores.mean(axis=0)
    se = np.array([np.std(scores[:, j], ddof=1) / np.sqrt(7) for j in range(12)])
    t = np.array([m / s if s > 0 else 0.0 for m, s in zip(mean, se)])
    np.testing.assert_allclose(table["attribution"], mean, rtol=1e-12)
    np.testing.assert_allclose(table["se"], se, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(table["t"], t, rtol=1e-12)
    assert table.loc[4, "t"] == 0.0 and table.loc[9, "t"] == 0.0
    expected = sorted(range(12), key=lambda j: (-abs(t[j]), -abs(mean[j]), j))
    assert table.sort_values("rank")["feature"].tolist() == expected
    assert sorted(table["rank"]) == list(range(1, 13))
    one = attribution.table(scores[:1], pairs[:1])
    assert one["se"].isna().all() and (one["t"] == 0).all()


@pytest.mark.parametrize(("layer", "hook"), [(2, "resid_post"), (1, "mlp_out"), (0, "resid_post")])
def test_full_ablation_equals_two_forwards_by_hand(tiny64, layer, hook):
    """ablation_effects (blocks before the layer skipped from a cache, features batched, forks
    in turn) against m(model) − m(model with f_j(x) d_j removed at every kept position), each
    run by hand as a plain full forward with one hook, float64, on fresh random contexts."""
    model, _ = tiny64
    sae = _sae(model.config.hidden_size, seed=1)
    pairs = _random_forks(3, model.config.vocab_size, seed=1)
    features = [0, 5, 7, 11, 23, 2]
    report = {}
    effect = attribution.ablation_effects(
        model, sae, layer, hook, pairs, features, special_ids=SPECIAL, batch_size=4, report=report
    )
    assert report["shortcut"] == (layer > 0)
    moved = 0
    for i, fork in enumerate(pairs):
        base = _margin(model, sae, fork, layer=layer, hook=hook)
        for c, j in enumerate(features):
            by_hand = base - _margin(model, sae, fork, j, 1.0, layer=layer, hook=hook)
            assert effect[i, c] == pytest.approx(by_hand, abs=1e-9), (i, j)
            moved += abs(by_hand) > 1e-4
    assert moved > 5  # not vacuous


def test_split_forks_by_prompt():
    pairs = [attribution.Fork(p, [1], 2, 3, 1.0, 0) for p in [0, 0, 0, 1, 2, 2, 3, 4, 4, 5]]
    select, heldout, info = attribution.split_forks(pairs, check_forks=3, seed=0)
    assert {p.prompt_id for p in select}.isdisjoint({p.prompt_id for p in heldout})
    assert 1 <= len(heldout) <= 3 and len(select) + len(heldout) + info["n_forks_unused"] == 10
    assert info["n_prompts_select"] + info["n_prompts_heldout"] == 6
    assert attribution.split_forks(pairs, 3, 0)[1] == heldout  # seeded
    assert attribution.split_forks(pairs, 0, 0)[1] == [] and attribution.split_forks(pairs[:3], 3, 0)[1] == []


def _many_samples(n_prompts=8):
    rows = []
    for p in range(n_prompts):
        for text, m in [("abc", 0.0), ("abd", 1.0), ("xy", 0.5)]:
            rows.append(
                {
                    "prompt_id": p,
                    "prompt": f"p{p}",
                    "prompt_text": f"<|user|>p{p}<|assistant|>",
                    "text": text + str(p),
                    "m": m,
                }
            )
    return pd.DataFrame(rows).assign(sample_id=range(3 * n_prompts))


def _saved_sae(tiny_model_dir, tmp_path):
    from sae_diff.sae import files

    model, _ = models.load(tiny_model_dir)
    d = model.config.hidden_size
    sae = SAE(SAEConfig(architecture="topk", d_in=d, d_sae=16, k=3))
    sae.initialize(torch.randn(64, d, generator=torch.Generator().manual_seed(0)), seed=0)
    files.save(sae.eval(), tmp_path / "sae")
    return tmp_path / "sae"


def test_run_writes_a_table_and_says_why_when_there_is_no_fork(tiny_model_dir, tmp_path):
    sae = _saved_sae(tiny_model_dir, tmp_path)
    table, summary = attribution.run(tiny_model_dir, sae, _samples(), 1, "resid_post", "m", "up")
    # two prompts with a fork each: one is held out, the table is over the other
    assert summary["n_forks_total"] == 2 and summary["n_forks"] == 1 and summary["check"]["n_forks_heldout"] == 1
    assert list(table.columns) == ["feature", "attribution", "se", "t", "rank", "share_positive", "n_forks"]
    assert len(table) == 16 and table["n_forks"].iloc[0] == 1
    assert summary["top_features"] == table.sort_values("attribution", ascending=False)["feature"].head(10).tolist()
    every, summary = attribution.run(tiny_model_dir, sae, _samples(), 1, "resid_post", "m", "up", check_features=0)
    assert summary["n_forks"] == 2 and summary["share_at_first_token"] == 0.5 and "skipped" in summary["check"]
    lonely = _samples().assign(prompt_id=np.arange(6))
    empty, why = attribution.run(tiny_model_dir, sae, lonely, 1, "resid_post", "m", "up")
    assert empty.empty and "no fork" in why["skipped"]


def test_heldout_check_end_to_end_and_the_prompt_split(tiny_model_dir, tmp_path):
    sae = _saved_sae(tiny_model_dir, tmp_path)
    samples = _many_samples()
    table, summary = attribution.run(
        tiny_model_dir, sae, samples, 1, "resid_post", "m", "up", check_features=3, check_forks=6
    )
    check = summary["check"]
    assert summary["n_forks_total"] == 24 and check["n_forks_heldout"] == 6 and check["n_forks_select"] == 18
    assert table["n_forks"].iloc[0] == 18 == summary["n_forks"]
    assert check["n_features"] == len(check["features"]) == check["n_top"] + check["n_random"]
    top = [r["feature"] for r in check["features"] if r["group"] == "top"]
    assert top == table[table["t"] != 0].sort_values("rank")["feature"].head(3).tolist()
    for key in ("spearman", "pearson", "sign_agreement", "top_k_overlap"):
        assert key in check
    assert set(check["features"][0]) >= {"feature", "attribution_heldout", "ablation_effect_heldout", "t_select"}
    assert check["spearman"] is None or -1 <= check["spearman"] <= 1
    # the prompt split keeps the feature-selection prompts' samples only
    split = pd.DataFrame(
        {
            "source": "data",
            "prompt_id": [str(p) for p in range(8)],
            "prompt": [f"p{p}" for p in range(8)],
            "unit": [str(p) for p in range(8)],
            "stratum": "all",
            "part": ["select_features"] * 4 + ["select_condition", "report"] * 2,
        }
    )
    split.to_csv(tmp_path / "split.csv", index=False)
    _, restricted = attribution.run(
        tiny_model_dir, sae, samples, 1, "resid_post", "m", "up", prompt_split=tmp_path / "split.csv", check_features=0
    )
    assert restricted["n_samples"] == 24 and restricted["n_samples_split"] == 12 and restricted["n_forks"] == 12
