"""Incremental detokenization: multi-byte characters and stop strings across commits."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from tools.tiny_checkpoint import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_multibyte_character_is_never_split(tok):
    d = IncrementalDetokenizer(tok)
    euro = ids(tok, "€")  # three bytes, three tokens
    assert len(euro) == 3
    assert d.add(ids(tok, "a") + euro[:1]) == "a"
    assert d.add(euro[1:2]) == ""
    assert d.add(euro[2:] + ids(tok, "b")) == "€b"


def test_stop_string_split_across_commits_does_not_leak(tok):
    d = IncrementalDetokenizer(tok, stop=("\n\n",))
    first = d.add(ids(tok, "Hello\n"))
    second = d.add(ids(tok, "\nWorld"))
    assert first + second == "Hello"
    assert d.stopped and d.num_tokens_at_stop == len(ids(tok, "Hello\n\n"))


def test_held_back_tail_is_released_when_no_stop_follows(tok):
    d = IncrementalDetokenizer(tok, stop=("END!",))
    out = d.add(ids(tok, "abcEN"))
    assert out == "ab"  # "cEN" might begin "END!"
    out += d.add(ids(tok, "Dx"))
    assert out == "abcE"  # the last len("END!") - 1 characters wait
    out += d.add([], final=True)
    assert out == "abcENDx" and not d.stopped
