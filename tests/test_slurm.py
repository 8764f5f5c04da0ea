"""The workflow through Snakemake's SLURM executor with profiles/slurm, on a real single-node
SLURM cluster the session starts (slurmctld, slurmd, munge; tests/slurm/cluster.sh) and stops.

Every job must go through sbatch, and the results must equal the local run's. The targets are
one cell's way through every kind of stage (tests/slurm_session.py's TARGETS): 20 of the DAG's 111
jobs. The run starts with the session and overlaps the other tests (it mostly waits on the
cluster); these tests wait for it. Skipped only where the machine cannot run SLURM (not root, or
neither SLURM nor apt-get).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .slurm_session import TARGETS

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm_run(slurm_session):
    """The run started with the session (conftest.slurm_session): waited for here."""
    return slurm_session.result()


def test_every_job_went_through_sbatch(slurm_run):
    workdir, jobs, output = slurm_run
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    n_jobs = sum(jobs.values())
    # prompt_split, adl, and diff_sae + metric_latents on M0_D1's activations (the interventions'
    # lens and diff-SAE comparisons) included
    assert n_jobs == 23 and len(set(submitted)) == n_jobs, (len(set(submitted)), jobs)
    logs = list((workdir / "logs" / "slurm").rglob("*.log"))
    assert {p.stem for p in logs} == set(submitted)  # one kept SLURM log per job, named by its job id


def _tables_equal(a: Path, b: Path) -> None:
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), check_exact=False, rtol=1e-5)


def test_results_equal_the_local_run(slurm_run, finished_run):
    """Same config (but the crosscoder comparison), same seeds: the same samples, SAE metrics, probe
    and interventions."""
    workdir, _, _ = slurm_run
    ours, local = workdir / "results", finished_run / "results"
    # the premise of leaving the crosscoder comparison out: the local run's crosscoder had nothing to steer with
    crosscoder = json.loads((local / "diffing/crosscoder/M0_D1__M1_D1/layer1/metrics.json").read_text())
    assert crosscoder["classes"]["mi_only"] == 0
    for d in ("D0", "D1"):
        _tables_equal(ours / "data" / d / "samples.parquet", local / "data" / d / "samples.parquet")
    for path in sorted(ours.glob("eval/*/layer1/*.json")):
        a, b = json.loads((local / path.relative_to(ours)).read_text()), json.loads(path.read_text())
        for key in ("fvu", "l0", "dead_fraction", "ce_loss_score", "kl_div_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (path, key)
    path = Path("probes/M1_D1/layer1/topk/n_chars.json")
    a, b = json.loads((local / path).read_text()), json.loads((ours / path).read_text())
    assert a.get("top_features") == b.get("top_features") and a.get("auroc") == pytest.approx(b.get("auroc"))
    assert json.loads((local / "iterations.json").read_text()) == json.loads((ours / "iterations.json").read_text())
    for target in TARGETS[-2:]:
        path = local / Path(target).relative_to("results")
        a, b = json.loads(path.read_text()), json.loads((ours / path.relative_to(local)).read_text())
        assert a["features"] == b["features"], path
        for key in ("effect", "ci_low", "ci_high", "p", "control_effect", "perplexity_change"):
            assert a["report"][key] == pytest.approx(b["report"][key], rel=1e-5, abs=1e-9), (path, key)
        _tables_equal(
            path.with_name("generations.parquet"), ours / path.relative_to(local).with_name("generations.parquet")
        )
