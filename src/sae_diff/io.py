"""Atomic writes and small file helpers: nothing half-written is ever left at a target path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# written into every folder atomic_dir makes: only such folders (or empty ones) are ever replaced
OWNER_MARKER = ".written-by-sae-diff"
# files that sae-diff folders written before the marker existed always hold (SAE, model, features)
LEGACY_SIGNATURES = ("sae_diff.json", "sae_diff_model.json", "groups.json")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` on success.

    An existing ``target`` is replaced only if this tool wrote it (its marker file is inside) or
    it is empty: a user's folder given as an output is an error before any work starts, never
    deleted.
    """
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        (tmp / OWNER_MARKER).write_text("written by sae-diff, which replaces this folder when it rebuilds it\n")
        if target.exists():
            check_replaceable(target)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(target: Path) -> None:
    """Raise unless ``target`` is absent, an empty folder, or a folder this tool wrote."""
    from .errors import DataError

    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink():
        ours = [target / name for name in (OWNER_MARKER, *LEGACY_SIGNATURES)]
        if any(path.exists() for path in ours) or not any(target.iterdir()):
            return
    raise DataError(
        f"{target}: exists and was not written by sae-diff (no {OWNER_MARKER} inside); refusing to "
        "replace it. Move it away or choose another output folder"
    )


def discard_checkpoint(work_dir: str | Path, files, state_parent: str | None = None) -> None:
    """After a finished run: remove its checkpoint ``files``, then the state folder that held them
    and, when named ``state_parent``, that folder's parent (the crosscoder's default
    ``.crosscoder_state/<name>``), each only if empty: another run's checkpoint keeps it, and nothing
    the run did not write is touched."""
    for path in files:
        Path(path).unlink(missing_ok=True)
    work_dir = Path(work_dir)
    folders = [work_dir, work_dir.parent] if work_dir.parent.name == state_parent else [work_dir]
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty, or already gone
            folder.rmdir()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def write_parquet(df, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: Path, recorded: dict[str, str], record: Path, rebuild: str) -> None:
    """Each file ``recorded`` names is in ``folder`` with the sha256 written beside it in
    ``record``; otherwise a DataError naming the file and ``rebuild`` (how to remake it)."""
    from .errors import DataError

    for name, digest in recorded.items():
        path = folder / name
        problem = "missing" if not path.exists() else "corrupted" if sha256_file(path) != digest else None
        if problem:
            raise DataError(f"{path}: {problem} (its sha256 was recorded in {record} when it was written); {rebuild}")


def file_stamps(root: str | Path, recursive: bool = True) -> list[str]:
    """``name:size:mtime_ns`` of every file under ``root`` (or of ``root`` itself), sorted: a cheap
    signature of a folder or file that changes when any file is rewritten, without reading it."""
    root = Path(root)
    items = (sorted(root.rglob("*") if recursive else root.iterdir())) if root.is_dir() else [root]
    stamps = []
    for item in items:
        if item.is_file():
            stat = item.stat()
            name = item.relative_to(root) if root.is_dir() else item.name
            stamps.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return stamps


def setup_logging(log_file: str | Path | None = None, level: str = "INFO") -> None:
    """Log to stderr (which rules redirect into logs/{rule}/...) and optionally to a file."""
    import logging

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level, handlers=handlers, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def crash_point(variable: str, here: str) -> None:
    """SIGKILL this process when environment ``variable`` names ``here`` (resume tests only)."""
    if os.environ.get(variable) == here:
        os.kill(os.getpid(), signal.SIGKILL)
