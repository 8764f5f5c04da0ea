"""The lock decides what every machine installs: the venv the tests run in is the lock, and the
conda environments and the Makefile read the same file."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "cpu.lock"


def _pins(path: Path, here_only: bool = False) -> dict[str, str]:
    """name -> locked version; ``here_only``: only the lines whose environment marker holds here."""
    from packaging.markers import Marker

    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^\s;]+)\s*(?:;\s*(.+))?$", line)
        if match and not (here_only and match.group(3) and not Marker(match.group(3)).evaluate()):
            pins[_norm(match.group(1))] = match.group(2)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_pinned_in_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("test", "slurm"):
        wanted += project["optional-dependencies"][extra]
    pins = _pins(LOCK)
    for requirement in wanted:
        name = _norm(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
        assert name in pins, f"{requirement!r} of pyproject.toml is not in {LOCK.name}: run make lock"


def test_conda_environments_use_the_same_versions():
    pins = _pins(LOCK)
    conda = _pins(ROOT / "requirements" / "conda.lock")
    assert conda == {k: v for k, v in pins.items() if k != "torch"}, "requirements/conda.lock is stale: make lock"
    torch_version = pins["torch"].split("+")[0]
    for env in (ROOT / "workflow" / "envs").glob("*.yaml"):
        text = env.read_text()
        assert f"- pytorch={torch_version}" in text, env.name
        assert "-r ../../requirements/conda.lock" in text, env.name


@pytest.mark.skipif(os.environ.get("SAE_DIFF_UNLOCKED") == "1", reason="make test-latest: newest releases, no lock")
def test_the_running_venv_is_the_lock():
    """Every locked package is installed at exactly its locked version (make test installs the lock);
    torch's build label (+cpu, +cu128) may differ: GPU users bring their own build of the same release."""
    wrong = {}
    for name, version in _pins(LOCK, here_only=True).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if name == "torch" and installed is not None:
            installed, version = installed.split("+")[0], version.split("+")[0]
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed: {wrong}; reinstall with `rm -r .venv && make test`"
