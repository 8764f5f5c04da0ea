"""Bring-your-own checkpoints and tables (iterations: method given), as config/examples/given.yaml
ships them: `sae-diff validate` and the DAG build accept and refuse the same configs, and the
example runs through to summary.json, where an intervention on a metric that only the tables
carry is skipped with its reason instead of failing at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .workflow_run import ROOT, snakemake

EXAMPLE = ROOT / "config" / "examples" / "given.yaml"


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_diff", "validate", str(path)], capture_output=True, text=True, cwd=ROOT
    )


def _both_refuse(path: Path, tmp_path: Path, expected: str) -> None:
    """validate and the DAG build stop with the same one-line message, before any job."""
    checked = _validate(path)
    assert checked.returncode != 0 and expected in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr
    dry = snakemake(tmp_path / "run", "-n", configfile=path)
    assert dry.returncode != 0 and expected in dry.stderr, dry.stderr[-2000:]
    assert not (tmp_path / "run" / "results").exists()


def test_the_example_validates_and_names_the_experiments_it_will_skip():
    checked = _validate(EXAMPLE)
    assert checked.returncode == 0, checked.stderr
    assert "valid (5 cells" in checked.stdout
    assert "interventions on rating will be skipped" in checked.stderr and "no configured scorer" in checked.stderr


def test_without_a_table_block_the_defaults_apply(tmp_path):
    """No `table:` key: the text column `text` and no metrics (was a KeyError traceback)."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    del cfg["iterations"]["table"]
    cfg["iterations"]["target"] = {"metric": "n_chars"}
    cfg["probes"]["metrics"] = ["n_chars"]
    checked = _validate(_write(cfg, tmp_path / "no_table.yaml"))
    assert checked.returncode == 0, checked.stderr
    dry = snakemake(tmp_path / "run", "-n", configfile=tmp_path / "no_table.yaml")
    assert dry.returncode == 0, dry.stderr[-2000:]


def test_missing_intervention_prompts_are_refused_by_validate_as_by_the_dag(tmp_path):
    cfg = yaml.safe_load(EXAMPLE.read_text())
    del cfg["interventions"]["prompts"]
    _both_refuse(_write(cfg, tmp_path / "no_prompts.yaml"), tmp_path, "interventions.prompts: required")


def test_a_bad_table_cell_is_refused_by_validate_naming_file_column_and_row(tmp_path):
    """validate reads the user's tables with the same checks as the first rule that loads them."""
    import pandas as pd

    cfg = yaml.safe_load(EXAMPLE.read_text())
    table = pd.read_csv(ROOT / "resources" / "examples" / "given" / "D1.csv")
    table["rating"] = table["rating"].astype(object)
    table.loc[5, "rating"] = "high"
    table.to_csv(tmp_path / "D1.csv", index=False)
    cfg["iterations"]["data"][1] = str(tmp_path / "D1.csv")
    checked = _validate(_write(cfg, tmp_path / "bad.yaml"))
    assert checked.returncode != 0, checked.stdout
    assert f"{tmp_path / 'D1.csv'}: column 'rating'" in checked.stderr and "'high' in row 5" in checked.stderr


def test_a_text_the_models_cannot_tokenize_is_refused_by_validate(tmp_path):
    """The example's models read characters: '∂' would become <unk> in every activation."""
    import pandas as pd

    cfg = yaml.safe_load(EXAMPLE.read_text())
    table = pd.read_csv(ROOT / "resources" / "examples" / "given" / "D2.csv")
    table.loc[3, "text"] = "a ∂ here"
    table.to_csv(tmp_path / "D2.csv", index=False)
    cfg["iterations"]["data"][2] = str(tmp_path / "D2.csv")
    checked = _validate(_write(cfg, tmp_path / "bad.yaml"))
    assert checked.returncode != 0, checked.stdout
    assert (
        f"{tmp_path / 'D2.csv'}: row 3 (sample 3), column 'text': characters ['∂'] are not in the vocabulary "
        "of models.M0's tokenizer"
    ) in checked.stderr


@pytest.mark.slow
def test_the_given_example_runs_end_to_end(tmp_path):
    """The example through to summary.json (MXDX branch and the last iteration's interventions, to
    keep CI short; the full example is the README's command): the user's folders are converted,
    the tables read with their own metric, and the rating experiments skipped with the reason."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["grid"] = {"branches": ["MXDX"]}
    cfg["interventions"]["iterations"] = [2]
    cfg["dashboard"] = {"enabled": False}  # the dashboard is tested on config/test.yaml's run
    cfg["diff"] = {"enabled": False}  # so are the SAE diffs and their null (CI has 20 minutes)
    result = snakemake(tmp_path, "--cores", "2", configfile=_write(cfg, tmp_path / "given.yaml"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # long jobs report on the terminal, not only in their logs (one whole line per report)
    terminal = result.stdout + result.stderr
    for job in ("[extract M2 D2]", "[train M2 D2 layer1]", "[features M2 D2 layer1]", "[intervene steering M2_D2"):
        assert job in terminal, job
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    from sae_diff import summary as summary_lib

    summary_lib.validate(summary)  # interventions_skipped is part of the schema
    assert {m: summary["models"][m]["source"] for m in ("M0", "M1", "M2")} == {"M0": "hf", "M1": "hf", "M2": "hf"}
    assert set(summary["cells"]) == {"M0_D0", "M1_D1", "M2_D2"}
    for d in ("D0", "D1", "D2"):  # the table's own metric beside the scorer's
        assert {"rating", "n_chars"} <= set(summary["data"][d]["metrics"])
    assert summary["headline"]["iterations"]["metric"] == "rating"
    # n_chars is scored on new generations: both experiments ran on it
    assert set(summary["interventions"]) == {"ablation", "steering"}
    assert "n_chars" in summary["headline"]["steering"] and "rating" not in summary["headline"]["steering"]
    skipped = summary["interventions_skipped"]
    assert {(s["experiment"], s["metric"]) for s in skipped} == {("ablation", "rating"), ("steering", "rating")}
    assert all("comes only from the data tables" in s["skipped"] for s in skipped)
    # the user's folders are read, never written
    given = ROOT / "resources" / "examples" / "given"
    assert not list(given.rglob(".written-by-sae-diff")) and not list(given.rglob("sae_diff_model.json"))
