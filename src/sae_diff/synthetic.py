"""Synthetic worlds with changes planted on purpose: the proof that the SAE diff and its resampling
null find what changed and stay quiet when nothing did (tests/test_nulls.py at small sizes,
bench/planted.py at full sizes).

A world is a known dictionary of unit feature directions; a cell's activations are sparse
non-negative combinations of them plus a little isotropic noise. Against the base world's cell
A (its data D0) the worlds are:

- ``no_change``: the same world on a disjoint sample (nothing changed but the sample);
- ``placebo``: the same world on a disjoint sample, plus isotropic noise of the norm a planted
  change moves the activations by (something changed, but no feature);
- ``planted``: some features rotated away from their direction (cos ``rotate_cos``), some removed
  (never active), some new ones added (fresh directions with their own firing).

Every cell runs through the unchanged code: ``sae.train.train`` → ``diff.compare`` (matched
weights, the presence test on each cell's eval tokens) with thresholds from the null
(``nulls.thresholds``), and the null through ``nulls.train_pairs`` / ``nulls.pair_table`` /
``nulls.null_counts`` on prompt halves of D0, exactly as the workflow's rules run them. Synthetic
tokens are independent; they are grouped into "prompts" of ``PROMPT_TOKENS`` for the presence
test's cluster bootstrap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PROMPT_TOKENS = 64  # synthetic tokens per "prompt" (the presence test's bootstrap unit)


@dataclass
class World:
    d: int = 24
    n_features: int = 48
    active: int = 3  # features per token
    noise: float = 0.05  # isotropic noise per dimension, relative to a unit feature
    tokens: int = 8192  # a cell's training tokens (D0 holds as many: the null's halves get half)
    eval_tokens: int = 2048
    prompts: int = 32  # D0's prompts: the unit the null splits
    n_rotated: int = 4
    n_removed: int = 4
    n_added: int = 4
    rotate_cos: float = 0.3
    expansion: int = 2  # SAE latents per feature of the base dictionary
    k: int = 3
    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.01
    null_pairs: int = 5
    seed: int = 0


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def base_dictionary(world: World, rng) -> np.ndarray:
    return unit(rng.standard_normal((world.n_features, world.d)))


def planted_dictionary(world: World, base: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, dict]:
    """The changed world's dictionary, which features fire in it, and the indices of each change.

    Rows [0, n_rotated) are rotated to cosine ``rotate_cos`` with their old direction; the next
    ``n_removed`` never fire; ``n_added`` fresh rows are appended."""
    out = base.copy()
    r = np.arange(world.n_rotated)
    for i in r:
        u = rng.standard_normal(world.d)
        u -= (u @ base[i]) * base[i]
        out[i] = world.rotate_cos * base[i] + np.sqrt(1 - world.rotate_cos**2) * unit(u)
    removed = np.arange(world.n_rotated, world.n_rotated + world.n_removed)
    added = np.arange(world.n_features, world.n_features + world.n_added)
    out = np.concatenate([out, unit(rng.standard_normal((world.n_added, world.d)))])
    fires = np.ones(len(out), dtype=bool)
    fires[removed] = False
    return out, fires, {"rotated": r, "removed": removed, "added": added}


def activations(world: World, dictionary: np.ndarray, fires: np.ndarray, n: int, rng) -> np.ndarray:
    """n tokens: each the sum of ``active`` firing features (uniformly drawn, magnitudes 0.5 + Exp(1)) plus noise."""
    live = np.nonzero(fires)[0]
    idx = np.stack([rng.choice(live, size=world.active, replace=False) for _ in range(n)])
    mags = 0.5 + rng.exponential(1.0, size=idx.shape)
    acts = np.einsum("nk,nkd->nd", mags, dictionary[idx])
    return (acts + world.noise * rng.standard_normal(acts.shape)).astype(np.float32)


def planted_shift(world: World, base: np.ndarray, changed: np.ndarray, fires: np.ndarray, rng) -> float:
    """The mean norm by which the planted change moves a token's activation (the same features and
    magnitudes drawn under both dictionaries; a removed feature's whole contribution)."""
    idx = np.stack([rng.choice(world.n_features, size=world.active, replace=False) for _ in range(world.eval_tokens)])
    mags = 0.5 + rng.exponential(1.0, size=idx.shape)
    after = changed[: world.n_features] * fires[: world.n_features, None]
    return float(np.linalg.norm(np.einsum("nk,nkd->nd", mags, after[idx] - base[idx]), axis=1).mean())


def isotropic(shape, norm: float, rng) -> np.ndarray:
    """Noise in a uniformly random direction with exactly this norm per token (the placebo)."""
    return (norm * unit(rng.standard_normal(shape))).astype(np.float32)


def write_cell(folder: Path, acts: np.ndarray, prompts: int) -> tuple[Path, pd.DataFrame]:
    """A one-split (train) store whose tokens belong to ``prompts`` prompts of one sample each (so the
    null can split them by prompt), and the samples table that says so."""
    import torch

    from .activations import write_store

    n = len(acts)
    sample = np.repeat(np.arange(prompts), int(np.ceil(n / prompts)))[:n]
    write_store(folder, torch.from_numpy(acts), meta={"sample_idx": torch.from_numpy(sample)})
    samples = pd.DataFrame(
        {"sample_id": np.arange(prompts), "prompt": [f"p{i}" for i in range(prompts)], "split": "train"}
    )
    return folder, samples


def train_spec(world: World, name: str = "topk", seed: int = 0):
    from .sae.model import SAEConfig
    from .sae.train import TrainSpec

    cfg = SAEConfig(architecture="topk", d_in=world.d, d_sae=world.expansion * world.n_features, k=world.k)
    return TrainSpec(name=name, sae=cfg, lr=world.lr, warmup_steps=5, seed=seed, dead_tokens=world.tokens)


def train_args(world: World, order_seed: int = 0) -> dict:
    return {
        "n_tokens": world.tokens,
        "batch_size": world.batch_size,
        "shuffle_buffer": world.tokens,
        "seed": order_seed,
        "checkpoint_every": 0,
        "epochs": world.epochs,
        "progress": False,
    }


def train_cell(world: World, folder: Path, acts: np.ndarray, order_seed: int = 0, init_seed: int = 0):
    from .activations import ActivationStore
    from .sae import files
    from .sae.train import train

    store_dir, _ = write_cell(folder / "acts", acts, world.prompts)
    train(
        ActivationStore(store_dir),
        [train_spec(world, seed=init_seed)],
        [folder / "sae"],
        **train_args(world, order_seed),
    )
    return files.load(folder / "sae")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    from scipy.stats import rankdata

    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def run(world: World, work: Path) -> dict:
    """One replicate: cell A (the base world on D0), the null from D0's prompt halves, and cells B of
    the no-change, placebo and planted worlds, each labelled against A. Returns, per world, the label
    counts beside the null (``nulls.versus``) and, for the planted world, how well A's latents tied to
    a planted feature are told apart from the rest (AUROC of 1 − matched cosine) and the false-positive
    rate among the latents tied to untouched features."""
    import torch

    from . import config, diff, nulls
    from .activations import ActivationStore

    work = Path(work)
    rng = np.random.default_rng(world.seed)
    base = base_dictionary(world, rng)
    everything = np.ones(world.n_features, dtype=bool)
    d0 = activations(world, base, everything, world.tokens, rng)
    eval_base = torch.from_numpy(activations(world, base, everything, world.eval_tokens, rng))

    sae_a = train_cell(world, work / "A", d0)
    seed_sae = train_cell(world, work / "A_seed", d0, order_seed=1)
    block = config.defaults("diff")  # the workflow's quantiles, norm collapse and presence threshold
    quantiles = block["same_quantile"], block["new_quantile"]
    _, seed_table = diff.calibration(sae_a, seed_sae, *quantiles)

    store = ActivationStore(work / "A" / "acts")
    samples = pd.DataFrame(
        {"sample_id": np.arange(world.prompts), "prompt": [f"p{i}" for i in range(world.prompts)], "split": "train"}
    )
    dirs = nulls.train_pairs(
        store, samples, [train_spec(world)], work / "null", world.null_pairs, world.seed, **train_args(world)
    )
    from .sae import files

    # alive on the base cell's eval tokens, presence between halves of them, as the workflow's null-diffs
    tokens_a = eval_set(eval_base, cell=0)
    tables = [
        nulls.pair_table(files.load(a[0]), files.load(b[0]), tokens_a, world.seed + k) for k, (a, b) in enumerate(dirs)
    ]
    null = nulls.null_counts(tables, block)
    thresholds = nulls.thresholds([t[0]["dec_cos_match"].to_numpy() for t in tables], *quantiles)
    seed_changed = float((diff.label(seed_table["dec_cos_match"].to_numpy(), thresholds) != "same").mean())

    changed, fires, planted = planted_dictionary(world, base, rng)
    shift = planted_shift(world, base, changed, fires, rng)
    placebo = activations(world, base, everything, world.tokens, rng)
    worlds = {
        "no_change": (activations(world, base, everything, world.tokens, rng), base, everything, 0.0),
        "placebo": (placebo + isotropic(placebo.shape, shift, rng), base, everything, shift),
        "planted": (activations(world, changed, fires, world.tokens, rng), changed, fires, 0.0),
    }

    out = {
        "world": asdict(world),
        "null": null,
        "thresholds": thresholds.to_dict(),
        "seed_pair_changed_fraction": seed_changed,
        "worlds": {},
    }
    out["planted_shift"] = shift
    for c, (name, (acts, dictionary, live, noise)) in enumerate(worlds.items(), start=1):
        sae_b = train_cell(world, work / name, acts)
        eval_b = activations(world, dictionary, live, world.eval_tokens, rng)
        tokens_b = eval_set(torch.from_numpy(eval_b + isotropic(eval_b.shape, noise, rng)), cell=c)
        table, summary = diff.compare(
            sae_a, sae_b, tokens_a, tokens_b, thresholds, False, block["norm_collapse"], block["absent_below"]
        )
        record = {"counts": nulls.versus(summary["counts"], null), "mmcs": summary["mmcs"]}
        if name == "planted":
            record.update(_recovery(sae_a, sae_b, base, changed, planted, table, summary, thresholds))
        out["worlds"][name] = record
    return out


def eval_set(acts, cell: int):
    """A cell's synthetic eval tokens as ``presence.Tokens``: "prompts" of ``PROMPT_TOKENS``
    consecutive tokens, identities unique to the cell (no two cells share tokens)."""
    from .presence import Tokens

    n = len(acts)
    identity = np.stack([np.full(n, cell), np.arange(n), np.zeros(n, dtype=np.int64)], axis=1)
    return Tokens(acts, np.arange(n) // PROMPT_TOKENS, identity.astype(np.int64))


def _tie(sae, dictionary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each latent's nearest true feature (by |cos| of its decoder row) and that cosine."""
    from .diff import unit_rows

    cos = unit_rows(sae.W_dec) @ dictionary.T
    best = np.abs(cos).argmax(1)
    return best, np.abs(cos[np.arange(len(cos)), best])


def _recovery(sae_a, sae_b, base, changed, planted: dict, table, summary: dict, thresholds) -> dict:
    """A's latents tied (|cos| ≥ 0.9) to a rotated or removed feature against those tied to untouched
    ones: AUROC of 1 − matched cosine; how many untouched ones are labelled 'changed' (nominal rate:
    ``same_quantile`` of the null) or 'died', and the rate labelled anything but 'same'; how many of
    those tied to a removed feature are labelled 'died'. B's latents tied to an added feature: the
    share of them labelled born."""
    tie_a, cos_a = _tie(sae_a, base)
    touched = np.isin(tie_a, np.concatenate([planted["rotated"], planted["removed"]]))
    labels = table["label"].to_numpy()
    keep = (cos_a >= 0.9) & (labels != "inactive")
    untouched = keep & ~touched
    score = 1 - np.nan_to_num(table["dec_cos_match"].to_numpy(dtype=np.float64), nan=-1.0)
    removed = keep & np.isin(tie_a, planted["removed"])
    tie_b, cos_b = _tie(sae_b, changed)
    added = np.isin(tie_b, planted["added"]) & (cos_b >= 0.9)
    born = np.isin(np.arange(len(tie_b)), summary["born"])
    return {
        "auroc": auroc(score[keep], touched[keep]),
        "n_touched_latents": int((keep & touched).sum()),
        "n_untouched_latents": int(untouched.sum()),
        "untouched_changed": int((labels[untouched] == "changed").sum()),
        "untouched_died": int((labels[untouched] == "died").sum()),
        "n_removed_latents": int(removed.sum()),
        "removed_died": int((labels[removed] == "died").sum()),
        "false_positive_rate": float((labels[untouched] != "same").mean()) if untouched.any() else float("nan"),
        "nominal_rate": thresholds.same_quantile,
        "n_added_latents": int(added.sum()),
        "added_born_share": float(born[added].mean()) if added.any() else float("nan"),
    }
