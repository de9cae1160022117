"""The body scan that refuses large bodies before they are parsed (``server.bodies``) agrees with
``json.loads`` on every body: the same number of strings, objects and arrays, and the same longest
run of numbers in an array, whatever the strings hold (quotes, backslashes, commas, brackets) and wherever
the scan's slices cut the body. The HTTP side is in test_reliability_inputs.py and
test_reliability_requests.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.bodies import BodyLimits, scan, skeleton
from server.errors import APIError

# strings made of the characters the scan treats specially, and a few others
TRICKY = st.text(alphabet='"\\,[]{}: ab\n\u00e9\U0001f600', max_size=12)
SCALARS = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(),
                    st.none(), TRICKY)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(TRICKY, inner, max_size=5),
                            st.lists(st.integers(0, 9), min_size=0, max_size=12)),
    max_leaves=40,
)


def truth(value) -> tuple[int, int, int]:
    """(strings, keys included, + objects + arrays; the most numbers or literals in a row in an array;
    numbers and literals in all)."""
    count, longest, numbers = 0, 0, 0
    stack = [value]
    while stack:
        v = stack.pop()
        if not isinstance(v, (str, dict, list)):
            numbers += 1
        elif isinstance(v, str):
            count += 1
        elif isinstance(v, dict):
            count += 1 + len(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            count += 1
            run = 0
            for x in v:
                run = 0 if isinstance(x, (str, list, dict)) else run + 1
                longest = max(longest, run)
            stack.extend(v)
    return count, longest, numbers


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(value=st.dictionaries(TRICKY, VALUES, max_size=4), slice_bytes=st.integers(1, 64),
       ensure_ascii=st.booleans(), compact=st.booleans())
def test_scan_agrees_with_json_loads(value, slice_bytes, ensure_ascii, compact):
    raw = json.dumps(value, ensure_ascii=ensure_ascii, separators=(",", ":") if compact else None).encode()
    expected, longest, numbers = truth(json.loads(raw))
    strings, structure = skeleton(raw, slice_bytes)
    assert strings + structure.count(b"{") + structure.count(b"[") == expected
    # the scan refuses exactly the bodies over each limit
    for limit in (expected - 1, expected):
        if limit < 1:
            continue
        refused = _refused(raw, BodyLimits(32, limit))
        assert refused == (expected > limit), (limit, expected)
    for bound in (longest - 1, longest):
        if bound < 1:
            continue
        refused = _refused(raw, BodyLimits(32, 10**9, bound, "x", "prompt"))
        assert refused == (longest > bound), (bound, longest, structure)
    # numbers in all: never refused at or under the bound; an array of nothing but numbers, refused over it
    assert not _refused(raw, BodyLimits(32, 10**9, max_numbers=numbers))
    ids = json.dumps({"p": [7] * (numbers + 3)}).encode()  # the key is taken for a value: numbers + 2 for certain
    assert _refused(ids, BodyLimits(32, 10**9, max_numbers=numbers + 1))


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=12), compact=st.booleans(),
       bias=st.dictionaries(st.integers(0, 999).map(str), st.integers(-100, 100), max_size=20))
def test_the_numbers_of_prompts_of_token_ids_are_never_refused(lengths, compact, bias):
    """A completions body's numbers are its prompts' token ids and values under keys (logit_bias): with as
    many arrays as it has prompts and as many values as it has strings and containers, never refused; more
    prompts of the longest length than allowed are."""
    body = {"prompt": [[7] * n for n in lengths], "logit_bias": bias, "max_tokens": 5, "temperature": 0.5}
    raw = json.dumps(body, separators=(",", ":") if compact else None).encode()
    values = truth(body)[0]
    limits = BodyLimits(32, values, number_arrays=len(lengths), number_arrays_why="x")
    assert not _refused(raw, limits)
    # more arrays of the longest length than allowed: refused, without parsing
    many = json.dumps({"prompt": [[7] * 1000] * 300}).encode()
    assert _refused(many, BodyLimits(32, 1000, number_arrays=256, number_arrays_why="x"))


def _refused(raw: bytes, limits: BodyLimits) -> bool:
    try:
        scan(raw, limits)
    except APIError as exc:
        assert exc.status == 400 and exc.code == "limit_exceeded"
        return True
    return False


@pytest.mark.parametrize("raw,strings,structure", [
    (b'{"a": [1, 2], "b": "x"}', 3, b"{s[,],ss}"),
    (b'{"a": "\\\\", "b": "\\"]", "c": [5, "x,y"]}', 6, b"{ss,ss,s[,s]}"),
    (b'["\\\\\\"", "[,,,]"]', 2, b"[s,s]"),
])
def test_skeleton_examples(raw, strings, structure):
    for size in (1, 2, 3, 1 << 20):
        assert skeleton(raw, size) == (strings, structure)


# 30 arrays of one number fewer than the limit (the 26B checkpoint's prompt limit): a search that retried
# inside each run of commas took about 25 s an array; measured once each, the body takes milliseconds.
_NEAR_LIMIT_ARRAYS = """
import json
from server.bodies import BodyLimits, scan
from server.errors import APIError
limit = 262143
limits = BodyLimits(max_depth=64, max_values=1000, max_array=limit, array_message="too long.", array_param="prompt")
scan(json.dumps({"prompt": [[7] * (limit - 1)] * 30}).encode(), limits)
try:
    scan(json.dumps({"prompt": [[7] * (limit - 1)] * 29 + [[7] * (limit + 1)]}).encode(), limits)
except APIError as exc:
    assert "an array of 262144 numbers" in exc.message, exc.message
else:
    raise AssertionError("a run over the limit passed")
print("ok")
"""


def test_many_arrays_just_under_the_limit_scan_in_linear_time():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _NEAR_LIMIT_ARRAYS], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("limit, sent, status, received", [(10_000, 1800, 200, 1800), (1500, 1800, 413, None)])
def test_a_body_past_the_drain_limit_is_read_whole_when_under_the_body_limit(monkeypatch, limit, sent, status,
                                                                               received):
    """Draining stops early only for a body over ``max_request_body_bytes``: one under it but past the
    drain limit (an operator's raised body limit) reaches the endpoint whole, never cut short."""
    import asyncio

    import server.limits

    monkeypatch.setattr(server.limits, "DRAIN_LIMIT", 1000)  # stands for 256 MiB: the same path, fewer bytes
    got = {}

    async def endpoint(scope, receive, send):
        got["body"] = len((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        messages = [{"type": "http.request", "body": b"x" * 600, "more_body": i < 2} for i in range(3)]
        sent_back = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent_back.append(message)

        scope = {"type": "http", "method": "POST", "headers": [(b"content-length", str(sent).encode())]}
        await server.limits.BodyLimitMiddleware(endpoint, max_bytes=limit)(scope, receive, send)
        return sent_back[0]["status"]

    assert asyncio.run(main()) == status
    assert got.get("body") == received
