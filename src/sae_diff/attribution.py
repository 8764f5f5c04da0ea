"""Which features a model *uses* when it decides a metric: attribution at forks.

A probe finds features that carry a metric (they fire once, say, "she" is written); ablating
those often changes nothing, because the decision was taken earlier. Here the decision is
located in the data: two completions of one prompt whose metric differs part at a first
token, the fork. With m = log p(better token) − log p(worse token) given the prompt and the
shared prefix, zero-ablating feature j at every kept position up to the fork changes m, to
first order, by −Σ_p f_j(x_p) d_j·∂m/∂x_p (attribution patching: one forward and one backward
per pair for all features at once). A feature's attribution is the mean over pairs of
Σ_p f_j(x_p) d_j·∂m/∂x_p: positive when it pushes the model toward the better continuation,
so ablating it should move the metric the other way.

Kept positions are those the SAE was trained on: position 0 (an attention-sink outlier) and
special tokens (the tokenizer's ``all_special_ids``, BOS among them) are excluded, as the
activation extraction excludes them by default; the SAE's features there are out of
distribution and are neither summed over nor ablated.

Selection and its check. The forks are split by prompt (seeded): the held-out prompts'
forks (at most ``check_forks``, at most half of all forks) check the attribution, the other
forks (the *selection* forks) make the table the interventions pick features from. On the
held-out forks, for the top ``check_features`` features by |t| on the selection forks and as
many random live features, the full ablation (x' = x − f_j(x) d_j at every kept position, SAE
error kept, one forward per feature) is measured and compared with the attribution on the
same held-out forks; the summary's ``check`` holds the rank correlation and per-feature rows.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
from collections import Counter
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


def kept_positions(context: list[int], special_ids=(), exclude_first: bool = True) -> np.ndarray:
    """Which positions of ``context`` count (bool per position): not position 0 (when
    ``exclude_first``) and not a token of ``special_ids``, as in SAE training
    (``activations.tokenize``)."""
    special = set(int(t) for t in special_ids)
    keep = np.array([int(t) not in special for t in context], dtype=bool)
    if exclude_first and len(keep):
        keep[0] = False
    return keep


def _fork_inputs(pairs: list[Fork], special_ids, exclude_first: bool, device, like: torch.Tensor, desc: str, progress):
    """Per fork with a kept position (``kept_positions``): its index, the fork, its context as
    input ids [1, positions] on ``device`` and its kept positions as a 0/1 mask in ``like``'s
    dtype and device (what attribution and the ablation check both sum or edit over)."""
    from .progress import bar

    for i, fork in enumerate(bar(pairs, desc=desc, enabled=progress)):
        keep = kept_positions(fork.context, special_ids, exclude_first)
        if keep.any():
            mask = torch.as_tensor(keep, device=like.device, dtype=like.dtype)
            yield i, fork, torch.tensor([fork.context], device=device), mask


def _last_logits(model) -> dict:
    """The keyword that makes the model compute logits at the last position only (if any)."""
    params = inspect.signature(type(model).forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _margin(logits: torch.Tensor, fork: Fork) -> torch.Tensor:
    """m = log p(better) − log p(worse) from the last position's logits ([..., vocab])."""
    log_p = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    return log_p[..., fork.better] - log_p[..., fork.worse]


def attribute(
    model,
    sae,
    layer: int,
    hook: str,
    pairs: list[Fork],
    device: str = "cpu",
    progress: bool = False,
    special_ids=(),
    exclude_first: bool = True,
) -> np.ndarray:
    """[n_pairs, d_sae]: Σ_p f_j(x_p) d_j·∂m/∂x_p per fork over the kept positions p of its
    context (``kept_positions``; see the module docstring)."""
    from . import models
    from .editing import _first, _replace_first

    site = models.hook_module(model, layer, hook)
    sae_device = models.site_device(model, layer, hook)
    sae = sae.to(sae_device)
    W_dec = sae.W_dec.detach()
    held: dict = {}
    last = _last_logits(model)

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
        for i, fork, ids, mask in _fork_inputs(
            pairs, special_ids, exclude_first, device, W_dec, "attribution", progress
        ):
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False, **last).logits[0, -1]
                _margin(logits, fork).backward()
            x, grad = held["x"][0].detach(), held["x"].grad[0]
            with torch.no_grad():
                acts = sae.encode(x.to(W_dec.dtype)) * mask[:, None]  # [positions, d_sae]
                out[i] = (acts * (grad.to(W_dec.dtype) @ W_dec.T)).sum(0).double().cpu().numpy()
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
    return out


@contextlib.contextmanager
def _skipped_blocks(model, layer: int, held: dict):
    """Blocks 0 … layer−1 skipped: each returns ``held["prev"]`` (block layer−1's output, cached
    from an unedited forward) instead of computing; the embedding still runs (cheap)."""
    from . import models

    early = list(models.blocks(model))[:layer]
    saved = [block.__dict__.get("forward") for block in early]  # accelerate may have wrapped it

    def cached(*_args, **_kwargs):
        return held["prev"]

    for block in early:
        block.forward = cached
    try:
        yield
    finally:
        for block, forward in zip(early, saved):
            block.__dict__.pop("forward", None)
            if forward is not None:
                block.forward = forward


def ablation_effects(
    model,
    sae,
    layer: int,
    hook: str,
    pairs: list[Fork],
    features: list[int],
    device: str = "cpu",
    special_ids=(),
    exclude_first: bool = True,
    batch_size: int = 64,
    progress: bool = False,
    report: dict | None = None,
) -> np.ndarray:
    """[n_pairs, n_features]: m − m_j per fork, where m_j is the margin with feature j fully
    zero-ablated: x' = x − f_j(x) d_j at the hook point at every kept position of the context
    (f_j from the same ``sae.encode`` as ``attribute``; the SAE's error term is kept). To first
    order this is the attribution ``attribute`` gives, so the two should agree in rank and sign.

    One forward per fork and feature, features batched (``batch_size`` per forward). A feature
    that fires at no kept position of a fork has effect exactly 0 there (no forward). The
    blocks before ``layer`` are not recomputed: their output is cached from the fork's
    unedited forward (verified once against the full model: if the shortcut does not
    reproduce the unedited margin, every forward runs the full model). ``report`` (a dict)
    receives ``shortcut`` (whether blocks were skipped) and ``forwards``.
    """
    from . import models
    from .editing import _first, _replace_first

    site = models.hook_module(model, layer, hook)
    sae_device = models.site_device(model, layer, hook)
    sae = sae.to(sae_device)
    W_dec = sae.W_dec.detach()
    feats = torch.as_tensor(list(features), dtype=torch.long, device=W_dec.device)
    early = list(models.blocks(model))[layer - 1] if layer > 0 else None
    last = _last_logits(model)
    held: dict = {}
    state = {"shortcut": early is not None, "verified": False, "forwards": 0}

    def capture_site(_module, _inputs, output):
        held["x"] = _first(output).detach()

    def capture_prev(_module, _inputs, output):
        held["prev_one"] = output

    def edit(_module, _inputs, output):
        delta = held.get("delta")
        if delta is None:
            return None
        x = _first(output)
        return _replace_first(output, x - delta.to(device=x.device, dtype=x.dtype))

    def margins(ids: torch.Tensor, delta: torch.Tensor, fork: Fork, shortcut: bool) -> torch.Tensor:
        rows = delta.shape[0]
        held["delta"] = delta
        state["forwards"] += 1
        with torch.no_grad():
            if shortcut:
                prev = held["prev_one"]
                first = _first(prev)
                held["prev"] = _replace_first(prev, first.expand(rows, *first.shape[1:]).contiguous())
                with _skipped_blocks(model, layer, held):
                    logits = model(input_ids=ids.expand(rows, -1), use_cache=False, **last).logits[:, -1]
            else:
                logits = model(input_ids=ids.expand(rows, -1), use_cache=False, **last).logits[:, -1]
        held["delta"] = held["prev"] = None
        return _margin(logits, fork).double().cpu()

    out = np.zeros((len(pairs), len(feats)))
    if not len(feats):
        return out
    handle = site.register_forward_hook(edit)
    try:
        for i, fork, ids, mask in _fork_inputs(
            pairs, special_ids, exclude_first, device, W_dec, "ablation check", progress
        ):
            # the unedited forward: x at the hook point, block layer-1's output, m
            captures = [site.register_forward_hook(capture_site)]
            if early is not None:
                captures.append(early.register_forward_hook(capture_prev))
            try:
                with torch.no_grad():
                    full = _margin(model(input_ids=ids, use_cache=False, **last).logits[0, -1], fork)
            finally:
                for h in captures:
                    h.remove()
            with torch.no_grad():
                acts = sae.encode(held["x"][0].to(W_dec.dtype))[:, feats] * mask[:, None]  # [positions, F]
            firing = torch.nonzero((acts != 0).any(0)).flatten().tolist()
            if not firing:
                continue
            zero = torch.zeros((1, len(fork.context), W_dec.shape[1]), dtype=W_dec.dtype, device=W_dec.device)
            base = None
            for start in range(0, len(firing), batch_size):
                chunk = firing[start : start + batch_size]
                delta = acts[:, chunk].T[:, :, None] * W_dec[feats[chunk]][:, None, :]  # [B, positions, d]
                if base is None:  # the unedited margin on the same path, in the same batch
                    delta = torch.cat([zero, delta])
                m = margins(ids, delta, fork, state["shortcut"])
                if base is None and state["shortcut"] and not state["verified"]:
                    gap = abs(float(m[0]) - float(full))
                    if gap > 1e-2 * max(1.0, abs(float(full))):
                        log.warning(
                            "ablation check: skipping blocks 0-%d changes the unedited margin by %.3g; "
                            "running the full model instead",
                            layer - 1,
                            gap,
                        )
                        state["shortcut"] = False
                        m = margins(ids, delta, fork, False)
                    state["verified"] = True
                if base is None:
                    base, m = m[0], m[1:]
                out[i, chunk] = (base - m).numpy()
    finally:
        handle.remove()
        held.clear()
    if report is not None:
        report.update(shortcut=bool(state["shortcut"]), forwards=int(state["forwards"]))
    return out


def table(scores: np.ndarray, pairs: list[Fork]) -> pd.DataFrame:
    """Per feature, over the forks of ``scores`` ([n_forks, d_sae], one row per fork of ``pairs``):

    attribution     mean per-fork attribution
    se              its standard error (sample sd / √n; NaN with one fork). Forks of one prompt
                    are not independent, so this is optimistic when prompts have many forks.
    t               attribution / se; 0 where se is 0 or not finite (a feature that never fires
                    before a fork, or a single fork)
    rank            1 = largest |t|; ties by larger |attribution|, then feature id. The
                    t-statistic selection order: a feature with a large but erratic mean ranks
                    below one that is smaller but consistent. Features with t = 0 come last.
    share_positive  share of forks where it points the better way
    n_forks         forks the statistics are over
    """
    n = len(pairs)
    if n == 0:  # nothing to attribute: an empty table, so no feature can be selected from it
        return pd.DataFrame(
            {
                "feature": pd.Series(dtype="int64"),
                "attribution": pd.Series(dtype="float64"),
                "se": pd.Series(dtype="float64"),
                "t": pd.Series(dtype="float64"),
                "rank": pd.Series(dtype="int64"),
                "share_positive": pd.Series(dtype="float64"),
                "n_forks": pd.Series(dtype="int64"),
            }
        )
    mean = scores.mean(0)
    se = scores.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(scores.shape[1], np.nan)
    ok = np.isfinite(se) & (se > 0)
    t = np.zeros_like(mean)
    t[ok] = mean[ok] / se[ok]
    order = np.lexsort((np.arange(len(t)), -np.abs(mean), -np.abs(t)))
    rank = np.empty(len(t), dtype=np.int64)
    rank[order] = np.arange(1, len(t) + 1)
    return pd.DataFrame(
        {
            "feature": np.arange(scores.shape[1]),
            "attribution": mean,
            "se": se,
            "t": t,
            "rank": rank,
            "share_positive": (scores > 0).mean(0),
            "n_forks": n,
        }
    )


def split_forks(pairs: list[Fork], check_forks: int, seed: int = 0) -> tuple[list[Fork], list[Fork], dict]:
    """The selection forks and the held-out forks, split by prompt (no prompt in both).

    Prompts are shuffled (seeded) and held out until their forks reach min(``check_forks``,
    half the forks); at least one prompt stays with selection. When the last held-out prompt
    overshoots ``check_forks``, a seeded subset of ``check_forks`` held-out forks is kept (the
    rest are used by neither side: ``n_forks_unused``). No held-out forks when ``check_forks``
    is 0 or the forks come from a single prompt.
    """
    prompts = sorted({str(p.prompt_id) for p in pairs})
    info = {"n_prompts_select": len(prompts), "n_prompts_heldout": 0, "n_forks_unused": 0}
    if check_forks < 1 or len(prompts) < 2:
        return list(pairs), [], info
    counts = Counter(str(p.prompt_id) for p in pairs)
    rng = np.random.default_rng([seed, 1])
    want = max(1, min(check_forks, len(pairs) // 2))
    held: set[str] = set()
    total = 0
    for i in rng.permutation(len(prompts)):
        if total >= want or len(held) == len(prompts) - 1:
            break
        held.add(prompts[i])
        total += counts[prompts[i]]
    select = [p for p in pairs if str(p.prompt_id) not in held]
    heldout = [p for p in pairs if str(p.prompt_id) in held]
    if len(heldout) > check_forks:
        keep = np.sort(rng.choice(len(heldout), check_forks, replace=False))
        info["n_forks_unused"] = len(heldout) - check_forks
        heldout = [heldout[i] for i in keep]
    info.update(n_prompts_select=len(prompts) - len(held), n_prompts_heldout=len(held))
    return select, heldout, info


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3:
        return None
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else None


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    return _pearson(_ranks(a), _ranks(b)) if len(a) >= 3 else None


def _bootstrap_spearman(attr: np.ndarray, effect: np.ndarray, groups: list, seed: int, n_boot: int = 1000):
    """Percentile 95% interval of the Spearman correlation of the per-feature means, resampling
    prompts (forks of one prompt together) with replacement. ``attr``, ``effect``: [forks, F]."""
    if attr.shape[1] < 3:
        return None
    labels, index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    rng = np.random.default_rng([seed, 3])
    draws = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    per_prompt = np.zeros((n_boot, len(labels)))
    np.add.at(per_prompt, (np.arange(n_boot)[:, None], draws), 1.0)
    weights = per_prompt[:, index]  # [n_boot, forks]: how often each fork is drawn
    weights = weights / weights.sum(1, keepdims=True)
    a, e = _ranks(weights @ attr), _ranks(weights @ effect)
    a, e = a - a.mean(1, keepdims=True), e - e.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (e * e).sum(1))
    rho = (a * e).sum(1)[denom > 0] / denom[denom > 0]
    if len(rho) < n_boot // 2:
        return None
    return [float(np.quantile(rho, 0.025)), float(np.quantile(rho, 0.975))]


def check_features(selection: pd.DataFrame, n: int, seed: int) -> tuple[list[int], list[int]]:
    """The features the held-out check measures: the top ``n`` by |t| on the selection forks
    (t ≠ 0, in ``rank`` order), and ``n`` random live features (nonzero attribution on the
    selection forks, i.e. firing before some fork; not among the top), drawn seeded."""
    fired = selection[selection["attribution"] != 0]
    top = fired[fired["t"] != 0].sort_values("rank")["feature"].astype(int).tolist()[:n]
    pool = np.asarray(sorted(set(fired["feature"].astype(int)) - set(top)), dtype=np.int64)
    rng = np.random.default_rng([seed, 2])
    random = sorted(int(f) for f in rng.choice(pool, min(n, len(pool)), replace=False)) if len(pool) else []
    return top, random


def heldout_check(
    model,
    sae,
    layer: int,
    hook: str,
    selection: pd.DataFrame,
    heldout: list[Fork],
    n_features: int,
    seed: int = 0,
    device: str = "cpu",
    special_ids=(),
    exclude_first: bool = True,
    progress: bool = False,
) -> dict:
    """Attribution checked against what it predicts, on forks the selection never saw.

    For the ``check_features`` features (top by |t| on the selection table ``selection`` plus
    as many random live ones), on the ``heldout`` forks: the mean attribution
    (``attribution_heldout``) and the mean effect of the full ablation, m − m_j
    (``ablation_effect_heldout``; what the attribution estimates to first order). Statistics
    are over the features that fire before at least one held-out fork (the others are 0 on
    both sides): Spearman (with a 95% bootstrap interval over held-out prompts) and Pearson
    correlation, the share of features where the two agree in sign, the share of the top k by
    |ablation effect| that are also among the top k by |attribution| (k = min(10, features)),
    and Spearman of the selection forks' t with the held-out ablation effect (does the
    selection statistic predict the effect on new prompts).
    """
    started = time.perf_counter()
    top, random = check_features(selection, n_features, seed)
    features = top + random
    attr = attribute(model, sae, layer, hook, heldout, device, progress, special_ids, exclude_first)[:, features]
    report: dict = {}
    effect = ablation_effects(
        model, sae, layer, hook, heldout, features, device, special_ids, exclude_first, progress=progress, report=report
    )
    by_feature = selection.set_index("feature")
    fires = (attr != 0).sum(0)
    rows = [
        {
            "feature": int(f),
            "group": "top" if i < len(top) else "random",
            "t_select": float(by_feature.at[f, "t"]),
            "attribution_select": float(by_feature.at[f, "attribution"]),
            "attribution_heldout": float(attr[:, i].mean()) if len(heldout) else 0.0,
            "ablation_effect_heldout": float(effect[:, i].mean()) if len(heldout) else 0.0,
            "n_forks_firing": int(fires[i]),
        }
        for i, f in enumerate(features)
    ]
    live = np.flatnonzero(fires > 0)
    a = np.array([rows[i]["attribution_heldout"] for i in live])
    e = np.array([rows[i]["ablation_effect_heldout"] for i in live])
    t = np.array([rows[i]["t_select"] for i in live])
    is_top = np.array([rows[i]["group"] == "top" for i in live], dtype=bool)
    k = min(10, len(live))
    if k:
        top_a = set(np.argsort(-np.abs(a), kind="stable")[:k])
        top_e = set(np.argsort(-np.abs(e), kind="stable")[:k])
        overlap = len(top_a & top_e) / k
    both = (a != 0) & (e != 0)
    return {
        "n_forks_heldout": len(heldout),
        "n_prompts_heldout": len({str(p.prompt_id) for p in heldout}),
        "n_features": len(features),
        "n_top": len(top),
        "n_random": len(random),
        "n_features_firing": int(len(live)),
        "spearman": _spearman(a, e),
        "spearman_ci": _bootstrap_spearman(attr[:, live], effect[:, live], [p.prompt_id for p in heldout], seed),
        "pearson": _pearson(a, e),
        "sign_agreement": float(np.mean(np.sign(a[both]) == np.sign(e[both]))) if both.any() else None,
        "top_k": k,
        "top_k_overlap": overlap if k else None,
        "spearman_top": _spearman(a[is_top], e[is_top]),
        "spearman_random": _spearman(a[~is_top], e[~is_top]),
        "spearman_t_select": _spearman(t, e),
        "shortcut": report.get("shortcut"),
        "forwards": report.get("forwards"),
        "seconds": round(time.perf_counter() - started, 2),
        "features": rows,
    }


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
    prompt_split=None,
    check_features: int = 50,
    check_forks: int = 32,
    exclude_first: bool = True,
    exclude_special: bool = True,
) -> tuple[pd.DataFrame, dict]:
    """The attribution table of one SAE for one metric on its cell's samples, and a summary.

    ``prompt_split``: the prompt split table (``sae_diff.splits``); when given, only the
    samples of feature-selection prompts are used. The forks are split by prompt
    (``split_forks``): the table is over the selection forks only, and the summary's ``check``
    compares attribution with the full ablation on the held-out forks (``heldout_check``;
    ``check_features`` = 0 turns it off and gives every fork to selection).
    ``exclude_first`` / ``exclude_special``: leave out position 0 / special tokens, as SAE
    training does (``activations.exclude_first_position`` / ``exclude_special_tokens``).
    """
    from . import models, splits
    from .sae import files

    n_samples = len(samples)
    samples = splits.restrict_samples(samples, prompt_split)
    place = models.as_placement(place)
    model, tokenizer = place.load(model_dir)
    pairs = forks(samples, metric, direction, tokenizer, max_pairs=max_pairs, seed=seed)
    special = sorted({int(t) for t in tokenizer.all_special_ids}) if exclude_special else []
    select, heldout, split_info = split_forks(pairs, check_forks if check_features > 0 else 0, seed)
    summary = {
        "metric": metric,
        "direction": direction,
        "n_samples": n_samples,
        "n_samples_split": len(samples),
        "prompt_split": str(prompt_split) if prompt_split is not None else None,
        "n_forks_total": len(pairs),
        "n_forks": len(select),
        "layer": layer,
        "hook_point": hook,
        "excluded": {"first_position": bool(exclude_first), "special_token_ids": special},
    }
    if not pairs:
        summary["skipped"] = (
            f"no two samples of one prompt differ in {metric}: no fork to attribute "
            "(generate several samples per prompt)"
        )
        return table(np.zeros((0, 0)), pairs), summary
    sae = files.load(sae_dir)
    with place.precision():
        scores = attribute(model, sae, layer, hook, select, place.device, progress, special, exclude_first)
        result = table(scores, select)
        if check_features <= 0:
            check = {"skipped": "interventions.attribution.check_features = 0"}
        elif not heldout:
            check = {"skipped": "the forks come from a single prompt: none to hold out"}
        else:
            check = heldout_check(
                model,
                sae,
                layer,
                hook,
                result,
                heldout,
                check_features,
                seed,
                place.device,
                special,
                exclude_first,
                progress,
            )
    top = result.sort_values("attribution", ascending=False).head(10)
    by_t = result.sort_values("rank").head(10)
    summary.update(
        top_features=top["feature"].astype(int).tolist(),
        top_attribution=top["attribution"].round(6).tolist(),
        top_t_features=by_t["feature"].astype(int).tolist(),
        top_t=by_t["t"].round(3).tolist(),
        share_at_first_token=float(np.mean([p.shared == 0 for p in select])),
        n_forks_select=len(select),
        **split_info,
        check={"n_forks_select": len(select), **check},
    )
    if "spearman" in check:
        log.info(
            "attribution check: %d held-out forks, %d features, Spearman %s %s, %.1f s",
            check["n_forks_heldout"],
            check["n_features"],
            check["spearman"],
            check["spearman_ci"],
            check["seconds"],
        )
    return result, summary
