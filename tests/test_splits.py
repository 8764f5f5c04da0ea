"""The causal tests' prompt split (sae_diff.splits): disjoint, reproducible, stratified, and
obeyed by the stages that select features and by the interventions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sae_diff import splits
from sae_diff.errors import DataError

OPTS = {
    "fractions": {"select_features": 0.5, "select_condition": 0.25, "report": 0.25},
    "unit": "pair_id",
    "stratify": ["template"],
}


def _prompts(n_professions=20, templates=2, languages=("en", "fr")) -> pd.DataFrame:
    rows = [
        {"prompt": f"{lang} t{t} about job{j}", "language": lang, "template": t, "pair_id": f"job{j}#{t}"}
        for lang in languages
        for t in range(templates)
        for j in range(n_professions)
    ]
    out = pd.DataFrame(rows)
    out.insert(0, "prompt_id", np.arange(len(out)))
    return out


def test_one_prompt_set_split_three_ways_is_disjoint_reproducible_and_stratified():
    """Compared: the parts' prompt ids (pairwise empty intersections), two calls with one seed
    (equal tables) and another seed (another assignment), each template's share of units per
    part (10 / 5 / 5 of 20), and translations (one pair_id) always in one part."""
    prompts = _prompts()
    asked = prompts[prompts["language"] == "en"]
    split = splits.make(prompts, asked, separate=False, opts=OPTS, seed=3)
    splits.check(split)
    ids = {part: set(split.loc[split["part"] == part, "prompt_id"]) for part in splits.PARTS}
    assert not (ids["select_features"] & ids["select_condition"])
    assert not (ids["select_features"] & ids["report"]) and not (ids["select_condition"] & ids["report"])
    assert sum(map(len, ids.values())) == len(prompts)
    pd.testing.assert_frame_equal(split, splits.make(prompts, asked, separate=False, opts=OPTS, seed=3))
    assert not split["part"].equals(splits.make(prompts, asked, separate=False, opts=OPTS, seed=4)["part"])
    units = split.drop_duplicates("unit")
    per_template = units.groupby(["stratum", "part"]).size().unstack()
    assert (per_template[list(splits.PARTS)].to_numpy() == [[10, 5, 5], [10, 5, 5]]).all()
    assert (split.groupby("pair_id" if "pair_id" in split else "unit")["part"].nunique() == 1).all()
    assert splits.counts(split, separate=False, intervention_texts=set(asked["prompt"])) == {
        "select_features": 40,  # 20 of 40 units, each an English prompt and its French translation
        "select_condition": 10,
        "report": 10,
    }


def test_a_separate_prompt_set_is_split_two_ways_and_must_be_new():
    """Every data prompt selects features; the separate set is shared 50/50 between condition
    and report; a separate prompt that is also a data prompt is an error naming it."""
    data = _prompts(6)
    own = pd.DataFrame({"prompt_id": np.arange(10), "prompt": [f"held-out {i}" for i in range(10)]})
    opts = dict(OPTS, stratify=[])
    split = splits.make(data, own, separate=True, opts=opts, seed=0)
    splits.check(split)
    assert set(split.loc[split["source"] == "data", "part"]) == {"select_features"}
    held = split[split["source"] == "interventions"]
    assert held["part"].value_counts().to_dict() == {"select_condition": 5, "report": 5}
    clash = pd.concat([own, data[["prompt_id", "prompt"]].iloc[:1].assign(prompt_id=99)], ignore_index=True)
    with pytest.raises(DataError, match="also in the data prompts.*en t0 about job0"):
        splits.make(data, clash, separate=True, opts=opts, seed=0)
    given = splits.make(None, own, separate=True, opts=opts, seed=0)  # data came as given samples
    assert set(given["source"]) == {"interventions"}


def test_too_few_prompts_for_a_part_is_a_clear_error():
    prompts = _prompts(1, 1, ("en",))
    with pytest.raises(DataError, match="no intervention prompt in the select_condition part"):
        splits.make(prompts, prompts, separate=False, opts=OPTS, seed=0)


def test_the_check_catches_a_prompt_in_two_parts():
    split = splits.make(_prompts(), _prompts(), separate=False, opts=OPTS, seed=0)
    other = "report" if split["part"][0] != "report" else "select_features"
    broken = pd.concat([split, split.iloc[:1].assign(part=other)])
    with pytest.raises(DataError, match="in more than one part"):
        splits.check(broken)


def test_samples_and_interventions_read_only_their_parts(tmp_path):
    """The feature-selection stages keep the samples of select_features prompts only; the
    interventions get the other two parts as their select / report halves; no id crosses."""
    prompts = _prompts()
    split = splits.make(prompts, prompts, separate=False, opts=OPTS, seed=1)
    path = tmp_path / "split.csv"
    split.to_csv(path, index=False)
    # the data stage numbers prompts after its filters: samples carry other ids, the same texts
    samples = pd.DataFrame(
        {
            "sample_id": np.arange(3 * len(prompts)),
            "prompt_id": np.repeat(np.arange(len(prompts))[::-1], 3),
            "prompt": np.repeat(prompts["prompt"], 3),
        }
    )
    kept = splits.restrict_samples(samples, path)
    chosen = set(split.loc[split["part"] == "select_features", "prompt"])
    assert set(kept["prompt"]) == chosen and len(kept) == 3 * len(chosen)
    halves = splits.intervention_halves(prompts, path, separate=False)
    assert not set(halves["prompt"]) & chosen
    assert set(halves["half"]) == {"select", "report"} and len(halves) == len(prompts) - len(chosen)
    unknown = pd.DataFrame({"prompt_id": [10_000], "prompt": ["?"]})
    with pytest.raises(DataError, match="not in the split"):
        splits.intervention_halves(unknown, path, separate=False)
    assert splits.restrict_samples(samples, None) is samples
