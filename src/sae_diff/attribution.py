"""Which features a model *uses* when it decides a metric: attribution at forks.

A probe finds features that carry a metric (they fire once, say, "she" is written); ablating
those often changes nothing, because the decision was taken earlier. Here the decision is
located in the data: two completions of one prompt whose metric differs part at a first
token, the fork. With m = log p(better token) − log p(worse token) given the prompt and the
shared prefix, zero-ablating feature j at every position up to the fork changes m, to first
order, by −Σ_p f_j(x_p) d_j·∂m/∂x_p (attribution patching: one forward and one backward per
pair for all features at once). A feature's attribution is the mean over pairs of
Σ_p f_j(x_p) d_j·∂m/∂x_p: positive when it pushes the model toward the better continuation,
so ablating it should move the metric the other way.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Fork:
    """Two completions of one prompt at the token where they part."""

    prompt_id: object
    context: list[int]  # prompt and shared prefix, as token ids
    better: int  # the next token of the completion with the better metric
    worse: int
    gap: float  # |metric difference|
    shared: int  # completion tokens before the fork (0: they part at the first)


def forks(
    samples: pd.DataFrame, metric: str, direction: str, tokenizer, max_pairs: int = 256, seed: int = 0
) -> list[Fork]:
    """Pairs of same-prompt samples whose ``metric`` differs, cut at their first differing token.

    ``direction`` (up / down) says which of the two is better. At most ``max_pairs``, drawn
    uniformly (seeded) when there are more.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction = {direction!r}: expected up or down")
    missing = [c for c in (metric, "prompt_id", "prompt_text", "text") if c not in samples.columns]
    if missing:
        raise DataError(f"attribution: the samples table has no column(s) {missing}")
    rows = samples[samples[metric].notna()]
    out: list[Fork] = []
    for prompt_id, group in rows.groupby("prompt_id", sort=True):
        records = group.to_dict("records")
        for a, b in itertools.combinations(records, 2):
            if a[metric] == b[metric]:
                continue
            high, low = (a, b) if a[metric] > b[metric] else (b, a)
            better, worse = (high, low) if direction == "up" else (low, high)
            # one tokenization for the pair, as extraction and generation tokenize prompt_text
            prompt = tokenizer(better["prompt_text"], add_special_tokens=True)["input_ids"]
            good = tokenizer(better["text"], add_special_tokens=False)["input_ids"]
            bad = tokenizer(worse["text"], add_special_tokens=False)["input_ids"]
            shared = 0
            while shared < min(len(good), len(bad)) and good[shared] == bad[shared]:
                shared += 1
            if shared >= min(len(good), len(bad)):
                continue  # one text is a prefix of the other: no token where they part
            out.append(
                Fork(
                    prompt_id,
                    list(prompt) + good[:shared],
                    good[shared],
                    bad[shared],
                    float(abs(high[metric] - low[metric])),
                    shared,
                )
            )
    if len(out) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), max_pairs, replace=False))
        out = [out[i] for i in keep]
    return out


def attribute(
    model, sae, layer: int, hook: str, pairs: list[Fork], device: str = "cpu", progress: bool = False
) -> np.ndarray:
    """[n_pairs, d_sae]: Σ_p f_j(x_p) d_j·∂m/∂x_p per fork (see the module docstring)."""
    from . import models
    from .editing import _first, _replace_first
    from .progress import bar

    site = models.hook_module(model, layer, hook)
    sae_device = models.site_device(model, layer, hook)
    sae = sae.to(sae_device)
    W_dec = sae.W_dec.detach()
    held: dict = {}

    def keep_grad(_module, _inputs, output):
        # a leaf at the hook point: its .grad is ∂m/∂x at every position
        leaf = _first(output).detach().requires_grad_(True)
        held["x"] = leaf
        return _replace_first(output, leaf)

    out = np.zeros((len(pairs), sae.cfg.d_sae))
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = site.register_forward_hook(keep_grad)
    try:
        for i, fork in enumerate(bar(pairs, desc="attribution", enabled=progress)):
            ids = torch.tensor([fork.context], device=device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
                log_p = torch.log_softmax(logits, dim=-1)
                (log_p[fork.better] - log_p[fork.worse]).backward()
            x, grad = held["x"][0].detach(), held["x"].grad[0]
            with torch.no_grad():
                acts = sae.encode(x.to(W_dec.dtype))  # [positions, d_sae]
                out[i] = (acts * (grad.to(W_dec.dtype) @ W_dec.T)).sum(0).double().cpu().numpy()
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
    return out


def table(scores: np.ndarray, pairs: list[Fork]) -> pd.DataFrame:
    """Per feature: mean attribution over forks, its standard error and the share of forks where
    it points the better way."""
    n = len(pairs)
    if n == 0:  # nothing to attribute: an empty table, so no feature can be selected from it
        return pd.DataFrame(
            {
                "feature": pd.Series(dtype="int64"),
                "attribution": pd.Series(dtype="float64"),
                "se": pd.Series(dtype="float64"),
                "share_positive": pd.Series(dtype="float64"),
                "n_forks": pd.Series(dtype="int64"),
            }
        )
    se = scores.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(scores.shape[1], np.nan)
    return pd.DataFrame(
        {
            "feature": np.arange(scores.shape[1]),
            "attribution": scores.mean(0),
            "se": se,
            "share_positive": (scores > 0).mean(0),
            "n_forks": n,
        }
    )


def run(
    model_dir,
    sae_dir,
    samples: pd.DataFrame,
    layer: int,
    hook: str,
    metric: str,
    direction: str,
    max_pairs: int = 256,
    seed: int = 0,
    place="cpu",
    progress: bool = True,
) -> tuple[pd.DataFrame, dict]:
    """The attribution table of one SAE for one metric on its cell's samples, and a summary."""
    from . import models
    from .sae import files

    place = models.as_placement(place)
    model, tokenizer = place.load(model_dir)
    pairs = forks(samples, metric, direction, tokenizer, max_pairs=max_pairs, seed=seed)
    summary = {"metric": metric, "direction": direction, "n_forks": len(pairs), "layer": layer, "hook_point": hook}
    if not pairs:
        summary["skipped"] = (
            f"no two samples of one prompt differ in {metric}: no fork to attribute "
            "(generate several samples per prompt)"
        )
        return table(np.zeros((0, 0)), pairs), summary
    with place.precision():
        scores = attribute(model, files.load(sae_dir), layer, hook, pairs, place.device, progress)
    result = table(scores, pairs)
    top = result.sort_values("attribution", ascending=False).head(10)
    summary.update(
        top_features=top["feature"].astype(int).tolist(),
        top_attribution=top["attribution"].round(6).tolist(),
        share_at_first_token=float(np.mean([p.shared == 0 for p in pairs])),
    )
    return result, summary
