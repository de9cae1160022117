"""Request bodies: strict JSON, bounded before it is parsed, validated into the endpoint's pydantic model.

The body is parsed whatever the Content-Type says (curl's ``-d`` sends form encoding). JSON
errors, nesting deeper than ``max_json_depth``, too many values and schema errors are OpenAI-shaped
400s.

Parsing costs time in proportion to the number of values, and ``json.loads`` and pydantic hold the
GIL while they run, so a large body is measured before it is parsed (``scan``): counting bytes is
cheap, and a body with more strings, objects and arrays than ``max_json_values``, with an array
of numbers longer than any prompt may be (``BodyLimits.max_array``), or with more numbers in all than
the endpoint can take (``BodyLimits.max_numbers``, ``number_arrays``), is refused without being parsed.
Large bodies are scanned, parsed and validated in a worker thread, at most ``preprocess_concurrency``
at a time (the ``gate``: a parse whose client has gone keeps its thread to its end), so the event loop
stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from . import errors
from .preprocess import PreprocessGate

# The request state's key for the body's ``MarkCounts``, taken as it arrived (limits.BodyLimitMiddleware).
BODY_MARKS = "body_marks"
BODY_BYTES = "body_bytes"  # the request state's key of the parsed body's size (``read_json``)
BODY_HELD = "body_held"  # the body's share of max_body_bytes_in_flight (``limits._Held``)
# Bodies larger than this are scanned, parsed and checked in a worker thread (the event loop stays free).
PARSE_IN_THREAD_BYTES = 64 * 1024
# The exact scan works through the body in slices of this size, so that no single call holds the GIL long.
SCAN_SLICE_BYTES = 1 << 20

_STRUCTURE = b'",[]{}'
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in _STRUCTURE)
_NOT_MARKS = bytes(b for b in range(256) if b not in _STRUCTURE + b"\\")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class BodyLimits:
    """What a body may hold before it is parsed (see ``scan``)."""

    max_depth: int  # setting max_json_depth
    max_values: int  # setting max_json_values: strings (keys included), objects and arrays
    max_array: int | None = None  # longest array of numbers (token ids); None: only the body size bounds it
    array_message: str = ""  # ends the refusal of a longer array ("The request body has an array of N numbers; ...")
    array_param: str | None = None
    array_code: str | None = "limit_exceeded"
    # the numbers (and literals) in all: a number in an object has a key (under max_values), so past those the
    # numbers are in arrays: at most ``max_numbers`` (why: ``numbers_why``), and at most those of the body's
    # ``number_arrays`` longest arrays of numbers (``number_arrays_why`` names the setting)
    max_numbers: int | None = None
    numbers_why: str = ""
    number_arrays: int | None = None
    number_arrays_why: str = ""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _too_deep(max_depth: int) -> errors.APIError:
    return errors.bad_request(
        f"The request body nests arrays and objects more than {max_depth} levels deep (setting max_json_depth).",
        None, "json_too_deep",
    )


def _too_many_values(count: int, at_least: bool, limit: int) -> errors.APIError:
    return errors.bad_request(
        f"The request body has {'at least ' if at_least else ''}{count} strings, objects and arrays; the limit is "
        f"{limit} (setting max_json_values).", None, "limit_exceeded",
    )


def _check_string(s: str) -> None:
    if not s.isascii() and _SURROGATE.search(s):
        raise errors.bad_request(
            "The request body is not valid JSON: a string contains an unpaired UTF-16 surrogate escape.",
            None, "invalid_json",
        )


def check_json_value(data, max_depth: int) -> None:
    """Depth of nesting (the body itself is level 1) and well-formed strings, without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(max_depth)
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict):
            for key in value:
                _check_string(key)
        for item in items:
            kind = type(item)
            if kind is int or kind is float or kind is bool or item is None:
                continue
            if kind is str:
                _check_string(item)
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


def _slices(raw: bytes, size: int):
    """``raw`` in slices of about ``size`` bytes that never cut a run of backslashes from the
    character it escapes."""
    start, n = 0, len(raw)
    while start < n:
        end = min(n, start + size)
        while end < n and raw[end - 1] == 0x5C:  # a backslash: take the character it escapes too
            end += 1
        yield raw[start:end]
        start = end


def skeleton(raw: bytes, slice_bytes: int = SCAN_SLICE_BYTES) -> tuple[int, bytes]:
    """(number of strings, the body's structure outside strings with each string as ``s``).

    Escaped backslashes and escaped quotes are dropped first, so every remaining ``"`` opens or closes
    a string; numbers, literals and whitespace are dropped too. ``{"a": [1, 2], "b": "x"}`` becomes
    ``{s[,],ss}`` (colons are dropped). Exact for valid JSON.
    """
    quotes = 0
    inside = False
    pieces: list[bytes] = []
    for part in _slices(raw, slice_bytes):
        if b"\\" in part:
            part = part.replace(b"\\\\", b"").replace(b'\\"', b"")
        part = part.translate(None, _NOT_STRUCTURE)
        segments = part.split(b'"')
        quotes += len(segments) - 1
        if inside:  # the first segment ends a string begun in an earlier slice
            if len(segments) > 1:
                pieces.append(b"s" + b"s".join(segments[1::2]))
        else:
            pieces.append(b"s".join(segments[0::2]))
        inside ^= (len(segments) - 1) % 2 == 1
    return quotes // 2, b"".join(pieces)


class MarkCounts:
    """Running counts of the bytes that ``scan`` decides most bodies by (quotes, backslashes, braces,
    brackets, commas), fed a body's chunks as they arrive (``limits.BodyLimitMiddleware``) or a whole
    body at once. Counts do not care where the chunks were cut."""

    def __init__(self):
        self.quotes = self.backslashes = self.braces = self.brackets = self.commas = 0

    def feed(self, data: bytes) -> None:
        marks = data.translate(None, _NOT_MARKS)
        self.quotes += marks.count(b'"')
        self.backslashes += marks.count(b"\\")
        self.braces += marks.count(b"{")
        self.brackets += marks.count(b"[")
        self.commas += marks.count(b",")

    @property
    def strings_at_least(self) -> int:
        return (self.quotes - self.backslashes) // 2  # each backslash escapes at most one quote

    @property
    def values_at_most(self) -> int:
        return self.quotes // 2 + self.braces + self.brackets

    @property
    def numbers_at_most(self) -> int:
        return self.commas + self.braces + self.brackets + 1  # a value after each comma, or a container's first

    def too_many_values(self, max_values: int) -> bool:
        """Whether the body has, for certain, more values than ``max_values``."""
        return self.strings_at_least > max_values


def scan(raw: bytes, limits: BodyLimits, counts: MarkCounts | None = None) -> None:
    """Refuse, before parsing, a body with more values than ``limits.max_values``, an array of numbers
    longer than ``limits.max_array``, or more numbers than its number bounds allow (each a 400). The
    counts of the bytes that matter (``MarkCounts``: given, or taken here in one pass) decide most bodies,
    and the exact skeleton is built only when they cannot."""
    if counts is None:
        counts = MarkCounts()
        counts.feed(raw)
    if counts.too_many_values(limits.max_values):
        raise _too_many_values(counts.strings_at_least, True, limits.max_values)
    array_bound_holds = limits.max_array is None or counts.commas < limits.max_array
    cheap_cap = min(limits.max_numbers if limits.max_numbers is not None else float("inf"),
                    limits.max_values if limits.number_arrays is not None else float("inf"))
    numbers_bound_holds = counts.numbers_at_most <= cheap_cap
    if counts.values_at_most <= limits.max_values and array_bound_holds and numbers_bound_holds:
        return
    strings, structure = skeleton(raw)
    containers = structure.count(b"{") + structure.count(b"[")
    values = strings + containers
    if values > limits.max_values:
        raise _too_many_values(values, False, limits.max_values)
    if limits.max_array is not None:
        run = number_run_over(structure, limits.max_array)
        if run is not None:
            length, whole = run
            what = f"an array of {length} numbers" if whole else f"an array with {length} numbers in a row"
            raise errors.bad_request(f"The request body has {what}, {limits.array_message}",
                                     limits.array_param, limits.array_code)
    # the values in arrays and objects are their commas plus one for each non-empty one; strings (keys
    # among them) and containers take at most that many: the rest are numbers or literals
    empty = structure.count(b"[]") + structure.count(b"{}")
    numbers = structure.count(b",") - strings - empty + 1
    bounds = []
    if limits.max_numbers is not None:
        bounds.append((limits.max_numbers, limits.numbers_why))
    if limits.number_arrays is not None and numbers > limits.max_values:
        # k commas in a row hold at most k + 1 numbers; the endpoint takes that many arrays of them at most
        runs = sorted((found.end() - found.start() + 1 for found in re.finditer(rb",+", structure)), reverse=True)
        bounds.append((sum(runs[:limits.number_arrays]) + limits.max_values,
                       f"its {limits.number_arrays_why} longest arrays of numbers + max_json_values"))
    for bound, why in bounds:
        if numbers > bound:
            raise errors.bad_request(f"The request body has at least {numbers} numbers; the most this endpoint "
                                     f"takes is {bound} ({why}).", limits.array_param, "limit_exceeded")


def number_run_over(structure: bytes, limit: int) -> tuple[int, bool] | None:
    """In ``skeleton``'s structure, the first run of more than ``limit`` numbers (or literals) in a
    row in one array, as ``(count, whether they are the whole array)``; ``None`` if there is none.

    Numbers leave only their commas: ``k`` commas in a row hold ``k - 1`` to ``k + 1`` of them, one
    more for each end that is the array's bracket rather than another element (``s``, ``[``, ``{``,
    or the end of a nested ``]``/``}``)."""
    for found in re.finditer(rb",+", structure):  # each run once: ",{limit,}" retries inside every shorter run
        if found.end() - found.start() < limit:
            continue
        before = structure[found.start() - 1:found.start()]
        after = structure[found.end():found.end() + 1]
        opens, closes = before == b"[", after == b"]"
        count = found.end() - found.start() + 1 - (not opens) - (not closes)
        if count > limit:
            return count, opens and closes
    return None


def load_json(raw: bytes, max_depth: int, require_object: bool = True):
    """Strict JSON (no NaN, Infinity or numbers that overflow to them), at most ``max_depth`` deep."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    if require_object and not isinstance(data, dict):
        raise errors.bad_request("The request body must be a JSON object.", None, "invalid_json")
    if isinstance(data, (dict, list)):
        check_json_value(data, max_depth)
    elif isinstance(data, str):
        _check_string(data)
    return data


def _validate(data, model: type[BaseModel]):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise errors.validation_error(RequestValidationError(exc.errors())) from None


async def read_json(request: Request, limits: BodyLimits, gate: PreprocessGate, model: type[BaseModel] | None = None,
                    require_object: bool = True):
    """The body, scanned (``scan``), parsed and, with ``model``, validated into it. A body larger than
    ``PARSE_IN_THREAD_BYTES`` is handled in a worker thread once ``gate`` lets it in.

    ``BodyLimitMiddleware`` counts the body's marks as it arrives (``BODY_MARKS`` in the request's
    state) and drops a body that has too many values for certain: that refusal needs no body."""
    counts: MarkCounts | None = (request.scope.get("state") or {}).get(BODY_MARKS)
    if counts is not None and counts.too_many_values(limits.max_values):
        raise _too_many_values(counts.strings_at_least, True, limits.max_values)
    # read without Starlette's cache (request.body() keeps the bytes on the request, which lives until
    # the response ends): a queued or streaming request holds its parsed fields, not its raw body
    raw = b"".join([chunk async for chunk in request.stream()])
    request.scope.setdefault("state", {})[BODY_BYTES] = len(raw)

    def work():
        scan(raw, limits, counts)
        data = load_json(raw, limits.max_depth, require_object)
        return data if model is None else _validate(data, model)

    if len(raw) <= PARSE_IN_THREAD_BYTES:
        return work()
    held = (request.scope.get("state") or {}).get(BODY_HELD)  # max_body_bytes_in_flight
    parsed = held.hand_over() if held is not None else (lambda: None)
    loop = asyncio.get_running_loop()
    started = []

    def job():
        started.append(True)
        try:
            return work()
        finally:  # the bytes are the thread's until it ends, even when its client has gone
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(parsed)

    try:
        return await gate.run(job, receive=request.receive)  # a client gone while it waits: nothing parsed
    finally:
        if not started:
            parsed()


def large_body(request: Request) -> bool:
    """Whether the request's parsed body was large enough to be parsed off the event loop: work in
    proportion to it (the endpoint's checks) goes there too."""
    return (request.scope.get("state") or {}).get(BODY_BYTES, 0) > PARSE_IN_THREAD_BYTES


async def parse_body(request: Request, model: type[BaseModel], limits: BodyLimits, gate: PreprocessGate):
    """The body as an instance of ``model`` (see ``read_json``)."""
    return await read_json(request, limits, gate, model)
