"""What each SAE feature is and where it fires, on its cell's data.

One pass encodes every kept token of the cell once per SAE and produces:

* per-feature firing statistics on the held-out (eval) tokens: frequency over tokens and
  sequences, mean / max / quantiles of the activation when firing, firing positions (mean,
  quantiles, relative rank within the sequence), prompt-only and completion-only flags;
* the top-activating examples of each feature (eval tokens, the token marked in its context);
* for the dashboard (``token_examples.parquet`` and ``token_histograms.parquet``; read them
  with ``read_token_examples``), per live feature: a histogram of its eval activations, its top
  examples and examples drawn from each activation interval, each with the feature's
  activation on every token of the context window;
* per-sample pooled activations (both splits), with each sample's token L0 and activation
  sums, for group statistics and probes; the poolings (``POOLINGS``):
  ``max`` / ``mean`` over the completion tokens, and ``prompt``: the mean over the prompt's
  tokens only (position 0 excluded even when the store kept it) -- what the model holds
  before it writes a word, so it cannot count the words a completion metric counts; and
  ``before_scored``: the mean over the completion tokens before the first scored word (the
  first gendered word of the gender_pronouns lexicon; the whole completion when it has none),
  each sample's cut-off position saved as ``scored_cutoff``;
* logit-lens tokens: the decoder direction through the final norm's scale and the
  unembedding — the tokens it promotes and suppresses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .activations import ActivationStore

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)
POSITION_QUANTILES = (0.1, 0.5, 0.9)
MARK = ("⟦", "⟧")  # around the activating token in an example's context
# the dashboard's view of a feature's activations: SAE-Vis-style intervals of max_act, not only the top
HISTOGRAM_BINS = 20
INTERVALS = 4  # [0, ¼), [¼, ½), [½, ¾), [¾, 1] of the feature's max activation on eval
PER_INTERVAL = 2


# pooling name -> (which tokens of a sample it reads, how it reduces them)
POOLINGS = {
    "max": ("completion", "max"),
    "mean": ("completion", "mean"),
    "prompt": ("prompt", "mean"),
    "before_scored": ("before_scored", "mean"),
}
NO_CUTOFF = np.iinfo(np.int32).max  # scored_cutoff of a sample without a scored word


def pooled_tokens(how: str, in_prompt, position, cutoff=None):
    """Boolean mask of the tokens that pooling ``how`` reads (numpy or torch inputs alike):
    completion tokens for max / mean; prompt tokens at positions > 0 for prompt; completion
    tokens at positions below ``cutoff`` (per token: its sample's first scored word) for
    before_scored."""
    if how not in POOLINGS:
        raise ValueError(f"unknown pooling {how!r}; expected one of {sorted(POOLINGS)}")
    tokens = POOLINGS[how][0]
    if tokens == "completion":
        return ~in_prompt
    if tokens == "prompt":
        return in_prompt & (position > 0)
    if cutoff is None:
        raise ValueError("pooling 'before_scored' needs each sample's scored_cutoff (features stage)")
    return ~in_prompt & (position < cutoff)


def _same_length_lower(text: str) -> str:
    """text.lower(), character by character where lowering would change the length (offsets stay valid)."""
    low = text.lower()
    return low if len(low) == len(text) else "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def first_scored_positions(samples: pd.DataFrame, tokenizer, language_column: str = "language") -> np.ndarray:
    """Per sample (row of ``samples``): the sequence position of the token holding the first
    character of the completion's first scored word -- a word of the gender_pronouns lexicon
    (``scorers.GENDER_WORDS``, by the sample's language, found as that scorer finds them) --
    with prompt + completion tokenized as the activation store does (``activations.tokenize``);
    ``NO_CUTOFF`` when the completion has no such word. Needs a fast tokenizer (offsets)."""
    from .scorers import _WORD, GENDER_WORDS

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("pooling before_scored: the tokenizer gives no character offsets (not a fast tokenizer)")
    out = np.full(len(samples), NO_CUTOFF, dtype=np.int64)
    languages = samples[language_column] if language_column in samples.columns else ["en"] * len(samples)
    for i, (prompt_text, text, language) in enumerate(
        zip(samples.get("prompt_text", [""] * len(samples)), samples["text"], languages)
    ):
        text = str(text)
        lexicon = GENDER_WORDS.get(language, GENDER_WORDS["en"])
        words = lexicon["male"] | lexicon["female"]
        first = next(
            (m.start() for m in _WORD.finditer(_same_length_lower(text).replace("’", "'")) if m.group() in words), None
        )
        if first is None:
            continue
        prompt_text = prompt_text if isinstance(prompt_text, str) else ""
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=True)["input_ids"]) if prompt_text else 0
        enc = tokenizer(text, add_special_tokens=not n_prompt, return_offsets_mapping=True)
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            if b > first and b > a:
                out[i] = n_prompt + j
                break
    return out


@dataclass
class FeaturePass:
    stats: pd.DataFrame  # one row per feature
    examples: dict  # feature -> list of top-activating examples
    pooled: dict  # sample_id, max, mean, prompt [n_samples, d_sae], l0_sum, act_sum, n_tokens, ...
    token_examples: dict  # feature -> histogram, top and interval examples with per-token activations


def _pick(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[index] with the index clipped into range (callers mask the clipped rows)."""
    if not len(values):
        return np.full(len(index), np.nan)
    return values[np.clip(index, 0, len(values) - 1)]


def _firing_table(
    feat, act, pos, rel, in_prompt, seq_keys, d_sae: int, n_tokens: int, n_sequences: int
) -> pd.DataFrame:
    """Per-feature statistics from the flat list of (feature, activation, ...) firings."""
    order = np.lexsort((act, feat))  # by feature, activation ascending within it
    feat, act, pos, rel, in_prompt = feat[order], act[order], pos[order], rel[order], in_prompt[order]
    counts = np.bincount(feat, minlength=d_sae)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    fires = counts > 0
    table = pd.DataFrame({"feature": np.arange(d_sae), "fire_count": counts, "freq": counts / max(n_tokens, 1)})
    seq_counts = np.bincount(np.unique(seq_keys) % d_sae, minlength=d_sae) if len(seq_keys) else np.zeros(d_sae, int)
    table["seq_freq"] = seq_counts / max(n_sequences, 1)
    safe = np.maximum(counts, 1)
    sums = np.bincount(feat, weights=act, minlength=d_sae)
    table["mean_act"] = np.where(fires, sums / safe, np.nan)
    last = starts + counts - 1
    table["max_act"] = np.where(fires, _pick(act, last), np.nan)
    for q in QUANTILES:  # 'lower' quantile of each feature's sorted activations (exact order statistic)
        idx = starts + np.floor(q * (counts - 1)).astype(np.int64)
        table[f"act_q{int(q * 100)}"] = np.where(fires, _pick(act, idx), np.nan)
    table["mean_position"] = np.where(fires, np.bincount(feat, weights=pos, minlength=d_sae) / safe, np.nan)
    table["mean_rel_position"] = np.where(fires, np.bincount(feat, weights=rel, minlength=d_sae) / safe, np.nan)
    # position quantiles need positions sorted within each feature
    porder = np.lexsort((pos, feat))
    spos = pos[porder]
    for q in POSITION_QUANTILES:
        idx = starts + np.floor(q * (counts - 1)).astype(np.int64)
        table[f"position_q{int(q * 100)}"] = np.where(fires, _pick(spos, idx), np.nan)
    n_prompt = np.bincount(feat, weights=in_prompt.astype(np.float64), minlength=d_sae).astype(np.int64)
    table["prompt_fires"] = n_prompt
    table["completion_fires"] = counts - n_prompt
    table["prompt_only"] = fires & (n_prompt == counts)
    table["completion_only"] = fires & (n_prompt == 0)
    table["dead"] = ~fires
    return table


def _contexts(store: ActivationStore, split: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """sample id -> (positions, token ids) of its kept tokens, in position order."""
    shards = list(store.iter_shards(split))
    if not shards:
        return {}
    samples = np.concatenate([s["sample_idx"].numpy() for s in shards])
    positions = np.concatenate([s["position"].numpy() for s in shards])
    tokens = np.concatenate([s["token_ids"].numpy() for s in shards])
    order = np.lexsort((positions, samples))
    samples, positions, tokens = samples[order], positions[order], tokens[order]
    ids, starts = np.unique(samples, return_index=True)
    ends = np.append(starts[1:], len(samples))
    return {int(i): (positions[a:b], tokens[a:b]) for i, a, b in zip(ids, starts, ends)}


def _render(tokenizer, positions, tokens, at: int, window: int) -> str:
    keep = np.abs(positions - at) <= window
    pieces = []
    for p, t in zip(positions[keep], tokens[keep]):
        text = tokenizer.decode([int(t)]) if tokenizer is not None else f"[{int(t)}]"
        pieces.append(f"{MARK[0]}{text}{MARK[1]}" if p == at else text)
    return "".join(pieces)


def run(
    sae,
    store: ActivationStore,
    sample_ids: np.ndarray,
    batch_size: int = 4096,
    n_examples: int = 5,
    context_window: int = 8,
    tokenizer=None,
    device: str = "cpu",
    progress: bool = True,
    cutoffs: np.ndarray | None = None,
) -> FeaturePass:
    """Encode the store's tokens (both splits) once; statistics on eval, pooling on all samples.

    sample_ids: every sample id of the cell's table (rows of the pooled matrices, in order).
    cutoffs: per sample (same order) the position of its first scored word
    (``first_scored_positions``); with them the ``before_scored`` pooling is made too.
    """
    from .progress import bar as progress_bar

    d_sae = sae.cfg.d_sae
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    sorter = np.argsort(sample_ids)
    n = len(sample_ids)
    pooled_max = torch.zeros((n, d_sae))
    pooled_sum = torch.zeros((n, d_sae))
    n_completion = torch.zeros(n)
    # the mean poolings over other tokens than the completion's: name -> (sum, token count)
    extra = {"prompt": (torch.zeros((n, d_sae)), torch.zeros(n))}
    if cutoffs is not None:
        cutoffs_t = torch.as_tensor(np.asarray(cutoffs, dtype=np.int64))
        if len(cutoffs_t) != n:
            raise ValueError(f"cutoffs has {len(cutoffs_t)} entries for {n} samples")
        extra["before_scored"] = (torch.zeros((n, d_sae)), torch.zeros(n))
    l0_sum, act_sum, n_tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n)
    firings = {k: [] for k in ("feat", "act", "pos", "sample", "in_prompt")}
    sae = sae.to(device).eval()
    total = store.n_tokens("train") + store.n_tokens("eval")
    bar = progress_bar(total=total, desc="features", unit="tok", enabled=progress)
    for split in ("eval", "train"):
        for shard in store.iter_shards(split):
            samples = shard["sample_idx"].numpy()
            found = np.clip(np.searchsorted(sample_ids, samples, sorter=sorter), 0, n - 1)
            rows_np = sorter[found]
            if len(samples) and not np.array_equal(sample_ids[rows_np], samples):
                bad = samples[sample_ids[rows_np] != samples][0]
                raise ValueError(f"{store.folder}: sample {int(bad)} is not in the cell's sample table")
            rows_all = torch.from_numpy(rows_np)
            for start in range(0, len(samples), batch_size):
                x = shard["acts"][start : start + batch_size].to(device, torch.float32)
                with torch.no_grad():
                    f = sae.encode(x).float().cpu()
                rows = rows_all[start : start + batch_size]
                in_prompt = shard["in_prompt"][start : start + batch_size]
                active = f > 0
                l0_sum.index_add_(0, rows, active.sum(1).double())
                act_sum.index_add_(0, rows, f.sum(1).double())
                n_tokens.index_add_(0, rows, torch.ones(len(rows)))
                comp = ~in_prompt
                if comp.any():
                    pooled_sum.index_add_(0, rows[comp], f[comp])
                    n_completion.index_add_(0, rows[comp], torch.ones(int(comp.sum())))
                    index = rows[comp][:, None].expand(-1, d_sae)
                    pooled_max.scatter_reduce_(0, index, f[comp], "amax", include_self=True)
                position = shard["position"][start : start + batch_size]
                for name, (total, count) in extra.items():
                    cut = cutoffs_t[rows] if name == "before_scored" else None
                    keep = pooled_tokens(name, in_prompt, position, cut)
                    if keep.any():
                        total.index_add_(0, rows[keep], f[keep])
                        count.index_add_(0, rows[keep], torch.ones(int(keep.sum())))
                if split == "eval":
                    r, c = active.nonzero(as_tuple=True)
                    firings["feat"].append(c.numpy())
                    firings["act"].append(f[r, c].numpy())
                    firings["pos"].append(shard["position"][start : start + batch_size][r].numpy())
                    firings["sample"].append(samples[start : start + batch_size][r.numpy()])
                    firings["in_prompt"].append(in_prompt[r].numpy())
                bar.update(len(x))
    bar.close()
    flat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in firings.items()}
    feat = flat["feat"].astype(np.int64)
    act = flat["act"].astype(np.float64)
    pos = flat["pos"].astype(np.int64)
    sample = flat["sample"].astype(np.int64)
    contexts = _contexts(store, "eval")
    last_position = {s: int(p.max()) for s, (p, _) in contexts.items()}
    first_position = {s: int(p.min()) for s, (p, _) in contexts.items()}
    span = np.array([max(last_position[s] - first_position[s], 1) for s in sample], dtype=np.float64)
    rel = (pos - np.array([first_position[s] for s in sample], dtype=np.float64)) / span if len(sample) else pos * 0.0
    n_eval_tokens = store.n_tokens("eval")
    stats = _firing_table(
        feat, act, pos, rel, flat["in_prompt"].astype(bool), sample * d_sae + feat, d_sae, n_eval_tokens, len(contexts)
    )
    examples = top_examples(feat, act, pos, sample, contexts, tokenizer, n_examples, context_window)
    shaded = token_examples(feat, act, pos, sample, contexts, tokenizer, n_examples, context_window)
    mean = pooled_sum / n_completion.clamp_min(1)[:, None]
    pooled = {
        "sample_id": torch.tensor(np.asarray(sample_ids, dtype=np.int64)),
        "max": pooled_max,
        "mean": mean,
        "l0_sum": l0_sum,
        "act_sum": act_sum,
        "n_tokens": n_tokens,
        "n_completion_tokens": n_completion,
    }
    for name, (total, count) in extra.items():
        pooled[name] = total / count.clamp_min(1)[:, None]
        pooled[f"n_{name}_tokens"] = count
    if cutoffs is not None:
        pooled["scored_cutoff"] = cutoffs_t
    return FeaturePass(stats=stats, examples=examples, pooled=pooled, token_examples=shaded)


def top_examples(feat, act, pos, sample, contexts, tokenizer, n: int, window: int) -> dict:
    """feature -> its ``n`` highest activations on eval tokens, each with the marked context."""
    if not len(feat):
        return {}
    order = np.lexsort((sample, -act, feat))
    feat_sorted = feat[order]
    starts = np.searchsorted(feat_sorted, np.unique(feat_sorted))
    out = {}
    for start in starts:
        j = int(feat_sorted[start])
        rows = order[start : start + n]
        rows = rows[feat[rows] == j]
        out[j] = [
            {
                "sample_id": int(sample[r]),
                "position": int(pos[r]),
                "activation": float(act[r]),
                "context": _render(tokenizer, *contexts[int(sample[r])], at=int(pos[r]), window=window),
            }
            for r in rows
        ]
    return out


def token_examples(feat, act, pos, sample, contexts, tokenizer, n: int, window: int, seed: int = 0) -> dict:
    """feature -> {"histogram": {edges, counts}, "top": [...], "intervals": [{label, examples}]}.

    From the flat list of eval firings (feature, activation, position, sample): the histogram of
    the feature's activations on ``HISTOGRAM_BINS`` bins over (0, max]; its ``n`` top examples;
    ``PER_INTERVAL`` examples drawn at random (seeded per feature) from each of ``INTERVALS``
    equal intervals of its max activation. An example holds the context's tokens (± ``window``)
    and the feature's activation on each (0 where it did not fire), ``at`` indexing its token.
    """
    if not len(feat):
        return {}
    # firings sorted by (feature, sample, position): one feature's firings in one sample are a run
    order = np.lexsort((pos, sample, feat))
    f_s, s_s, p_s, a_s = feat[order], sample[order], pos[order], act[order]
    names: dict[int, str] = {}

    def token_text(t: int) -> str:
        if t not in names:
            names[t] = tokenizer.decode([t]) if tokenizer is not None else f"[{t}]"
        return names[t]

    def example(j: int, row: int) -> dict:
        s, at = int(sample[row]), int(pos[row])
        positions, tokens = contexts[s]
        keep = np.abs(positions - at) <= window
        lo = np.searchsorted(f_s, j, "left")
        hi = np.searchsorted(f_s, j, "right")
        a = lo + np.searchsorted(s_s[lo:hi], s, "left")
        b = lo + np.searchsorted(s_s[lo:hi], s, "right")
        fired = dict(zip(p_s[a:b].tolist(), a_s[a:b].tolist()))
        window_positions = positions[keep].tolist()
        return {
            "sample_id": s,
            "position": at,
            "activation": round(float(act[row]), 4),
            "tokens": [token_text(int(t)) for t in tokens[keep]],
            "acts": [round(fired.get(p, 0.0), 4) for p in window_positions],
            "at": window_positions.index(at),
        }

    by_feature = np.lexsort((sample, -act, feat))  # each feature's firings, largest first
    feat_sorted = feat[by_feature]
    features, starts = np.unique(feat_sorted, return_index=True)
    ends = np.append(starts[1:], len(feat_sorted))
    out = {}
    for j, start, end in zip(features.tolist(), starts, ends):
        rows = by_feature[start:end]
        values = act[rows]
        top = float(values[0])
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, top if top > 0 else 1.0))
        rng = np.random.default_rng([seed, j])
        intervals = []
        for i in range(INTERVALS):
            low, high = top * i / INTERVALS, top * (i + 1) / INTERVALS
            inside = rows[(values >= low) & ((values < high) if i < INTERVALS - 1 else (values <= high))]
            picked = np.sort(rng.choice(inside, size=min(PER_INTERVAL, len(inside)), replace=False))
            intervals.append(
                {
                    "label": _interval_label(i),
                    "n": int(len(inside)),
                    "examples": [example(j, int(r)) for r in picked],
                }
            )
        out[j] = {
            "histogram": {"edges": [float(e) for e in edges], "counts": counts.tolist()},
            "top": [example(j, int(r)) for r in rows[:n]],
            "intervals": intervals,
        }
    return out


TOKEN_EXAMPLES = "token_examples.parquet"  # one row per example (feature, group, rank, tokens, acts)
TOKEN_HISTOGRAMS = "token_histograms.parquet"  # one row per live feature (max, bin counts, interval sizes)
TOP_GROUP = -1  # an example's group: the top examples, or the index of its activation interval


def write_token_examples(folder: Path, views: dict) -> None:
    """``token_examples`` output as two parquet tables in ``folder`` (token strings compress well
    there: as JSON the demo's views took ~38 MB per SAE)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {k: [] for k in ("feature", "group", "rank", "sample_id", "position", "activation", "at", "tokens", "acts")}
    hist = {"feature": [], "max_act": [], "counts": [], "interval_n": []}
    for j, view in sorted(views.items(), key=lambda kv: int(kv[0])):
        j = int(j)
        hist["feature"].append(j)
        hist["max_act"].append(float(view["histogram"]["edges"][-1]))
        hist["counts"].append([int(c) for c in view["histogram"]["counts"]])
        hist["interval_n"].append([int(i["n"]) for i in view["intervals"]])
        groups = [(TOP_GROUP, view["top"])] + [(g, i["examples"]) for g, i in enumerate(view["intervals"])]
        for group, examples in groups:
            for rank, e in enumerate(examples):
                for key, value in (("feature", j), ("group", group), ("rank", rank)):
                    rows[key].append(value)
                for key in ("sample_id", "position", "activation", "at", "tokens", "acts"):
                    rows[key].append(e[key])
    types = {
        "feature": pa.int32(), "group": pa.int8(), "rank": pa.int16(), "sample_id": pa.int64(),
        "position": pa.int32(), "activation": pa.float32(), "at": pa.int16(),
        "tokens": pa.list_(pa.string()), "acts": pa.list_(pa.float32()),
    }  # fmt: skip
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in rows.items()})
    pq.write_table(table, Path(folder) / TOKEN_EXAMPLES, compression="zstd")
    histograms = pa.table(
        {
            "feature": pa.array(hist["feature"], pa.int32()),
            "max_act": pa.array(hist["max_act"], pa.float64()),
            "counts": pa.array(hist["counts"], pa.list_(pa.int32())),
            "interval_n": pa.array(hist["interval_n"], pa.list_(pa.int32())),
        }
    )
    pq.write_table(histograms, Path(folder) / TOKEN_HISTOGRAMS, compression="zstd")


def _interval_label(i: int) -> str:
    return f"{100 * i // INTERVALS}–{100 * (i + 1) // INTERVALS}% of max"


def read_token_examples(folder: Path, features=None) -> dict:
    """feature (str) -> {"histogram": {edges, counts}, "top": [...], "intervals": [{label, n, examples}]}
    as ``token_examples`` made them, for every live feature or only ``features``."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    for name in (TOKEN_EXAMPLES, TOKEN_HISTOGRAMS):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name}: missing; rebuild the feature statistics (rule feature_stats)")
    wanted = None if features is None else sorted({int(j) for j in features})
    filters = None if wanted is None else [("feature", "in", wanted)]
    hist = pq.read_table(folder / TOKEN_HISTOGRAMS, filters=filters).to_pylist()
    out = {}
    for h in hist:
        out[str(h["feature"])] = {
            "histogram": {
                "edges": [
                    float(e) for e in np.linspace(0.0, h["max_act"] if h["max_act"] > 0 else 1.0, len(h["counts"]) + 1)
                ],
                "counts": h["counts"],
            },
            "top": [],
            "intervals": [{"label": _interval_label(i), "n": n, "examples": []} for i, n in enumerate(h["interval_n"])],
        }
    table = pq.read_table(folder / TOKEN_EXAMPLES, filters=filters).to_pandas()
    table = table.sort_values(["feature", "group", "rank"], kind="stable")
    for row in table.itertuples(index=False):
        example = {
            "sample_id": int(row.sample_id),
            "position": int(row.position),
            "activation": float(row.activation),
            "tokens": list(row.tokens),
            "acts": [float(a) for a in row.acts],
            "at": int(row.at),
        }
        view = out[str(row.feature)]
        (view["top"] if row.group == TOP_GROUP else view["intervals"][row.group]["examples"]).append(example)
    return out


def logit_lens(sae, model, tokenizer, k: int = 10, chunk: int = 512) -> pd.DataFrame:
    """Top promoted and suppressed tokens of each decoder direction: W_U (γ ⊙ d_j).

    γ is the final norm's scale; the norm's division by the residual's RMS is left out (it
    rescales all logits of a direction alike, so the token ranking is unchanged).
    """
    from . import models

    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d], on the model's device
    device = unembed.device  # the products run there, not on the CPU
    norm = models.final_norm(model)
    gamma = getattr(norm, "weight", None)
    gamma = gamma.detach().float().to(device) if gamma is not None else torch.ones(unembed.shape[1], device=device)
    dec = sae.W_dec.detach().float().to(device)
    if dec.shape[1] != unembed.shape[1]:
        raise ValueError(f"decoder width {dec.shape[1]} differs from the model's d_model {unembed.shape[1]}")
    top_ids, bottom_ids, top_vals, bottom_vals = [], [], [], []
    for start in range(0, len(dec), chunk):
        logits = (dec[start : start + chunk] * gamma) @ unembed.T
        t, b = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        top_ids.append(t.indices.cpu()), top_vals.append(t.values.cpu())
        bottom_ids.append(b.indices.cpu()), bottom_vals.append(b.values.cpu())
    top_ids, bottom_ids = torch.cat(top_ids).numpy(), torch.cat(bottom_ids).numpy()
    decode = np.vectorize(lambda i: tokenizer.decode([int(i)]), otypes=[object])
    return pd.DataFrame(
        {
            "feature": np.arange(len(dec)),
            "promoted": [list(row) for row in decode(top_ids)],
            "promoted_logit": [list(map(float, row)) for row in torch.cat(top_vals).numpy()],
            "suppressed": [list(row) for row in decode(bottom_ids)],
            "suppressed_logit": [list(map(float, row)) for row in torch.cat(bottom_vals).numpy()],
        }
    )


def weight_columns(sae) -> pd.DataFrame:
    """Encoder and decoder norms, encoder bias and (JumpReLU / BatchTopK) threshold per feature."""
    out = pd.DataFrame(
        {
            "enc_norm": sae.W_enc_T.detach().double().norm(dim=1).numpy(),
            "dec_norm": sae.W_dec.detach().double().norm(dim=1).numpy(),
            "b_enc": sae.b_enc.detach().double().numpy(),
        }
    )
    if hasattr(sae, "log_threshold"):
        out["threshold"] = sae.log_threshold.detach().double().exp().numpy()
    elif bool((sae.threshold > 0).any()):
        out["threshold"] = sae.threshold.detach().double().numpy()
    return out


def write(
    sae_dir: Path,
    store: "ActivationStore | Path",
    samples: pd.DataFrame,
    out_dir: Path,
    opts: dict,
    model=None,
    tokenizer=None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run the feature pass of one SAE and write its files into ``out_dir`` (atomically):

    stats.parquet (one row per feature, with weight columns and logit-lens tokens),
    examples.json, token_examples.parquet + token_histograms.parquet (the dashboard's per-token
    view, ``read_token_examples``), pooled.safetensors
    (per-sample max / mean and L0 sums), groups.json and
    coactivation_<column>.npy / .json for the configured columns. Returns a short summary.
    """
    from safetensors.torch import save_file

    from . import groups
    from .io import atomic_dir, check_replaceable, write_json
    from .sae import files

    check_replaceable(Path(out_dir))  # before the feature pass, not after it
    sae = files.load(sae_dir)
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    cutoffs = None
    if tokenizer is not None and "text" in samples.columns and getattr(tokenizer, "is_fast", False):
        cutoffs = first_scored_positions(samples, tokenizer)
    elif opts["pooling"] == "before_scored":
        raise ValueError("features.pooling = before_scored needs the samples' text and the model's fast tokenizer")
    result = run(
        sae,
        store,
        samples["sample_id"].to_numpy(),
        cutoffs=cutoffs,
        batch_size=opts["batch_size"],
        n_examples=opts["n_examples"],
        context_window=opts["context_window"],
        tokenizer=tokenizer,
        device=device,
        progress=progress,
    )
    stats = pd.concat([result.stats, weight_columns(sae)], axis=1)
    writes_residual = sae.cfg.target_hook_name or sae.cfg.hook_name
    if model is not None and not writes_residual.endswith("ln2.hook_normalized"):
        stats = stats.merge(logit_lens(sae, model, tokenizer, k=opts["logit_lens_k"]), on="feature")
    x = result.pooled[opts["pooling"]].double().numpy()
    group_block = {"pooling": opts["pooling"], "groups": {}}
    for column in opts["group_columns"]:
        if column not in samples.columns:
            raise ValueError(
                f"features.group_columns: column {column!r} is not in the samples table "
                f"(columns: {list(samples.columns)})"
            )
        group_block["groups"][column] = groups.per_group(
            result.pooled, samples, column, opts["pooling"], opts["rank_variance"]
        )
    bias = opts.get("bias")
    if bias and bias["column"] in samples.columns:
        block = groups.group_bias(x, samples, bias["column"], bias["a"], bias["b"])
        stats[f"cohens_d_{bias['a']}_vs_{bias['b']}"] = block.pop("d")
        group_block["bias"] = block
        if opts["group_columns"] and opts["group_columns"][0] != bias["column"]:
            group_block["bias_correlation"] = groups.bias_correlation(
                x, samples, opts["group_columns"][0], bias["column"], bias["a"], bias["b"]
            )
    pair = opts.get("pair_column")
    if pair and opts["group_columns"]:
        column = opts["group_columns"][0]
        values = [str(v) for v in pd.unique(samples[column].dropna())]
        if len(values) == 2:
            xa, xb, _ = groups.paired_matrices(x, samples, column, pair, values[0], values[1])
            aligned = groups.alignment(xa, xb, opts["alignment_threshold"])
            r = aligned.pop("r", None)
            if r is not None:
                stats[f"alignment_r_{values[0]}_{values[1]}"] = r
            group_block["alignment"] = {"groups": values, **aligned}
        else:
            group_block["alignment"] = {"skipped": f"{column} has {len(values)} values; alignment pairs exactly 2"}
    with atomic_dir(out_dir) as tmp:
        stats.to_parquet(tmp / "stats.parquet", index=False)
        write_json(tmp / "examples.json", {str(k): v for k, v in result.examples.items()})
        write_token_examples(tmp, result.token_examples)
        save_file(
            {k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in result.pooled.items()},
            str(tmp / "pooled.safetensors"),
        )
        write_json(tmp / "groups.json", group_block)
        for column in opts["coactivation_columns"]:
            matrix, block = groups.coactivation(x, samples, column)
            np.save(tmp / f"coactivation_{column}.npy", matrix)
            write_json(tmp / f"coactivation_{column}.json", block)
    live = int((~stats["dead"]).sum())
    return {
        "n_features": int(len(stats)),
        "live": live,
        "prompt_only": int(stats["prompt_only"].sum()),
        "completion_only": int(stats["completion_only"].sum()),
    }


def pool_tokens(
    store: ActivationStore,
    sample_ids: np.ndarray,
    how: str = "mean",
    encoders: dict | None = None,
    batch_size: int = 4096,
    device: str = "cpu",
    cutoffs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-sample pooled activations over the tokens pooling ``how`` reads (``pooled_tokens``),
    in one pass over the store (both splits): ``raw``, the model's own activations (float64),
    and one float32 matrix per entry of ``encoders`` (name -> function from a float32 batch of
    activations [n, d_model] on ``device`` to features [n, width], e.g. an SAE's encode).
    Rows follow ``sample_ids``; a sample without such tokens pools to zeros. ``cutoffs``
    (before_scored only): per sample, in the order of ``sample_ids``, its ``scored_cutoff``."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    sorter = np.argsort(sample_ids)
    if how not in POOLINGS:
        raise ValueError(f"unknown pooling {how!r}; expected one of {sorted(POOLINGS)}")
    reduce = POOLINGS[how][1]
    encoders = encoders or {}
    out: dict[str, torch.Tensor] = {}  # made at the first batch (an encoder's width is known then)
    counts = torch.zeros(len(sample_ids), dtype=torch.float64)
    cut = None if cutoffs is None else np.asarray(cutoffs, dtype=np.int64)
    if cut is not None and len(cut) != len(sample_ids):
        raise ValueError(f"cutoffs has {len(cut)} entries for {len(sample_ids)} samples")
    for split in ("train", "eval"):
        for shard in store.iter_shards(split):
            token_cut = None
            if cut is not None:
                everyone = shard["sample_idx"].numpy()
                at = np.clip(np.searchsorted(sample_ids, everyone, sorter=sorter), 0, max(len(sample_ids) - 1, 0))
                token_cut = torch.from_numpy(np.where(sample_ids[sorter[at]] == everyone, cut[sorter[at]], NO_CUTOFF))
            keep = pooled_tokens(how, shard["in_prompt"], shard["position"], token_cut).numpy()
            found = shard["sample_idx"].numpy()[keep]
            index = np.clip(np.searchsorted(sample_ids, found, sorter=sorter), 0, max(len(sample_ids) - 1, 0))
            if len(found) and not np.array_equal(sample_ids[sorter[index]], found):
                bad = found[sample_ids[sorter[index]] != found][0]
                raise ValueError(f"{store.folder}: sample {int(bad)} is not in the cell's sample table")
            rows_all = torch.from_numpy(sorter[index])
            acts_all = shard["acts"][torch.from_numpy(keep)]
            for start in range(0, len(rows_all), batch_size):
                rows = rows_all[start : start + batch_size]
                acts = acts_all[start : start + batch_size].float()
                parts = {"raw": acts.double()}
                with torch.no_grad():
                    for name, encode in encoders.items():
                        parts[name] = encode(acts.to(device)).float().cpu()
                for name, part in parts.items():
                    if name not in out:
                        fill = -torch.inf if reduce == "max" else 0.0
                        out[name] = torch.full((len(sample_ids), part.shape[1]), fill, dtype=part.dtype)
                    if reduce == "max":
                        index_rows = rows[:, None].expand(-1, part.shape[1])
                        out[name].scatter_reduce_(0, index_rows, part, "amax", include_self=True)
                    else:
                        out[name].index_add_(0, rows, part)
                counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    result = {}
    for name, matrix in out.items():
        if reduce == "max":
            matrix = torch.where(counts[:, None] > 0, matrix, torch.zeros((), dtype=matrix.dtype))
        else:
            matrix = matrix / counts.clamp_min(1).to(matrix.dtype)[:, None]
        result[name] = matrix.numpy()
    result.setdefault("raw", np.zeros((len(sample_ids), store.d_model)))
    for name in encoders:  # no token read anywhere: an encoder's width is unknown -> an empty matrix
        result.setdefault(name, np.zeros((len(sample_ids), 0), dtype=np.float32))
    return result


def pool_raw(
    store: ActivationStore, sample_ids: np.ndarray, how: str = "mean", cutoffs: np.ndarray | None = None
) -> np.ndarray:
    """The model's own activations pooled over each sample's tokens that pooling ``how`` reads
    (both splits; float64): the dense baseline the probes compare SAE features with."""
    return pool_tokens(store, sample_ids, how, cutoffs=cutoffs)["raw"]
