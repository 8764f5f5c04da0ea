"""What the edits did: every generation scored, effects against the no-op with their statistics,
and the summary's intervention headline.

Every text is scored with the configured scorers plus coherence (perplexity under M0,
repetition). Every condition generates from the same prompts, so effects are paired: per
prompt, the condition's metric (its samples' mean) minus the no-op's, over the prompts both
define, with a paired bootstrap CI and a sign-flip permutation p-value; the change in the
share of prompts the metric leaves undefined is reported beside it. The reported condition
(the group or a single feature, and alpha) is picked on the ``select`` half of the prompts
and its effects are measured on the ``report`` half.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import torch

from .experiments import COMPARISONS
from .stats import bootstrap_mean, paired_shift

# --------------------------------------------------------------------------- coherence


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that already occurred earlier in it (0: no loops)."""
    words = re.findall(r"\w+", str(text).lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def completion_nll(
    model,
    tokenizer,
    prompt_texts: list[str],
    completion_ids: list[list[int]],
    batch_size: int = 16,
    device: str = "cpu",
) -> np.ndarray:
    """Mean negative log-likelihood per completion token under ``model`` (NaN for an empty completion)."""
    out = np.full(len(prompt_texts), np.nan)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompt_texts), batch_size):
        batch = range(start, min(start + batch_size, len(prompt_texts)))
        seqs = []
        for i in batch:
            prompt = tokenizer(prompt_texts[i], add_special_tokens=True)["input_ids"]
            seqs.append((list(prompt), list(completion_ids[i])))
        width = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        scored = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions whose token is scored
        for j, (p, c) in enumerate(seqs):
            ids[j, : len(p) + len(c)] = torch.tensor(p + c)
            attn[j, : len(p) + len(c)] = 1
            scored[j, len(p) : len(p) + len(c)] = True
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float().cpu()
        log_p = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = scored[:, 1:]
        for j, i in enumerate(batch):
            if mask[j].any():
                out[i] = float(-log_p[j][mask[j]].double().mean())
    return out


# --------------------------------------------------------------------------- effects


def score(
    generations: pd.DataFrame,
    scorer_specs: list[dict],
    base_model,
    tokenizer,
    batch_size: int = 16,
    device: str = "cpu",
) -> pd.DataFrame:
    """The scorers' metrics plus coherence: perplexity of the completion under M0 and repetition.

    The random null's texts (role ``null``) are scored on the metrics and repetition only: their
    perplexity would be a full forward per text (half the null's cost) that no statistic reads."""
    from . import scorers

    table = generations.drop(columns=["completion_ids"])
    scored = scorers.score(table, scorer_specs)
    coherent = (generations["role"] != "null").to_numpy() if "role" in generations else np.ones(len(table), bool)
    nll = np.full(len(table), np.nan)
    nll[coherent] = completion_nll(
        base_model,
        tokenizer,
        generations["prompt_text"][coherent].tolist(),
        generations["completion_ids"][coherent].tolist(),
        batch_size,
        device,
    )
    scored["nll_base"] = nll
    scored["perplexity_base"] = np.exp(nll)
    scored["repetition"] = [repetition_rate(t) for t in generations["text"]]
    return scored


def _shift(before: pd.DataFrame, after: pd.DataFrame, metric: str, seed: int) -> dict:
    """``after`` against ``before`` on one metric, paired by prompt: each prompt's value is the
    mean over its samples (NaN when none defines the metric); prompts in only one side drop out."""
    a = before.groupby("prompt_id")[metric].mean()
    b = after.groupby("prompt_id")[metric].mean()
    a, b = a.align(b, join="inner")
    return paired_shift(a.to_numpy(dtype=float), b.to_numpy(dtype=float), seed=seed)


def _perplexity_change(noop: pd.DataFrame, cond: pd.DataFrame) -> float | None:
    """Relative change of the geometric-mean perplexity under M0: exp(mean NLL - mean NLL_noop) - 1."""
    a, b = noop["nll_base"].dropna(), cond["nll_base"].dropna()
    if a.empty or b.empty:
        return None
    return float(math.expm1(b.mean() - a.mean()))


def expected_sign(direction: str, sign: str, experiment: str) -> float:
    """Which way the metric should move: steering promoters pushes it the target's way, ablating
    them pushes it back; suppressors the other way round."""
    out = 1.0 if direction == "up" else -1.0
    if sign == "suppress":
        out = -out
    return -out if experiment == "ablation" else out


def effects(
    scores: pd.DataFrame,
    metric: str,
    expected: float,
    experiment: str,
    metrics: list[str],
    max_perplexity_ratio: float,
    seed: int = 0,
) -> dict:
    """Per condition and half: every metric's mean and its shift from the no-op; the condition
    (the group or a single feature) and alpha picked on the ``select`` half, and its effects on
    the ``report`` half against the no-op and against its own matched random control."""
    rows = []
    for (name, alpha, half), group in scores.groupby(["condition", "alpha", "half"], dropna=False, sort=False):
        noop = scores[(scores["condition"] == "noop") & (scores["half"] == half)]
        entry = {
            "condition": name,
            "role": group["role"].iloc[0],
            "alpha": None if pd.isna(alpha) else float(alpha),
            "half": half,
            "features": group["features"].iloc[0],
            "n": int(len(group)),
            "perplexity_change": _perplexity_change(noop, group),
            "repetition": float(group["repetition"].mean()),
            "delta_norm": _delta_norm(group),
            "metrics": {m: bootstrap_mean(group[m].to_numpy(dtype=float), seed=seed) for m in metrics},
            "vs_noop": {m: _shift(noop, group, m, seed) for m in metrics},
        }
        rows.append(entry)

    def find(name, half, alpha):
        for row in rows:
            if row["condition"] == name and row["half"] == half and (alpha is None or row["alpha"] == alpha):
                return row
        return None

    selection = [
        _candidate(row, metric, expected, max_perplexity_ratio)
        for row in rows
        if row["half"] == "select" and row["role"] in ("target", "single")
    ]
    chosen = _pick(selection, expected)
    if chosen is None:  # nothing stays coherent: the group at its gentlest alpha
        group = [c for c in selection if c["condition"] == "features"]
        chosen = min(group, key=lambda c: c["alpha"] or 0) if group else {"condition": "features", "alpha": None}
    name, chosen_alpha = chosen["condition"], chosen["alpha"]
    control_name = "random" if name == "features" else "random_" + name.split("_", 1)[1]
    # the comparison methods' own sizes are picked the same way, on the same half
    comparisons = {}
    for method in COMPARISONS:
        options = [
            _candidate(row, metric, expected, max_perplexity_ratio)
            for row in rows
            if row["half"] == "select" and row["condition"] == method
        ]
        picked = _pick(options, expected) or (min(options, key=lambda c: c["alpha"] or 0) if options else None)
        if picked is not None:
            comparisons[method] = picked["alpha"]
    report = None
    target = find(name, "report", chosen_alpha)
    control = find(control_name, "report", chosen_alpha)
    noop = scores[(scores["condition"] == "noop") & (scores["half"] == "report")]

    def report_rows(condition, alpha):
        picked = scores[(scores["condition"] == condition) & (scores["half"] == "report")]
        return picked if alpha is None else picked[picked["alpha"] == alpha]

    if target is not None:
        t_rows = report_rows(name, chosen_alpha)
        c_rows = report_rows(control_name, chosen_alpha)
        shift = target["vs_noop"][metric]
        report = {
            "condition": name,
            "features": [int(f) for f in str(target["features"]).split()],
            "alpha": chosen_alpha,
            "expected_sign": expected,
            "effect": shift["diff"],
            "ci_low": shift["ci_low"],
            "ci_high": shift["ci_high"],
            "p": shift["p"],
            "paired": True,
            "n_pairs": shift["n_pairs"],
            "undefined_change": shift["undefined_change"],
            "delta_norm": target["delta_norm"],
            "control_effect": control["vs_noop"][metric]["diff"] if control else None,
            "control_ci": [control["vs_noop"][metric]["ci_low"], control["vs_noop"][metric]["ci_high"]]
            if control
            else None,
            "vs_control": _shift(c_rows, t_rows, metric, seed) if control else None,
            "perplexity_change": target["perplexity_change"],
            "repetition_change": target["repetition"] - float(noop["repetition"].mean()),
            "n": target["n"],
            "baseline_mean": float(noop[metric].mean()) if noop[metric].notna().any() else None,
            "null": random_null(
                [r for r in rows if r["half"] == "report" and r["role"] == "null"], metric, expected, shift["diff"]
            ),
            "baselines": {},
        }
        for method in COMPARISONS:
            # difference in means at the size picked on the select half; prompting has no size
            row = find(method, "report", comparisons.get(method))
            if row is None:
                report["baselines"][method] = None
                continue
            b_shift = row["vs_noop"][metric]
            report["baselines"][method] = {
                "effect": b_shift["diff"],
                "ci_low": b_shift["ci_low"],
                "ci_high": b_shift["ci_high"],
                "p": b_shift["p"],
                "alpha": row["alpha"],
                "delta_norm": row["delta_norm"],
                "perplexity_change": row["perplexity_change"],
                # the SAE edit against the method, paired by prompt (positive: the SAE edit moved more)
                "sae_minus_method": _shift(report_rows(method, row["alpha"]), t_rows, metric, seed),
            }
        flipped = find("flipped", "report", chosen_alpha) if name == "features" else None
        if flipped is not None:
            report["flipped_effect"] = flipped["vs_noop"][metric]["diff"]
    chosen = {"condition": name, "alpha": chosen_alpha, "control": control_name, "comparisons": comparisons}
    return {"conditions": rows, "selection": selection, "chosen": chosen, "report": report}


def _delta_norm(group: pd.DataFrame) -> float | None:
    """The condition's mean |dx| per edited position (None: nothing edited, or not logged)."""
    if "delta_norm" not in group.columns or group["delta_norm"].isna().all():
        return None
    return float(group["delta_norm"].dropna().iloc[0])


def _candidate(row: dict, metric: str, expected: float, max_perplexity_ratio: float) -> dict:
    """One condition of the select half as a candidate for the report: its paired effect, the
    bound of its 95% CI on the no-op's side, and whether it stays coherent."""
    ppl, shift = row["perplexity_change"], row["vs_noop"][metric]
    return {
        "condition": row["condition"],
        "alpha": row["alpha"],
        "effect": shift["diff"],
        "bound": None if shift["diff"] is None else min(expected * shift["ci_low"], expected * shift["ci_high"]),
        "n_pairs": shift.get("n_pairs"),
        "undefined_change": shift.get("undefined_change"),
        "perplexity_change": ppl,
        "coherent": ppl is None or ppl + 1.0 <= max_perplexity_ratio,
    }


def _pick(candidates: list[dict], expected: float) -> dict | None:
    """Among the coherent candidates with an effect, the one whose paired effect is surely
    largest the expected way: the largest bound of its 95% CI on the side of the no-op (a large
    mean over a few defined prompts does not win by luck); ties go to the group, then the
    smaller alpha."""
    scored = [c for c in candidates if c["coherent"] and c["effect"] is not None]
    if not scored:
        return None
    return max(
        scored,
        key=lambda c: (c["bound"], expected * c["effect"], c["condition"] == "features", -(c["alpha"] or 0)),
    )


def random_null(null_rows: list[dict], metric: str, expected: float, observed: float | None) -> dict:
    """The reported effect against the random null: the paired effects of the null's edits (the
    same size, other features or random directions) and the rank p-value of the observed one,
    one-sided in the expected direction: (1 + #{null >= observed}) / (1 + n) over the n draws
    with a defined effect, so never below 1 / (1 + n). Per kind (feature sets, directions) and
    pooled."""

    def ranked(kind_rows):
        values = [r["vs_noop"][metric]["diff"] for r in kind_rows]
        values = [v for v in values if v is not None]
        if not values or observed is None:
            return {"n": len(values), "effects": values, "p": None}
        beaten = sum(expected * v >= expected * observed - 1e-12 for v in values)
        norms = [r["delta_norm"] for r in kind_rows if r["delta_norm"] is not None]
        return {
            "n": len(values),
            "effects": values,
            "mean": float(np.mean(values)),
            "low": float(np.quantile(values, 0.025)),
            "high": float(np.quantile(values, 0.975)),
            "p": (1 + beaten) / (1 + len(values)),
            "delta_norm": float(np.mean(norms)) if norms else None,
        }

    kinds = {
        "features": [r for r in null_rows if r["condition"].startswith("null_feature_")],
        "directions": [r for r in null_rows if r["condition"].startswith("null_direction_")],
    }
    out = {kind: ranked(kind_rows) for kind, kind_rows in kinds.items()}
    pooled = ranked(null_rows)
    # n_controls counts the draws; a draw whose texts leave the metric undefined on every prompt
    # (no paired effect) cannot be ranked and is counted apart (n_defined)
    out.update(
        n_controls=len(null_rows), n_defined=pooled["n"], p=pooled["p"], low=pooled.get("low"), high=pooled.get("high")
    )
    return out


def noop_check(generations: pd.DataFrame) -> dict:
    """Does the no-op splice reproduce the plain generations token for token?"""
    plain = generations[generations["condition"] == "plain"].set_index(["prompt_id", "n"])["completion_ids"]
    noop = generations[generations["condition"] == "noop"].set_index(["prompt_id", "n"])["completion_ids"]
    same = [list(plain[key]) == list(noop[key]) for key in plain.index]
    return {"n": len(same), "n_identical": int(sum(same)), "identical": bool(all(same))}


# --------------------------------------------------------------------------- summary headline


def family(blocks: list[dict]) -> dict[tuple, dict]:
    """Benjamini-Hochberg over the whole family of causal tests the summary reports: every
    experiment x cell x layer x SAE x metric with a reported effect. Per test: ``q`` (of the
    paired p) and ``null_q`` (of the random null's rank p), with the ``family_size``."""
    from .probes import benjamini_hochberg

    tested = [b for b in blocks if (b.get("report") or {}).get("p") is not None]
    keys = [(b["experiment"], b.get("cell"), b["layer"], b.get("sae"), b["metric"]) for b in tested]
    out = {key: {"family_size": len(tested)} for key in keys}
    if not tested:
        return out
    q = benjamini_hochberg(np.array([b["report"]["p"] for b in tested], dtype=float))
    null_p = [(b["report"].get("null") or {}).get("p") for b in tested]
    with_null = [i for i, v in enumerate(null_p) if v is not None]
    null_q = benjamini_hochberg(np.array([null_p[i] for i in with_null], dtype=float)) if with_null else []
    for i, key in enumerate(keys):
        out[key]["q"] = float(q[i])
        out[key]["null_q"] = float(null_q[with_null.index(i)]) if i in with_null else None
    return out


def headline(blocks: list[dict], cfg: dict) -> dict:
    """``headline.steering`` / ``headline.ablation``: per metric, the report-half effect of the
    chosen features with its CI and p, the matched random control's effect and the perplexity
    change, for the last iteration's own cell (MXDX, else M0DX), the deepest layer tested and
    the first SAE config; with the random null's rank p (``null_p``, over ``n_controls`` draws),
    the prompt split's counts, the comparison methods' effects and Benjamini-Hochberg's ``q``
    over the whole family of causal tests (``family_size``).
    """
    from .grid import Cell, data_ids

    last = data_ids(cfg)[-1]
    wanted_cells = [Cell("M" + last[1:], last).name, Cell("M0", last).name]
    if "MXDX" not in cfg["grid"]["branches"]:
        wanted_cells.reverse()
    order = cfg.get("sae_order", list(cfg["saes"]))
    corrected = family(blocks)
    out: dict = {}
    for experiment in ("steering", "ablation"):
        mine = [
            b for b in blocks if b["experiment"] == experiment and (b.get("report") or {}).get("effect") is not None
        ]
        for metric in dict.fromkeys(b["metric"] for b in mine):
            candidates = [b for b in mine if b["metric"] == metric and b.get("cell") in wanted_cells]
            if not candidates:
                continue
            best = min(
                candidates,
                key=lambda b: (
                    wanted_cells.index(b["cell"]),
                    -b["layer"],
                    order.index(b["sae"]) if b.get("sae") in order else len(order),
                ),
            )
            report = best["report"]
            entry = {k: report[k] for k in ("effect", "ci_low", "ci_high", "p", "control_effect", "perplexity_change")}
            if any(v is None for v in entry.values()):
                continue
            null = report.get("null") or {}
            baselines = report.get("baselines") or {}
            entry.update(
                cell=best["cell"],
                layer=best["layer"],
                sae=best["sae"],
                model=best.get("model"),
                alpha=report["alpha"],
                condition=report.get("condition", "features"),
                features=report.get("features", best["features"]),
                selected_by=best.get("select", "probe"),
                n=report["n"],
                paired=report.get("paired", False),
                n_pairs=report.get("n_pairs"),
                undefined_change=report.get("undefined_change"),
                delta_norm=report.get("delta_norm"),
                null_p=null.get("p"),
                n_controls=null.get("n_controls"),
                null_range=[null.get("low"), null.get("high")],
                split=best.get("split"),
                baselines={name: (baselines.get(name) or {}).get("effect") for name in COMPARISONS},
                **corrected.get((experiment, best.get("cell"), best["layer"], best.get("sae"), metric), {}),
            )
            if report.get("vs_control"):
                entry["p_vs_control"] = report["vs_control"]["p"]
            out.setdefault(experiment, {})[metric] = entry
    return out
