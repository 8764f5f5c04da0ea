"""KL recovery: how much of the tuned model's departure from the base model a few directions explain.

Per-token KL(P_Mi ‖ P_M0) on the eval split of Di measures where the two models disagree. Adding
into M0, at one layer, what a method says Mi changed there — the diff-SAE's top latents applied to
the same token's difference, a crosscoder's Mi-only latents, the lens's mean difference — and
measuring the KL again gives the share of the disagreement those directions close:

    recovery = 1 − mean KL(Mi ‖ M0 patched) / mean KL(Mi ‖ M0)

A number alone says little: the same number of *random* latents of the same dictionary, patched
the same way, is the null (``n_random`` draws, rank p one-sided: does the method's choice close
more than random latents do). The latents are chosen on the train split (``diff_sae``); every
recovery here is measured on eval samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from . import lens, models

Patch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sae_patch(sae, latents, with_bias: bool = False) -> Patch:
    """h_base + Σ_{j ∈ latents} f_j(h_tuned − h_base)·W_dec[j] (+ b_dec with ``with_bias``;
    ``latents`` None: every latent, i.e. the diff-SAE's whole reconstruction of the difference)."""
    index = None if latents is None else torch.as_tensor(np.asarray(latents, dtype=np.int64))
    sae.eval()

    def patch(h_base: torch.Tensor, h_tuned: torch.Tensor) -> torch.Tensor:
        delta = (h_tuned - h_base).float()
        with torch.no_grad():
            f = sae.encode(delta.reshape(-1, delta.shape[-1]))
            if index is not None:
                kept = torch.zeros_like(f)
                kept[:, index] = f[:, index]
                f = kept
            added = f @ sae.W_dec.float()
            if with_bias:
                added = added + sae.b_dec.float()
        return h_base + added.reshape(delta.shape).to(h_base.dtype)

    return patch


def crosscoder_patch(cc, latents) -> Patch:
    """h_base + Σ_{j ∈ latents} f_j(h_base, h_tuned)·(d_j^tuned / s_tuned − d_j^base / s_base): what those
    latents write into the tuned model's reconstruction and not into the base model's (raw units)."""
    index = torch.as_tensor(np.asarray(latents, dtype=np.int64))
    cc.eval()

    def patch(h_base: torch.Tensor, h_tuned: torch.Tensor) -> torch.Tensor:
        shape = h_base.shape
        pair = torch.stack([h_base, h_tuned], dim=-2).reshape(-1, 2, shape[-1]).float()
        with torch.no_grad():
            f = cc.encode(pair)[:, index]
            w = cc.W_dec.detach().float()[index]  # [K, 2, d]
            scale = cc.input_scale.float()
            writes = w[:, 1] / scale[1] - w[:, 0] / scale[0]
            added = f @ writes
        return h_base + added.reshape(shape).to(h_base.dtype)

    return patch


def vector_patch(vector) -> Patch:
    """h_base + v at every position (the lens's mean difference as a steering vector)."""
    v = torch.as_tensor(np.asarray(vector), dtype=torch.float32)

    def patch(h_base: torch.Tensor, h_tuned: torch.Tensor) -> torch.Tensor:
        return h_base + v.to(h_base.dtype)

    return patch


def rank_p(value: float, null: list[float]) -> float:
    """One-sided rank p of ``value`` against its null draws: (1 + #{null ≥ value}) / (1 + n)."""
    null = [v for v in null if np.isfinite(v)]
    if not np.isfinite(value) or not null:
        return float("nan")
    return (1 + sum(v >= value for v in null)) / (1 + len(null))


def measure(
    base,
    tuned,
    tokenizer,
    samples: pd.DataFrame,
    layer: int,
    targets: dict[str, Patch],
    nulls: dict[str, list[Patch]],
    batch_size: int = 8,
    place="cpu",
    max_length: int = 512,
    progress: bool = True,
) -> dict:
    """KL before, recovery of every target patch, and of its null draws (with the rank p)."""
    every = dict(targets)
    for name, draws in nulls.items():
        every.update({f"{name}/null{j}": patch for j, patch in enumerate(draws)})
    before, after = lens.kl_with_patches(
        base, tuned, tokenizer, samples, layer, every, batch_size, place, max_length=max_length, progress=progress
    )

    def recover(name: str) -> float:
        return lens.kl_recovery(before, after[name])

    out = {"mean_kl_before": float(before["kl_tuned_base"].mean()), "n_tokens": int(len(before)), "targets": {}}
    for name in targets:
        value = recover(name)
        block = {"recovery": value}
        if nulls.get(name):
            null = [recover(f"{name}/null{j}") for j in range(len(nulls[name]))]
            block.update(
                null=null,
                null_median=float(np.median(null)),
                null_range=[float(min(null)), float(max(null))],
                null_p=rank_p(value, null),
            )
        out["targets"][name] = block
    return out


def random_latents(candidates, n: int, draws: int, seed: int) -> list[np.ndarray]:
    """``draws`` sets of ``n`` latents drawn without replacement from ``candidates`` (seeded)."""
    rng = np.random.default_rng(seed)
    candidates = np.asarray(candidates, dtype=np.int64)
    n = min(n, len(candidates))
    return [np.sort(rng.choice(candidates, size=n, replace=False)) for _ in range(draws)]


def run(
    base_dir,
    tuned_dir,
    samples: pd.DataFrame,
    layer: int,
    diff_sae_dir: Path | None,
    adl_dir: Path | None,
    crosscoder_dir: Path | None,
    out: Path,
    top: int,
    n_random: int,
    max_samples: int,
    batch_size: int,
    max_length: int,
    seed: int = 0,
    place="cpu",
    progress: bool = True,
) -> dict:
    """KL recovery at ``layer`` of the methods that ran, each beside its random null; writes ``out`` (JSON)."""
    from .io import read_json, write_json

    place = models.as_placement(place)
    base, tokenizer = place.load(base_dir)
    tuned, _ = place.load(tuned_dir)
    chosen = samples[samples["split"] == "eval"] if "split" in samples.columns else samples
    chosen = chosen.sort_values("sample_id").head(max_samples)
    targets, nulls, notes = {}, {}, {}
    if diff_sae_dir is not None:
        diff_sae_dir = Path(diff_sae_dir)
        if read_json(diff_sae_dir / "metrics.json").get("identical"):
            notes["diff_sae"] = "identical models: no diff-SAE"
        else:
            from .sae import files

            sae = files.load(diff_sae_dir / "sae")
            table = pd.read_parquet(diff_sae_dir / "latents.parquet")
            chosen_latents = table["latent"].head(top).to_numpy()
            live = table.loc[~table["dead"].astype(bool), "latent"].to_numpy() if "dead" in table else table["latent"]
            pool = np.setdiff1d(live, chosen_latents)
            targets["diff_sae_top"] = sae_patch(sae, chosen_latents)
            draws = random_latents(pool, len(chosen_latents), n_random, seed)
            nulls["diff_sae_top"] = [sae_patch(sae, r) for r in draws]
            targets["diff_sae_all"] = sae_patch(sae, None, with_bias=True)
            notes["diff_sae_top"] = [int(v) for v in chosen_latents]
    if crosscoder_dir is not None:
        from . import crosscoder

        table = pd.read_parquet(Path(crosscoder_dir) / "latents.parquet")
        ranked = table.dropna(subset=["mi_only_rank"]).sort_values("mi_only_rank")
        chosen_latents = ranked["latent"].head(top).to_numpy()
        if len(chosen_latents):
            cc = crosscoder.load(Path(crosscoder_dir) / "crosscoder")
            live = table.loc[table["firing_frequency"] > 0, "latent"].to_numpy()
            draws = random_latents(np.setdiff1d(live, chosen_latents), len(chosen_latents), n_random, seed)
            targets["crosscoder_mi_only"] = crosscoder_patch(cc, chosen_latents)
            nulls["crosscoder_mi_only"] = [crosscoder_patch(cc, r) for r in draws]
            notes["crosscoder_mi_only"] = [int(v) for v in chosen_latents]
        else:
            notes["crosscoder_mi_only"] = "the crosscoder has no Mi-only latent"
    if adl_dir is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(adl_dir) / "adl.safetensors"))
        if "data.direction" in tensors:
            targets["adl_data"] = vector_patch(tensors["data.direction"].numpy())
    result = measure(base, tuned, tokenizer, chosen, layer, targets, nulls, batch_size, place, max_length, progress)
    result.update(layer=int(layer), n_samples=int(len(chosen)), n_random=n_random, notes=notes)
    write_json(out, result)
    return result
