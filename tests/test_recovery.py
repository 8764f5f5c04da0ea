"""KL recovery (sae_diff.recovery): the patches against a direct float64 computation, the rank p
against its closed form, and a planted world where the right latent closes the whole KL and random
latents of the same dictionary close none of it."""

from __future__ import annotations

import numpy as np
import torch

from sae_diff import models, recovery
from sae_diff.sae.model import SAE, SAEConfig

from .conftest import TINY_SPEC
from .test_lens import LAYER, SAMPLES, _planted


def _sae_with_first_latent(direction: torch.Tensor, d_sae: int = 6, seed: int = 0) -> SAE:
    """A TopK (k=1) SAE whose latent 0 reads and writes ``direction``; the other latents read and
    write random directions orthogonal to it (so they never fire on a difference along it)."""
    d = len(direction)
    u = direction / direction.norm()
    others = torch.randn(d_sae - 1, d, generator=torch.Generator().manual_seed(seed))
    others = others - (others @ u)[:, None] * u[None]
    others = others / others.norm(dim=1, keepdim=True)
    sae = SAE(SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=1))
    with torch.no_grad():
        rows = torch.cat([u[None], others])
        sae.W_enc_T.copy_(rows)
        sae.W_dec.copy_(rows)
    return sae.eval()


def test_sae_patch_equals_a_dense_float64_computation():
    """h_b + Σ_{j∈S} f_j(h_t − h_b) W_dec[j] (+ b_dec), compared with the same sum written out in float64."""
    gen = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(architecture="relu", d_in=8, d_sae=20))
    sae.initialize(torch.randn(50, 8, generator=gen), seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8, generator=gen))
    hb, ht = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    chosen = [3, 7, 11]
    centred = (ht - hb).double().reshape(-1, 8) - sae.b_dec.double()  # SAELens: b_dec subtracted from the input
    f = torch.relu(centred @ sae.W_enc_T.double().T + sae.b_enc.double())
    expected = hb.double().reshape(-1, 8) + f[:, chosen] @ sae.W_dec.double()[chosen]
    got = recovery.sae_patch(sae, chosen)(hb, ht)
    torch.testing.assert_close(got.double().reshape(-1, 8), expected, rtol=1e-5, atol=1e-5)
    everything = hb.double().reshape(-1, 8) + f @ sae.W_dec.double() + sae.b_dec.double()
    got_all = recovery.sae_patch(sae, None, with_bias=True)(hb, ht)
    torch.testing.assert_close(got_all.double().reshape(-1, 8), everything, rtol=1e-5, atol=1e-5)


def test_rank_p_is_the_one_sided_rank():
    """(1 + #{null ≥ value}) / (1 + n), NaN draws left out."""
    assert recovery.rank_p(0.9, [0.1, 0.2, 0.95, float("nan")]) == (1 + 1) / (1 + 3)
    assert recovery.rank_p(0.5, [0.5]) == 1.0
    assert np.isnan(recovery.rank_p(float("nan"), [0.1]))


def test_the_planted_direction_closes_the_kl_and_random_latents_do_not():
    """Tuned = base + a bias b on block 1's MLP output: the difference at (1, resid_post) is b at every
    token. Latent 0 (along b) patched into the base model closes the KL (recovery ≈ 1); random latents
    orthogonal to b close exactly none of it (recovery 0); the rank p is the smallest possible."""
    tok = models.build_char_tokenizer("ascii")
    base = models.build_random_model(dict(TINY_SPEC), tok)
    bias = torch.randn(TINY_SPEC["d_model"], generator=torch.Generator().manual_seed(7)) * 2.0
    tuned = _planted(base, bias)
    sae = _sae_with_first_latent(bias)
    draws = recovery.random_latents(np.arange(1, 6), 1, 4, seed=0)
    result = recovery.measure(
        base, tuned, tok, SAMPLES, LAYER,
        {"planted": recovery.sae_patch(sae, [0]), "mean": recovery.vector_patch(bias.numpy())},
        {"planted": [recovery.sae_patch(sae, r) for r in draws]},
        progress=False,
    )  # fmt: skip
    assert result["mean_kl_before"] > 1e-3
    planted = result["targets"]["planted"]
    assert planted["recovery"] > 0.999 and result["targets"]["mean"]["recovery"] > 0.999
    assert planted["null"] == [0.0] * 4 and planted["null_p"] == 1 / 5
