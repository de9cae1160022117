"""OpenAI's ``logprobs`` objects from the engine's ``TokenLogprob``s (``engine.outputs``; docs/api.md,
"Log-probabilities").

A token is shown as its decoded text (special tokens included), or, when that text alone is not valid
UTF-8 (a piece of a multi-byte character), as ``bytes:`` and its bytes escaped (``bytes:\\xe2\\x80``),
as OpenAI does; chat tokens also carry their raw ``bytes``. A special token the text skips (eos, pad)
shows as itself with no bytes (in chat ``"bytes": null``, as OpenAI). Completions' ``text_offset`` is
where each token's text starts in the choice's text (``TextPosition``): the pieces of a character
split over tokens all start where the character does, and a skipped special token adds nothing.
"""

from __future__ import annotations

import codecs
import functools
from dataclasses import dataclass

from engine.detokenizer import decode_text
from engine.token_bytes import token_bytes


# A log-probability too small for a float (a token whose logit is -inf) is shown as OpenAI does.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


@functools.lru_cache(maxsize=65536)
def _token(tokenizer, token_id: int) -> tuple[str, bytes | None]:
    """(how the token is shown, its bytes in the text (None: none, a special token)); a token's is
    looked up once (a response may list it many times, as the chosen token and as an alternative)."""
    if not decode_text(tokenizer, [token_id]):  # a special token the text skips (eos, pad, ...)
        return tokenizer.decode([token_id], skip_special_tokens=False), None
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


@dataclass(frozen=True)
class TextPosition:
    """Where the next token's text starts in a choice's text: the characters complete so far, and the
    bytes of one that the tokens so far have only begun."""

    chars: int = 0
    pending: bytes = b""

    def start(self, raw: bytes) -> int:
        """Where a token of bytes ``raw`` starts: where the character it continues starts, or after the
        replacement character of the pending bytes, if its first byte cannot continue them."""
        if not self.pending or not raw:
            return self.chars
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.setstate((self.pending, 0))
        return self.chars + 1 if decoder.decode(raw[:1]).startswith("\ufffd") else self.chars

    def after(self, raw: bytes) -> "TextPosition":
        """The position after ``raw`` (bytes that can be invalid UTF-8: each bad sequence is one
        replacement character, as in the text)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.setstate((self.pending, 0))
        chars = self.chars + len(decoder.decode(raw))
        return TextPosition(chars, decoder.getstate()[0])


def completion_logprobs(entries, tokenizer, position: TextPosition) -> tuple[dict, TextPosition]:
    """The legacy completions shape, and the text position after these tokens; ``position``: where the
    first one starts. Each ``top_logprobs`` entry holds the top alternatives and the chosen token (up to
    ``logprobs`` + 1)."""
    tokens, offsets, tops = [], [], []
    for e in entries:
        shown, raw = _token(tokenizer, e.token_id)
        tokens.append(shown)
        offsets.append(position.start(raw or b""))
        if raw:
            position = position.after(raw)
        top: dict[str, float | None] = {}
        for t, lp in e.top:  # best first: of two ids that show as the same text, the better one's value
            top.setdefault(_token(tokenizer, t)[0], _finite(lp))
        top[shown] = _finite(e.logprob)  # the chosen token's own value, should another id show as the same text
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries], "top_logprobs": tops,
            "text_offset": offsets}, position


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    shown, raw = _token(tokenizer, token_id)
    return {"token": shown, "logprob": _finite(logprob), "bytes": None if raw is None else list(raw)}


def chat_logprobs(entries, tokenizer) -> dict:
    """The chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    return {"content": [{**_chat_token(tokenizer, e.token_id, e.logprob),
                         "top_logprobs": [_chat_token(tokenizer, t, lp) for t, lp in e.top]} for e in entries]}
