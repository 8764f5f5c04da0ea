"""The activation-difference lens (ADL) and per-token KL between a base model and a fine-tune.

Activation-difference lens (Minder et al. 2025, "Narrow finetuning leaves clearly readable
traces in activation differences", arXiv:2510.13900; code: science-of-finetuning/diffing-toolkit,
``methods/activation_difference_lens``): both models read the same token ids of unrelated,
pretraining-like text; at each of the first ``n_positions`` positions the difference
h_tuned - h_base at a site is averaged over the texts. Read through the logit lens (final
norm, then unembedding) or used as a steering vector, that mean shows what the fine-tune was
about. As in the toolkit, the texts are tokenized with the tokenizer's special tokens
(``add_special_tokens=True``) and position 0 -- the BOS token, where the tokenizer adds one --
is *included*: positions are 0..n_positions-1 of that token sequence. Unlike the toolkit,
texts shorter than ``n_positions`` tokens are kept (they count at the positions they reach:
``count`` is per position) rather than dropped.

Per-token KL (the toolkit's ``methods/kl``): KL(P_tuned || P_base) of the next-token
distributions at every kept token of a samples table, tokenized as the activation store
tokenizes it (``activations.tokenize``: prompt + completion; special tokens and position 0
left out by default, like the SAEs' training tokens). ``kl_with_patch`` recomputes it with
the base model's hidden state at one site replaced by any function of both models' hidden
states there, so that the share of the KL a patch closes (``kl_recovery``) can be measured,
e.g. for the tuned-only latents of a crosscoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from . import models

NEUTRAL_TEXTS = Path(__file__).resolve().parents[2] / "resources" / "prompts" / "neutral.txt"
KL_COLUMNS = ("kl_tuned_base", "kl_base_tuned")
NORMALISATIONS = ("final_norm", "gamma", "none")
_KL_CHUNK_ELEMENTS = 1 << 24  # rows x vocab per float64 KL chunk (~128 MiB)

Patch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- texts


def neutral_texts(path: str | Path | None = None) -> list[str]:
    """The non-empty lines of a text file, one text each; lines starting with ``#`` are comments.

    Default: ``resources/prompts/neutral.txt`` of the source checkout (short encyclopedic,
    weather, cooking, geography, science and sports sentences, with no people, gendered words
    or professions in them)."""
    path = Path(path) if path is not None else NEUTRAL_TEXTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file; expected one neutral text per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line and not line.startswith("#")]
    if not texts:
        raise ValueError(f"{path}: no texts in the file (every line is empty or a # comment); expected one per line")
    return texts


# --------------------------------------------------------------------------- shared helpers


def _batches(sequences: list[list[int]], batch_size: int) -> Iterable[list[int]]:
    """Indices of the sequences in batches, longest first (less padding)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask (1 on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[j, : len(s)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _check_sites(model, sites, name: str) -> None:
    depth = models.n_blocks(model)
    for layer, _ in sites:
        if not 0 <= layer < depth:
            raise ValueError(f"layer {layer}: the {name} model has {depth} blocks (0..{depth - 1})")


# --------------------------------------------------------------------------- activation differences


def activation_difference(
    base,
    tuned,
    tokenizer,
    texts: list[str],
    sites: list[tuple[int, str]],
    n_positions: int = 5,
    batch_size: int = 32,
    place: "models.Placement | str" = "cpu",
    progress: bool = True,
) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """Mean of h_tuned - h_base per position at each site, over the first ``n_positions`` tokens
    of each text (the ADL of Minder et al. 2025).

    Each text is tokenized once, with special tokens (position 0 is the BOS token when the
    tokenizer adds one, and it is included, as in the diffing toolkit), and cut to
    ``n_positions`` tokens: a causal model's activations there do not depend on what follows.
    Both models read exactly those ids; each forward stops after the deepest needed block
    (``models.capture(stop=True)``). Differences are taken and summed in float64.

    Returns per (layer, hook): ``mean`` [n_positions, d] (NaN at a position no text reaches),
    ``count`` [n_positions] (texts reaching each position), ``mean_all`` [d] (over every
    (text, position) pair), ``base_mean`` / ``tuned_mean`` [n_positions, d] (each model's own
    mean activation) and ``tuned_norm`` [n_positions] (mean L2 norm of the tuned activations).
    All float64 numpy arrays. The toolkit scales a steering vector to the tuned model's mean
    norm at positions 5..127 of 128-token texts: run with ``n_positions=128`` and take the
    count-weighted mean of ``tuned_norm[5:]``.
    """
    from .data import check_vocabulary
    from .progress import bar as progress_bar

    if n_positions < 1:
        raise ValueError(f"n_positions = {n_positions}: expected at least 1")
    sites = [(int(layer), str(hook)) for layer, hook in sites]
    if not sites:
        raise ValueError("activation_difference: no sites given")
    _check_sites(base, sites, "base")
    _check_sites(tuned, sites, "tuned")
    texts = [str(t) for t in texts]
    check_vocabulary(
        pd.DataFrame({"sample_id": np.arange(len(texts)), "text": texts}),
        tokenizer,
        "activation_difference texts",
        "the model",
    )
    sequences = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:n_positions] for t in texts]
    sequences = [s for s in sequences if s]
    if not sequences:
        raise ValueError("activation_difference: no text has any token")
    place = models.as_placement(place)
    pad_id = _pad_id(tokenizer)
    sums: dict = {}
    counts = torch.zeros(n_positions, dtype=torch.float64)
    bar = progress_bar(total=len(sequences), desc="activation difference", unit="text", enabled=progress)
    for rows in _batches(sequences, batch_size):
        ids, mask = _pad([sequences[i] for i in rows], pad_id)
        width = ids.shape[1]
        acts = {}
        for name, model in (("base", base), ("tuned", tuned)):
            with torch.inference_mode(), place.precision(), models.capture(model, sites, stop=True) as store:
                models.run_until_stopped(
                    model, input_ids=ids.to(place.device), attention_mask=mask.to(place.device), use_cache=False
                )
            acts[name] = {site: store[site].to("cpu", torch.float64) for site in sites}
        real = mask.bool()[:, :, None]
        for site in sites:
            h_base, h_tuned = acts["base"][site], acts["tuned"][site]
            zero = torch.zeros((), dtype=torch.float64)
            if site not in sums:
                d = h_base.shape[-1]
                sums[site] = {k: torch.zeros((n_positions, d), dtype=torch.float64) for k in ("diff", "base", "tuned")}
                sums[site]["norm"] = torch.zeros(n_positions, dtype=torch.float64)
            sums[site]["diff"][:width] += torch.where(real, h_tuned - h_base, zero).sum(0)
            sums[site]["base"][:width] += torch.where(real, h_base, zero).sum(0)
            sums[site]["tuned"][:width] += torch.where(real, h_tuned, zero).sum(0)
            sums[site]["norm"][:width] += torch.where(real[..., 0], h_tuned.norm(dim=-1), zero).sum(0)
        counts[:width] += mask.sum(0).to(torch.float64)
        bar.update(len(rows))
    bar.close()
    per_position = counts[:, None]
    out = {}
    for site in sites:
        s = sums[site]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[site] = {
                "mean": (s["diff"] / per_position).numpy(),
                "count": counts.numpy().astype(np.int64),
                "mean_all": (s["diff"].sum(0) / counts.sum()).numpy(),
                "base_mean": (s["base"] / per_position).numpy(),
                "tuned_mean": (s["tuned"] / per_position).numpy(),
                "tuned_norm": (s["norm"] / counts).numpy(),
            }
    return out


# --------------------------------------------------------------------------- reading directions


def logit_lens(vectors, model, tokenizer, k: int = 20, normalise: str = "final_norm", chunk: int = 256) -> pd.DataFrame:
    """Tokens each row of ``vectors`` [n, d] promotes (top-k logits) and suppresses (bottom-k).

    normalise: ``final_norm`` (default, as the ADL paper and the diffing toolkit read a
    difference): the model's final norm module applied to the vector as it stands -- RMS
    division and scale (and, for LayerNorm, centring and bias) -- then the unembedding
    (with its bias, if any); ``gamma``: only the final norm's scale, as ``features.logit_lens``
    reads SAE decoder rows (the division by the RMS rescales all logits of a row alike, so
    the ranking of an RMSNorm model is the same; logits differ); ``none``: the unembedding alone.
    The toolkit reads the difference through the fine-tuned model's head; pass that model.

    Columns: row, promoted / suppressed (decoded tokens), promoted_id / suppressed_id,
    promoted_logit / suppressed_logit, promoted_prob (softmax of the logits) and
    suppressed_prob (softmax of the negated logits: the toolkit's ``inv_probs`` when the head
    has no bias).
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise = {normalise!r}: expected one of {NORMALISATIONS}")
    vectors = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    head = model.get_output_embeddings()
    weight = head.weight
    if vectors.shape[1] != weight.shape[1]:
        raise ValueError(f"vectors have width {vectors.shape[1]}, the model's d_model is {weight.shape[1]}")
    norm = models.final_norm(model)
    k = min(k, weight.shape[0])
    parts: dict[str, list] = {key: [] for key in ("top_i", "top_v", "top_p", "bot_i", "bot_v", "bot_p")}
    with torch.no_grad():
        for start in range(0, len(vectors), chunk):
            v = vectors[start : start + chunk].to(weight.device, weight.dtype)
            if normalise == "final_norm":
                v = norm(v)
            elif normalise == "gamma" and getattr(norm, "weight", None) is not None:
                v = v * norm.weight.to(v.dtype)
            logits = head(v).float()
            top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
            probs, inverse = logits.softmax(-1), (-logits).softmax(-1)
            parts["top_i"].append(top.indices.cpu()), parts["top_v"].append(top.values.cpu())
            parts["bot_i"].append(bottom.indices.cpu()), parts["bot_v"].append(bottom.values.cpu())
            parts["top_p"].append(probs.gather(1, top.indices).cpu())
            parts["bot_p"].append(inverse.gather(1, bottom.indices).cpu())
    cat = {key: torch.cat(value).numpy() for key, value in parts.items()}

    def decode(ids):
        return [[tokenizer.decode([int(i)]) for i in row] for row in ids]

    return pd.DataFrame(
        {
            "row": np.arange(len(vectors)),
            "promoted": decode(cat["top_i"]),
            "promoted_id": [list(map(int, r)) for r in cat["top_i"]],
            "promoted_logit": [list(map(float, r)) for r in cat["top_v"]],
            "promoted_prob": [list(map(float, r)) for r in cat["top_p"]],
            "suppressed": decode(cat["bot_i"]),
            "suppressed_id": [list(map(int, r)) for r in cat["bot_i"]],
            "suppressed_logit": [list(map(float, r)) for r in cat["bot_v"]],
            "suppressed_prob": [list(map(float, r)) for r in cat["bot_p"]],
        }
    )


def top_aligned(direction, decoder, k: int = 20) -> pd.DataFrame:
    """The ``k`` latents whose decoder rows (``decoder`` [m, d]) have the largest cosine with
    ``direction`` [d], highest first (ties by latent id); columns latent, cosine (float64).
    A zero row has cosine 0."""
    v = np.asarray(torch.as_tensor(direction).detach().cpu().double() if torch.is_tensor(direction) else direction)
    w = np.asarray(torch.as_tensor(decoder).detach().cpu().double() if torch.is_tensor(decoder) else decoder)
    v, w = v.astype(np.float64).reshape(-1), w.astype(np.float64)
    if w.ndim != 2 or w.shape[1] != len(v):
        raise ValueError(f"decoder of shape {w.shape} does not match a direction of width {len(v)}")
    norm_v = np.linalg.norm(v)
    if norm_v == 0:
        raise ValueError("top_aligned: the direction is zero")
    norms = np.linalg.norm(w, axis=1)
    cosine = np.divide(w @ v, norms * norm_v, out=np.zeros(len(w)), where=norms > 0)
    order = np.lexsort((np.arange(len(w)), -cosine))[: max(0, k)]
    return pd.DataFrame({"latent": order.astype(np.int64), "cosine": cosine[order]})


# --------------------------------------------------------------------------- per-token KL


def _sequences(tokenizer, samples: pd.DataFrame, max_length: int, exclude_special: bool, exclude_first: bool):
    """The samples tokenized as the activation store tokenizes them (``activations.tokenize``)."""
    from .activations import tokenize

    if "text" not in samples.columns:
        raise ValueError(f"samples: no 'text' column (columns: {list(samples.columns)})")
    n = len(samples)
    view = pd.DataFrame(
        {
            "sample_id": samples["sample_id"].to_numpy() if "sample_id" in samples.columns else np.arange(n),
            "split": "",
            "text": samples["text"].astype(str).to_numpy(),
        }
    )
    if "prompt_text" in samples.columns:
        view["prompt_text"] = samples["prompt_text"].to_numpy()
    return tokenize(tokenizer, view, max_length, exclude_special, exclude_first)


def _kl_rows(lt: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P_t || P_b) and KL(P_b || P_t) per row of two logit matrices [n, vocab]: log_softmax
    in float32 (float64 for float64 logits), the sum over the vocabulary accumulated in float64."""
    out_tb, out_bt = [], []
    dtype = torch.promote_types(torch.promote_types(lt.dtype, lb.dtype), torch.float32)
    step = max(1, _KL_CHUNK_ELEMENTS // max(1, lt.shape[-1]))
    for start in range(0, len(lt), step):
        lpt = torch.log_softmax(lt[start : start + step].to(dtype), dim=-1)
        lpb = torch.log_softmax(lb[start : start + step].to(dtype), dim=-1)
        diff = lpt - lpb
        out_tb.append(torch.sum(lpt.exp() * diff, dim=-1, dtype=torch.float64).cpu())
        out_bt.append(torch.sum(lpb.exp() * -diff, dim=-1, dtype=torch.float64).cpu())
    return torch.cat(out_tb), torch.cat(out_bt)


def _kl_table(
    base,
    tuned,
    tokenizer,
    samples: pd.DataFrame,
    batch_size: int,
    place,
    exclude_special: bool,
    exclude_first: bool,
    max_length: int,
    progress: bool,
    site: tuple[int, str] | None = None,
    patch: Patch | None = None,
) -> pd.DataFrame:
    from .editing import _replace_first
    from .progress import bar as progress_bar

    if site is not None:
        _check_sites(base, [site], "base")
        _check_sites(tuned, [site], "tuned")
    place = models.as_placement(place)
    sequences = _sequences(tokenizer, samples, max_length, exclude_special, exclude_first)
    pad_id = _pad_id(tokenizer)
    results: list = [None] * len(sequences)
    bar = progress_bar(total=len(sequences), desc="per-token KL", unit="seq", enabled=progress)
    for rows in _batches([s.ids for s in sequences], batch_size):
        seqs = [sequences[i] for i in rows]
        if not any(len(s.ids) for s in seqs):
            for i in rows:
                results[i] = (np.zeros(0, np.float64), np.zeros(0, np.float64))
            continue
        ids, mask = _pad([s.ids for s in seqs], pad_id)
        inputs = dict(input_ids=ids.to(place.device), attention_mask=mask.to(place.device), use_cache=False)
        with torch.inference_mode(), place.precision():
            if patch is None:
                logits_t = tuned(**inputs).logits
                logits_b = base(**inputs).logits
            else:
                with models.capture(tuned, [site], stop=False) as store:
                    logits_t = tuned(**inputs).logits
                h_tuned = store[site]

                def replace(_module, _inputs, output):
                    h_base = models._first(output)
                    new = patch(h_base, h_tuned.to(h_base.device))
                    if tuple(new.shape) != tuple(h_base.shape):
                        raise ValueError(f"patch returned shape {tuple(new.shape)}, expected {tuple(h_base.shape)}")
                    return _replace_first(output, new.to(h_base.dtype))

                handle = models.hook_module(base, *site).register_forward_hook(replace)
                try:
                    logits_b = base(**inputs).logits
                finally:
                    handle.remove()
            if logits_t.shape != logits_b.shape:
                raise ValueError(f"logits of shape {tuple(logits_t.shape)} (tuned) and {tuple(logits_b.shape)} (base)")
            keep = torch.zeros(ids.shape, dtype=torch.bool)
            for j, s in enumerate(seqs):
                keep[j, : len(s.ids)] = torch.from_numpy(s.keep)
            keep = keep.to(logits_b.device)
            kl_tb, kl_bt = _kl_rows(logits_t.to(logits_b.device)[keep], logits_b[keep])
        counts = [int(s.keep.sum()) for s in seqs]
        for i, a, b in zip(
            rows, np.split(kl_tb.numpy(), np.cumsum(counts)[:-1]), np.split(kl_bt.numpy(), np.cumsum(counts)[:-1])
        ):
            results[i] = (a, b)
        bar.update(len(rows))
    bar.close()
    return _kl_frame(sequences, results)


def _kl_frame(sequences: list, results: list) -> pd.DataFrame:
    """The per-token KL table of ``_kl_table``: one row per kept token of each sequence, from
    its (KL(P_t || P_b), KL(P_b || P_t)) arrays in ``results`` (the same order as ``sequences``)."""
    columns: dict[str, list] = {k: [] for k in ("sample_idx", "position", "token_id", "in_prompt", *KL_COLUMNS)}
    for s, (kl_tb, kl_bt) in zip(sequences, results):
        pos = np.nonzero(s.keep)[0]
        columns["sample_idx"].append(np.full(len(pos), s.sample_id, dtype=np.int64))
        columns["position"].append(pos.astype(np.int64))
        columns["token_id"].append(np.asarray(s.ids, dtype=np.int64)[pos])
        columns["in_prompt"].append(pos < s.n_prompt)
        columns["kl_tuned_base"].append(np.asarray(kl_tb, dtype=np.float64))
        columns["kl_base_tuned"].append(np.asarray(kl_bt, dtype=np.float64))
    dtypes = {"sample_idx": np.int64, "position": np.int64, "token_id": np.int64, "in_prompt": bool}
    return pd.DataFrame(
        {k: (np.concatenate(v) if v else np.zeros(0, dtypes.get(k, np.float64))) for k, v in columns.items()}
    )


def per_token_kl(
    base,
    tuned,
    tokenizer,
    samples: pd.DataFrame,
    batch_size: int = 8,
    place: "models.Placement | str" = "cpu",
    exclude_special: bool = True,
    exclude_first: bool = True,
    max_length: int = 512,
    progress: bool = True,
) -> pd.DataFrame:
    """KL between the two models' next-token distributions at every kept token of ``samples``.

    samples: a table with a ``text`` column (optionally ``prompt_text`` and ``sample_id``; rows
    without ``sample_id`` are numbered 0..n-1), tokenized as ``activations.tokenize`` does
    (prompt + completion, truncated to ``max_length``); ``exclude_special`` /
    ``exclude_first`` leave out special tokens and position 0 as the activation store does.
    Both models read the same ids. The row of token t holds the distributions after reading
    tokens 0..t (the prediction of token t+1), the position the activation at t belongs to.

    Returns one row per kept token, in sample then position order: sample_idx, position,
    token_id, in_prompt, kl_tuned_base = KL(P_tuned || P_base), kl_base_tuned = KL(P_base ||
    P_tuned) (nats; float64 sums of float32 log_softmax terms -- float64 ones for float64 models).
    """
    return _kl_table(
        base, tuned, tokenizer, samples, batch_size, place, exclude_special, exclude_first, max_length, progress
    )


def kl_with_patch(
    base,
    tuned,
    tokenizer,
    samples: pd.DataFrame,
    layer: int,
    hook: str,
    patch: Patch,
    batch_size: int = 8,
    place: "models.Placement | str" = "cpu",
    exclude_special: bool = True,
    exclude_first: bool = True,
    max_length: int = 512,
    progress: bool = True,
) -> pd.DataFrame:
    """``per_token_kl`` with the base model's activation at (layer, hook) replaced by
    ``patch(h_base, h_tuned)``: both [batch, seq, d] at that site on the same ids (right
    padding included; padded positions are never read), the result [batch, seq, d] flows on
    through the rest of the base model. The tuned model runs unchanged. The same rows as
    ``per_token_kl``; an identity patch (returning ``h_base``) reproduces it exactly.

    Example patches: ``lambda hb, ht: ht`` (the tuned activation spliced in), ``lambda hb, ht:
    hb + v`` (a steering vector), ``lambda hb, ht: hb + decode(tuned_only(encode(ht)))`` (a
    crosscoder's tuned-only latents). ``kl_recovery`` compares the result with the unpatched KL.
    """
    return _kl_table(
        base,
        tuned,
        tokenizer,
        samples,
        batch_size,
        place,
        exclude_special,
        exclude_first,
        max_length,
        progress,
        site=(int(layer), str(hook)),
        patch=patch,
    )


def kl_with_patches(
    base,
    tuned,
    tokenizer,
    samples: pd.DataFrame,
    layer: int,
    patches: dict[str, Patch],
    batch_size: int = 8,
    place: "models.Placement | str" = "cpu",
    exclude_special: bool = True,
    exclude_first: bool = True,
    max_length: int = 512,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """``per_token_kl`` and, for every patch at (``layer``, resid_post), KL(P_tuned ‖ P_base-patched)
    per kept token, in one pass over the samples: per batch the tuned model runs once and the
    base model once (its unpatched logits give ``per_token_kl``; ``models.branch_point`` keeps
    its activation at the layer), and only the blocks above the layer run again for each patch
    (``models.continue_from``). The same numbers as ``per_token_kl`` and as ``kl_with_patch``
    called once per patch (checked in a test), at a fraction of the cost when there are many
    patches (KL recovery's null: one patch per random draw).

    Returns the unpatched table (as ``per_token_kl``) and {patch name: kl_tuned_base array in the
    table's row order}."""
    from .progress import bar as progress_bar

    site = (int(layer), "resid_post")
    _check_sites(base, [site], "base")
    _check_sites(tuned, [site], "tuned")
    place = models.as_placement(place)
    sequences = _sequences(tokenizer, samples, max_length, exclude_special, exclude_first)
    pad_id = _pad_id(tokenizer)
    unpatched: list = [None] * len(sequences)
    per_sequence = {name: [None] * len(sequences) for name in patches}
    bar = progress_bar(total=len(sequences), desc=f"KL with {len(patches)} patches", unit="seq", enabled=progress)
    for rows in _batches([s.ids for s in sequences], batch_size):
        seqs = [sequences[i] for i in rows]
        counts = [int(s.keep.sum()) for s in seqs]
        if not any(len(s.ids) for s in seqs):
            for i in rows:
                unpatched[i] = (np.zeros(0, np.float64), np.zeros(0, np.float64))
                for name in patches:
                    per_sequence[name][i] = np.zeros(0, np.float64)
            continue
        ids, mask = _pad([s.ids for s in seqs], pad_id)
        inputs = dict(input_ids=ids.to(place.device), attention_mask=mask.to(place.device), use_cache=False)
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        for j, s in enumerate(seqs):
            keep[j, : len(s.ids)] = torch.from_numpy(s.keep)
        with torch.inference_mode(), place.precision():
            with models.capture(tuned, [site], stop=False) as store:
                logits_t = tuned(**inputs).logits
            h_tuned = store[site]
            with models.branch_point(base, site[0]) as state:
                logits_b = base(**inputs).logits
            h_base = state["hidden"]
            if logits_t.shape != logits_b.shape:
                raise ValueError(f"logits of shape {tuple(logits_t.shape)} (tuned) and {tuple(logits_b.shape)} (base)")
            kept_t = logits_t[keep.to(logits_t.device)]
            kl_tb, kl_bt = _kl_rows(kept_t.to(logits_b.device), logits_b[keep.to(logits_b.device)])
            splits = np.cumsum(counts)[:-1]
            for i, a, b in zip(rows, np.split(kl_tb.numpy(), splits), np.split(kl_bt.numpy(), splits)):
                unpatched[i] = (a, b)
            for name, patch in patches.items():
                new = patch(h_base, h_tuned.to(h_base.device))
                if tuple(new.shape) != tuple(h_base.shape):
                    raise ValueError(f"patch {name} returned shape {tuple(new.shape)}, expected {tuple(h_base.shape)}")
                logits_b = models.continue_from(base, site[0], new.to(h_base.dtype), state)
                kl_tb, _ = _kl_rows(kept_t.to(logits_b.device), logits_b[keep.to(logits_b.device)])
                for i, part in zip(rows, np.split(kl_tb.numpy(), splits)):
                    per_sequence[name][i] = part
        bar.update(len(rows))
    bar.close()
    before = _kl_frame(sequences, unpatched)
    after = {
        name: (np.concatenate(parts) if parts else np.zeros(0)).astype(np.float64)
        for name, parts in per_sequence.items()
    }
    return before, after


def _kl_values(kl, column: str) -> np.ndarray:
    if isinstance(kl, pd.DataFrame):
        return kl[column].to_numpy(dtype=np.float64)
    return np.asarray(kl, dtype=np.float64).reshape(-1)


def kl_recovery(kl_before, kl_after, column: str = "kl_tuned_base") -> float:
    """1 - mean KL(after) / mean KL(before): the share of the base-to-tuned KL a patch closes
    (1: all of it; 0: none; negative: the patch moved the base model further away).

    kl_before / kl_after: ``per_token_kl`` / ``kl_with_patch`` tables (their ``column``; the
    two must list the same tokens in the same order) or arrays of per-token KL. NaN when the
    unpatched KL is zero (identical models: nothing to recover)."""
    if isinstance(kl_before, pd.DataFrame) and isinstance(kl_after, pd.DataFrame):
        keys = ["sample_idx", "position"]
        if not kl_before[keys].reset_index(drop=True).equals(kl_after[keys].reset_index(drop=True)):
            raise ValueError("kl_recovery: the two tables do not list the same tokens in the same order")
    before, after = _kl_values(kl_before, column), _kl_values(kl_after, column)
    if len(before) != len(after):
        raise ValueError(f"kl_recovery: {len(before)} tokens before, {len(after)} after")
    if not len(before):
        raise ValueError("kl_recovery: no tokens")
    mean_before = float(before.mean())
    if mean_before == 0:
        return float("nan")
    return 1.0 - float(after.mean()) / mean_before


def top_kl_contexts(
    table: pd.DataFrame,
    tokenizer,
    samples: pd.DataFrame,
    n: int = 20,
    window: int = 8,
    column: str = "kl_tuned_base",
    max_length: int = 512,
) -> pd.DataFrame:
    """The ``n`` rows of a ``per_token_kl`` table with the largest ``column``, each with its
    decoded ``token`` and its ``context``: the tokens within ``window`` positions of it (all
    tokens, special ones included), the token itself between ⟦ ⟧ (``features._render``).
    ``samples`` and ``max_length`` must be those the table was computed from."""
    from .features import _render

    top = table.sort_values(column, ascending=False, kind="stable").head(n).reset_index(drop=True)
    sequences = {s.sample_id: s for s in _sequences(tokenizer, samples, max_length, False, False)}
    tokens, contexts = [], []
    for row in top.itertuples(index=False):
        seq = sequences.get(int(row.sample_idx))
        if seq is None or row.position >= len(seq.ids) or seq.ids[row.position] != row.token_id:
            raise ValueError(
                f"top_kl_contexts: sample {row.sample_idx} position {row.position} does not hold token "
                f"{row.token_id} here; pass the samples and max_length the table was computed from"
            )
        ids = np.asarray(seq.ids, dtype=np.int64)
        tokens.append(tokenizer.decode([int(row.token_id)]))
        contexts.append(_render(tokenizer, np.arange(len(ids)), ids, at=int(row.position), window=window))
    return top.assign(token=tokens, context=contexts)


# --------------------------------------------------------------------------- workflow stages


def headline_positions(n_positions: int) -> slice:
    """Positions the lens's headline direction averages: 1..n-1. Position 0 (BOS or the first
    token) is an attention sink whose activation norm dwarfs the rest in most models; its
    difference is kept in the files but would dominate the mean."""
    return slice(1 if n_positions > 1 else 0, n_positions)


def write_adl(
    base_dir,
    tuned_dir,
    text_sets: dict[str, list[str]],
    layers: list[int],
    out_dirs: list,
    n_positions: int,
    k: int,
    batch_size: int,
    place="cpu",
    progress: bool = True,
) -> dict:
    """The activation-difference lens of one (base, tuned) pair at ``layers`` (resid_post).

    For each text set (``neutral``: unrelated text; ``data``: the iteration's own texts) and layer,
    writes into that layer's folder ``adl.safetensors`` (per set: ``{set}.mean`` [n_positions, d],
    ``{set}.direction`` [d], the headline direction = mean over positions 1..n-1) and ``adl.json``
    (per set: texts, counts, the difference's norm per position, promoted / suppressed tokens per
    position and of the direction, read through the tuned model's final norm and unembedding).
    """
    from safetensors.torch import save_file

    from .io import atomic_path, write_json

    place = models.as_placement(place)
    base, tokenizer = place.load(base_dir)
    tuned, _ = place.load(tuned_dir)
    sites = [(int(layer), "resid_post") for layer in layers]
    results = {
        name: activation_difference(base, tuned, tokenizer, texts, sites, n_positions, batch_size, place, progress)
        for name, texts in text_sets.items()
    }
    keep = headline_positions(n_positions)
    summary = {}
    for layer, out_dir in zip(layers, out_dirs):
        out_dir = Path(out_dir)
        record = {"layer": int(layer), "n_positions": n_positions, "headline_positions": [keep.start, keep.stop]}
        tensors = {}
        for name, by_site in results.items():
            block = by_site[(int(layer), "resid_post")]
            mean = block["mean"]
            counts = block["count"]
            reached = counts[keep] > 0
            weights = counts[keep][reached][:, None]
            direction = (mean[keep][reached] * weights).sum(0) / max(weights.sum(), 1)
            per_position = logit_lens(np.nan_to_num(mean), tuned, tokenizer, k=k)
            overall = logit_lens(direction[None], tuned, tokenizer, k=k)
            tensors[f"{name}.mean"] = torch.as_tensor(mean, dtype=torch.float32)
            tensors[f"{name}.direction"] = torch.as_tensor(direction, dtype=torch.float32)
            record[name] = {
                "n_texts": len(text_sets[name]),
                "count": counts.astype(int).tolist(),
                "norm": [float(v) for v in np.linalg.norm(np.nan_to_num(mean), axis=1)],
                "tuned_norm": [float(v) for v in block["tuned_norm"]],
                "direction_norm": float(np.linalg.norm(direction)),
                "promoted": list(overall["promoted"].iloc[0]),
                "promoted_logit": [float(v) for v in overall["promoted_logit"].iloc[0]],
                "suppressed": list(overall["suppressed"].iloc[0]),
                "per_position": [
                    {"position": int(p), "promoted": list(row.promoted), "suppressed": list(row.suppressed)}
                    for p, row in zip(range(n_positions), per_position.itertuples())
                ],
            }
        with atomic_path(out_dir / "adl.safetensors") as tmp:
            save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp))
        write_json(out_dir / "adl.json", record)
        summary[int(layer)] = {name: record[name]["promoted"][:5] for name in results}
    return summary


def write_kl(
    base_dir,
    tuned_dir,
    samples: pd.DataFrame,
    out_dir,
    max_samples: int,
    top_n: int,
    window: int,
    batch_size: int,
    max_length: int,
    place="cpu",
    progress: bool = True,
) -> dict:
    """Per-token KL of one pair on the eval split of its data: ``tokens.parquet`` (every kept token,
    both directions), ``top.parquet`` (the largest KL(Mi ‖ M0) tokens in context) and ``kl.json``
    (means, by position in prompt / completion)."""
    from .io import write_json, write_parquet

    place = models.as_placement(place)
    base, tokenizer = place.load(base_dir)
    tuned, _ = place.load(tuned_dir)
    chosen = samples[samples["split"] == "eval"] if "split" in samples.columns else samples
    chosen = chosen.sort_values("sample_id").head(max_samples)
    if chosen.empty:
        raise ValueError("per-token KL: the data has no eval samples")
    table = per_token_kl(base, tuned, tokenizer, chosen, batch_size, place, max_length=max_length, progress=progress)
    top = top_kl_contexts(table, tokenizer, chosen, n=top_n, window=window, max_length=max_length)
    out_dir = Path(out_dir)
    write_parquet(table, out_dir / "tokens.parquet")
    write_parquet(top, out_dir / "top.parquet")
    record = {
        "n_samples": int(len(chosen)),
        "n_tokens": int(len(table)),
        **{f"mean_{c}": float(table[c].mean()) for c in KL_COLUMNS},
        **{f"median_{c}": float(table[c].median()) for c in KL_COLUMNS},
        "mean_kl_tuned_base_prompt": float(table.loc[table["in_prompt"], "kl_tuned_base"].mean()),
        "mean_kl_tuned_base_completion": float(table.loc[~table["in_prompt"], "kl_tuned_base"].mean()),
        "top_tokens": [str(t) for t in top["token"]],
    }
    write_json(out_dir / "kl.json", record)
    return record
