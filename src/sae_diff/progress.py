"""Progress of long jobs where the user looks: a bar in the job's log, and a one-line summary on
the terminal every ``ECHO_EVERY`` seconds and when the work ends.

Workflow rules send a job's stdout and stderr to its log file, so a bar there is invisible
while Snakemake runs. A rule that opens one more descriptor onto Snakemake's own output
(``3>&1 > log 2>&1``) and names it in ``SAE_DIFF_PROGRESS_FD`` gets these lines on the terminal
(under SLURM, in the job's SLURM log), each one whole, prefixed with the job, so the lines of
parallel jobs interleave legibly. ``--no-progress`` keeps the log free of bars; the terminal
lines still come.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.std import tqdm

FD_VARIABLE = "SAE_DIFF_PROGRESS_FD"
ECHO_EVERY = 20.0  # seconds between terminal lines of one bar: a line per job stage, not a stream
_label = "sae-diff"


def set_label(label: str) -> None:
    """What every terminal line starts with (the CLI sets the verb and its output)."""
    global _label
    _label = label


def _echo_fd() -> int | None:
    value = os.environ.get(FD_VARIABLE)
    if not value:
        return None
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError):
        return None  # not open here (a job run by hand): the log bar alone
    return fd


_last_note = 0.0


def note(text: str, force: bool = False) -> None:
    """One terminal line outside a bar (a trainer's logged step), throttled like the bars."""
    global _last_note
    fd = _echo_fd()
    if fd is None or (not force and time.monotonic() - _last_note < ECHO_EVERY):
        return
    _last_note = time.monotonic()
    try:
        os.write(fd, f"[{_label}] {text}\n".encode("utf-8", "replace"))
    except OSError:
        pass


class JobProgress(tqdm):
    """tqdm whose state also goes, throttled, to the terminal descriptor as whole lines."""

    def __init__(self, *args, log_bar: bool = True, **kwargs):
        self._echo = _echo_fd()
        self._echo_last = time.monotonic()
        self._echo_sent_final = False
        self._devnull = None if log_bar else open(os.devnull, "w")
        kwargs.setdefault("file", sys.stderr if log_bar else self._devnull)
        kwargs["disable"] = kwargs.get("disable", False) or (not log_bar and self._echo is None)
        super().__init__(*args, **kwargs)

    def _send(self) -> None:
        line = self.format_meter(**{**self.format_dict, "ncols": None}).strip()
        try:
            os.write(self._echo, f"[{_label}] {line}\n".encode("utf-8", "replace"))
        except OSError:
            self._echo = None

    def display(self, msg=None, pos=None):
        if self._devnull is None:
            super().display(msg, pos)
        if self._echo is not None and not self._echo_sent_final and time.monotonic() - self._echo_last >= ECHO_EVERY:
            self._echo_last = time.monotonic()
            self._send()
        return True

    def close(self):
        if not self.disable and self._echo is not None and not self._echo_sent_final:
            self._echo_sent_final = True
            self._send()  # the last state: how far it got and how long it took
        super().close()
        if self._devnull is not None:
            self._devnull.close()
            self._devnull = None


def bar(iterable=None, *, desc: str, enabled: bool = True, **kwargs) -> JobProgress:
    """A progress bar: in the log when ``enabled`` (``--no-progress`` turns that off), and on the
    terminal whenever the workflow gives a descriptor for it."""
    return JobProgress(iterable, desc=desc, log_bar=enabled, **kwargs)
