"""Processes a test started (engine replicas, servers): whether one still runs, waiting until some are gone,
and killing what is left."""

from __future__ import annotations

import os
import signal
import time


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], seconds: float, message: str) -> None:
    """Until none of ``pids`` runs; fails with ``message`` after ``seconds`` (which only bound a hang)."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` still there (a test's cleanup)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
