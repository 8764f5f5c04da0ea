"""The SLURM test's workflow run (tests/test_slurm.py), started with the test session and collected
by the SLURM tests at its end.

Its 23 jobs follow one cell's way through the stages (mostly a chain), and most of its time is
waiting, not computing: every job pays an sbatch, a Snakemake start-up inside the job, and the
executor's status checks, whose interval grows by 10 s after each check that finds no job finished.
Started first, in the background, it overlaps the rest of the suite instead of adding its ~5 minutes
to CI's 20. The run is the same as run in the foreground: the same profile, targets, configs and
checks (tests/test_slurm.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from .workflow_run import ROOT, command, environment, planned, snakemake

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
# One cell's path through every kind of stage (models, DPO, data, scoring, extraction, SAEs,
# evaluation, features, probes, the lens and the diff-SAE, attribution, interventions), 23 jobs:
# the SLURM executor treats every rule alike, each job pays a Snakemake start-up, and CI has 20
# minutes in all. The diff / evolution rules are plain CPU jobs like these and run in the local
# whole-DAG tests.
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
TIMEOUT = 1800  # seconds the SLURM tests wait for the run to finish once they reach it


class SlurmRun:
    """A local SLURM cluster (tests/slurm/cluster.sh) and the workflow run through profiles/slurm on
    it: ``start`` starts the cluster, checks the dry run and leaves the run going in the background
    (it never raises: what went wrong is kept for the SLURM tests to report), ``result`` waits for
    the run, ``stop`` cancels the run and its jobs if still going and stops exactly the daemons the
    cluster started."""

    def __init__(self, folder: Path, workdir: Path):
        self.folder, self.workdir = folder, workdir
        self.skip: str | None = None  # why this machine cannot run it
        self.failed: str | None = None  # a start that went wrong, with its output
        self.dry = None
        self.process: subprocess.Popen | None = None
        self.log = workdir / "snakemake.out"

    def _env(self) -> dict:
        return {"SLURM_CONF": str(self.folder / "slurm.conf")}

    def start(self) -> None:
        try:
            self._start()
        except Exception as error:  # a timeout, a missing tool: the SLURM tests fail with it, not the session
            self.failed = f"starting the SLURM run failed: {error!r}"

    def _start(self) -> None:
        check = subprocess.run(["bash", str(CLUSTER), "can-run"], capture_output=True, text=True)
        if check.returncode != 0:
            self.skip = f"this machine cannot run a local SLURM cluster: {check.stdout.strip() or check.stderr.strip()}"
            return
        started = subprocess.run(
            ["bash", str(CLUSTER), "start", str(self.folder)], capture_output=True, text=True, timeout=600
        )
        if started.returncode != 0:
            self.failed = f"cluster.sh start failed:\n{started.stdout}{started.stderr}"
            return
        profile = ["--profile", str(ROOT / "profiles" / "slurm")]
        self.dry = snakemake(self.workdir, "-n", *profile, *TARGETS, *CONFIGS, env=self._env())
        if self.dry.returncode != 0:
            self.failed = f"dry run failed:\n{self.dry.stderr[-3000:]}"
            return
        # short status checks: the tiny jobs finish in seconds, and each stage waits for the next
        # check before its successors are submitted (the profile's 20 s suits clusters)
        run = command(
            self.workdir,
            *profile,
            "--slurm-init-seconds-before-status-checks",
            "2",
            "--seconds-between-status-checks",
            "2",
            "--jobs",
            "8",
            *TARGETS,
            *CONFIGS,
        )
        with open(self.log, "w") as out:  # a file, not a pipe: nobody reads a pipe while the suite runs
            # one torch thread per job (workflow_run.command), as in the local run the results are
            # compared with: the profile's 4-8 threads per job would oversubscribe CI's 2 cores
            self.process = subprocess.Popen(
                run, stdout=out, stderr=subprocess.STDOUT, env=environment(**self._env()), text=True
            )

    def result(self) -> tuple[Path, dict, str]:
        """(run folder, planned jobs by rule, the run's output) once it has finished with success."""
        import pytest

        if self.skip:
            pytest.skip(self.skip)
        assert self.failed is None, self.failed
        try:
            returncode = self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        output = self.log.read_text()
        assert returncode == 0, output[-5000:]
        return self.workdir, planned(self.dry), output

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:  # the session ended before the tests
            # SIGINT: Snakemake cancels its SLURM jobs (scancel); SIGTERM would wait for them to end
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.skip:
            return
        if (self.folder / "slurm.conf").exists():
            # any job still queued or running on this private cluster (its own slurm.conf) is
            # cancelled, so no job step outlives the daemons
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                cancel = ["scancel", "--user", str(os.getuid())]
                subprocess.run(cancel, env=environment(**self._env()), capture_output=True, timeout=60)
        pids = {p: p.read_text().strip() for p in (self.folder / "pid").glob("*.pid")}
        subprocess.run(["bash", str(CLUSTER), "stop", str(self.folder)], capture_output=True, text=True, timeout=120)
        # exactly the daemons it started are gone (by their pid files; nothing else is signalled)
        for path, pid in pids.items():
            assert not path.exists() and not Path(f"/proc/{pid}").exists(), (path, pid)
