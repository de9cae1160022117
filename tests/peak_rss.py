"""A call's peak memory, measured in a fresh process: the resident set's peak (VmHWM) reset after a first
call that sets up the allocator and the kernels, then read around a second one. Other processes' load
does not move it, and no timing is involved. Linux only (``/proc/self/clear_refs``)."""

from __future__ import annotations

import os
import subprocess
import sys

SUPPORTED = os.path.exists("/proc/self/clear_refs")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = r'''
import torch

def peak_growth(call) -> int:
    """Bytes the resident set grows to during ``call()``, its set-up done by a first call."""
    def kib(field):
        return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

    with torch.no_grad():
        call()
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident set, to now
        base = kib("VmRSS")
        call()
        return (kib("VmHWM") - base) * 1024
'''


def growth_and_plan(script: str, *args: str) -> tuple[int, int]:
    """Run ``script`` (which may call ``peak_growth(call)`` and must print two integers last: what grew and
    what the plan sets aside) with ``args`` in a fresh process; return the two."""
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + script, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300,
                          # every large block mapped on its own: glibc's dynamic mmap threshold would
                          # otherwise serve the measured call from a heap whose growth varies
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew, planned = (int(x) for x in proc.stdout.split()[-2:])
    return grew, planned
