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


def _byte_fallback_tokenizer():
    """SentencePiece-style, as Gemma's: characters outside the vocabulary (here any but a few letters)
    are written as <0xNN> byte tokens, and the decoder (Replace, ByteFallback, Fuse) decodes a run of
    them together, one replacement character per byte when the run is not valid UTF-8."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>"]
    pieces = special + [f"<0x{b:02X}>" for b in range(256)] + list("abehilnorst\u2581") + ["\u2581the", "\u2581Paris"]
    tokenizer = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _tokenizers():
    from transformers import AutoTokenizer

    from tests.conftest import REPO_ROOT

    return {"bytes": build_byte_tokenizer(), "metaspace": _metaspace_tokenizer(),
            "byte-fallback": _byte_fallback_tokenizer(),
            "embedded": AutoTokenizer.from_pretrained(REPO_ROOT / "engine/default_model")}


@pytest.mark.parametrize("name", ["bytes", "metaspace", "byte-fallback", "embedded"])
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
        if name in ("bytes", "byte-fallback"):  # whole characters, some of several bytes
            tokens = ids(tokenizer, "".join(rng.choice("ab \u20ac\u4e2d\n\u00e9") for _ in range(60)))
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


def test_a_stray_byte_after_a_sent_character_loses_no_later_text():
    """Byte fallback: a commit that starts with a byte which makes the run before it invalid UTF-8 (a
    whole decode turns the already sent euro sign into four replacement characters) does not stop the
    text: the sent text stays as it was, the byte is a replacement character, and the rest follows."""
    tokenizer = _byte_fallback_tokenizer()
    stray = tokenizer.convert_tokens_to_ids("<0xE2>")
    commits = [ids(tokenizer, "the \u20ac"), [stray] + ids(tokenizer, " the Paris"), ids(tokenizer, " its last")]
    assert "\u20ac" not in tokenizer.decode(sum(commits, []))  # what a whole decode makes of it
    d = IncrementalDetokenizer(tokenizer)
    deltas = [d.add(c) for c in commits] + [d.add([], final=True)]
    assert deltas[0] == "the \u20ac" and "".join(deltas) == "the \u20ac\ufffd the Paris its last"
    stopped = IncrementalDetokenizer(tokenizer, ("Paris",))
    assert "".join(stopped.add(c) for c in commits) == "the \u20ac\ufffd the " and stopped.stopped


def test_a_stop_counts_the_tokens_up_to_its_first_occurrence_with_byte_fallback():
    """The tokens kept at a stop string are the fewest whose text holds it, though with byte fallback a
    text can lose that prefix as later bytes join a run and hold it again once the run is whole."""
    tokenizer = _byte_fallback_tokenizer()
    tokens = ids(tokenizer, ". \u00e9\U0001f600\u00e9")
    first = next(n for n in range(len(tokens) + 1) if tokenizer.decode(tokens[:n]).startswith(". \u00e9"))
    later = [n for n in range(first, len(tokens) + 1) if not tokenizer.decode(tokens[:n]).startswith(". \u00e9")]
    assert later  # the premise: the prefix is lost and found again
    d = IncrementalDetokenizer(tokenizer, ("\u00e9",))
    assert d.add(tokens) == ". " and d.num_tokens_at_stop == first == 4


def test_a_commit_of_skipped_tokens_keeps_the_context_of_the_next():
    """A commit whose tokens are all skipped special tokens adds no text: the next one still decodes
    after the last word, so its space is kept."""
    tokenizer = _metaspace_tokenizer()
    hello, world, unk = (tokenizer.convert_tokens_to_ids(t) for t in ("\u2581hello", "\u2581world", "<unk>"))
    d = IncrementalDetokenizer(tokenizer)
    assert d.add([hello]) + d.add([unk]) + d.add([world]) + d.add([], final=True) == "hello world"


class _Counting:
    """A tokenizer, counting the tokens it is asked to decode."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, token_ids, **kwargs):
        self.decoded += len(token_ids)
        return self.inner.decode(token_ids, **kwargs)


def test_work_grows_with_the_length_not_its_square(tok):
    """A long output in commits of 32 tokens decodes each token a few times, not once per later commit."""
    counting = _Counting(tok)
    text = "".join("ab\u20ac "[i % 4] for i in range(4096))
    tokens = ids(tok, text)
    d = IncrementalDetokenizer(counting, stop=("never here",))
    out = "".join(d.add(tokens[at:at + 32]) for at in range(0, len(tokens), 32)) + d.add([], final=True)
    assert out == text
    assert counting.decoded <= 4 * len(tokens)  # a decode of everything at every commit: about len/64 times that


def test_output_that_keeps_ending_in_a_stray_byte_streams_and_stays_linear(tok):
    """Every token a lone continuation byte (a logit bias can force it): each commit's text ends in a
    replacement character, yet the text streams commit by commit instead of at the end, each token is
    decoded a few times rather than once per later commit, and the whole equals one decode."""
    from engine.detokenizer import decode_text
    from engine.token_bytes import byte_of_char

    stray = tok.convert_tokens_to_ids(next(ch for ch, b in byte_of_char().items() if b == 0x80))
    counting = _Counting(tok)
    tokens = [stray] * 4096
    d = IncrementalDetokenizer(counting)
    deltas = [d.add(tokens[at:at + 32]) for at in range(0, len(tokens), 32)] + [d.add([], final=True)]
    assert "".join(deltas) == decode_text(tok, tokens) == "\ufffd" * 4096
    assert all(deltas[4:-1])  # text every commit, but while the first window fills
    assert counting.decoded <= 16 * len(tokens)  # a decode of everything at every commit: about 4 times that


def test_a_stray_byte_before_a_long_run_of_byte_characters_loses_no_text():
    """Byte fallback: a stray byte makes the long run of byte tokens after it replacement characters,
    one per byte, while text after the run is already sent; settling the text read so far must not cut
    the run where the rest would decode as characters again (shorter than what was sent, so that later
    text was skipped), and a stop string after it is still found where it first occurs."""
    from engine.detokenizer import decode_text

    tokenizer = _byte_fallback_tokenizer()
    byte = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0x82, 0xE2, 0xAC)]
    stray, euro = byte[0], [byte[1], byte[0], byte[2]]
    commits = [[stray] + euro * 30 + ids(tokenizer, "bbb") + [byte[1]], ids(tokenizer, "ss") + [byte[1]],
               ids(tokenizer, "a" + " the Paris" * 10 + " a"), ids(tokenizer, " the last")]
    tokens = sum(commits, [])
    whole = decode_text(tokenizer, tokens)
    assert whole.startswith("\ufffd" * 91 + "bbb\ufffdss\ufffda the Paris")
    d = IncrementalDetokenizer(tokenizer)
    assert "".join(d.add(c) for c in commits) + d.add([], final=True) == whole
    stopped = IncrementalDetokenizer(tokenizer, ("Paris",))
    assert "".join(stopped.add(c) for c in commits) == whole[:whole.index("Paris")]
    first = next(n for n in range(len(tokens)) if "Paris" in decode_text(tokenizer, tokens[:n]))
    assert stopped.num_tokens_at_stop == first


def test_byte_fallback_output_of_stray_bytes_streams_and_stays_linear():
    """Byte fallback, every token a lone continuation byte: one run of byte tokens, replacement
    characters however it is cut, so its text is still settled commit by commit (streamed, each token
    decoded a few times) rather than decoded whole at every commit and held back to the end."""
    from engine.detokenizer import decode_text

    tokenizer = _byte_fallback_tokenizer()
    counting = _Counting(tokenizer)
    tokens = [tokenizer.convert_tokens_to_ids("<0x80>")] * 4096
    d = IncrementalDetokenizer(counting)
    deltas = [d.add(tokens[at:at + 32]) for at in range(0, len(tokens), 32)] + [d.add([], final=True)]
    assert "".join(deltas) == decode_text(tokenizer, tokens) == "\ufffd" * 4096
    assert all(deltas[4:-1])
    assert counting.decoded <= 16 * len(tokens)


def test_a_long_run_of_byte_tokens_cut_inside_a_character_is_not_settled_early():
    """Byte fallback: sixty characters outside the vocabulary are a run of 180 byte tokens, which
    commits of 48 cut inside characters (the whole run then decodes as replacement characters until
    it is finished); the text that comes out is still the whole decode, stop strings in it found."""
    from engine.detokenizer import decode_text

    tokenizer = _byte_fallback_tokenizer()
    tokens = ids(tokenizer, "a" + "\u4e2d" * 60 + " the")
    d = IncrementalDetokenizer(tokenizer)
    out = "".join(d.add(tokens[at:at + 48]) for at in range(0, len(tokens), 48)) + d.add([], final=True)
    assert out == decode_text(tokenizer, tokens) == "a" + "\u4e2d" * 60 + " the"
    stopped = IncrementalDetokenizer(tokenizer, ("\u4e2d\u4e2d the",))
    assert "".join(stopped.add(tokens[at:at + 48]) for at in range(0, len(tokens), 48)) == "a" + "\u4e2d" * 58
