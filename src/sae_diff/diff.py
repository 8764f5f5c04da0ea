"""Weight diffs between two SAEs of the same layer: per-feature cosines, norms, matching.

Features are compared twice: by index (meaningful when one SAE was warm-started from the
other, so indices stay aligned) and by the best one-to-one match, a Hungarian assignment
on 1 − cos of decoder directions (``scipy.optimize.linear_sum_assignment``). Whether a
matched pair is "same", "changed" or unmatched ("new") is decided by thresholds: quantiles of
the matched cosines of SAE pairs where nothing changed but the sample of data (``nulls``) or the
seed. Whether a feature died or was born is not a matter of weights: the presence test
(``presence``) asks whether the other cell's tokens still carry it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

CHUNK = 2048  # rows per block when scanning a [n, n] similarity matrix


def unit_rows(weight: torch.Tensor) -> np.ndarray:
    w = weight.detach().double()
    return (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def match(dec_a: np.ndarray, dec_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of unit rows: for each row of A, its partner in B and their cosine.

    With more rows in A than in B, the surplus rows get partner -1 and cosine NaN.
    """
    from scipy.optimize import linear_sum_assignment

    cos = dec_a @ dec_b.T
    rows, cols = linear_sum_assignment(-cos)  # maximise total cosine = minimise Σ (1 − cos)
    partner = np.full(len(dec_a), -1, dtype=np.int64)
    partner[rows] = cols
    matched = np.full(len(dec_a), np.nan)
    matched[rows] = cos[rows, cols]
    return partner, matched


def max_cos_to_others(unit: np.ndarray) -> np.ndarray:
    """Each row's largest cosine with another row of the same matrix (chunked)."""
    out = np.empty(len(unit))
    for start in range(0, len(unit), CHUNK):
        block = unit[start : start + CHUNK] @ unit.T
        idx = np.arange(start, min(start + CHUNK, len(unit)))
        block[idx - start, idx] = -np.inf
        out[start : start + CHUNK] = block.max(axis=1)
    return out


def weight_diff(sae_a, sae_b, aligned: bool = False) -> pd.DataFrame:
    """One row per feature of A: cosines with B (same index when ``aligned``, best match),
    decoder and encoder norms and their relative difference, and max cosine within A."""
    dec_a, dec_b = unit_rows(sae_a.W_dec), unit_rows(sae_b.W_dec)
    enc_a, enc_b = unit_rows(sae_a.W_enc_T), unit_rows(sae_b.W_enc_T)
    partner, dec_cos_match = match(dec_a, dec_b)
    has = partner >= 0
    norms = {
        name: w.detach().double().norm(dim=1).numpy()
        for name, w in (
            ("dec_a", sae_a.W_dec),
            ("dec_b", sae_b.W_dec),
            ("enc_a", sae_a.W_enc_T),
            ("enc_b", sae_b.W_enc_T),
        )
    }
    table = pd.DataFrame({"feature": np.arange(len(dec_a)), "match": partner, "dec_cos_match": dec_cos_match})
    enc_cos_match = np.full(len(dec_a), np.nan)
    enc_cos_match[has] = (enc_a[has] * enc_b[partner[has]]).sum(1)
    table["enc_cos_match"] = enc_cos_match
    for kind in ("dec", "enc"):
        own = norms[f"{kind}_a"]
        other = np.full(len(own), np.nan)
        other[has] = norms[f"{kind}_b"][partner[has]]
        table[f"{kind}_norm"] = own
        table[f"{kind}_norm_match"] = other
        table[f"{kind}_norm_rel_diff"] = (other - own) / np.maximum(own, 1e-12)
    if aligned:
        if dec_a.shape != dec_b.shape:
            raise ValueError(f"index-aligned diff needs equal shapes, got {dec_a.shape} and {dec_b.shape}")
        table["dec_cos_same"] = (dec_a * dec_b).sum(1)
        table["enc_cos_same"] = (enc_a * enc_b).sum(1)
    table["max_cos_within"] = max_cos_to_others(dec_a)
    return table


def mmcs(table: pd.DataFrame) -> float:
    """Mean max cosine similarity: the mean matched decoder cosine over A's features."""
    return float(np.nanmean(table["dec_cos_match"]))


@dataclass
class Thresholds:
    same: float  # matched cosine at or above: the same feature
    new: float  # below: no counterpart among the other SAE's decoder rows ('unmatched')
    same_quantile: float
    new_quantile: float
    n_null: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calibrate(null_cos: np.ndarray, same_quantile: float = 0.05, new_quantile: float = 0.001) -> Thresholds:
    """Thresholds from the matched cosines of a seed pair (two SAEs, same cell, other seed).

    "same": at least the ``same_quantile`` quantile of the null (so about that fraction of
    features would be called changed by seed noise alone); "new": below its
    ``new_quantile`` quantile.
    """
    null = np.asarray(null_cos, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not len(null):
        raise ValueError("calibration needs at least one matched pair")
    if not 0 <= new_quantile <= same_quantile <= 1:
        raise ValueError(f"quantiles must satisfy 0 <= new ({new_quantile}) <= same ({same_quantile}) <= 1")
    return Thresholds(
        same=float(np.quantile(null, same_quantile)),
        new=float(np.quantile(null, new_quantile)),
        same_quantile=same_quantile,
        new_quantile=new_quantile,
        n_null=len(null),
    )


def label(cos: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """'same', 'changed' or 'new' for each matched cosine (NaN: no partner -> 'new')."""
    cos = np.asarray(cos, dtype=np.float64)
    out = np.full(len(cos), "changed", dtype=object)
    out[cos >= thresholds.same] = "same"
    out[~(cos >= thresholds.new)] = "new"  # also catches NaN
    return out


def step_labels(
    table: pd.DataFrame,
    thresholds: Thresholds,
    alive_a: np.ndarray,
    alive_b: np.ndarray,
    absent_a: np.ndarray,
    absent_b: np.ndarray,
    collapse: float = 0.1,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Label A's features against B (``table`` from ``weight_diff(A, B)``) and find B's born ones.

    A live feature of A has 'died' when it is absent from B's tokens (``absent_a``: the presence
    test of ``presence``, through A's own encoder) or when its matched counterpart's encoder norm
    fell below ``collapse`` times its own (norm collapse); else it is 'same' or 'changed' by the
    calibrated thresholds on its matched cosine. A feature with no counterpart at the 'new'
    threshold that B's tokens still carry is 'changed' (``unmatched``: B's dictionary cut it
    otherwise), not dead. Features that never fire on A's own tokens are 'inactive': they cannot
    die. A live B feature is 'born' when it is absent from A's tokens (``absent_b``, through B's
    encoder).
    """
    out = table.copy()
    cos = out["dec_cos_match"].to_numpy(dtype=np.float64)
    partner = out["match"].to_numpy()
    has = partner >= 0
    base = label(cos, thresholds)
    reason = np.full(len(out), "", dtype=object)
    reason[absent_a] = "absent"
    collapsed = (out["enc_norm_match"].to_numpy() < collapse * np.maximum(out["enc_norm"].to_numpy(), 1e-12)) & has
    reason[~absent_a & (base != "new") & collapsed] = "norm_collapse"
    out["unmatched"] = (base == "new") & alive_a & (reason == "")  # 'changed' for want of a counterpart
    labels = np.where(reason != "", "died", np.where(base == "new", "changed", base))
    out["label"] = np.where(alive_a, labels, "inactive")
    out["died_reason"] = np.where(alive_a, reason, "")
    born = np.nonzero(alive_b & absent_b)[0]
    return out, born


def calibration(sae_main, sae_seed, same_quantile: float, new_quantile: float) -> tuple[Thresholds, pd.DataFrame]:
    """Thresholds from a seed pair (same cell and config, other seeds) and the null table itself."""
    null = weight_diff(sae_main, sae_seed)
    return calibrate(null["dec_cos_match"].to_numpy(), same_quantile, new_quantile), null


def calibration_record(null: pd.DataFrame, thresholds: Thresholds, alive: np.ndarray | None = None) -> dict:
    """What a seed pair says about the labels: the thresholds, the pair's MMCS, and the fraction of
    its live features that the labels would call anything but 'same' (``changed_fraction``,
    reported as ``seed_baseline_changed_fraction``: the rate at which a step of two SAEs that
    differ only in their seeds looks changed). ``alive`` (by feature id of the pair's first SAE:
    fires on its cell's eval tokens) leaves out the features a step labels 'inactive', whatever
    their cosine: a feature that never fires keeps its random start and matches nothing, which is
    no change of the model's (on the planted example the seed pair's one "changed" feature of 32
    was such a one). ``n_features`` says how many were counted; all when ``alive`` is None."""
    cos = null["dec_cos_match"].to_numpy()
    counted = np.ones(len(null), dtype=bool)
    if alive is not None:
        counted = np.asarray(alive, dtype=bool)[null["feature"].to_numpy()]
    not_same = label(cos[counted], thresholds) != "same"
    return {
        "thresholds": thresholds.to_dict(),
        "mmcs": mmcs(null),
        "changed_fraction": float(not_same.mean()) if counted.any() else 0.0,
        "n_features": int(counted.sum()),
    }


DIED_REASONS = ("absent", "norm_collapse")


def count_labels(table: pd.DataFrame, born: np.ndarray) -> dict:
    """Features per label of a labelled diff (``step_labels``), died by reason, and the born count."""
    counts = {k: int(v) for k, v in table["label"].value_counts().items()}
    for reason in DIED_REASONS:
        counts[f"died_{reason}"] = int((table["died_reason"] == reason).sum())
    counts["unmatched"] = int(table["unmatched"].sum())
    counts["born"] = int(len(born))
    return counts


def compare(
    sae_a, sae_b, tokens_a, tokens_b, thresholds: Thresholds, aligned: bool, collapse: float, absent_below: float
) -> tuple[pd.DataFrame, dict]:
    """Labelled per-feature diff of A against B and its summary (counts, MMCS, thresholds).
    ``tokens_a`` / ``tokens_b``: each cell's eval tokens (``presence.Tokens``), on which each SAE's
    features are alive and each is tested for presence on the other's."""
    from . import presence

    table = weight_diff(sae_a, sae_b, aligned=aligned)
    on_b, on_a = presence.both_ways(sae_a, sae_b, tokens_a, tokens_b)
    table, born = labelled(table, on_b, on_a, thresholds, collapse, absent_below)
    counts = count_labels(table, born)
    summary = {
        "mmcs": mmcs(table),
        "aligned": aligned,
        "paired_tokens": bool(on_b["paired"].iloc[0]) if len(on_b) else False,
        "thresholds": thresholds.to_dict(),
        "absent_below": absent_below,
        "counts": counts,
        "born": born.tolist(),
        "born_presence": on_a.loc[born, list(PRESENCE_COLUMNS)].to_dict("list"),
    }
    if aligned:
        summary["mean_dec_cos_same_index"] = float(table["dec_cos_same"].mean())
    return table, summary


# what a diff table keeps of A's presence test (``presence.ratio_interval``): the ratio, its interval,
# and the mean activation per token on A's own tokens and on B's
PRESENCE_COLUMNS = ("presence", "presence_low", "presence_high", "own_mass", "other_mass")


def labelled(
    table: pd.DataFrame,
    on_b: pd.DataFrame,
    on_a: pd.DataFrame,
    thresholds: Thresholds,
    collapse: float,
    absent_below: float,
    alive_a: np.ndarray | None = None,
    alive_b: np.ndarray | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """``step_labels`` of a weight diff with its presence tests (``presence.both_ways``: A's features
    on B's tokens, B's on A's): the labelled table, with A's presence columns, and B's born features.
    A feature is alive where it fires on its own cell's tokens, unless ``alive_a`` / ``alive_b`` say
    otherwise."""
    from . import presence

    out = table.copy()
    for column in PRESENCE_COLUMNS:
        out[column] = on_b[column].to_numpy()
    return step_labels(
        out,
        thresholds,
        on_b["own_mass"].to_numpy() > 0 if alive_a is None else alive_a,
        on_a["own_mass"].to_numpy() > 0 if alive_b is None else alive_b,
        presence.absent(on_b, absent_below),
        presence.absent(on_a, absent_below),
        collapse,
    )


def ranked(table: pd.DataFrame, summary: dict) -> pd.DataFrame:
    """Every feature a labelled diff flags (A's died and changed, B's born), most moved first: by
    how much its mean activation per token, through its own encoder, differs between B's tokens and
    A's (``shift``: B − A; negative where the feature lost mass from A to B, positive where it
    gained). ``side`` says whose feature it is (a or b)."""
    flagged = table[table["label"].isin(["died", "changed"])]
    rows = [
        pd.DataFrame(
            {
                "side": "a",
                "feature": flagged["feature"].to_numpy(),
                "label": flagged["label"].to_numpy(),
                "presence": flagged["presence"].to_numpy(),
                "shift": (flagged["other_mass"] - flagged["own_mass"]).to_numpy(),
            }
        )
    ]
    born = summary["born_presence"]
    rows.append(
        pd.DataFrame(
            {
                "side": "b",
                "feature": np.asarray(summary["born"], dtype=np.int64),
                "label": "born",
                "presence": np.asarray(born["presence"], dtype=np.float64),
                "shift": np.asarray(born["own_mass"], dtype=np.float64) - np.asarray(born["other_mass"]),
            }
        )
    )
    out = pd.concat(rows, ignore_index=True)
    return out.iloc[np.argsort(-np.abs(out["shift"].to_numpy()), kind="stable")].reset_index(drop=True)
