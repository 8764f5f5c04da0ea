"""Feature absorption on the first-letter task, as SAEBench defines it (Chanin et al. 2024).

1. Words: single-token, alphabetic vocabulary entries (" nurse"); each gets an in-context
   prompt "… {w} has the first letter: {L}\\n{word} has the first letter:" and its residual
   activation at the word token is read at the SAE's layer.
2. A linear probe (multinomial logistic regression) predicts the first letter from those
   activations; its per-letter weight vector is the letter's direction.
3. k-sparse probing on SAE latents per letter finds the *main* latents: latents ranked by
   mean activation difference, k grown from 1 while the test F1 still jumps by more than
   ``f1_jump_threshold``.
4. On test words the probe gets right, a word is *fully absorbed* when no main latent fires,
   the latent projecting most onto the probe has cosine ≥ 0.025 with it and supplies ≥ 40%
   of the activation's probe projection; the *absorption fraction* is the share of the
   probe projection carried by at most 3 other latents (cosine ≥ 0.1) instead of the main
   ones. Per letter both are averaged over the probe's true positives; the scores are the
   means over letters. Thresholds are SAEBench's defaults.

Tokenizers without enough alphabetic word tokens (amino-acid or character models) get a
clear skip reason instead of a number.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np
import torch

LETTERS = string.ascii_lowercase
EPS = 1e-8


@dataclass
class AbsorptionConfig:
    max_words: int = 1200
    n_icl_examples: int = 6
    test_fraction: float = 0.3
    max_k: int = 10
    f1_jump_threshold: float = 0.03
    full_absorption_cos: float = 0.025
    fraction_cos: float = 0.1
    projection_proportion: float = 0.4
    max_absorbing_latents: int = 3
    top_latents: int = 10
    min_words: int = 104  # fewer alphabetic words than 4 per letter: not a text tokenizer
    batch_size: int = 16
    seed: int = 0


class AbsorptionSkipped(Exception):
    """Absorption cannot be measured for this model; the message says why."""


def alphabetic_words(tokenizer, limit: int, seed: int) -> list[str]:
    """Single-token words: a leading space then 2+ ASCII letters, sampled reproducibly."""
    pattern = re.compile(r" [a-z]{2,}")
    words = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if pattern.fullmatch(text) and tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]:
            words.add(text[1:])
    words = sorted(words)
    rng = np.random.default_rng(seed)
    if len(words) > limit:
        words = sorted(rng.choice(words, size=limit, replace=False).tolist())
    return words


def build_prompts(tokenizer, words: list[str], n_examples: int, seed: int) -> list[tuple[list[int], int]]:
    """Token ids of each word's ICL prompt and the index of the word's token."""
    rng = np.random.default_rng(seed)
    out = []
    suffix = tokenizer(" has the first letter:", add_special_tokens=False)["input_ids"]
    for word in words:
        examples = [w for w in rng.choice(words, size=n_examples + 1, replace=False) if w != word][:n_examples]
        # every word keeps its leading space, so " nurse" is the single vocabulary token
        context = "".join(f" {w} has the first letter: {w[0].upper()}\n" for w in examples)
        prefix = tokenizer(context, add_special_tokens=True)["input_ids"]
        word_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        out.append((prefix + word_ids + suffix, len(prefix) + len(word_ids) - 1))
    return out


@torch.no_grad()
def word_activations(model, prompts, layer: int, batch_size: int, pad_id: int, device: str = "cpu") -> torch.Tensor:
    """Residual stream after block ``layer`` at each prompt's word token."""
    from . import models

    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (seq, _) in enumerate(batch):
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        with models.capture(model, [(layer, "resid_post")]) as store:
            models.run_until_stopped(model, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        acts = store[(layer, "resid_post")]
        rows.append(torch.stack([acts[j, pos] for j, (_, pos) in enumerate(batch)]).float().cpu())
    return torch.cat(rows)


def _f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    tp = float(((y_pred == 1) & (y_true == 1)).sum())
    fp = float(((y_pred == 1) & (y_true == 0)).sum())
    fn = float(((y_pred == 0) & (y_true == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def main_latents(
    f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, max_k: int, jump: float, seed: int
) -> tuple[list[int], list[float]]:
    """k-sparse probing: latents by mean-difference rank; grow k while test F1 jumps > ``jump``."""
    from sklearn.linear_model import LogisticRegression

    diff = f_train[y_train == 1].mean(0) - f_train[y_train == 0].mean(0)
    ranked = np.argsort(-diff, kind="stable")
    f1s: list[float] = []
    chosen = 1
    for k in range(1, max_k + 1):
        cols = ranked[:k]
        probe = LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed)
        probe.fit(f_train[:, cols], y_train)
        f1s.append(_f1(y_test, probe.predict(f_test[:, cols])))
        if k > 1:
            if f1s[-1] - f1s[-2] > jump:
                chosen = k
            else:
                break
    return [int(i) for i in ranked[:chosen]], f1s


def word_absorption(
    x: torch.Tensor, f: torch.Tensor, direction: torch.Tensor, cos: torch.Tensor, main: list[int], cfg: AbsorptionConfig
) -> tuple[float, bool]:
    """SAEBench's absorption fraction and full-absorption flag for one word."""
    direction = direction / direction.norm()
    act_proj = float(x @ direction)
    latent_proj = f * cos
    main_proj = float(latent_proj[main].sum())
    candidates = torch.ones_like(latent_proj, dtype=torch.bool)
    candidates[main] = False
    candidates &= (cos >= cfg.fraction_cos) & (latent_proj > 0)
    pool = latent_proj[candidates]
    absorbing = float(pool.topk(min(cfg.max_absorbing_latents, pool.numel())).values.sum()) if pool.numel() else 0.0
    if main_proj >= act_proj or absorbing / act_proj < cfg.projection_proportion:
        fraction = 0.0
    elif main_proj <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(absorbing, act_proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(latent_proj.topk(1).indices[0])
    full = (
        all(abs(float(f[m])) < EPS for m in main)
        and float(cos[top]) >= cfg.full_absorption_cos
        and act_proj >= 0
        and float(latent_proj[top]) / act_proj >= cfg.projection_proportion
    )
    return fraction, bool(full)


def absorption_scores(x: torch.Tensor, words: list[str], sae, cfg: AbsorptionConfig) -> dict:
    """The whole measurement from word activations ``x`` [n_words, d] and the SAE."""
    from sklearn.linear_model import LogisticRegression

    letters = np.array([LETTERS.index(w[0]) for w in words])
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(words))
    n_test = max(1, int(round(len(words) * cfg.test_fraction)))
    test, train = order[:n_test], order[n_test:]
    # one shared scale keeps the probe's directions in activation space
    scale = float(x[train].norm(dim=1).mean())
    probe = LogisticRegression(max_iter=2000, random_state=cfg.seed)
    probe.fit((x[train] / scale).numpy(), letters[train])
    predicted = probe.predict((x[test] / scale).numpy())
    with torch.no_grad():
        f = sae.encode(x.float())
    f_np = f.numpy()
    decoder = sae.W_dec.detach()
    per_letter = {}
    for class_index, letter_index in enumerate(probe.classes_):
        letter = LETTERS[letter_index]
        y = (letters == letter_index).astype(int)
        if y[train].sum() < 2 or y[test].sum() < 1:
            continue
        main, f1s = main_latents(f_np[train], y[train], f_np[test], y[test], cfg.max_k, cfg.f1_jump_threshold, cfg.seed)
        direction = torch.as_tensor(probe.coef_[class_index], dtype=torch.float32)
        cos = torch.nn.functional.cosine_similarity(decoder, direction[None], dim=-1)
        positives = [i for i, p in zip(test, predicted) if letters[i] == letter_index and p == letter_index]
        if not positives:
            continue
        results = [word_absorption(x[i], f[i], direction, cos, main, cfg) for i in positives]
        per_letter[letter] = {
            "num_probe_true_positives": len(positives),
            "main_latents": main,
            "k_sparse_f1": f1s,
            "true_positive_words": [words[i] for i in positives],
            "full_absorption_words": [words[i] for i, r in zip(positives, results) if r[1]],
            "mean_absorption_fraction": float(np.mean([r[0] for r in results])),
            "full_absorption_rate": float(np.mean([r[1] for r in results])),
            "num_full_absorption": int(sum(r[1] for r in results)),
        }
    if not per_letter:
        raise AbsorptionSkipped("the first-letter probe found no true positives on the test words")
    return {
        "mean_absorption_fraction_score": float(np.mean([v["mean_absorption_fraction"] for v in per_letter.values()])),
        "mean_full_absorption_score": float(np.mean([v["full_absorption_rate"] for v in per_letter.values()])),
        "mean_num_split_features": float(np.mean([len(v["main_latents"]) for v in per_letter.values()])),
        "probe_test_accuracy": float((predicted == letters[test]).mean()),
        "n_words": len(words),
        "n_letters": len(per_letter),
        "per_letter": per_letter,
    }


def measure(model, tokenizer, saes: dict, layer: int, cfg: AbsorptionConfig, device: str = "cpu") -> dict:
    """Absorption of every SAE in ``saes`` (name -> SAE) at one layer; one pass of the model."""
    words = alphabetic_words(tokenizer, cfg.max_words, cfg.seed)
    if len(words) < cfg.min_words:
        raise AbsorptionSkipped(
            f"the tokenizer has {len(words)} single-token alphabetic words (need "
            f"{cfg.min_words}): the first-letter task needs a text tokenizer"
        )
    prompts = build_prompts(tokenizer, words, cfg.n_icl_examples, cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x = word_activations(model, prompts, layer, cfg.batch_size, pad, device)
    return {name: absorption_scores(x, words, sae, cfg) for name, sae in saes.items()}
