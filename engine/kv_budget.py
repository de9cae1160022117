"""The KV budget rule, in one place (no torch): what a request reserves and what a running set costs.

A request reserves its prompt and every canvas it commits but the last (``kv_reservation``). The
runner's slot buffers hold ``slot_rows(n)`` rows (the next power of two of the running count, capped)
of the longest reservation, and the decoder reads them in place, with no copy; so a running set costs
``kv_tokens_needed`` token slots. The scheduler admits against it, the KV cache sizes its buffers by
it, and the memory plan prices each of its token slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def kv_reservation(prompt_len: int, max_tokens: int, canvas_length: int) -> int:
    """The most full-attention KV tokens a request can hold: its prompt and every canvas it commits
    but the last. A committed canvas enters the KV only for the next canvas to attend to, and the last
    one (``max_tokens`` reached) finishes the request instead."""
    canvases = math.ceil(max_tokens / canvas_length)
    return prompt_len + (canvases - 1) * canvas_length


def slot_rows(num_requests: int, max_rows: int) -> int:
    """Rows the buffers hold for ``num_requests`` running requests: the next power of two, capped."""
    if num_requests <= 0:
        return 0
    return min(max_rows, 1 << (num_requests - 1).bit_length())


def slot_buffer_shape(reservations: Iterable[int], max_rows: int) -> tuple[int, int]:
    """(rows, tokens per row) of the slot buffers for a running set with these reservations:
    ``slot_rows(n)`` rows of the longest reservation (``max_rows`` is ``max_num_seqs``)."""
    reservations = list(reservations)
    return slot_rows(len(reservations), max_rows), max(reservations, default=0)


def kv_tokens_needed(reservations: Iterable[int], max_rows: int) -> int:
    """KV token slots a running set with these reservations takes from the budget: the slot buffers."""
    rows, longest = slot_buffer_shape(reservations, max_rows)
    return rows * longest


def most_max_tokens_alone(prompt_len: int, canvas_length: int, budget: int) -> int:
    """The largest ``max_tokens`` whose reservation fits ``budget`` with nothing else running (0: none, the
    prompt alone is over it). Alone, a request's slot buffers are one row of its reservation."""
    if prompt_len > budget:
        return 0
    return ((budget - prompt_len) // canvas_length + 1) * canvas_length


def fits_alone(reservation: int, max_rows: int, budget: int) -> bool:
    """Whether a request reserving ``reservation`` KV tokens fits ``budget`` with nothing else running."""
    return kv_tokens_needed([reservation], max_rows) <= budget
