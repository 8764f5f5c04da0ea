"""Iteration statistics (bootstrap CIs, permutation p) against plain references, and the
iterations block of the config: both methods resolve to the same grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from sae_diff import config as cfglib
from sae_diff import grid, iterations
from sae_diff.config import ConfigError


def test_bootstrap_mean_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.normal(0.4, 1.0, size=150)
    ours = iterations.bootstrap_mean(np.append(x, np.nan), n_boot=8000, seed=1)  # NaN left out
    ref = stats.bootstrap((x,), np.mean, n_resamples=8000, method="percentile", random_state=2)
    assert ours["n"] == 150
    assert ours["mean"] == pytest.approx(float(np.mean(x)), rel=1e-12)
    # two independent Monte-Carlo estimates of the same interval: equal to within resampling noise
    assert ours["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert ours["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.02)
    # and the textbook normal interval, mean +- 1.96 s / sqrt(n)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert ours["ci_high"] - ours["ci_low"] == pytest.approx(2 * half, rel=0.1)


def test_shift_difference_ci_and_permutation_p_against_references():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.0, 1.0, 120), rng.normal(0.5, 1.0, 100)
    ours = iterations.bootstrap_shift(a, b, n_boot=6000, seed=0)
    assert ours["diff"] == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    welch = stats.ttest_ind(b, a, equal_var=False)
    half = welch.confidence_interval(0.95)
    assert ours["ci_low"] == pytest.approx(half.low, abs=0.05)
    assert ours["ci_high"] == pytest.approx(half.high, abs=0.05)
    perm = stats.permutation_test(
        (b, a), lambda u, v: np.mean(u) - np.mean(v), n_resamples=6000, random_state=1, alternative="two-sided"
    )
    assert ours["p"] == pytest.approx(perm.pvalue, abs=0.003)
    assert ours["significant"]
    same = iterations.bootstrap_shift(a, rng.permutation(a), seed=0)
    assert same["diff"] == pytest.approx(0.0, abs=1e-12) and not same["significant"] and same["p"] > 0.9


def _table(values, split):
    return pd.DataFrame({"sample_id": range(len(values)), "prompt": "p", "text": "t", "m": values, "split": split})


def test_summarize_reports_every_iteration_held_out_part_and_headline():
    t0 = _table([0.0, 0.0, 1.0, np.nan], ["train", "train", "eval", "eval"])
    t1 = _table([1.0, 1.0, 1.0, 0.0], ["train", "train", "eval", "eval"])
    out = iterations.summarize({"D0": t0, "D1": t1}, ["m"], {"metric": "m", "direction": "up"})
    per = out["metrics"]["m"]["per_iteration"]
    assert per["M0"]["all"]["mean"] == pytest.approx(1 / 3) and per["M0"]["all"]["n"] == 3
    assert per["M1"]["eval"]["mean"] == pytest.approx(0.5)
    assert out["metrics"]["m"]["shift"]["all"]["diff"] == pytest.approx(0.75 - 1 / 3)
    assert out["metrics"]["m"]["shift"]["all"]["paired"]  # one prompt, paired by its text
    assert out["examples"]["M0"][1]["m"] is None  # NaN becomes null in JSON
    head = iterations.headline(out)
    assert head["metric"] == "m" and set(head["means"]) == {"M0", "M1"}
    assert set(head["shift"]) == {"diff", "ci_low", "ci_high", "p"}
    no_target = iterations.summarize({"D0": t0, "D1": t1}, ["m"], None)
    assert iterations.headline(no_target) is None  # no target: no headline, never a guess


def test_target_population_restricts_the_headline():
    t0 = _table([0.0, 0.0, 1.0, 1.0], ["train", "train", "eval", "eval"]).assign(language=["en", "en", "fr", "fr"])
    t1 = _table([1.0, 1.0, 1.0, 1.0], ["train", "train", "eval", "eval"]).assign(language=["en", "en", "fr", "fr"])
    out = iterations.summarize(
        {"D0": t0, "D1": t1}, ["m"], {"metric": "m", "direction": "up", "where": {"language": ["en"]}}
    )
    assert out["metrics"]["m"]["per_iteration"]["M0"]["all"]["mean"] == pytest.approx(0.5)  # every sample
    head = iterations.headline(out)
    assert head["means"] == {"M0": 0.0, "M1": 1.0} and head["where"] == {"language": ["en"]}
    assert head["shift"]["diff"] == pytest.approx(1.0)


# ----- config: the iterations block


def _load(cfg, tmp_path, root):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfglib.load(path, base_dirs=[root])


def test_dpo_block_expands_to_models_and_data(test_config, tmp_path, root):
    test_config["iterations"]["rounds"] = 3
    cfg = _load(test_config, tmp_path, root)
    assert grid.model_ids(cfg) == ["M0", "M1", "M2", "M3"]
    assert cfg["models"]["M2"] == {
        "source": "dpo",
        "parent": "M1",
        "pairs_from": "D1",
        "reference": "M1",
        "dtype": "float32",
        "trust_remote_code": False,
    }
    assert cfg["data"]["D3"]["model"] == "M3" and cfg["data"]["D3"]["sampling"]["n_per_prompt"] == 3
    test_config["iterations"]["dpo"]["reference"] = "base"
    assert _load(test_config, tmp_path, root)["models"]["M3"]["reference"] == "M0"
    # a second check of an expanded config changes nothing (Snakemake and the CLI both check)
    again = cfglib.check(cfglib.validate(yaml.safe_load(yaml.safe_dump(cfg))), [root])
    assert again == cfg


def test_given_method_resolves_the_same_grid_as_dpo(test_config, tmp_path, root, tiny_model_dir):
    dpo_cfg = _load(test_config, tmp_path, root)
    for i in range(2):
        pd.DataFrame({"text": ["abc", "abd"], "score": [1.0, 2.0]}).to_csv(tmp_path / f"D{i}.csv", index=False)
    given = dict(test_config)
    given["iterations"] = {
        "method": "given",
        "models": [str(tiny_model_dir)],
        "data": [str(tmp_path / "D0.csv"), str(tmp_path / "D1.csv")],
        "table": {"metric_columns": ["score"]},
        "target": {"metric": "score"},
    }
    given["interventions"] = {**given["interventions"], "prompts": "resources/prompts/tiny.txt"}
    given_cfg = _load(given, tmp_path, root)
    assert grid.cells(given_cfg) == grid.cells(dpo_cfg)
    assert grid.model_ids(given_cfg) == grid.model_ids(dpo_cfg)
    assert grid.data_ids(given_cfg) == grid.data_ids(dpo_cfg)
    assert given_cfg["models"]["M1"] == {
        "source": "hf",
        "path": str(tiny_model_dir),
        "dtype": "float32",
        "trust_remote_code": False,
    }
    assert given_cfg["data"]["D1"]["source"] == "table" and given_cfg["data"]["D1"]["metric_columns"] == ["score"]


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda c: c["models"].update(M1={"source": "random"}), ["models.M1", "also made by iterations"]),
        (
            lambda c: c.update(data={"D5": {"source": "table", "path": "x.csv"}}),
            ["data.D5", "not part of the iterations"],
        ),
        (
            lambda c: c["iterations"]["target"].update(metric="toxicity"),
            ["iterations.target.metric = 'toxicity'", "n_chars"],
        ),
        (lambda c: c["iterations"].update(prompts="nope.txt"), ["iterations.prompts", "nope.txt"]),
        (
            lambda c: c.update(iterations={"method": "given", "models": ["a"], "data": ["b"]}),
            ["iterations.data", "minItems 2"],
        ),
        (
            lambda c: c.update(iterations={"method": "given", "models": ["a", "b"], "data": ["c", "d"]}),
            ["iterations.data has 2 tables", "3"],
        ),
        (lambda c: c["iterations"].update(method="ppo"), ["iterations.method", '"ppo"', "dpo"]),
        (lambda c: c.pop("iterations"), ["missing required key 'data'"]),
    ],
    ids=[
        "model-clash",
        "extra-data",
        "unknown-target",
        "missing-prompts",
        "given-too-few",
        "given-count",
        "bad-method",
        "no-data",
    ],
)
def test_bad_iterations_blocks_fail_with_one_line(mutate, expected, test_config, tmp_path, root):
    mutate(test_config)
    with pytest.raises(ConfigError) as info:
        _load(test_config, tmp_path, root)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
