"""Fork attribution: the forks found in the data, and the attribution against finite differences
of the actual ablation in float64."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_diff import attribution, models
from sae_diff.editing import _first, _replace_first
from sae_diff.sae.model import SAE, SAEConfig


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


def _margin(model, sae, fork, feature=None, eps=0.0):
    """m = log p(better) - log p(worse) with eps * f_j(x) d_j removed at every position of block 1."""

    def edit(_module, _inputs, output):
        x = _first(output)
        acts = sae.encode(x[0])[:, feature]
        return _replace_first(output, x - eps * acts[None, :, None] * sae.W_dec[feature])

    handle = models.hook_module(model, 1, "resid_post").register_forward_hook(edit) if feature is not None else None
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
    scores = attribution.attribute(model, sae, 1, "resid_post", forks)
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


def test_run_writes_a_table_and_says_why_when_there_is_no_fork(tiny_model_dir, tmp_path):
    from sae_diff.sae import files

    model, _ = models.load(tiny_model_dir)
    d = model.config.hidden_size
    sae = SAE(SAEConfig(architecture="topk", d_in=d, d_sae=16, k=3))
    sae.initialize(torch.randn(64, d, generator=torch.Generator().manual_seed(0)), seed=0)
    files.save(sae.eval(), tmp_path / "sae")
    table, summary = attribution.run(tiny_model_dir, tmp_path / "sae", _samples(), 1, "resid_post", "m", "up")
    assert summary["n_forks"] == 2 and summary["share_at_first_token"] == 0.5
    assert list(table.columns) == ["feature", "attribution", "se", "share_positive", "n_forks"]
    assert len(table) == 16 and table["n_forks"].iloc[0] == 2
    assert summary["top_features"] == table.sort_values("attribution", ascending=False)["feature"].head(10).tolist()
    lonely = _samples().assign(prompt_id=np.arange(6))
    empty, why = attribution.run(tiny_model_dir, tmp_path / "sae", lonely, 1, "resid_post", "m", "up")
    assert empty.empty and "no fork" in why["skipped"]
