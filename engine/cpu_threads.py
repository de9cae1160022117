"""How the engine uses a CPU's cores: the one place its thread rules are written.

A pass's decoder rows are split into groups that run side by side, one Python thread each with
torch's intra-op threads (``--num-threads``, 1 by default) inside it. Threads that each own a
whole piece of work never spin-wait on each other the way OpenMP threads inside one operator do,
so a busy neighbour process slows such a server in proportion instead of collapsing it.
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one, as on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_forward_threads(intra_op_threads: int) -> int:
    """Row groups of a CPU decoder pass when ``forward_threads`` is unset: one per usable CPU left
    after each group's intra-op threads."""
    return max(1, usable_cpus() // max(1, intra_op_threads))
