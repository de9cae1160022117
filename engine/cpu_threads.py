"""How the engine uses a CPU's cores: the one place its thread rules are written.

A pass's decoder rows are split into groups that run side by side, one Python thread each with
torch's intra-op threads (``--num-threads``, 1 by default) inside it. Threads that each own a
whole piece of work never spin-wait on each other the way OpenMP threads inside one operator do,
so a busy neighbour process slows such a server in proportion instead of collapsing it.

A traced pass (``engine.traced_decoder``, the CPU default) runs its operators without Python's
GIL, so its groups never wait for each other: with the decoder traced, any pass of two canvases or
more splits. In an eager pass only one thread at a time dispatches an operator (the GIL); the
operator's own work runs without it. Small operators are mostly dispatch, so two groups of them run
no faster than one, and in practice slower: an eager group is formed only for ``MIN_GROUP_WORK`` of
work, canvas tokens times the hidden size squared, the shape of its matrix products.

The encoder (prompts and commits into the KV) runs eagerly on the engine's thread. In a traced pass
the decoder rows that do not wait for it start first, in the other threads, and the encoder runs
beside them (``rows_beside_encoder``): a pass with prompts to encode then keeps every core busy.
"""

from __future__ import annotations

import math
import os


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def cgroup_cpu_limit(path: str = CGROUP_CPU_MAX) -> int | None:
    """The CPUs a cgroup v2 quota allows (``docker run --cpus 2`` -> 2, rounded up), or None without one."""
    try:
        with open(path) as fh:
            quota, period = fh.read().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS has one (as on Linux), within a
    container's CPU quota (which the affinity does not show)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return cpus if limit is None else min(cpus, limit)


# Least work (canvas tokens x hidden size^2) that makes an eager row group of its own (see the module docstring).
MIN_GROUP_WORK = 4 * 1024 * 1024


def min_group_work(traced: bool) -> int:
    """The least work of a row group: none for a traced pass, ``MIN_GROUP_WORK`` for an eager one."""
    return 0 if traced else MIN_GROUP_WORK


def row_groups(rows: int, canvas_length: int, hidden_size: int, forward_threads: int,
               min_work: int = MIN_GROUP_WORK) -> int:
    """How many groups a decoder pass of ``rows`` canvases runs in: at most ``forward_threads``, one
    per row at most, and each with at least ``min_work``."""
    work = rows * canvas_length * hidden_size * hidden_size
    return max(1, min(forward_threads, rows, work // max(1, min_work)))


# An encoder call's cost beyond its tokens, in canvases: what rows_beside_encoder adds to its token count
ENCODER_CALL_CANVASES = 1


def rows_beside_encoder(rows: int, independent: int, encoder_tokens: int, canvas_length: int,
                        forward_threads: int) -> int:
    """How many of a traced pass's ``rows`` decoder canvases (slot order) start in the other threads
    before the encoder runs on the engine's thread: the first ``independent`` of them do not wait for
    it. The engine's thread then runs the encoder and the remaining rows, and every thread gets about
    the same work, the encoder's counted as ``encoder_tokens / canvas_length + ENCODER_CALL_CANVASES``
    canvases. 0: no row starts early (one thread, or no row to spare)."""
    if forward_threads < 2 or encoder_tokens == 0:
        return 0
    encoder = encoder_tokens / canvas_length + ENCODER_CALL_CANVASES
    own = max(0, round((rows + encoder) / forward_threads - encoder))  # rows left to the engine's thread
    return max(0, min(independent, rows - own))


def default_forward_threads(intra_op_threads: int) -> int:
    """Row groups of a CPU decoder pass when ``forward_threads`` is unset: one per usable CPU left
    after each group's intra-op threads."""
    return max(1, usable_cpus() // max(1, intra_op_threads))
