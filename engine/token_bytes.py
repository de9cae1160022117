"""The raw bytes of one vocabulary token, for tokens whose text alone is not valid UTF-8 (a piece of
a multi-byte character): byte-level BPE vocabularies (GPT-2's byte <-> character table) and
SentencePiece byte-fallback tokens (``<0xNN>``). Other tokens are their decoded text in UTF-8."""

from __future__ import annotations

import functools
import re

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level table, character -> byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def is_byte_fallback(tokenizer, token_id: int) -> bool:
    """Whether ``token_id`` is a SentencePiece byte-fallback token (``<0xNN>``): its tokenizer decodes a
    run of them together, so the text of such a token depends on the run around it."""
    return _BYTE_FALLBACK.fullmatch(tokenizer.convert_ids_to_tokens(token_id) or "") is not None


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes token ``token_id`` contributes to a decoded text."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token_id)
    match = _BYTE_FALLBACK.fullmatch(piece or "")
    if match:
        return bytes([int(match.group(1), 16)])
    table = byte_of_char()
    if _byte_level(tokenizer) and piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return text.encode("utf-8")
