"""The workflow through Snakemake's SLURM executor with profiles/slurm, on a real single-node
SLURM cluster this test starts (slurmctld, slurmd, munge; tests/slurm/cluster.sh) and stops.

Every job must go through sbatch, and the results must equal the local run's. The targets are
one cell's way through every kind of stage (see TARGETS): 20 of the DAG's 102 jobs (each SLURM job
pays a Snakemake start-up; CI has two cores). Skipped
only where the machine cannot run SLURM (not root, or neither SLURM nor apt-get).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from .workflow_run import ROOT, planned, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
# One cell's path through every kind of stage (models, DPO, data, scoring, extraction, SAEs,
# evaluation, features, probes, the lens, attribution, interventions), 20 jobs: the SLURM executor
# treats every rule alike, each job pays a Snakemake start-up, and CI has 20 minutes in all. The
# diff / evolution rules are plain CPU jobs like these and run in the local whole-DAG tests.
TARGETS = [
    "results/iterations.json",
    *[f"results/eval/{cell}/layer1/topk.json" for cell in ("M0_D0", "M1_D1")],
    "results/probes/M1_D1/layer1/topk/n_chars.json",
    *[
        f"results/interventions/{experiment}/M1_D1/layer1/topk/n_chars/effects.json"
        for experiment in ("ablation", "steering")
    ],
]


# config/test.yaml with the crosscoder comparison left out of the interventions (the override's comment says why)
CONFIGS = ["--configfile", str(ROOT / "config" / "test.yaml"), str(ROOT / "tests/slurm/no_crosscoder_comparison.yaml")]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    check = subprocess.run(["bash", str(CLUSTER), "can-run"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"this machine cannot run a local SLURM cluster: {check.stdout.strip() or check.stderr.strip()}")
    folder = Path(os.environ.get("SAE_DIFF_SLURM_DIR") or tmp_path_factory.mktemp("slurm"))
    started = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield folder / "slurm.conf"
    finally:
        pids = {p: p.read_text().strip() for p in (folder / "pid").glob("*.pid")}
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, text=True, timeout=120)
        # exactly the daemons it started are gone (by their pid files; nothing else is signalled)
        for path, pid in pids.items():
            assert not path.exists() and not Path(f"/proc/{pid}").exists(), (path, pid)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_run")
    env_conf = {"SLURM_CONF": str(slurm_cluster)}
    old = {k: os.environ.get(k) for k in env_conf}
    os.environ.update(env_conf)
    try:
        dry = snakemake(workdir, "-n", "--profile", str(ROOT / "profiles" / "slurm"), *TARGETS, *CONFIGS)
        assert dry.returncode == 0, dry.stderr[-3000:]
        # short status checks: the tiny jobs finish in seconds, and each stage waits for the next
        # check before its successors are submitted (the profile's 20 s and Snakemake's 10 s between
        # checks suit clusters)
        result = snakemake(
            workdir,
            "--profile",
            str(ROOT / "profiles" / "slurm"),
            "--slurm-init-seconds-before-status-checks",
            "2",
            "--seconds-between-status-checks",
            "2",
            "--jobs",
            "8",
            *TARGETS,
            *CONFIGS,
            timeout=1800,
        )
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return workdir, planned(dry), result.stdout + result.stderr


def test_every_job_went_through_sbatch(slurm_run):
    workdir, jobs, output = slurm_run
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    n_jobs = sum(jobs.values())
    # prompt_split and adl (the interventions' lens baseline) included
    assert n_jobs == 20 and len(set(submitted)) == n_jobs, (len(set(submitted)), jobs)
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
