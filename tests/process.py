"""Helpers for tests that run `presenced` as a real process (CLI, kill -9, Debian clients)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

# (re-exported: the tests take their ports from here)
from bench.ports import free_port as free_port
from bench.ports import free_ports as free_ports


def presenced(*args: str) -> list[str]:
    exe = shutil.which("presenced")
    return [exe, *args] if exe else [sys.executable, "-m", "server", *args]


# Tracebacks seen on the stderr of presenced processes (the first lines of each): the autouse
# fixture of tests/conftest.py fails the test during which one appeared.
stderr_tracebacks: list[str] = []


def watch_line(line: str, state: list[int]) -> None:
    """Keep the first lines of every traceback in a server's log (state: lines left to keep)."""
    if line.startswith("Traceback (most recent call last)"):
        stderr_tracebacks.append(line.rstrip())
        state[0] = 40
    elif state[0] > 0:
        stderr_tracebacks[-1] += "\n" + line.rstrip()
        state[0] -= 1 if line.startswith(" ") else 40  # the exception's line ends it


def drain(proc: subprocess.Popen[str], state: list[int] | None = None) -> None:
    """Keep reading the server's log so that a full pipe never blocks it, noting tracebacks."""
    assert proc.stderr is not None
    stderr = proc.stderr
    lines = state if state is not None else [0]

    def read() -> None:
        for line in stderr:
            watch_line(line, lines)

    threading.Thread(target=read, daemon=True).start()


@contextlib.contextmanager
def serving(args: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(presenced(*args), cwd=cwd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        state = [0]
        for line in proc.stderr:
            watch_line(line, state)
            if "event=started" in line:
                break
            if proc.poll() is not None:
                raise AssertionError(f"presenced did not start: {line}")
        else:  # stderr closed before event=started: it exited
            raise AssertionError(f"presenced exited before it started (status {proc.wait(5)})")
        drain(proc, state)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
