"""make run after a kill: a stale Snakemake lock is removed, but never while a run works there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_diff import unlock


def _locked_workflow(tmp_path):
    """A run killed with SIGKILL while its job sleeps: it leaves its lock behind."""
    (tmp_path / "Snakefile").write_text('rule all:\n    output: "done.txt"\n    shell: "sleep 60; touch {output}"\n')
    locks = tmp_path / ".snakemake" / "locks"
    run = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (locks.is_dir() and any(locks.iterdir())):
        assert time.monotonic() < deadline and run.poll() is None, "the run never took its lock"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # the run and its sleeping job, as kill -9 or a power cut would
    run.wait()
    (tmp_path / "Snakefile").write_text('rule all:\n    output: "done.txt"\n    shell: "touch {output}"\n')
    return locks


def test_no_lock_is_nothing_to_do(tmp_path):
    assert unlock.unlock(tmp_path) == "no lock"


def test_a_stale_lock_is_removed_and_the_run_goes_ahead(tmp_path):
    locks = _locked_workflow(tmp_path)
    blocked = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "LockException" in blocked.stdout + blocked.stderr
    assert "stale lock" in unlock.unlock(tmp_path)
    assert not locks.exists() or not any(locks.iterdir())
    ran = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True
    )
    assert ran.returncode == 0 and (tmp_path / "done.txt").exists(), ran.stderr[-2000:]


def test_a_live_run_in_the_folder_keeps_its_lock(tmp_path):
    locks = _locked_workflow(tmp_path)
    # a process named snakemake working in this folder stands for a run that is still alive
    alive = subprocess.Popen(["bash", "-c", "exec -a snakemake sleep 30"], cwd=tmp_path)
    deadline = time.monotonic() + 10
    # until bash has exec'd: before that its cmdline also contains the word ("bash -c exec -a snakemake ...")
    while Path(f"/proc/{alive.pid}/cmdline").read_bytes().split(b"\0")[0] != b"snakemake":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        with pytest.raises(SystemExit, match=r"still working in .*\(pid \d+\)"):
            unlock.unlock(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert any(locks.iterdir())


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([b"/work/.venv/bin/snakemake", b"--cores", b"2"], True),
        ([b"/usr/bin/python3", b"-m", b"snakemake", b"results/summary.json"], True),
        ([b"tail", b"-f", b".snakemake/log/2026-11-30T1200.snakemake.log"], False),  # reads a log, runs nothing
        ([b"vim", b"Snakefile"], False),
    ],
)
def test_only_snakemake_itself_counts_as_a_live_run(argv, expected):
    assert unlock._is_snakemake(argv) is expected
