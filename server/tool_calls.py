"""Tool calls in Gemma 4's function-call format, read out of a model's text (docs/tools.md).

A call is one block ``<|tool_call>call:NAME{ARGS}<tool_call|>``. ``ARGS`` is a comma-separated list
of ``key:value`` pairs with bare keys; a value is a string between two ``<|"|>`` markers (no escapes),
``{...}`` (an object, bare keys again), ``[...]`` (an array), or a bare token up to the next ``,``,
``}`` or ``]``: a JSON number, ``true``, ``false``, ``null`` (or ``None``), or else the token's text
as a string. Text around the blocks is the message's content.

A block that does not parse (no ``call:``, a bad name or one the request did not declare, unbalanced
brackets, an unterminated string, text after the arguments) stays in the content as it was written, and
so does an opening marker that is never closed. ``parse`` reads a whole text; ``ToolCallStream`` reads
it in pieces and gives the same result for every way of cutting the text.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from engine.detokenizer import FUNCTION_CALL_MARKERS

# special tokens of Gemma 4's tokenizer, which the engine's detokenizer keeps in the text
CALL_OPEN, CALL_CLOSE, QUOTE = FUNCTION_CALL_MARKERS
CALL_PREFIX = "call:"
# OpenAI's rule for function names; declared tools and parsed calls are held to it.
NAME_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_NAME = re.compile(NAME_PATTERN)
# Deepest nesting of objects and arrays in a call's arguments; deeper is malformed (the reader recurses).
MAX_ARGUMENT_DEPTH = 64


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's ``function.arguments``
    id: str = field(default_factory=lambda: new_call_id())

    def as_openai(self) -> dict:
        """The call as a message's ``tool_calls`` item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class Malformed(ValueError):
    pass


def parse_block(body: str, declared: frozenset[str]) -> ToolCall | None:
    """The call written between ``CALL_OPEN`` and ``CALL_CLOSE``, or ``None`` if it is malformed or calls a
    function not in ``declared`` (a client dispatches calls by the names it declared)."""
    try:
        body = body.strip()
        if not body.startswith(CALL_PREFIX):
            raise Malformed("no call: prefix")
        brace = body.find("{")
        if brace < 0:
            raise Malformed("no arguments")
        name = body[len(CALL_PREFIX):brace].strip()
        if not _NAME.fullmatch(name) or name not in declared:
            raise Malformed(f"bad or undeclared function name {name!r}")
        arguments, end = _Reader(body).object(brace)
        if body[end:].strip():
            raise Malformed("text after the arguments")
    except Malformed:
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def parse(text: str, declared: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a whole text: the calls (of ``declared`` functions) in order, and the text
    around them."""
    content, calls, pos = [], [], 0
    while True:
        start = text.find(CALL_OPEN, pos)
        end = -1 if start < 0 else text.find(CALL_CLOSE, start + len(CALL_OPEN))
        if end < 0:
            content.append(text[pos:])
            return "".join(content), calls
        content.append(text[pos:start])
        for item in _settle_block(text, start, end, declared):
            (content if isinstance(item, str) else calls).append(item)
        pos = end + len(CALL_CLOSE)


def _settle_block(text: str, start: int, end: int, declared: frozenset[str]) -> list[str | ToolCall]:
    """The block from the ``CALL_OPEN`` at ``start`` to the ``CALL_CLOSE`` at ``end``: its call, or the
    block as text when it is malformed. A malformed block that holds another ``CALL_OPEN`` (a call the
    model abandoned before starting the next) is text up to the last one, and a call from there."""
    call = parse_block(text[start + len(CALL_OPEN):end], declared)
    if call is not None:
        return [call]
    inner = text.rfind(CALL_OPEN, start + len(CALL_OPEN), end)
    if inner >= 0:
        call = parse_block(text[inner + len(CALL_OPEN):end], declared)
        if call is not None:
            return [text[start:inner], call]
    return [text[start:end + len(CALL_CLOSE)]]


class ToolCallStream:
    """``parse`` for a text that arrives in pieces. ``feed`` returns what is settled so far, in
    order: content strings and ``ToolCall`` objects. Text that could still become a call (a tail
    that begins ``CALL_OPEN``, or an open block) is held until it is settled; ``finish`` returns
    what is left, as content. ``declared``: the function names a call may have."""

    def __init__(self, declared: frozenset[str]):
        self.declared = declared
        self._pending = ""  # unsettled text: empty, a prefix of CALL_OPEN, or an open block

    def feed(self, text: str) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        buf = self._pending + text
        pos = 0
        while True:
            start = buf.find(CALL_OPEN, pos)
            if start < 0:
                hold = _open_prefix_len(buf, pos)
                _add_text(out, buf[pos:len(buf) - hold])
                self._pending = buf[len(buf) - hold:]
                return out
            _add_text(out, buf[pos:start])
            end = buf.find(CALL_CLOSE, start + len(CALL_OPEN))
            if end < 0:
                self._pending = buf[start:]
                return out
            for item in _settle_block(buf, start, end, self.declared):
                if isinstance(item, str):
                    _add_text(out, item)
                else:
                    out.append(item)
            pos = end + len(CALL_CLOSE)

    def finish(self) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        _add_text(out, self._pending)
        self._pending = ""
        return out


def _add_text(out: list, text: str) -> None:
    if not text:
        return
    if out and isinstance(out[-1], str):
        out[-1] += text
    else:
        out.append(text)


def _open_prefix_len(buf: str, pos: int) -> int:
    """Length of the longest tail of ``buf[pos:]`` that is a proper prefix of ``CALL_OPEN``."""
    for n in range(min(len(CALL_OPEN) - 1, len(buf) - pos), 0, -1):
        if CALL_OPEN.startswith(buf[len(buf) - n:]):
            return n
    return 0


class _Reader:
    """Recursive descent over one call's arguments (the grammar in the module docstring)."""

    def __init__(self, text: str):
        self.text = text
        self.depth = 0

    def _skip(self, i: int) -> int:
        while i < len(self.text) and self.text[i].isspace():
            i += 1
        return i

    def _expect(self, i: int, what: str) -> int:
        if not self.text.startswith(what, i):
            raise Malformed(f"expected {what!r} at {i}")
        return i + len(what)

    def object(self, i: int) -> tuple[dict, int]:
        i = self._skip(self._expect(i, "{"))
        out: dict[str, Any] = {}
        if self.text.startswith("}", i):
            return out, i + 1
        while True:
            key, i = self._key(i)
            i = self._skip(self._expect(self._skip(i), ":"))
            out[key], i = self.value(i)
            i = self._skip(i)
            if self.text.startswith("}", i):
                return out, i + 1
            i = self._skip(self._expect(i, ","))

    def array(self, i: int) -> tuple[list, int]:
        i = self._skip(self._expect(i, "["))
        out: list = []
        if self.text.startswith("]", i):
            return out, i + 1
        while True:
            value, i = self.value(i)
            out.append(value)
            i = self._skip(i)
            if self.text.startswith("]", i):
                return out, i + 1
            i = self._skip(self._expect(i, ","))

    def _string(self, i: int) -> tuple[str, int]:
        start = self._expect(i, QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            raise Malformed("unterminated string")
        return self.text[start:end], end + len(QUOTE)

    def _key(self, i: int) -> tuple[str, int]:
        if self.text.startswith(QUOTE, i):
            return self._string(i)
        j = i
        while j < len(self.text) and self.text[j] not in ':{}[],' and not self.text.startswith(QUOTE, j):
            j += 1
        key = self.text[i:j].strip()
        if not key:
            raise Malformed(f"expected a key at {i}")
        return key, j

    def value(self, i: int) -> tuple[Any, int]:
        if self.text.startswith(QUOTE, i):
            return self._string(i)
        if self.text.startswith(("{", "["), i):
            self.depth += 1
            if self.depth > MAX_ARGUMENT_DEPTH:
                raise Malformed("arguments nested too deep")
            found = self.object(i) if self.text[i] == "{" else self.array(i)
            self.depth -= 1
            return found
        j = i
        while j < len(self.text) and self.text[j] not in ",}]" and not self.text.startswith(QUOTE, j):
            j += 1
        token = self.text[i:j].strip()
        if not token or any(c in token for c in "{["):
            raise Malformed(f"expected a value at {i}")
        return _scalar(token), j


def _reject_constant(name: str):
    raise ValueError(name)  # NaN and Infinity are not JSON


def _scalar(token: str) -> Any:
    if token == "None":
        return None
    try:
        value = json.loads(token, parse_constant=_reject_constant)
    except ValueError:
        return token
    if isinstance(value, float) and not math.isfinite(value):
        return token  # too large for a JSON number
    if isinstance(value, str) and not _is_unicode(value):
        return token  # an escaped half of a surrogate pair ("\ud800") has no UTF-8 form
    return value


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
