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


@pytest.mark.parametrize("commits, stop, text, tokens", [
    (["a€b"], "€", "a", "a€"),  # the stop is a character of three byte tokens
    (["xy€"[:2], "€zzz"], "€", "xy", "xy€"),
    (["中", "\nyzab"], "\n", "中", "中\n"),  # an ASCII stop after a character of three byte tokens
    (["中\nyzab"], "\n", "中", "中\n"),
])
def test_stop_after_a_multibyte_character_counts_its_tokens(tok, commits, stop, text, tokens):
    """The tokens up to the end of the stop string are counted exactly, also where a token ends
    part-way through a character (its text is then a replacement character, so the text does not grow
    with every token)."""
    d = IncrementalDetokenizer(tok, stop=(stop,))
    out = "".join(d.add(ids(tok, c)) for c in commits)
    assert (out, d.stopped, d.num_tokens_at_stop) == (text, True, len(ids(tok, tokens)))


def test_a_stop_split_inside_a_character_across_commits(tok):
    d = IncrementalDetokenizer(tok, stop=("€",))
    euro = ids(tok, "€")
    out = d.add(ids(tok, "xy") + euro[:2]) + d.add(euro[2:] + ids(tok, "zzz"))
    assert (out, d.num_tokens_at_stop) == ("xy", len(ids(tok, "xy€")))


@pytest.mark.parametrize("commits", [["axyzb"], ["axy", "zb"], ["ax", "yzb"]])
def test_overlapping_stops_end_where_the_first_one_ends(tok, commits):
    """Of stop strings "xyz" and "y", "y" is complete first: the text is "ax" however the commits split."""
    d = IncrementalDetokenizer(tok, stop=("xyz", "y"))
    out = "".join(d.add(ids(tok, c)) for c in commits)
    assert (out, d.num_tokens_at_stop) == ("ax", 3)
