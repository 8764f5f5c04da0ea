"""Presence of a feature on two sets of tokens: the test behind "died" and "born".

A feature of SAE A is present on a set of tokens in proportion to the activation mass A's own
encoder gives it there. Its **presence ratio** on B's tokens is

    ρ = (Σ_B a(x) / N_B) / (Σ_A a(x) / N_A),

the mean activation per token on the other cell's tokens over that on its own cell's (1: carried as
much; 0: gone). A feature has **died** when the upper end of ρ's 95% interval is below
``diff.absent_below`` (it confidently keeps less than that share of its mass); a feature of B is
**born** when the same holds for it, through B's encoder, on A's tokens. This replaces "never fired
on the other cell's eval split", which is chance for a rare feature, and "no counterpart among B's
decoder rows", which two SAEs trained on other samples of the same data show by the thousand: the
encoder that defines the feature decides whether the other cell's activations still carry it, in
the spirit of latent scaling (Minder et al. 2025: how much of a latent's direction each model's
activations carry).

The interval is a cluster bootstrap over prompts (a prompt's tokens, and its samples, are
correlated; ``N_BOOT`` resamples, percentile interval). Where both token sets are the same tokens
(M0Di against MiDi: the same texts through two models) the resampling is paired: the same prompts
are drawn for both, so only the model's difference is left in ρ. A feature whose mass in a
resample lies in no drawn prompt has an unbounded ratio there, so a feature seen in a handful of
prompts is never called absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

N_BOOT = 200  # bootstrap resamples: the 97.5% quantile is the 195th of 200
LEVEL = 0.95  # the interval's coverage (two-sided; "absent" reads its upper end)
BATCH = 4096  # tokens encoded at once


@dataclass
class Tokens:
    """One cell's eval tokens at one site: activations, each token's cluster (its prompt, numbered
    0..n_clusters-1) and its identity (sample, position, token id) to tell whether two sets are the
    same tokens."""

    acts: object  # torch tensor [n_tokens, d_model]
    cluster: np.ndarray
    identity: np.ndarray  # [n_tokens, 3]: sample index, position, token id

    @property
    def n_clusters(self) -> int:
        return int(self.cluster.max()) + 1 if len(self.cluster) else 0

    def same_as(self, other: "Tokens") -> bool:
        return self.identity.shape == other.identity.shape and bool(np.array_equal(self.identity, other.identity))

    def subset(self, clusters: np.ndarray) -> "Tokens":
        """The tokens of some clusters, renumbered 0..len(clusters)-1 in the given order."""
        rank = np.full(self.n_clusters, -1, dtype=np.int64)
        rank[np.asarray(clusters, dtype=np.int64)] = np.arange(len(clusters))
        rows = np.nonzero(rank[self.cluster] >= 0)[0]
        return Tokens(self.acts[rows], rank[self.cluster[rows]], self.identity[rows])


MIN_PROMPTS = 4  # fewer prompts than this: single samples are the units (two prompts cannot be halved or resampled)


def units(sample_ids: np.ndarray, samples: pd.DataFrame | None) -> np.ndarray:
    """Each sample id's cluster: its prompt (by the samples' ``prompt`` column; a prompt's samples
    are correlated, so they are resampled and halved together), or the sample itself where there is
    no table, no such column, or fewer than ``MIN_PROMPTS`` prompts among the ids. The one rule
    behind the presence bootstrap's clusters and the null's halves (``nulls.prompt_halves``)."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    if samples is None or "prompt" not in samples.columns:
        return sample_ids
    prompt_of = dict(zip(samples["sample_id"].to_numpy(dtype=np.int64), samples["prompt"].astype(str)))
    missing = sorted(set(np.unique(sample_ids).tolist()) - set(prompt_of))
    if missing:
        raise ValueError(
            f"sample(s) {missing[:5]} have no row in the samples table "
            "(were the activations extracted from another samples file?)"
        )
    prompts = np.array([prompt_of[s] for s in sample_ids.tolist()], dtype=object)
    return prompts if len(np.unique(prompts)) >= MIN_PROMPTS else sample_ids


def eval_tokens(store, samples: pd.DataFrame | None = None) -> Tokens:
    """A store's eval split, read once, clustered by ``units``."""
    import torch

    acts, sample_idx, position, token_ids = [], [], [], []
    for shard in store.iter_shards("eval"):
        acts.append(shard["acts"])
        sample_idx.append(shard["sample_idx"].numpy())
        position.append(shard["position"].numpy())
        token_ids.append(shard["token_ids"].numpy())
    if not acts:
        raise ValueError(f"{store.folder}: the eval split holds no tokens; the presence test needs some")
    sample_idx = np.concatenate(sample_idx).astype(np.int64)
    try:
        unit = units(sample_idx, samples)
    except ValueError as err:
        raise ValueError(f"{store.folder}: eval tokens of {err}") from None
    _, cluster = np.unique(unit, return_inverse=True)
    identity = np.stack([sample_idx, np.concatenate(position), np.concatenate(token_ids)], axis=1).astype(np.int64)
    return Tokens(torch.cat(acts), cluster.astype(np.int64), identity)


def read_eval_tokens(site: str | Path, samples_path: str | Path) -> Tokens:
    """``eval_tokens`` of the store at ``site`` (one layer and hook point of a cell's activations)
    with the cell's samples table. The eval split is on disk even with ``activations.cache: false``,
    so no model is loaded."""
    from .activations import ActivationStore

    return eval_tokens(ActivationStore(Path(site)), pd.read_parquet(samples_path))


def halving(n_units: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of ``n_units`` units (indices; with an odd count the permutation's
    last unit is left out): how the null's two "cells" are drawn, from training and eval prompts alike."""
    order = np.random.default_rng(seed).permutation(n_units)
    half = n_units // 2
    return order[:half], order[half : 2 * half]


def halves(tokens: Tokens, seed: int) -> tuple[Tokens, Tokens]:
    """Two disjoint halves of the tokens' prompts at random (``halving``)."""
    if tokens.n_clusters < MIN_PROMPTS:
        raise ValueError(
            f"the eval split has {tokens.n_clusters} prompt(s): halving it for the null needs at least {MIN_PROMPTS}"
        )
    a, b = halving(tokens.n_clusters, seed)
    return tokens.subset(a), tokens.subset(b)


def cluster_mass(sae, tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's summed activation per cluster [n_clusters, d_sae] (float64) and the tokens
    per cluster, through ``sae``'s own encoder."""
    import torch

    mass = torch.zeros((tokens.n_clusters, sae.cfg.d_sae), dtype=torch.float64)
    cluster = torch.from_numpy(tokens.cluster)
    with torch.no_grad():
        for start in range(0, len(tokens.acts), BATCH):
            codes = sae.encode(tokens.acts[start : start + BATCH].float()).double()
            mass.index_add_(0, cluster[start : start + BATCH], codes)
    return mass.numpy(), np.bincount(tokens.cluster, minlength=tokens.n_clusters).astype(np.float64)


def ratio_interval(
    own: tuple[np.ndarray, np.ndarray],
    other: tuple[np.ndarray, np.ndarray],
    paired: bool,
    seed: int = 0,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
) -> pd.DataFrame:
    """Per feature: the presence ratio ρ (other's mean activation per token over own's), its
    cluster-bootstrap ``level`` interval, and the mean activation per token on own tokens
    (``own_mass``, 0: the feature never fires there and has no ratio) and on the other's
    (``other_mass``). ``own`` and ``other``: ``cluster_mass`` results; with
    ``paired`` the clusters are the same prompts in the same order and are drawn together."""
    (mass_own, n_own), (mass_other, n_other) = own, other
    if paired and mass_own.shape[0] != mass_other.shape[0]:
        raise ValueError(f"paired presence needs the same clusters, got {mass_own.shape[0]} and {mass_other.shape[0]}")
    rng = np.random.default_rng(seed)

    def draws(n_clusters):
        return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(np.float64)

    w_own = draws(len(n_own))
    w_other = w_own if paired else draws(len(n_other))
    per_token_own = (w_own @ mass_own) / (w_own @ n_own)[:, None]
    per_token_other = (w_other @ mass_other) / (w_other @ n_other)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = per_token_other / per_token_own
    boot[~np.isfinite(boot)] = np.inf  # no own mass drawn: the ratio is unbounded in that resample
    tail = (1 - level) / 2
    own_mean, other_mean = mass_own.sum(0) / n_own.sum(), mass_other.sum(0) / n_other.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.where(own_mean > 0, other_mean / own_mean, np.nan)
    fires = own_mean > 0
    return pd.DataFrame(
        {
            "presence": point,
            "presence_low": np.where(fires, np.quantile(boot, tail, axis=0, method="lower"), np.nan),
            "presence_high": np.where(fires, np.quantile(boot, 1 - tail, axis=0, method="higher"), np.nan),
            "own_mass": own_mean,
            "other_mass": other_mean,
        }
    )


def both_ways(sae_a, sae_b, tokens_a: Tokens, tokens_b: Tokens, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A's features on B's tokens and B's features on A's (``ratio_interval``), paired where the
    two token sets are the same tokens."""
    paired = tokens_a.same_as(tokens_b)
    a_on_a, a_on_b = cluster_mass(sae_a, tokens_a), cluster_mass(sae_a, tokens_b)
    b_on_b, b_on_a = cluster_mass(sae_b, tokens_b), cluster_mass(sae_b, tokens_a)
    frame_a = ratio_interval(a_on_a, a_on_b, paired, seed)
    frame_b = ratio_interval(b_on_b, b_on_a, paired, seed + 1)
    frame_a["paired"] = frame_b["paired"] = paired
    return frame_a, frame_b


def absent(frame: pd.DataFrame, below: float) -> np.ndarray:
    """Features whose presence interval lies wholly below ``below`` (NaN: never fired, not absent)."""
    return (frame["presence_high"].to_numpy(dtype=np.float64) < below) & (frame["own_mass"].to_numpy() > 0)
