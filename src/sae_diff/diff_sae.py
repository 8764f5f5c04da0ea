"""Diff-SAEs: an SAE trained on the activation difference Mi − M0 of the same tokens.

Aranguri, Drori & Nanda (2025) train a sparse dictionary on fine-tuned − base activations so that
its latents are, by construction, directions the fine-tune moved. Here the difference is read
through ``paired.DifferenceStore`` from the two cells' stores (M0Di, MiDi: same samples, same
tokens), and the existing trainer, file layout (SAELens), evaluation and feature statistics run on
it unchanged. One job writes, under its folder:

    sae/            cfg.json + sae_weights.safetensors (SAELens layout, d_in = d_model)
    features/       stats.parquet (firing, logit lens read through the tuned model), examples.json, ...
    latents.parquet one row per latent, ranked by ``share``: the part of the difference it carries
    metrics.json    FVU / L0 / dead of the SAE on the eval split's differences, ``b_dec_share``

``share`` of latent j = Σ_t f_j(t)·⟨W_dec[j], Δ_t⟩ / Σ_t ‖Δ_t‖² on the train split: the projection
of the difference onto the latent's own contributions. The shares of all latents plus
``b_dec_share`` (the constant part) sum to ⟨x̂_t, Δ_t⟩ summed over tokens / Σ‖Δ_t‖²; for a perfect
reconstruction, 1. The ranking uses the train split (the tokens the SAE was fitted on) so that
what is reported about the top latents afterwards (their KL recovery, the metrics) is measured on
the eval split, which chose nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .activations import ActivationStore
from .paired import DifferenceStore

log = logging.getLogger(__name__)


def carried_share(sae, store: ActivationStore, split: str = "eval", batch_size: int = 4096) -> tuple[np.ndarray, dict]:
    """Per latent, the share of the difference's energy it carries (float64 sums over ``split``)."""
    sae.eval()
    d_sae = sae.cfg.d_sae
    numerator = torch.zeros(d_sae, dtype=torch.float64)
    energy, constant, n = 0.0, 0.0, 0
    b_dec = sae.b_dec.detach().double()
    with torch.no_grad():
        for x in store.iter_batches(batch_size, split=split):
            x = x.float()
            f = sae.encode(x).double()
            # ⟨W_dec[j], Δ_t⟩ for every (token, latent): [B, d_sae]
            projections = x.double() @ sae.W_dec.detach().double().T
            numerator += (f * projections).sum(0)
            energy += float(x.double().pow(2).sum())
            constant += float((x.double() @ b_dec).sum())
            n += len(x)
    if n == 0 or energy == 0:
        raise ValueError(f"{store.folder}: no difference to explain on the {split} split ({n} tokens)")
    return (numerator / energy).numpy(), {"n_tokens": n, "b_dec_share": constant / energy, "mean_sq_diff": energy / n}


def latent_table(
    sae, store: ActivationStore, stats: pd.DataFrame | None = None, batch_size: int = 4096, split: str = "train"
):
    """Latents ranked by ``share`` on ``split`` (rank 1: carries the most), joined to the feature statistics."""
    share, totals = carried_share(sae, store, split=split, batch_size=batch_size)
    table = pd.DataFrame({"latent": np.arange(len(share)), "share": share})
    if stats is not None:
        table = table.merge(stats.rename(columns={"feature": "latent"}), on="latent", how="left")
    table = table.sort_values("share", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(1, "rank", np.arange(1, len(table) + 1))
    return table, totals


def run(
    base: ActivationStore,
    tuned: ActivationStore,
    spec,
    training: dict,
    out_dir: Path,
    samples: pd.DataFrame,
    features_opts: dict,
    model=None,
    tokenizer=None,
    place=None,
    progress: bool = True,
) -> dict:
    """Train the diff-SAE on ``tuned − base``, then its feature statistics, latent ranking and metrics."""
    from . import evaluate, features
    from .io import write_json, write_parquet
    from .sae import files
    from .sae.train import train

    store = DifferenceStore(base, tuned)
    out_dir = Path(out_dir)
    if all(float(shard["acts"].abs().max()) == 0 for shard in store.iter_shards("train")):
        # identical models (the null control): nothing to train on, no latent to flag
        write_parquet(pd.DataFrame({"latent": [], "rank": [], "share": []}), out_dir / "latents.parquet")
        write_json(out_dir / "metrics.json", {"identical": True, "n_tokens": store.n_tokens("train")})
        log.info("diff-SAE %s: the two models' activations are identical; no latents", out_dir)
        return {"identical": True}
    from dataclasses import replace

    from .sae.model import dictionary_seed

    spec = replace(spec, seed=dictionary_seed(spec.seed, "diff_sae"))  # not the cell SAEs' start
    train(
        store,
        [spec],
        [out_dir / "sae"],
        n_tokens=training["tokens"],
        batch_size=training["batch_size"],
        shuffle_buffer=training["shuffle_buffer"],
        seed=training["seed"],
        checkpoint_every=training["checkpoint_every"],
        epochs=training["epochs"],
        progress=progress,
        place=place,
        work_dir=out_dir / ".train_state",
    )
    device = getattr(place, "device", "cpu")
    # the difference has no prompt/completion structure of its own; the statistics use the tuned cell's
    opts = {**features_opts, "coactivation_columns": [], "bias": None, "pair_column": None}
    summary = features.write(
        out_dir / "sae", store, samples, out_dir / "features", opts, model, tokenizer, device, progress
    )
    sae = files.load(out_dir / "sae")
    stats = pd.read_parquet(out_dir / "features" / "stats.parquet")
    table, totals = latent_table(sae, store, stats)
    metrics = evaluate.json_ready(evaluate.reconstruction_metrics(sae, evaluate.store_batches(store)))
    write_parquet(table, out_dir / "latents.parquet")
    write_json(out_dir / "metrics.json", {**metrics, **totals, "features": summary})
    top = table.head(5)[["latent", "share"]].to_dict("records")
    log.info("diff-SAE %s: FVU %.3f, top latents %s", out_dir, metrics.get("fvu", float("nan")), top)
    return {"metrics": metrics, **totals}
