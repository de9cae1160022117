"""A cheap lower bound on a text's token count, so a prompt that cannot fit is refused before it is
tokenized (tokenizing megabytes of text costs seconds and gigabytes).

Every token of the model's vocabulary covers at most ``longest`` characters of text, so a text of
``c`` characters has at least ``c / longest`` tokens. Added (special) tokens are matched as whole
strings before the model's own tokenization; those longer than ``longest`` are counted in the text
and their characters set aside, so a long ``<start_of_turn>`` does not loosen the bound for every
prompt of a byte-level vocabulary.

The bound assumes what holds for the tokenizers DiffusionGemma and the test models use (byte-level
or SentencePiece-style BPE, per-character word level): normalization does not shorten the text,
and unknown text is not merged into one token. A tokenizer that strips, composes or fuses unknown
characters can give fewer tokens than the bound says; such a prompt is refused anyway (the refusal
names the characters, docs/reliability.md).
"""

from __future__ import annotations

from dataclasses import dataclass

# Past this many added tokens longer than the vocabulary's own, counting them in every prompt costs
# more than it saves: the bound then uses the longest token of all.
MAX_COUNTED_ADDED_TOKENS = 64


@dataclass(frozen=True)
class TokenBound:
    longest: int  # the longest token of the model's own vocabulary, in characters (at least 1)
    longest_any: int  # the longest token including the added ones
    long_added: tuple[str, ...]  # added tokens longer than ``longest`` (empty when there are too many)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenBound":
        vocab = tokenizer.get_vocab()
        added = set(tokenizer.get_added_vocab())
        longest = max((len(t) for t in vocab if t not in added), default=1) or 1
        longest_any = max([longest, *(len(t) for t in added)])
        long_added = tuple(sorted((t for t in added if len(t) > longest), key=len, reverse=True))
        if len(long_added) > MAX_COUNTED_ADDED_TOKENS:
            longest, long_added = longest_any, ()
        return cls(longest, longest_any, long_added)

    def at_least(self, text: str, limit: int) -> tuple[int, str] | None:
        """``(n, why)`` when ``text`` has at least ``n`` > ``limit`` tokens, ``why`` saying how that
        follows from its characters; ``None`` when its characters do not prove it."""
        chars = len(text)
        if chars <= limit:  # no bound below the character count can exceed the limit
            return None
        quick = -(-chars // self.longest_any)
        if quick > limit:
            return quick, f"no token of this model's vocabulary is longer than {_characters(self.longest_any)}"
        if self.long_added:
            covered = sum(len(t) * text.count(t) for t in self.long_added)
            finer = -(-max(0, chars - covered) // self.longest)
            if finer > limit:
                return finer, (f"{covered} of them are special tokens and no other token of this model's vocabulary "
                               f"is longer than {_characters(self.longest)}")
        return None


def _characters(n: int) -> str:
    return "1 character" if n == 1 else f"{n} characters"
