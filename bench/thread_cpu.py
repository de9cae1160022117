"""CPU time of this process's threads by Python thread name (Linux, from /proc/self/task): how busy the
engine's threads keep the cores during an in-process run (``bench.profile_engine``)."""

from __future__ import annotations

import os
import threading


def thread_cpu_seconds() -> dict[str, float]:
    """User plus system CPU seconds each live thread has used so far, by thread name (empty where
    /proc is missing)."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                stat = f.read()
        except (OSError, TypeError):  # not Linux, or the thread ended
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the fields after the command name, from "state"
        seconds[thread.name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return seconds


def busy_shares(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Each thread's CPU time between two ``thread_cpu_seconds`` as a share of ``wall_s``, busiest first."""
    shares = {name: (after[name] - before.get(name, 0.0)) / wall_s for name in after}
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def describe(shares: dict[str, float], cores: int, least: float = 0.005) -> str:
    """"name 96.6%, other 78.4%; 2 cores idle 12.5% of the time" (threads under ``least`` left out)."""
    busy = ", ".join(f"{name} {share:.1%}" for name, share in shares.items() if share >= least)
    idle = max(0.0, 1 - sum(shares.values()) / cores)
    return f"{busy}; {cores} cores idle {idle:.1%} of the time"
