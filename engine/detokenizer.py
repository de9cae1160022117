"""Incremental detokenization with stop strings, per request.

Text deltas are the difference between successive texts of all committed tokens, held back
while the tail is an incomplete UTF-8 sequence (so a multi-byte character is never split) and, with
stop strings, while the tail could still grow into one (so no part of a stop string leaks out).
Each text is the one before and what decoding the newest tokens adds, the last commit's tokens before
them decoded too for context, so a request's work grows with its length, not with its square. Text
already read is never decoded again: where a tokenizer's text of the context and the newest tokens is
not a continuation of the context's (a byte-fallback tokenizer decodes a run of byte tokens together,
and a run made invalid by a later byte turns the characters before it into replacement characters
too), the newest tokens are decoded alone and follow the text already read.
"""

from __future__ import annotations

import codecs
import functools

from .token_bytes import is_byte_fallback, token_bytes

# Special tokens decoded as text rather than skipped: Gemma 4's function-call markers, from which the
# chat endpoint reads tool calls (server/tool_calls.py, docs/tools.md). Every other special token is skipped.
FUNCTION_CALL_MARKERS = ("<|tool_call>", "<tool_call|>", '<|"|>')


@functools.lru_cache(maxsize=8)
def skipped_special_ids(tokenizer) -> frozenset[int] | None:
    """The special token ids a decode skips when the tokenizer has some of ``FUNCTION_CALL_MARKERS``
    as special tokens; ``None`` when it has none (a plain ``skip_special_tokens`` decode)."""
    added = {i: t for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special}
    kept = {i for i, t in added.items() if t.content in FUNCTION_CALL_MARKERS}
    if not kept:
        return None
    return frozenset((set(added) | set(tokenizer.all_special_ids)) - kept)


def decode_text(tokenizer, ids) -> str:
    """The text of ``ids`` as responses show it: special tokens skipped, but for the function-call
    markers (``skipped_special_ids``)."""
    skipped = skipped_special_ids(tokenizer)
    if skipped is None:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return tokenizer.decode([i for i in ids if i not in skipped], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


# A text that keeps ending in replacement characters is read up to this many tokens before its end. An
# unfinished character's bytes are in its last three tokens with bytes; a byte-fallback tokenizer decodes
# a whole run of byte tokens together, so a longer run still unfinished could change before this point.
UNSETTLED_TOKENS = 64
# How many token positions before that a settled text may end at, looking for one that does not cut a
# byte-fallback run's text (``IncrementalDetokenizer._splits_cleanly``): a character has at most 4 bytes.
SPLIT_CANDIDATES = 4


def _utf8(data: bytes, final: bool) -> bool:
    """Whether ``data`` is valid UTF-8 (``final=False``: or valid but for an unfinished last character)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
        return True
    except UnicodeDecodeError:
        return False


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False
        self.num_tokens_at_stop: int | None = None
        # the text of token_ids[:_read] is _read_text; newer tokens decode from _prefix (<= _read) on
        self._prefix = self._read = 0
        self._read_text = ""

    def _decode(self, ids: list[int]) -> str:
        return decode_text(self.tokenizer, ids)

    def _text_of(self, n: int, head: str | None = None) -> str:
        """The text of ``token_ids[:n]`` (``n >= _read``): the text read so far and what the tokens after it
        add, decoded after the last commit's as context (``head``: that context's text, if known)."""
        if head is None:
            head = self._decode(self.token_ids[self._prefix:self._read])
        window = self._decode(self.token_ids[self._prefix:n])
        if window.startswith(head):
            return self._read_text + window[len(head):]
        return self._read_text + self._decode(self.token_ids[self._read:n])

    def add(self, token_ids, final: bool = False) -> str:
        """Append committed tokens; return the new text delta. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        before = len(self.token_ids)
        self.token_ids.extend(token_ids)
        text = self._text_of(len(self.token_ids))
        if self.stop:
            start = max(0, len(self.sent) - max(len(s) for s in self.stop) + 1)
            hits = [(text.find(s, start), s) for s in self.stop]
            hits = [(i + len(s), i) for i, s in hits if i >= 0]
            if hits:
                # the stop string that ends first, as a token-by-token decode would meet it (so the
                # result does not depend on where commits split), the longest of those ending together
                end, index = min(hits)
                self.stopped = True
                self.num_tokens_at_stop = self._tokens_covering(text[:end], before)
                delta = text[:index][len(self.sent):]
                self.sent += delta
                return delta
        # new text of whole characters: later tokens decode after this commit's, which give them context
        # (a commit of skipped special tokens only would give none)
        if len(text) > len(self._read_text) and not text.endswith("\ufffd"):
            self._prefix, self._read, self._read_text = self._read, len(self.token_ids), text
        elif text.endswith("\ufffd"):
            self._settle(text)
        if not final:
            if text.endswith("\ufffd"):  # wait for the rest of the character (what is settled goes out)
                text = text[:max(len(text.rstrip("\ufffd")), len(self._read_text))]
            if self.stop:
                # hold back what could be the start of a stop string finished by the next tokens
                hold = max(len(s) for s in self.stop) - 1
                text = text[: max(len(self.sent), len(text) - hold)]
        # past what was sent (by length: where a decode changed text already sent, the rest still comes)
        delta = text[len(self.sent):]
        self.sent += delta
        return delta

    def _settle(self, text: str) -> None:
        """``text`` ends in replacement characters: where the unread tokens hold bytes no character takes
        (a logit bias can make every commit end in one), read the text before the last
        ``UNSETTLED_TOKENS`` tokens (or one of the few tokens before, ``_splits_cleanly``) if the tokens
        after it left it unchanged, so that such output is neither decoded again at every commit nor held
        back to the end."""
        start = len(self.token_ids) - UNSETTLED_TOKENS
        if start <= self._read:
            return
        unread = [token_bytes(self.tokenizer, t) for t in self.token_ids[self._read:]]
        if _utf8(b"".join(unread), final=False):  # bytes that merely end in an unfinished character: wait
            return
        for n in range(start, max(self._read, start - SPLIT_CANDIDATES), -1):
            if self._splits_cleanly(n, unread):
                break
        else:
            return
        settled = self._text_of(n)
        if len(settled) > len(self._read_text) and text.startswith(settled):
            self._prefix, self._read, self._read_text = self._read, n, settled

    def _splits_cleanly(self, n: int, unread: list[bytes]) -> bool:
        """Whether the text of the tokens from ``n`` on can be decoded apart from the tokens before it. Not
        inside a run of byte-fallback tokens, which its tokenizer decodes together (one replacement
        character per byte where the run is not valid UTF-8, so a stray byte changes the whole run's
        text), unless the run is invalid on both sides of ``n`` whatever tokens come next: then every
        byte is a replacement character however the run is cut. ``unread``: the bytes of the tokens
        from ``_read`` on."""
        ids, is_byte = self.token_ids, functools.partial(is_byte_fallback, self.tokenizer)
        if not (is_byte(ids[n - 1]) and is_byte(ids[n])):
            return True
        first, last = n - 1, n  # the run around n, from _read on
        while first > self._read and is_byte(ids[first - 1]):
            first -= 1
        while last + 1 < len(ids) and is_byte(ids[last + 1]):
            last += 1
        before = b"".join(unread[first - self._read:n - self._read])
        after = b"".join(unread[n - self._read:last + 1 - self._read])
        return not _utf8(before, final=True) and not _utf8(after, final=last + 1 < len(ids))

    def _tokens_covering(self, prefix: str, before: int) -> int:
        """Fewest tokens whose text starts with ``prefix`` (the text up to the end of the stop string):
        the tokens that produced the stop. More than ``before``, the tokens of earlier commits, whose
        text did not hold the stop. Neither a length test nor a bisection would do: a token that ends
        part-way through a character decodes to replacement characters (with byte fallback, a whole run
        of bytes does), so the text neither grows with the tokens nor keeps a prefix it once had. At
        most one commit's tokens are tried, once per request."""
        head = self._decode(self.token_ids[self._prefix:self._read])
        for n in range(before + 1, len(self.token_ids)):
            if self._text_of(n, head).startswith(prefix):
                return n
        return len(self.token_ids)
