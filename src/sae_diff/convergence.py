"""Has an SAE converged? Three measurements and a documented criterion, checked before its
features are labelled (``diff.convergence``; docs/methods.md, "Features, diffs and evolution").

- **held-out FVU flattening**: the relative drop of the held-out FVU over the last quarter of
  training (``heldout_fvu`` rows of ``train_log.jsonl``: a fixed set of eval-split tokens scored
  during training). An SAE still improving there would have changed more with more steps.
- **decoder cosine to its own init**: the mean over latents of cos(decoder row, the same row at
  init). The init is regenerated from the SAE's seed (``SAE.initialize`` draws the decoder from the
  seed alone). An SAE whose rows still point where they started has learnt little of the data, and
  two such SAEs agree because they share a start, not because they share features.
- **cross-init MMCS**: the MMCS of two SAEs of the same cell and config that start from different
  inits, placed between the MMCS of two random unit dictionaries of the same shape (computed here,
  not assumed) and 1: ``(mmcs - mmcs_random) / (1 - mmcs_random)``. Converged SAEs find the same
  features from any start.

A warm-started SAE starts from another SAE's decoder, not from a seed: its cosine to that start is
reported, and only the FVU criterion applies to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TAIL = 0.25  # the last quarter of training: where a converged SAE's held-out FVU no longer drops


@dataclass(frozen=True)
class Criterion:
    max_fvu_drop: float  # relative held-out FVU drop over the last quarter, at most
    max_init_cos: float  # mean decoder cosine to the init, at most
    min_cross_init: float  # cross-init MMCS as a share of the way from random (0) to identical (1), at least

    @classmethod
    def from_config(cls, block: dict) -> "Criterion":
        return cls(block["max_fvu_drop"], block["max_init_cos"], block["min_cross_init"])


def read_curve(folder: str | Path) -> list[tuple[int, float]]:
    """(step, held-out FVU) pairs from an SAE folder's training log (empty without one)."""
    path = Path(folder) / "train_log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["heldout_fvu"])) for r in rows if "heldout_fvu" in r]


def fvu_drop(curve: list[tuple[int, float]], tail: float = TAIL) -> float | None:
    """Relative drop of the held-out FVU over the last ``tail`` of training, from the first curve
    point inside it to the end: (FVU(that point) − FVU(end)) / FVU(end) (with 20 points the span is
    one point short of the quarter). None with fewer than two points in the curve."""
    if len(curve) < 2:
        return None
    steps = np.array([s for s, _ in curve], dtype=np.float64)
    fvu = np.array([v for _, v in curve], dtype=np.float64)
    start = steps[-1] - tail * (steps[-1] + 1)
    i = int(np.searchsorted(steps, start, side="left"))
    i = min(i, len(curve) - 2)  # at least one step of drop
    return float((fvu[i] - fvu[-1]) / max(fvu[-1], 1e-12))


def init_decoder(sae, seed: int) -> np.ndarray:
    """The unit decoder rows ``SAE.initialize`` gave an SAE of this shape with this seed (float64)."""
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.randn(tuple(sae.W_dec.shape), generator=gen, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).numpy()


def init_cosine(sae, start: np.ndarray) -> float:
    """Mean over latents of cos(decoder row, the same row of ``start``)."""
    from .diff import unit_rows

    return float((unit_rows(sae.W_dec) * start).sum(1).mean())


def random_mmcs(d_sae: int, d_in: int, seed: int = 0) -> float:
    """MMCS of two random unit dictionaries of this shape (Hungarian match, as ``diff.match``): the
    floor a cross-init MMCS is measured from."""
    from .diff import match

    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, d_sae, d_in))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.nanmean(match(a, b)[1]))


def cross_init_score(mmcs: float, mmcs_random: float) -> float:
    """Where the cross-init MMCS sits from random dictionaries (0) to identical ones (1)."""
    return float((mmcs - mmcs_random) / max(1.0 - mmcs_random, 1e-12))


def sae_record(folder: str | Path, criterion: Criterion, warm_start_from: str | Path | None = None) -> dict:
    """The per-SAE measurements (FVU drop, cosine to its seeded init, or to the SAE it was warm-started
    from when ``warm_start_from`` is given) and their verdicts."""
    from .sae import files

    folder = Path(folder)
    sae = files.load(folder)
    meta = json.loads((folder / "sae_diff.json").read_text()).get("training", {})
    curve = read_curve(folder)
    drop = fvu_drop(curve)
    out = {"steps": meta.get("steps"), "heldout_fvu": curve[-1][1] if curve else None, "fvu_drop": drop}
    out["fvu_flat"] = drop is not None and drop <= criterion.max_fvu_drop
    if warm_start_from is not None:
        from .diff import unit_rows

        out["init_cos"] = None
        out["warm_start_cos"] = init_cosine(sae, unit_rows(files.load(warm_start_from).W_dec))
        out["left_init"] = True  # judged by the FVU alone: a warm start is meant to be kept
    else:
        out["init_cos"] = init_cosine(sae, init_decoder(sae, int(meta.get("seed", 0))))
        out["left_init"] = out["init_cos"] <= criterion.max_init_cos
    out["converged"] = bool(out["fvu_flat"] and out["left_init"])
    return out


def cross_init_record(sae_a, sae_b, criterion: Criterion, seed: int = 0) -> dict:
    """Cross-init MMCS of two SAEs (same cell and config, different inits) against random dictionaries."""
    from .diff import match, unit_rows

    mmcs = float(np.nanmean(match(unit_rows(sae_a.W_dec), unit_rows(sae_b.W_dec))[1]))
    floor = random_mmcs(*tuple(sae_a.W_dec.shape), seed=seed)
    score = cross_init_score(mmcs, floor)
    return {"mmcs": mmcs, "mmcs_random": floor, "score": score, "converged": bool(score >= criterion.min_cross_init)}


def layer_verdict(cells: dict[str, dict], cross_init: dict | None) -> dict:
    """A layer's SAEs have converged when every diffed SAE has and the cross-init check passes;
    the reasons name what failed."""
    reasons = [
        f"{cell}: no held-out FVU curve (trained before it was recorded: rerun train_sae)"
        if r.get("fvu_drop", 0) is None
        else f"{cell}: held-out FVU still dropping"
        for cell, r in cells.items()
        if not r["fvu_flat"]
    ]
    reasons += [f"{cell}: decoder still near its init" for cell, r in cells.items() if not r["left_init"]]
    if cross_init is not None and not cross_init["converged"]:
        reasons.append("cross-init MMCS too close to random dictionaries")
    return {"converged": not reasons, "reasons": reasons}
