"""First-letter absorption on planted data: known main latents, known absorbed words."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from sae_diff import absorption
from sae_diff.absorption import AbsorptionConfig, AbsorptionSkipped
from sae_diff.sae.model import SAE, SAEConfig

N_ABSORBED = 10


def planted():
    """26 letter directions; the first 10 'a' words are carried by their own absorbing latent.

    Latent i < 26 reads letter i (the 'a' latent is switched off by any absorbing direction);
    latent 26 + j fires only for absorbed word j and decodes to (e_a + e_{26+j}) / √2.
    """
    d, rng = 48, np.random.default_rng(0)
    words, rows = [], []
    for li, letter in enumerate(string.ascii_lowercase):
        n = 100 if letter == "a" else 12
        for w in range(n):
            x = np.zeros(d)
            x[li] = 3.0
            if letter == "a" and w < N_ABSORBED:
                x[26 + w] = 3.0
            rows.append(x + rng.normal(0, 0.05, d))
            words.append(f"{letter}w{w}")
    sae = SAE(SAEConfig(architecture="relu", d_in=d, d_sae=26 + N_ABSORBED), dtype=torch.float32)
    with torch.no_grad():
        sae.W_enc_T.zero_()
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-1.0)
        for i in range(26):
            sae.W_enc_T[i, i] = 1.0
            sae.W_dec[i, i] = 1.0
        for j in range(N_ABSORBED):
            sae.W_enc_T[0, 26 + j] = -2.0  # the main 'a' latent stays silent when absorbed
            sae.W_enc_T[26 + j, 26 + j] = 2.0
            sae.W_dec[26 + j, 0] = sae.W_dec[26 + j, 26 + j] = 2**-0.5
    return torch.tensor(np.array(rows), dtype=torch.float32), words, sae.eval()


def test_planted_absorption_is_found_exactly():
    x, words, sae = planted()
    result = absorption.absorption_scores(x, words, sae, AbsorptionConfig(seed=0))
    a = result["per_letter"]["a"]
    assert a["main_latents"] == [0]  # one absorbing latent per word is too small a split to count
    absorbed = {f"aw{j}" for j in range(N_ABSORBED)}
    expected = absorbed & set(a["true_positive_words"])
    assert expected, "the split should put some absorbed words in the test set"
    assert set(a["full_absorption_words"]) == expected
    assert a["full_absorption_rate"] == pytest.approx(len(expected) / a["num_probe_true_positives"])
    assert a["mean_absorption_fraction"] == pytest.approx(len(expected) / a["num_probe_true_positives"])
    for letter, block in result["per_letter"].items():
        if letter != "a":
            assert block["main_latents"] == [string.ascii_lowercase.index(letter)]
            assert block["full_absorption_words"] == [] and block["mean_absorption_fraction"] == 0.0
    assert result["probe_test_accuracy"] > 0.95


def test_word_absorption_rules():
    cfg = AbsorptionConfig()
    direction = torch.tensor([1.0, 0.0, 0.0])
    cos = torch.tensor([1.0, 0.5, 0.02])
    x = torch.tensor([2.0, 0.0, 0.0])
    # main latent carries the whole projection: no absorption
    assert absorption.word_absorption(x, torch.tensor([2.0, 0.0, 0.0]), direction, cos, [0], cfg) == (0.0, False)
    # main silent, latent 1 carries 2 x 0.5 = 1.0 = 50% of the projection 2.0: full absorption, fraction 1
    assert absorption.word_absorption(x, torch.tensor([0.0, 2.0, 0.0]), direction, cos, [0], cfg) == (1.0, True)
    # main carries 0.5, latent 1 carries 1.0: fraction 1.0 / (1.0 + 0.5); main fired, so not full
    frac, full = absorption.word_absorption(x, torch.tensor([0.5, 2.0, 0.0]), direction, cos, [0], cfg)
    assert frac == pytest.approx(1.0 / 1.5) and not full
    # the top latent is barely aligned with the probe (cos 0.02 < 0.025): not full absorption
    assert absorption.word_absorption(x, torch.tensor([0.0, 0.0, 90.0]), direction, cos, [0], cfg)[1] is False


def test_character_tokenizer_is_skipped_with_a_reason(tiny_model_dir):
    from sae_diff import models

    model, tok = models.load(tiny_model_dir)
    sae = SAE(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    with pytest.raises(AbsorptionSkipped, match="single-token alphabetic words.*text tokenizer"):
        absorption.measure(model, tok, {"topk": sae}, 1, AbsorptionConfig())
