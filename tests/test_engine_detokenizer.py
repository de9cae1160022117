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


def _metaspace_tokenizer():
    """A word-level tokenizer whose decode drops the space a text's first word is stored with, as
    SentencePiece-style tokenizers do: the text of later tokens alone is not a suffix of the whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>"] + [f"\u2581{w}" for w in ("hello", "world", "a", "b", "\u20ac", "\u4e2d")] + ["x", "y"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def _tokenizers():
    from transformers import AutoTokenizer

    from tests.conftest import REPO_ROOT

    return {"bytes": build_byte_tokenizer(), "metaspace": _metaspace_tokenizer(),
            "embedded": AutoTokenizer.from_pretrained(REPO_ROOT / "engine/default_model")}


@pytest.mark.parametrize("name", ["bytes", "metaspace", "embedded"])
def test_deltas_add_up_to_the_decode_of_all_tokens(name):
    """However the commits split the tokens, the deltas add up to one decode of them all, on tokenizers
    whose text of later tokens alone differs from their part of the whole (metaspace), on multi-byte
    characters cut by commits (bytes), and with special tokens (skipped) anywhere, whole commits of them
    included."""
    import random

    from engine.detokenizer import decode_text

    tokenizer = _tokenizers()[name]
    rng = random.Random(0)
    special = sorted(tokenizer.all_special_ids)
    vocab = sorted(set(tokenizer.get_vocab().values()) - set(special))
    assert special
    for trial in range(40):
        tokens = [rng.choice(vocab) for _ in range(rng.randint(1, 120))]
        if name == "bytes":  # whole characters, some of several bytes
            tokens = ids(tokenizer, "".join(rng.choice("ab \u20ac\u4e2d\n") for _ in range(60)))
        for _ in range(rng.randint(0, 6)):  # special tokens, alone or in runs
            at = rng.randint(0, len(tokens))
            tokens[at:at] = [rng.choice(special)] * rng.randint(1, 12)
        d, out, at = IncrementalDetokenizer(tokenizer), "", 0
        while at < len(tokens):
            step = rng.randint(0, 9)
            out += d.add(tokens[at:at + step])
            at += step
        out += d.add([], final=True)
        assert out == decode_text(tokenizer, tokens), (name, trial)


def test_a_commit_of_skipped_tokens_keeps_the_context_of_the_next():
    """A commit whose tokens are all skipped special tokens adds no text: the next one still decodes
    after the last word, so its space is kept."""
    tokenizer = _metaspace_tokenizer()
    hello, world, unk = (tokenizer.convert_tokens_to_ids(t) for t in ("\u2581hello", "\u2581world", "<unk>"))
    d = IncrementalDetokenizer(tokenizer)
    assert d.add([hello]) + d.add([unk]) + d.add([world]) + d.add([], final=True) == "hello world"


def test_work_grows_with_the_length_not_its_square(tok):
    """A long output in commits of 32 tokens decodes each token a few times, not once per later commit."""

    class Counting:  # the tokenizer, counting the tokens it is asked to decode
        def __init__(self, inner):
            self.inner, self.decoded = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode(self, token_ids, **kwargs):
            self.decoded += len(token_ids)
            return self.inner.decode(token_ids, **kwargs)

    counting = Counting(tok)
    text = "".join("ab\u20ac "[i % 4] for i in range(4096))
    tokens = ids(tok, text)
    d = IncrementalDetokenizer(counting, stop=("never here",))
    out = "".join(d.add(tokens[at:at + 32]) for at in range(0, len(tokens), 32)) + d.add([], final=True)
    assert out == text
    assert counting.decoded <= 4 * len(tokens)  # a decode of everything at every commit: about len/64 times that
