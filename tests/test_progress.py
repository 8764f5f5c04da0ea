"""Terminal progress lines: whole lines on the descriptor the workflow names, throttled, with the
final state always sent, and none when no descriptor is open."""

from __future__ import annotations

import os

from sae_diff import progress


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16).decode()
    except BlockingIOError:
        return ""


def test_a_bar_without_log_output_still_reports_its_final_state_on_the_terminal(monkeypatch):
    read, write = os.pipe()
    monkeypatch.setenv(progress.FD_VARIABLE, str(write))
    progress.set_label("train M1 D1 layer1")
    bar = progress.bar(total=5, desc="train M1_D1", enabled=False)  # --no-progress: nothing in the log
    for _ in range(5):
        bar.update(1)
    bar.close()
    lines = _read_all(read).splitlines()
    os.close(read), os.close(write)
    assert len(lines) == 1  # throttled: only the final line within ECHO_EVERY seconds
    assert lines[0].startswith("[train M1 D1 layer1] train M1_D1: 100%") and "5/5" in lines[0]


def test_every_display_is_a_line_when_the_throttle_is_zero(monkeypatch):
    read, write = os.pipe()
    monkeypatch.setenv(progress.FD_VARIABLE, str(write))
    monkeypatch.setattr(progress, "ECHO_EVERY", 0.0)
    for _ in progress.bar(range(3), desc="features", enabled=False, mininterval=0):
        pass
    lines = _read_all(read).splitlines()
    os.close(read), os.close(write)
    assert len(lines) >= 3 and lines[-1].endswith("]") and "3/3" in lines[-1]
    assert all(line.startswith("[") for line in lines)


def test_no_descriptor_means_no_terminal_lines_and_a_disabled_bar(monkeypatch):
    monkeypatch.delenv(progress.FD_VARIABLE, raising=False)
    bar = progress.bar(total=2, desc="x", enabled=False)
    assert bar.disable
    bar.close()
    monkeypatch.setenv(progress.FD_VARIABLE, "987")  # not open in this process: ignored
    assert progress.bar(total=1, desc="x", enabled=False).disable
