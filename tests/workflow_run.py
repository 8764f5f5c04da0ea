"""Running the workflow from tests: Snakemake in a subprocess, and reading its dry-run plans."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(workdir: Path, *args: str, configfile: Path | None = None) -> list[str]:
    """The Snakemake command line of a test run in ``workdir`` (config/test.yaml unless ``configfile``)."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile or ROOT / "config" / "test.yaml"),
        # one thread per job, so two jobs share CI's two cores: the tests' tiny jobs are mostly
        # start-up (imports, loading), which a second thread does not speed up (the given example:
        # 227 s -> 153 s on 2 cores, summary.json identical but for its timings)
        "--max-threads",
        "1",
        *args,
    ]


def environment(**extra: str) -> dict:
    """The environment of a test run: this venv's executables first on PATH, plus ``extra``."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run Snakemake to the end (``env``: extra environment variables)."""
    cmd = command(workdir, *args, configfile=configfile)
    return subprocess.run(cmd, capture_output=True, text=True, env=environment(**(env or {})), timeout=timeout)


def reruns(jobs: dict, counts: dict, never: tuple[str, ...]) -> None:
    """The planned jobs include ``counts`` exactly and none of the ``never`` rules (upstream of the change)."""
    for rule, count in counts.items():
        assert jobs.get(rule) == count, (rule, jobs)
    assert not set(jobs) & set(never), jobs


def planned(result) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    return {
        m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"
    }
