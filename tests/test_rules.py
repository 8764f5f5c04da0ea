"""Every rule's command reads and writes only what the rule declares.

A dry run of the test config prints each job's inputs, outputs, log, benchmark and shell
command. Every results path on a command line must be one of the job's declared files, the
folder that holds one of them (a per-SAE or per-cell folder, never a stage root such as
``results/saes``), or a file written beside one of them by the same job (an SAE's training
log beside its weights). A rule that hands the library a results root, or a file it does not
list, fails here.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import PurePosixPath

import pytest

FIELDS = ("input", "output", "log", "benchmark")


def _jobs(text: str) -> list[dict]:
    jobs, job = [], None
    for line in text.splitlines():
        if line.startswith("rule ") and line.rstrip().endswith(":"):
            job = {"rule": line[5:-1].strip(), "files": set(), "shell": None}
            jobs.append(job)
        elif job is not None and line.startswith("    ") and ":" in line:
            key, _, value = line.strip().partition(": ")
            if key in FIELDS:
                job["files"].update(v.strip() for v in value.split(", ") if v.strip())
        elif job is not None and line.startswith("Shell command: "):
            job["shell"] = line[len("Shell command: ") :]
    return jobs


def _paths(command: str) -> list[str]:
    """Results paths on a command line (also inside NAME=PATH and $(dirname PATH))."""
    out = []
    for token in shlex.split(command):
        token = token.partition("=")[2] if "=" in token and not token.startswith("results/") else token
        token = token.rstrip(")").rstrip("/")
        if token == "results" or token.startswith("results/"):
            out.append(token)
    return out


def _declared(path: str, files: set[str]) -> bool:
    p = PurePosixPath(path)
    for f in map(PurePosixPath, files):
        if p == f or p.parent == f.parent:  # the file, or one written beside it
            return True
        if p in f.parents and len(p.parts) >= 3:  # a folder holding it, below the stage root
            return True
    return False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, root) -> list[dict]:
    workdir = tmp_path_factory.mktemp("dry")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(root / "Snakefile"), "-d", str(workdir)]
        + ["--configfile", str(root / "config" / "test.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return _jobs(result.stdout + result.stderr)


def test_every_command_reads_and_writes_only_declared_files(dry_run):
    """Compared: each results path on each job's command line against the job's declared files."""
    rules = {job["rule"] for job in dry_run if job["shell"]}
    assert {"train_sae", "feature_stats", "diff_saes", "evolution", "probes", "probe_comparison", "summary"} <= rules
    undeclared = [
        f"{job['rule']}: {path}"
        for job in dry_run
        if job["shell"]
        for path in _paths(job["shell"])
        if not _declared(path, job["files"])
    ]
    assert not undeclared, undeclared
    assert sum(len(_paths(job["shell"])) for job in dry_run if job["shell"]) > 200  # the check saw the paths


def test_a_results_root_on_a_command_line_is_caught():
    """The check itself: a stage root or an unlisted file is refused, the listed file and its folder pass."""
    files = {"results/saes/M0_D0/layer1/topk/sae_weights.safetensors"}
    assert _declared("results/saes/M0_D0/layer1/topk", files)
    assert _declared("results/saes/M0_D0/layer1/topk/train_log.jsonl", files)
    assert not _declared("results/saes", files)
    assert not _declared("results", files)
    assert not _declared("results/features/M0_D0/layer1/topk/stats.parquet", files)
    assert _paths("x --input features=$(dirname results/a/b/c.parquet) --out results/d --results results") == [
        "results/a/b/c.parquet",
        "results/d",
        "results",
    ]
