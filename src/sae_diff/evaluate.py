"""SAE evaluation: reconstruction metrics with SAELens 6.54's definitions.

All sums are accumulated in float64 over every kept token of the eval split, so the result
does not depend on the batch size:

    explained_variance         1 - mean_t ‖x - x̂‖² / (mean_t ‖x‖² - ‖mean_t x‖²)       (FVU = 1 - EV)
    explained_variance_legacy  mean_t [1 - ‖x - x̂‖² / ‖x - x̄‖²], x̄ the mean over all tokens
    mse                        mean_t ‖x - x̂‖²   (sum over dimensions)
    cossim                     mean_t cos(x, x̂)
    l0, l1                     mean_t of ‖f‖₀ and ‖f‖₁
    l2_ratio                   mean_t ‖x̂‖ / ‖x‖   (‖x‖ < 1e-4 counts as 1, as in SAELens)
    relative_reconstruction_bias   E‖x̂‖² / E[x · x̂]

SAELens computes the legacy EV and the reconstruction bias per batch and averages the
batches; with all tokens in one batch its numbers and ours are the same quantity.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch

from .sae.model import SAE


class ReconstructionAccumulator:
    """Streaming sums for the reconstruction metrics (two passes for the legacy EV)."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sum_x = None
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.sum_l2_ratio = 0.0
        self.sum_sq_xhat = 0.0
        self.sum_x_dot_xhat = 0.0
        self.firings = torch.zeros(d_sae, dtype=torch.float64)
        self.residuals: list[torch.Tensor] = []  # per-token ‖x - x̂‖², for the legacy EV

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        err = (x - x_hat).pow(2).sum(-1)
        self.residuals.append(err)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += len(x)
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += float(x.pow(2).sum())
        self.sum_sq_err += float(err.sum())
        self.sum_cos += float(((x * x_hat).sum(-1) / (norm_in * norm_out)).sum())
        active = f != 0
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(f.double().abs().sum())
        self.sum_l2_ratio += float(
            (norm_out / torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)).sum()
        )
        self.sum_sq_xhat += float(norm_out.pow(2).sum())
        self.sum_x_dot_xhat += float((x * x_hat).sum())
        self.firings += active.sum(0).double()

    def metrics(self) -> dict:
        n = self.n
        mean_x = self.sum_x / n
        total_variance = self.sum_sq_x / n - float(mean_x.pow(2).sum())
        mse = self.sum_sq_err / n
        ev = 1.0 - mse / total_variance if total_variance > 1e-10 else (1.0 if mse < 1e-10 else 0.0)
        density = (self.firings / n).numpy()
        return {
            "n_tokens": n,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "mse": mse,
            "cossim": self.sum_cos / n,
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "relative_reconstruction_bias": self.sum_sq_xhat / self.sum_x_dot_xhat,
            "dead_fraction": float((density == 0).mean()),
            "n_dead": int((density == 0).sum()),
            "feature_density": density,
        }


@torch.no_grad()
def reconstruction_metrics(sae: SAE, make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> dict:
    """Metrics over every (input, target) batch; ``make_batches()`` is called twice and must
    yield the same tokens in the same order (the legacy EV needs the mean over all tokens
    before its per-token ratios; the second pass reads targets only). For an SAE the target
    is the input."""
    sae.eval()
    acc = ReconstructionAccumulator(sae.cfg.d_sae)
    for x, y in make_batches():
        f = sae.encode(x.float())
        acc.add(y, sae.decode(f), f)
    if acc.n == 0:
        raise ValueError("no tokens to evaluate")
    out = acc.metrics()
    mean_y = acc.sum_x / acc.n
    residuals = torch.cat(acc.residuals)
    spread = torch.cat([(y.double() - mean_y).pow(2).sum(-1) for _, y in make_batches()])
    out["explained_variance_legacy"] = float((1 - residuals / spread).mean())
    return out


def store_batches(store, batch_size: int = 4096, split: str = "eval", target_store=None):
    """A ``make_batches`` for ``reconstruction_metrics`` over an activation store (or a pair)."""

    def make():
        d_in = store.d_model
        for batch in store.iter_batches(batch_size, split=split, paired=target_store):
            yield (batch[:, :d_in], batch[:, d_in:]) if target_store is not None else (batch, batch)

    return make


def tensor_batches(acts: torch.Tensor, batch_size: int = 4096):
    def make():
        for start in range(0, len(acts), batch_size):
            chunk = acts[start : start + batch_size]
            yield chunk, chunk

    return make


def log_density_histogram(density: np.ndarray, bins: int = 40) -> dict:
    """Histogram of log10 feature density over live features; dead ones counted apart."""
    live = density[density > 0]
    if not len(live):
        return {"edges": [], "counts": [], "n_dead": int(len(density))}
    counts, edges = np.histogram(np.log10(live), bins=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "n_dead": int((density == 0).sum())}


def json_ready(metrics: dict) -> dict:
    """Drop the per-feature arrays and make floats JSON-safe (NaN -> None)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, np.ndarray):
            continue
        out[key] = None if isinstance(value, float) and math.isnan(value) else value
    return out


# --------------------------------------------------------------------------- spliced


@torch.no_grad()
def spliced_metrics(
    model,
    tokenizer,
    sae: SAE | None,
    table,
    layer: int,
    max_length: int = 128,
    batch_size: int = 8,
    exclude_special: bool = True,
    exclude_first: bool = True,
    device: str = "cpu",
    progress: bool = False,
    reconstruct: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
):
    """CE loss and KL with the SAE's reconstruction spliced into the residual stream after
    block ``layer`` (no error term), against the clean model and layer ``layer`` zero-ablated.

    Splicing and ablation touch the kept tokens only (special tokens and position 0 keep
    their activations, as in training). Losses are next-token losses at kept positions that
    have a next token. The blocks up to ``layer`` run once per batch; only the blocks above
    it run again for each variant.

    ``reconstruct(hidden, batch)``, when given, replaces the SAE (``sae`` may then be None): it
    returns the activations spliced in at the kept tokens, [n_kept, d] in ``hidden[batch["keep"]]``
    order, from the block's output ``hidden`` [B, T, d] and the batch (``input_ids``,
    ``attention_mask``, ``keep``; right-padded, on ``device``), e.g. a crosscoder's reconstruction,
    which also needs other models' activations of the same tokens. The metric names stay ``*_with_sae``.

    Returns (metrics dict, per-position DataFrame with mean CE clean / spliced / ablated).
    """
    import pandas as pd

    from . import models
    from .activations import tokenize
    from .progress import bar

    sequences = tokenize(tokenizer, table, max_length, exclude_special, exclude_first)
    kl_sums = {"sae": 0.0, "ablated": 0.0}
    # per predicted-token position: count and CE sums (clean, sae, ablated); grown as batches widen
    counts = np.zeros(0)
    ce_sums = {name: np.zeros(0) for name in ("clean", "sae", "ablated")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].ids))
    for start in bar(range(0, len(order), batch_size), desc="spliced eval", enabled=progress):
        seqs = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        keep = torch.zeros((len(seqs), width), dtype=torch.bool)
        scored = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions whose next token is scored
        for j, s in enumerate(seqs):
            ids[j, : len(s.ids)] = torch.tensor(s.ids)
            attn[j, : len(s.ids)] = 1
            keep[j, : len(s.ids)] = torch.from_numpy(s.keep)
            scored[j, : len(s.ids) - 1] = torch.from_numpy(s.keep[:-1])
        ids, attn, keep, scored = ids.to(device), attn.to(device), keep.to(device), scored.to(device)
        with models.branch_point(model, layer) as state:
            clean_logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        hidden = state["hidden"]
        targets = ids[:, 1:]
        mask = scored[:, :-1]
        log_clean = torch.log_softmax(clean_logits[:, :-1].float(), dim=-1)
        del clean_logits
        ce_clean = -log_clean.gather(-1, targets[..., None]).squeeze(-1)
        variants = {}
        spliced = hidden.clone()
        if reconstruct is None:
            spliced[keep] = sae(hidden[keep].float()).to(hidden.dtype)
        else:
            batch = {"input_ids": ids, "attention_mask": attn, "keep": keep}
            spliced[keep] = reconstruct(hidden, batch).to(device=hidden.device, dtype=hidden.dtype)
        variants["sae"] = spliced
        ablated = hidden.clone()
        ablated[keep] = 0
        variants["ablated"] = ablated
        ce = {"clean": ce_clean}
        for name, h in variants.items():
            logits = models.continue_from(model, layer, h, state).to(log_clean.device)
            log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            ce[name] = -log_p.gather(-1, targets[..., None]).squeeze(-1)
            kl = (log_clean.exp() * (log_clean - log_p)).sum(-1)
            kl_sums[name] += float(kl[mask].double().sum())
            del log_p
        positions = torch.arange(width - 1, device=device).expand_as(mask)[mask].cpu().numpy()
        size = max(len(counts), width - 1)
        counts = np.pad(counts, (0, size - len(counts))) + np.bincount(positions, minlength=size)
        for name in ce_sums:
            values = ce[name][mask].double().cpu().numpy()
            ce_sums[name] = np.pad(ce_sums[name], (0, size - len(ce_sums[name]))) + np.bincount(
                positions, weights=values, minlength=size
            )
    n_positions = int(counts.sum())
    if n_positions == 0:
        raise ValueError("no scored positions for the spliced evaluation")
    mean = {f"ce_{name}": float(v.sum()) / n_positions for name, v in ce_sums.items()}
    mean.update({f"kl_{name}": v / n_positions for name, v in kl_sums.items()})
    metrics = {
        "ce_loss_clean": mean["ce_clean"],
        "ce_loss_with_sae": mean["ce_sae"],
        "ce_loss_with_ablation": mean["ce_ablated"],
        "ce_loss_score": _ratio(mean["ce_ablated"] - mean["ce_sae"], mean["ce_ablated"] - mean["ce_clean"]),
        "kl_div_with_sae": mean["kl_sae"],
        "kl_div_with_ablation": mean["kl_ablated"],
        "kl_div_score": 1.0 - _ratio(mean["kl_sae"], mean["kl_ablated"]),
        "n_positions": n_positions,
    }
    seen = counts > 0
    rows = {
        "position": np.nonzero(seen)[0] + 1,  # the position of the predicted token
        "n": counts[seen].astype(np.int64),
        "ce_clean": ce_sums["clean"][seen] / counts[seen],
        "ce_with_sae": ce_sums["sae"][seen] / counts[seen],
        "ce_with_ablation": ce_sums["ablated"][seen] / counts[seen],
    }
    return metrics, pd.DataFrame(rows)


POSITION_COLUMNS = {
    "position": "int64",
    "n": "int64",
    "ce_clean": "float64",
    "ce_with_sae": "float64",
    "ce_with_ablation": "float64",
}


def _ratio(a: float, b: float) -> float:
    return a / b if abs(b) > 1e-12 else float("nan")


# --------------------------------------------------------------------------- groups, comparison


@torch.no_grad()
def group_metrics(sae: SAE, store, table, columns: list[str], split: str = "eval") -> dict:
    """Per value of each group column: tokens, mean L0, dead count and mean activation.

    Tokens map to samples through the store's ``sample_idx``; ``table`` is the samples table.
    """
    import pandas as pd

    columns = [c for c in columns if c in table.columns]
    if not columns:
        return {}
    lookup = table.set_index("sample_id")[columns]
    stats: dict = {c: {} for c in columns}
    for shard in store.iter_shards(split):
        f = sae.encode(shard["acts"].float())
        groups = lookup.loc[shard["sample_idx"].numpy()]
        for column in columns:
            values = groups[column].to_numpy()
            for value in pd.unique(values):
                rows = torch.from_numpy(values == value)
                part = f[rows]
                entry = stats[column].setdefault(
                    str(value),
                    {
                        "n_tokens": 0,
                        "sum_l0": 0.0,
                        "sum_act": 0.0,
                        "fired": torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
                    },
                )
                entry["n_tokens"] += len(part)
                entry["sum_l0"] += float((part != 0).sum())
                entry["sum_act"] += float(part.double().sum())
                entry["fired"] |= (part != 0).any(0)
    return {
        column: {
            value: {
                "n_tokens": e["n_tokens"],
                "l0": e["sum_l0"] / e["n_tokens"],
                "dead_features": int((~e["fired"]).sum()),
                "mean_activation": e["sum_act"] / (e["n_tokens"] * sae.cfg.d_sae),
            }
            for value, e in groups_.items()
        }
        for column, groups_ in stats.items()
    }


# which direction is better for each reported metric
BETTER = {
    "explained_variance": "higher",
    "explained_variance_legacy": "higher",
    "fvu": "lower",
    "mse": "lower",
    "cossim": "higher",
    "l0": "lower",
    "dead_fraction": "lower",
    "ce_loss_score": "higher",
    "kl_div_score": "higher",
    "ce_loss_with_sae": "lower",
    "kl_div_with_sae": "lower",
    "relative_reconstruction_bias": "closer to 1",
    "l2_ratio": "closer to 1",
}


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> tuple[dict, str]:
    """Side-by-side metrics of two SAEs on the same activations, and a readable summary."""
    rows, lines = {}, [f"{'metric':<30}{name_a:>14}{name_b:>14}  better"]
    for metric, rule in BETTER.items():
        if metric not in a or metric not in b or a[metric] is None or b[metric] is None:
            continue
        va, vb = float(a[metric]), float(b[metric])
        if rule == "higher":
            winner = name_a if va > vb else name_b if vb > va else "tie"
        elif rule == "lower":
            winner = name_a if va < vb else name_b if vb < va else "tie"
        else:
            da, db = abs(va - 1), abs(vb - 1)
            winner = name_a if da < db else name_b if db < da else "tie"
        rows[metric] = {name_a: va, name_b: vb, "better": winner, "rule": rule}
        lines.append(f"{metric:<30}{va:>14.5g}{vb:>14.5g}  {winner} ({rule})")
    return rows, "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- one SAE of one cell


def evaluate_sae(
    sae_dir,
    store_dir,
    out_json,
    *,
    model_dir=None,
    samples_path=None,
    layer=None,
    target_store_dir=None,
    options: dict | None = None,
    place="cpu",
    progress: bool = False,
    loaded=None,
    extra: dict | None = None,
) -> dict:
    """Every metric of one SAE on its cell's eval split; writes JSON and the per-position loss table
    (empty when the spliced metrics were skipped). Figures are drawn by their own jobs.

    The spliced metrics need the model, the samples and a residual-stream SAE; they are
    skipped with a stated reason otherwise. ``loaded``: the (model, tokenizer) of
    ``model_dir`` when the caller evaluates several SAEs with one model; ``place``: a
    models.Placement (device, device map, autocast) or a device name. ``extra``: results
    computed by the caller for several SAEs at once (absorption), stored as given.
    """
    from pathlib import Path

    import pandas as pd

    from .activations import ActivationStore
    from .io import write_json, write_parquet
    from .sae import files

    opts = {
        "batch_size": 4096,
        "spliced": True,
        "spliced_batch_size": 8,
        "max_samples": 256,
        "group_columns": [],
        "max_length": 128,
        "exclude_special_tokens": True,
        "exclude_first_position": True,
        **(options or {}),
    }
    out_json = Path(out_json)
    sae = files.load_any(sae_dir)
    store = ActivationStore(store_dir)
    target = ActivationStore(target_store_dir) if target_store_dir else None
    result = {
        "sae": str(sae_dir),
        "architecture": sae.cfg.architecture,
        "d_sae": sae.cfg.d_sae,
        "hook_name": store.manifest["hook_name"],
    }
    recon = reconstruction_metrics(sae, store_batches(store, opts["batch_size"], "eval", target))
    density = recon.pop("feature_density")
    result.update(json_ready(recon))
    result["log_density_histogram"] = log_density_histogram(density)

    table = pd.read_parquet(samples_path) if samples_path else None
    if table is not None and opts["group_columns"]:
        result["groups"] = group_metrics(sae, store, table, opts["group_columns"])

    reason = None
    if not opts["spliced"]:
        reason = "disabled in the config (evaluation.spliced: false)"
    elif model_dir is None or table is None:
        reason = "no model or samples given"
    elif sae.cfg.is_transcoder or store.manifest["hook_point"] != "resid_post":
        reason = f"splicing is implemented for the residual stream; this SAE reads {store.manifest['hook_point']}"
    per_position = None
    if reason is None:
        from . import models

        place = models.as_placement(place)
        model, tokenizer = loaded or place.load(model_dir)
        eval_rows = table[table["split"] == "eval"].head(opts["max_samples"])
        at = layer if layer is not None else store.manifest["layer"]
        with place.precision():
            spliced, per_position = spliced_metrics(
                model,
                tokenizer,
                sae.to(models.site_device(model, at, "resid_post")),
                eval_rows,
                at,
                max_length=opts["max_length"],
                batch_size=opts["spliced_batch_size"],
                exclude_special=opts["exclude_special_tokens"],
                exclude_first=opts["exclude_first_position"],
                device=place.device,
                progress=progress,
            )
        result.update(json_ready(spliced))
    else:
        result["spliced_skipped"] = reason
        per_position = pd.DataFrame({c: pd.Series(dtype=t) for c, t in POSITION_COLUMNS.items()})
    write_parquet(per_position, out_json.with_suffix(".loss_by_position.parquet"))
    result.update(extra or {})
    write_json(out_json, result)
    return result
