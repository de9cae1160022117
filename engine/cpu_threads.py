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
the leading decoder rows (slot order) that do not wait for it start first, in the other threads, and
the encoder runs beside them (``rows_beside_encoder``); the rows left after it are shared out so that
the threads finish about together (``rows_after_encoder``).
"""

from __future__ import annotations

import os

from . import cgroups


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS has one (as on Linux), within its cgroups'
    CPU quota (a container's, a systemd unit's: ``engine.cgroups``; the affinity does not show it)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroups.cpu_limit()
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


# An encoder call's cost beyond its tokens, in canvases (see encoder_canvases)
ENCODER_CALL_CANVASES = 1


def encoder_canvases(encoder_tokens: int, canvas_length: int) -> float:
    """A pass's encoder work in canvases of decoder work: its tokens plus one call's fixed cost (an
    estimate: it leaves out the vision tower and the extra calls of prompts prefilled in chunks)."""
    return encoder_tokens / canvas_length + ENCODER_CALL_CANVASES if encoder_tokens else 0.0


def rows_beside_encoder(rows: int, independent: int, encoder: float, forward_threads: int) -> int:
    """How many of a traced pass's ``rows`` decoder canvases (slot order) start in the other threads
    before the encoder (``encoder`` canvases of work, ``encoder_canvases``) runs on the engine's thread:
    the engine's thread keeps a fair share of the whole pass, and only the first ``independent`` rows,
    which do not wait for the encoder, may start. 0: none starts early (one thread, no encoder work,
    or the first row waits for the encoder)."""
    if forward_threads < 2 or encoder <= 0:
        return 0
    own = max(0, round((rows + encoder) / forward_threads - encoder))  # rows the engine's thread keeps
    return max(0, min(independent, rows - own))


def rows_after_encoder(early: int, rest: int, encoder: float, forward_threads: int) -> int:
    """Of the ``rest`` rows that run after the encoder, how many the engine's thread takes (the others
    go to the other threads, behind the ``early`` rows they already run), so that both sides finish
    about together. At least one while rows remain: the engine's thread is free after the encoder."""
    if rest == 0:
        return 0
    others = forward_threads - 1
    free_at = max(early / others, encoder)  # when the other threads can take more rows
    return max(1, min(rest, round(((free_at - encoder) * others + rest) / forward_threads)))


def default_forward_threads(intra_op_threads: int) -> int:
    """Row groups of a CPU decoder pass when ``forward_threads`` is unset: one per usable CPU left
    after each group's intra-op threads."""
    return max(1, usable_cpus() // max(1, intra_op_threads))
