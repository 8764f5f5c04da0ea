"""Remove the Snakemake lock a killed run left behind, but only when no Snakemake process runs here.

    python -m sae_diff.unlock [--workdir DIR] [--configfile FILE]   (make run calls it first)

A run killed with SIGKILL (or a closed laptop) leaves ``.snakemake/locks/``; the next run then
stops with a LockException. Unlocking while another run is alive would let two runs write the
same files, so this looks for a live Snakemake process whose working folder is this one first
(on this machine only: a run on another host of a shared file system is not seen).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def live_snakemake_here(workdir: Path) -> list[int]:
    """Pids of running Snakemake processes whose working folder is ``workdir`` (Linux /proc)."""
    here = workdir.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd")).resolve()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if cwd == here and _is_snakemake(argv):
            found.append(int(entry.name))
    return found


def _is_snakemake(argv: list[bytes]) -> bool:
    """A Snakemake process by its command line: the snakemake executable, or python -m snakemake
    (not any command that merely names a file under .snakemake/, such as tail -f of a log)."""
    names = [os.path.basename(part.decode(errors="replace")) for part in argv[:3]]
    return "snakemake" in names or any(a == "-m" and b == "snakemake" for a, b in zip(names, names[1:]))


def unlock(workdir: Path, configfile: Path | None = None) -> str:
    locks = workdir / ".snakemake" / "locks"
    if not locks.is_dir() or not any(locks.iterdir()):
        return "no lock"
    alive = live_snakemake_here(workdir)
    if alive:
        raise SystemExit(
            f"{locks}: a Snakemake run is still working in {workdir} (pid {', '.join(map(str, alive))}); "
            "wait for it or stop it, then rerun"
        )
    config = ["--configfile", str(configfile)] if configfile else []
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--unlock", "--cores", "1", *config],
        cwd=workdir,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return f"removed the stale lock left by a stopped run ({locks})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--configfile", type=Path, help="the run's config (Snakemake parses it to unlock)")
    args = parser.parse_args()
    message = unlock(args.workdir, args.configfile)
    if message != "no lock":
        print(message, file=sys.stderr)


if __name__ == "__main__":
    main()
