"""Causal tests of SAE features: ablate, steer or clamp them at one layer during generation,
and measure what that does to the metrics, against controls.

Every edit is a correction added to the model's own activation x at the SAE's hook point:

    ablation   x' = x - sum_j f_j(x) d_j
    clamping   x' = x + sum_j (v_j - f_j(x)) d_j
    steering   x' = x + sum_j c_j d_j                 (c_j = alpha * s_j, s_j a typical activation)

which is the SAE's edited reconstruction spliced in with its error term kept
(x' = x_hat(f') + (x - x_hat(f))), written so that nothing is rounded twice: the no-op splice
(the SAE runs, nothing changes) adds an exact zero, so it reproduces unhooked greedy
generation token for token. Hooks run on every forward of ``generate``, so the KV cache is
kept: the prompt is edited once in the prefill and each new token as it is generated.

An experiment (``run``) takes its features from the probe (features that carry the metric)
or from fork attribution (``sae_diff.attribution``: features the model uses where it decides),
generates on one prompt set under each condition (plain, no-op, the group, matched random
features, sign-flipped steering, single features with their own random controls, over an
alpha grid), scores every text with the configured scorers plus coherence (perplexity under
M0, repetition), and reports effects against the no-op with bootstrap CIs and permutation
p-values. The prompts are split in two: one half picks what is reported (the group or a
single feature, and alpha), the other reports it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import DataError
from .experiments import EDIT_KINDS, EXPERIMENTS, POSITIONS, SWEPT, selection_method  # noqa: F401
from .sae.model import SAE
from .stats import bootstrap_mean, bootstrap_shift

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- hooks


@dataclass(frozen=True)
class Edit:
    """What to do to the features at each edited position.

    ``values``: per feature, the steering coefficient c_j (steer) or the clamped activation
    v_j (clamp); unused by ablate and noop. ``positions``: ``all`` (prompt and every generated
    token), ``generated`` (new tokens only; the prompt's prefill is left alone) or ``prompt``
    (the prefill only: what the model reads before it writes, whose cached keys and values
    carry the edit into every later token).
    """

    kind: str
    features: tuple[int, ...] = ()
    values: tuple[float, ...] = ()
    positions: str = "all"

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"edit kind {self.kind!r}: expected one of {EDIT_KINDS}")
        if self.positions not in POSITIONS:
            raise ValueError(f"edit positions {self.positions!r}: expected one of {POSITIONS}")
        if self.kind in ("steer", "clamp") and len(self.values) != len(self.features):
            raise ValueError(f"{self.kind}: {len(self.features)} features but {len(self.values)} values")


def feature_acts(sae: SAE, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Activations of the given features, [n, len(features)], as ``sae.encode(x)[:, features]``.

    TopK needs every pre-activation (a feature fires only inside the top k); ReLU and
    JumpReLU need just the chosen encoder rows.
    """
    arch = sae.cfg.architecture
    if arch == "topk":
        pre = sae.encode_pre(x)
        kth = pre.topk(sae.cfg.k, dim=-1).values[:, -1:]
        chosen = pre[:, features]
        return torch.where(chosen >= kth, chosen.clamp_min(0), torch.zeros_like(chosen))
    if arch in ("relu", "jumprelu"):
        pre = torch.addmm(sae.b_enc[features], sae._centered(x), sae.W_enc_T[features].t())
        if arch == "relu":
            return torch.relu(pre)
        return pre * (pre > sae.log_threshold.exp()[features])
    return sae.encode(x)[:, features]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def editor(sae: SAE, edit: Edit, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edit as a function of one activation tensor [..., d] (what the hook applies)."""
    sae = sae.to(device)
    dtype = sae.W_dec.dtype  # the edit is computed in the SAE's precision, added in the model's
    idx = torch.tensor(edit.features, dtype=torch.long, device=device)
    rows = sae.W_dec.detach()[idx]  # [n_features, d]
    values = torch.tensor(edit.values, dtype=dtype, device=device)
    steer = values @ rows if edit.kind == "steer" else None  # one constant vector

    def apply(x: torch.Tensor) -> torch.Tensor:
        if edit.kind == "steer":
            return x + steer.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        if edit.kind == "noop":
            sae.encode(flat)  # the SAE runs (the splice's cost); its exact-zero correction is skipped
            return x
        acts = feature_acts(sae, flat, idx)
        target = torch.zeros_like(acts) if edit.kind == "ablate" else values.expand_as(acts)
        return x + ((target - acts) @ rows).reshape(x.shape).to(x.dtype)

    return apply


@contextlib.contextmanager
def intervene(model, sae: SAE, layer: int, hook: str, edit: Edit):
    """Apply ``edit`` at (layer, hook) on every forward of ``model`` inside the block."""
    from . import models

    apply = editor(sae, edit, models.site_device(model, layer, hook))
    prefill = PrefillTracker()

    def edit_output(_module, _inputs, output):
        if edit.positions != "all" and (edit.positions == "prompt") != prefill.now:
            return output
        x = _first(output)
        edited = apply(x)
        return output if edited is x else _replace_first(output, edited)

    handle = models.hook_module(model, layer, hook).register_forward_hook(edit_output)
    try:
        with torch.no_grad(), prefill.track(model) if edit.positions != "all" else contextlib.nullcontext():
            yield
    finally:
        handle.remove()


class PrefillTracker:
    """Tells whether the model's current forward reads the prompt (the prefill) or decodes.

    A counter reset per ``generate`` call: the first forward of a call is its prefill, every later
    one a decoding step; a forward outside ``generate`` reads its whole input, like a prefill.
    This relies on nothing but ``generate`` and the forward being called, not on what transformers
    passes to the forward (the cache's keyword, ``cache_position`` and the attention mask all
    changed or vanished across releases: 5.24 passes ``cache=`` and no mask when nothing is padded).
    It assumes one forward reads the whole prompt, as plain ``generate`` does; a chunked prefill
    (``prefill_chunk_size``) or assisted decoding would need another rule.
    """

    def __init__(self) -> None:
        self.calls: int | None = None  # forwards so far in the running generate call; None outside
        self.now = True

    def _on_forward(self, _module, _args) -> None:
        self.now = self.calls is None or self.calls == 0
        if self.calls is not None:
            self.calls += 1

    @contextlib.contextmanager
    def track(self, model):
        original = model.generate  # the bound method; an instance attribute shadows it below

        @functools.wraps(original)
        def generate(*args, **kwargs):
            outer, self.calls = self.calls, 0
            try:
                return original(*args, **kwargs)
            finally:
                self.calls = outer

        shadowed = vars(model).get("generate")
        model.generate = generate
        handle = model.register_forward_pre_hook(self._on_forward)
        try:
            yield self
        finally:
            handle.remove()
            if shadowed is None:
                del model.generate
            else:
                model.generate = shadowed


# --------------------------------------------------------------------------- feature choice


def _check_sign(sign: str) -> None:
    if sign not in ("promote", "suppress", "any"):
        raise ValueError(f"interventions.sign = {sign!r}: expected promote, suppress or any")


def select_features(probe: pd.DataFrame, top: list[int], k: int, sign: str, direction: str) -> list[int]:
    """The first ``k`` features of the probe's L1-path order whose difference in means points the
    asked way: ``promote`` (higher metric in the target direction), ``suppress``, or ``any``.

    After the probe's ``top`` list, features continue in path-entry order, then by |SMD|.
    """
    _check_sign(sign)
    smd = probe.set_index("feature")["smd"]
    ordered = probe.assign(order=probe["l1_entry"].fillna(np.inf), size=-probe["smd"].abs())
    ordered = ordered.sort_values(["order", "size", "feature"])["feature"].tolist()
    want = 1.0 if direction == "up" else -1.0
    if sign == "suppress":
        want = -want
    chosen: list[int] = []
    for feature in [*top, *ordered]:
        feature = int(feature)
        if feature in chosen or not np.isfinite(smd.get(feature, np.nan)):
            continue
        if sign == "any" or np.sign(smd[feature]) == want:
            chosen.append(feature)
        if len(chosen) == k:
            break
    return chosen


def select_attributed(attribution: pd.DataFrame, k: int, sign: str) -> list[int]:
    """The ``k`` features with the largest fork attribution toward the better continuation
    (``promote``), away from it (``suppress``) or either way (``any``); zero attributions
    (features that never fire before a fork) are never chosen."""
    _check_sign(sign)
    score = attribution.set_index("feature")["attribution"]
    score = {"promote": score, "suppress": -score, "any": score.abs()}[sign]
    score = score[score > 0].sort_values(ascending=False, kind="stable")
    return [int(f) for f in score.index[:k]]


def matched_random(
    stats: pd.DataFrame, features: list[int], seed: int, pool: int = 20, exclude: list[int] | None = None
) -> list[int]:
    """For each feature, a random live feature among the ``pool`` nearest in log firing frequency
    (none chosen twice, none from ``features`` or ``exclude``)."""
    rng = np.random.default_rng(seed)
    table = stats.set_index("feature")
    live = table[(table["freq"] > 0) & ~table["dead"].astype(bool)]
    taken = set(features) | set(exclude or [])
    out = []
    for feature in features:
        candidates = live.drop(index=[f for f in taken if f in live.index])
        if candidates.empty:
            raise ValueError("matched_random: no live feature left to draw a control from")
        target = math.log(max(float(table.loc[feature, "freq"]), 1e-12))
        distance = (np.log(candidates["freq"].clip(lower=1e-12)) - target).abs()
        nearest = distance.sort_values(kind="stable").index[:pool]
        pick = int(rng.choice(np.asarray(nearest)))
        out.append(pick)
        taken.add(pick)
    return out


def typical_activation(stats: pd.DataFrame, features: list[int], how: str) -> list[float]:
    """s_j: the mean nonzero activation (``mean``) or the largest seen (``max``)."""
    column = {"mean": "mean_act", "max": "max_act"}.get(how)
    if column is None:
        raise ValueError(f"interventions.scale = {how!r}: expected mean or max")
    values = stats.set_index("feature").loc[features, column].to_numpy(dtype=float)
    return [float(v) if np.isfinite(v) else 0.0 for v in values]


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


# --------------------------------------------------------------------------- experiments


@dataclass
class Condition:
    """One way of generating: ``edit`` None is the plain, unhooked model."""

    name: str
    role: str  # baseline | target | control | single
    edit: Edit | None
    alpha: float | None = None
    features: list[int] = field(default_factory=list)


def conditions(
    experiment: str,
    features: list[int],
    random: list[int],
    typical: dict[int, float],
    alphas: list[float],
    n_single: int,
    positions: str,
) -> list[Condition]:
    """Every condition of one experiment: plain and no-op baselines, the features as a group,
    matched random features, (steering) the sign-flipped group, and single features, each with
    its own matched random feature."""
    edit_kind = EXPERIMENTS[experiment][0]
    out = [Condition("plain", "baseline", None), Condition("noop", "baseline", Edit("noop", positions=positions))]

    def make(name, role, group, alpha=None, sign=1.0):
        values = () if alpha is None else tuple(sign * alpha * typical[j] for j in group)
        return Condition(name, role, Edit(edit_kind, tuple(group), values, positions), alpha, list(group))

    # each single feature has its own matched random control (random[i] was drawn for features[i])
    singles = list(zip(features[:n_single], random[:n_single]))
    for alpha in alphas if experiment in SWEPT else [None]:
        out += [make("features", "target", features, alpha), make("random", "control", random, alpha)]
        if experiment == "steering":
            out.append(make("flipped", "control", features, alpha, sign=-1.0))
        for j, r in singles:
            out += [make(f"feature_{j}", "single", [j], alpha), make(f"random_{j}", "control", [r], alpha)]
    return out


def split_prompts(prompts: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Half the prompts pick alpha (``select``), the other half report (``report``)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    half = np.where(np.isin(np.arange(len(prompts)), order[: len(prompts) // 2]), "select", "report")
    return prompts.assign(half=half)


def generate_all(
    model,
    tokenizer,
    sae: SAE,
    layer: int,
    hook: str,
    prompts: pd.DataFrame,
    conds: list[Condition],
    sampling: dict,
    device: str = "cpu",
    progress: bool = True,
    work_dir: Path | None = None,
) -> pd.DataFrame:
    """Generations of every condition on the same prompts and the same random draws.

    With ``work_dir``, each finished condition is kept there, so an interrupted job resumes
    at the first condition it had not finished.
    """
    from . import data, io

    tables = []
    for i, cond in enumerate(conds):
        label = cond.name + ("" if cond.alpha is None else f"_a{cond.alpha:g}")
        done = None if work_dir is None else Path(work_dir) / f"{i:03d}_{label}.parquet"
        if done is not None and done.exists():
            tables.append(pd.read_parquet(done))
            log.info("condition %s: resumed from %s", label, done)
            continue
        context = contextlib.nullcontext() if cond.edit is None else intervene(model, sae, layer, hook, cond.edit)
        with context:
            table = data.generate(
                model, tokenizer, prompts, sampling, device=device, progress=progress, keep_ids=True, desc=label
            )
        table.insert(0, "condition", cond.name)
        table.insert(1, "role", cond.role)
        table.insert(2, "alpha", np.nan if cond.alpha is None else float(cond.alpha))
        table.insert(3, "features", " ".join(map(str, cond.features)))
        table.insert(4, "condition_index", i)
        if done is not None:
            io.write_parquet(table, done)
        tables.append(table)
    out = pd.concat(tables, ignore_index=True)
    out.insert(0, "generation_id", np.arange(len(out)))
    return out


def score(
    generations: pd.DataFrame,
    scorer_specs: list[dict],
    base_model,
    tokenizer,
    batch_size: int = 16,
    device: str = "cpu",
) -> pd.DataFrame:
    """The scorers' metrics plus coherence: perplexity of the completion under M0 and repetition."""
    from . import scorers

    table = generations.drop(columns=["completion_ids"])
    scored = scorers.score(table, scorer_specs)
    nll = completion_nll(
        base_model,
        tokenizer,
        generations["prompt_text"].tolist(),
        generations["completion_ids"].tolist(),
        batch_size,
        device,
    )
    scored["nll_base"] = nll
    scored["perplexity_base"] = np.exp(nll)
    scored["repetition"] = [repetition_rate(t) for t in generations["text"]]
    return scored


def _shift(before: pd.Series, after: pd.Series, seed: int) -> dict:
    return bootstrap_shift(before.to_numpy(dtype=float), after.to_numpy(dtype=float), seed=seed)


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
            "metrics": {m: bootstrap_mean(group[m].to_numpy(dtype=float), seed=seed) for m in metrics},
            "vs_noop": {m: _shift(noop[m], group[m], seed) for m in metrics},
        }
        rows.append(entry)

    def find(name, half, alpha):
        for row in rows:
            if row["condition"] == name and row["half"] == half and (alpha is None or row["alpha"] == alpha):
                return row
        return None

    # the reported condition is picked on the select half: among the group and each single
    # feature (at each alpha when swept), the largest effect the expected way whose perplexity
    # stays within max_perplexity_ratio of the no-op's; ties go to the group, then the smaller alpha
    selection = []
    for row in rows:
        if row["half"] != "select" or row["role"] not in ("target", "single"):
            continue
        ppl = row["perplexity_change"]
        selection.append(
            {
                "condition": row["condition"],
                "alpha": row["alpha"],
                "effect": row["vs_noop"][metric]["diff"],
                "perplexity_change": ppl,
                "coherent": ppl is None or ppl + 1.0 <= max_perplexity_ratio,
            }
        )
    scored = [c for c in selection if c["coherent"] and c["effect"] is not None]
    group = [c for c in selection if c["condition"] == "features"]
    if scored:
        chosen = max(scored, key=lambda c: (expected * c["effect"], c["condition"] == "features", -(c["alpha"] or 0)))
    else:  # nothing stays coherent: the group at its gentlest alpha
        chosen = min(group, key=lambda c: c["alpha"] or 0) if group else {"condition": "features", "alpha": None}
    name, chosen_alpha = chosen["condition"], chosen["alpha"]
    control_name = "random" if name == "features" else "random_" + name.split("_", 1)[1]
    report = None
    target = find(name, "report", chosen_alpha)
    control = find(control_name, "report", chosen_alpha)
    noop = scores[(scores["condition"] == "noop") & (scores["half"] == "report")]
    if target is not None:
        t_rows = scores[(scores["condition"] == name) & (scores["half"] == "report")]
        c_rows = scores[(scores["condition"] == control_name) & (scores["half"] == "report")]
        if chosen_alpha is not None:
            t_rows, c_rows = t_rows[t_rows["alpha"] == chosen_alpha], c_rows[c_rows["alpha"] == chosen_alpha]
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
            "control_effect": control["vs_noop"][metric]["diff"] if control else None,
            "control_ci": [control["vs_noop"][metric]["ci_low"], control["vs_noop"][metric]["ci_high"]]
            if control
            else None,
            "vs_control": _shift(c_rows[metric], t_rows[metric], seed) if control else None,
            "perplexity_change": target["perplexity_change"],
            "repetition_change": target["repetition"] - float(noop["repetition"].mean()),
            "n": target["n"],
            "baseline_mean": float(noop[metric].mean()) if noop[metric].notna().any() else None,
        }
        flipped = find("flipped", "report", chosen_alpha) if name == "features" else None
        if flipped is not None:
            report["flipped_effect"] = flipped["vs_noop"][metric]["diff"]
    return {"conditions": rows, "selection": selection, "report": report}


def noop_check(generations: pd.DataFrame) -> dict:
    """Does the no-op splice reproduce the plain generations token for token?"""
    plain = generations[generations["condition"] == "plain"].set_index(["prompt_id", "n"])["completion_ids"]
    noop = generations[generations["condition"] == "noop"].set_index(["prompt_id", "n"])["completion_ids"]
    same = [list(plain[key]) == list(noop[key]) for key in plain.index]
    return {"n": len(same), "n_identical": int(sum(same)), "identical": bool(all(same))}


def run(
    experiment: str,
    model_dir: Path,
    base_dir: Path,
    sae_dir: Path,
    layer: int,
    hook: str,
    probe_json: dict,
    probe_table: pd.DataFrame,
    stats: pd.DataFrame,
    prompts: pd.DataFrame,
    opts: dict,
    scorer_specs: list[dict],
    metric: str,
    direction: str,
    metrics: list[str],
    sampling: dict,
    place="cpu",
    progress: bool = True,
    work_dir: Path | None = None,
    attribution: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One experiment on one (cell, layer, SAE, metric): generations, scores and effects
    (``place``: a models.Placement or a device name). The features come from the probe or, when
    ``opts['select'][experiment]`` is ``attribution``, from the fork ``attribution`` table."""
    from . import models
    from .sae import files

    if experiment not in EXPERIMENTS:
        raise ValueError(f"interventions.experiments: {experiment!r}: expected one of {sorted(EXPERIMENTS)}")
    sae = files.load(sae_dir)
    method = selection_method(opts, experiment)
    if method == "attribution":
        if attribution is None:
            raise ValueError(f"interventions.select.{experiment} = attribution: no attribution table given")
        features = select_attributed(attribution, opts["k"], opts["sign"])
    else:
        features = select_features(
            probe_table, probe_json.get("top_features") or [], opts["k"], opts["sign"], direction
        )
    if not features:
        raise DataError(
            f"no feature of {sae_dir} points the asked way ({opts['sign']}) for {metric} (selected by {method})"
        )
    random = matched_random(
        stats, features, seed=opts["seed"], pool=opts["random_pool"], exclude=probe_json.get("top_features") or []
    )
    typical = dict(zip(features + random, typical_activation(stats, features + random, opts["scale"])))
    conds = conditions(experiment, features, random, typical, opts["alphas"], opts["singles"], opts["positions"])
    place = models.as_placement(place)
    model, tokenizer = place.load(model_dir)
    halves = split_prompts(prompts, opts["seed"])
    with place.precision():
        generations = generate_all(
            model, tokenizer, sae, layer, hook, halves, conds, sampling, place.device, progress, work_dir
        )
        base, base_tokenizer = (model, tokenizer) if Path(base_dir) == Path(model_dir) else place.load(base_dir)
        scores = score(generations, scorer_specs, base, base_tokenizer, sampling["batch_size"], place.device)
    expected = expected_sign(direction, opts["sign"], experiment)
    result = effects(
        scores,
        metric,
        expected,
        experiment,
        [m for m in metrics if m in scores.columns],
        opts["max_perplexity_ratio"],
        seed=opts["seed"],
    )
    result.update(
        experiment=experiment,
        metric=metric,
        direction=direction,
        layer=layer,
        hook_point=hook,
        select=method,
        features=features,
        random_features=random,
        typical_activation={str(k): v for k, v in typical.items()},
        scale=opts["scale"],
        alphas=opts["alphas"] if experiment in SWEPT else None,
        positions=opts["positions"],
        max_perplexity_ratio=opts["max_perplexity_ratio"],
        noop=noop_check(generations),
        prompts={"select": int((halves["half"] == "select").sum()), "report": int((halves["half"] == "report").sum())},
    )
    return generations, scores, result


def headline(blocks: list[dict], cfg: dict) -> dict:
    """``headline.steering`` / ``headline.ablation``: per metric, the report-half effect of the
    chosen features with its CI and p, the matched random control's effect and the perplexity
    change, for the last iteration's own cell (MXDX, else M0DX), the deepest layer tested and
    the first SAE config.
    """
    from .config import Cell, data_ids

    last = data_ids(cfg)[-1]
    wanted_cells = [Cell("M" + last[1:], last).name, Cell("M0", last).name]
    if "MXDX" not in cfg["grid"]["branches"]:
        wanted_cells.reverse()
    order = cfg.get("sae_order", list(cfg["saes"]))
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
            )
            if report.get("vs_control"):
                entry["p_vs_control"] = report["vs_control"]["p"]
            out.setdefault(experiment, {})[metric] = entry
    return out
