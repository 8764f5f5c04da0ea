"""The causal tests' prompt split, fixed before anything runs.

A causal claim is only as good as the prompts it is measured on: features chosen on the
prompts that later report their effect are chosen for that effect. So the prompts are split
once, by prompt (or by the unit that ties prompts together, e.g. a prompt and its
translations), stratified by the configured columns, into three parts that never share a
prompt:

    select_features    the probes and fork attribution pick the features from these prompts' samples
    select_condition   the interventions pick the condition (group or single feature, alpha) here
    report             the interventions report the effect here, on prompts nothing above has seen

Either one prompt set is split three ways (the iterations' prompts: their samples are the
data the probes read), or, with ``interventions.prompts`` a prompt set of its own, every data
prompt selects features and the separate set is split into condition selection and report;
then no text of the separate set may occur among the data prompts.

The split is a table (``grid.prompt_split``): one row per prompt with ``source`` (``data``:
a prompt whose samples are in the cells' data; ``interventions``: a prompt of the separate
set), ``prompt_id`` (its row in its prompt file), ``prompt``, ``unit``, ``stratum`` and
``part``. Samples and intervention prompts are matched to it by their prompt *text*: the data
stage numbers a set's prompts after its filters, the interventions before theirs, so ids of
one prompt differ between stages while its text does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

PARTS = ("select_features", "select_condition", "report")
# the interventions' own names for their two parts (the effects tables' ``half`` column)
HALVES = {"select_condition": "select", "report": "report"}


def _allocate(n: int, fractions: list[float]) -> list[int]:
    """``n`` units shared out by ``fractions`` (largest remainder: the counts sum to n)."""
    share = np.asarray(fractions, dtype=float) / float(sum(fractions)) * n
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign(
    prompts: pd.DataFrame, parts: list[str], fractions: list[float], unit: str | None, stratify: list[str], seed: int
) -> pd.DataFrame:
    """Each prompt's part: units (all prompts sharing a value of ``unit``; each prompt alone
    when None) are shuffled within each stratum (a unit's values of ``stratify``, from its
    first prompt) and shared out by ``fractions``, so every stratum is split alike."""
    missing = [c for c in [unit, *stratify] if c is not None and c not in prompts.columns]
    if missing:
        raise DataError(
            f"interventions.split: the prompts have no column(s) {missing}; they have {list(prompts.columns)}"
        )
    table = prompts.copy()
    table["unit"] = (table[unit] if unit else table["prompt_id"]).astype(str)
    first = table.drop_duplicates("unit")
    strata = first[stratify].astype(str).agg("|".join, axis=1) if stratify else pd.Series("all", first.index)
    unit_stratum = dict(zip(first["unit"], strata))
    rng = np.random.default_rng(seed)
    unit_part: dict[str, str] = {}
    for stratum in sorted(set(unit_stratum.values())):
        units = sorted(u for u, s in unit_stratum.items() if s == stratum)
        units = [units[i] for i in rng.permutation(len(units))]
        start = 0
        for part, count in zip(parts, _allocate(len(units), fractions)):
            unit_part.update({u: part for u in units[start : start + count]})
            start += count
    table["stratum"] = table["unit"].map(unit_stratum)
    table["part"] = table["unit"].map(unit_part)
    return table


def make(
    data_prompts: pd.DataFrame | None,
    intervention_prompts: pd.DataFrame,
    separate: bool,
    opts: dict,
    seed: int,
) -> pd.DataFrame:
    """The split table.

    ``data_prompts``: the prompts the cells' data was generated from (None when the data came
    as given samples: every sample then selects features); ``intervention_prompts``: the
    prompts the interventions generate from, after their filters; ``separate``: whether those
    are a prompt set of their own (``interventions.prompts``) rather than a subset of the data
    prompts. ``opts``: ``fractions`` (per part), ``unit`` and ``stratify``.
    """
    fractions = opts["fractions"]
    unit = opts.get("unit")
    stratify = list(opts.get("stratify") or [])
    cols = ["source", "prompt_id", "prompt", "unit", "stratum", "part"]
    if not separate:
        if data_prompts is None:
            raise DataError("interventions.split: no data prompts to split; name a prompt set (interventions.prompts)")
        unit = unit if unit is None or unit in data_prompts.columns else None
        table = assign(data_prompts, list(PARTS), [fractions[p] for p in PARTS], unit, stratify, seed)
        table["source"] = "data"
        out = table[cols]
        used = out[out["prompt"].isin(set(intervention_prompts["prompt"]))]
    else:
        halves = ["select_condition", "report"]
        unit = unit if unit is None or unit in intervention_prompts.columns else None
        own = assign(intervention_prompts, halves, [fractions[p] for p in halves], unit, stratify, seed)
        own["source"] = "interventions"
        frames = [own[cols]]
        if data_prompts is not None:
            clash = sorted(set(own["prompt"]) & set(data_prompts["prompt"]))
            if clash:
                raise DataError(
                    f"interventions.prompts: {len(clash)} prompt(s) also in the data prompts, e.g. {clash[0]!r}; "
                    "a separate report set must be new to the features' selection"
                )
            data = data_prompts.assign(
                source="data", unit=data_prompts["prompt_id"].astype(str), stratum="all", part="select_features"
            )
            frames.insert(0, data[cols])
        out = pd.concat(frames, ignore_index=True)
        used = own
    for part in HALVES:
        if not (used["part"] == part).any():
            raise DataError(
                f"interventions.split: no intervention prompt in the {part} part ({len(used)} prompts after the "
                f"filters, fractions {fractions}); add prompts or change interventions.split.fractions"
            )
    return out.reset_index(drop=True)


def check(split: pd.DataFrame, where: str = "the prompt split") -> None:
    """No prompt text in two parts, no unit in two parts, every part a known one."""
    unknown = sorted(set(split["part"]) - set(PARTS))
    if unknown:
        raise DataError(f"{where}: unknown part(s) {unknown}; expected {PARTS}")
    for key in ("prompt", "unit"):
        for source, rows in split.groupby("source") if key == "unit" else [("all", split)]:
            crossing = rows.groupby(key)["part"].nunique()
            crossing = crossing[crossing > 1]
            if len(crossing):
                raise DataError(f"{where}: {key} {crossing.index[0]!r} ({source}) is in more than one part")


def read(path: str | Path) -> pd.DataFrame:
    """The split table written by the split rule, checked."""
    split = pd.read_csv(path, dtype={"prompt_id": str, "unit": str})
    check(split, str(path))
    return split


def restrict_samples(samples: pd.DataFrame, split_path: str | Path | None) -> pd.DataFrame:
    """The samples whose prompt is in the feature-selection part (all of them without a split,
    or when the split has no data prompts: the data came as given samples)."""
    if split_path is None:
        return samples
    split = read(split_path)
    data = split[split["source"] == "data"]
    if data.empty:
        return samples
    if "prompt" not in samples.columns:
        raise DataError("the samples have no prompt column: the prompt split cannot be applied")
    keep = set(data.loc[data["part"] == "select_features", "prompt"])
    return samples[samples["prompt"].isin(keep)]


def intervention_halves(prompts: pd.DataFrame, split_path: str | Path, separate: bool) -> pd.DataFrame:
    """The interventions' prompts with their ``half`` (``select`` / ``report``); prompts of the
    feature-selection part are dropped, and a prompt the split does not know is an error."""
    split = read(split_path)
    rows = split[split["source"] == ("interventions" if separate else "data")]
    rows = rows.drop_duplicates("prompt").set_index("prompt")["part"]
    unknown = sorted(set(prompts["prompt"]) - set(rows.index))
    if unknown:
        raise DataError(f"{split_path}: prompt(s) {unknown[:3]} of the interventions' prompts are not in the split")
    part = prompts["prompt"].map(rows)
    kept = prompts[part.isin(list(HALVES)).to_numpy()].copy()
    kept["half"] = part[part.isin(list(HALVES))].map(HALVES).to_numpy()
    return kept


def counts(split: pd.DataFrame, separate: bool, intervention_texts: set[str] | None = None) -> dict:
    """Prompts per part, as the headline reports them: feature selection counts data prompts,
    condition selection and report the interventions' prompts (of ``intervention_texts`` when given)."""
    own = split[split["source"] == ("interventions" if separate else "data")]
    if intervention_texts is not None:
        own = own[own["prompt"].isin(intervention_texts)]
    data = split[split["source"] == "data"]
    return {
        "select_features": int((data["part"] == "select_features").sum()),
        "select_condition": int((own["part"] == "select_condition").sum()),
        "report": int((own["part"] == "report").sum()),
    }
