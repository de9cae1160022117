"""Tokenizer, model config and generation defaults of the Sudoku DiffusionGemma.

Contract (the server relies on it):

* prompt: exactly 81 characters, row by row, digits 1-9 for givens, ``0`` or ``.`` for blanks.
  The tokenizer maps ``.`` to the same id as ``0`` (a normalizer) and adds no special tokens, so
  ``tokenizer(prompt).input_ids`` is just the 81 cell ids. (The model was also trained with a
  ``<bos>`` in front some of the time, so a server that prepends one still works.)
* chat: the chat template renders the last user message with its whitespace removed, i.e. the
  same 81 characters, so chat and completion prompts tokenize identically.
* completion: one canvas of ``CANVAS_LENGTH`` = 82 tokens: the 81 solved cells, then ``<eos>``.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<unk>"]
PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID, UNK_ID = range(6)
# "\n" then printable ASCII from " " to "~": ids 6 .. 101
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
assert set(string.digits) <= set(CHARS)
CHAR_ID = {ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(CHARS)}
DIGIT_ID = [CHAR_ID[str(d)] for d in range(10)]  # DIGIT_ID[0] is the blank cell
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)  # 102
CANVAS_LENGTH = 82  # 81 cells + <eos>

# the shipped model's template (engine/default_model/chat_template.jinja is an export of it): the user's
# digits without whitespace, after tool declarations in Gemma 4's format when a request gives tools
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()

# Diffusion defaults written to generation_config.json.
# Tuned on held-out puzzles (puzzle seed 424242, not the evaluation seed): a hot start (t_max > 1)
# commits few cells per step early on, which this small model needs to avoid locking in wrong
# digits; the schedule cools to 0.5 so easy puzzles still stop after about 10 steps. On the
# 10,000-step checkpoint, t_max 1.5 / 1.75 / 2.0 solved 96 / 98 / 99% of 100 easy puzzles in
# 6.2 / 9.7 / 12.4 steps (31 / 31 / 32% of 30-35 givens). On the 30,871-step checkpoint, 24 / 32 / 48
# steps solved 50.0 / 51.5 / 53.5% of 200 puzzles with 30-35 givens and 98.5 / 99.0 / 99.0% of 200 easy
# ones in 8.3 / 10.3 / 14.9 steps per canvas; 32 keeps the easy ones well under 16.
GENERATION_DEFAULTS = dict(
    max_denoising_steps=32,
    entropy_bound=0.1,
    t_min=0.5,
    t_max=1.75,
    stability_threshold=1,
    confidence_threshold=0.01,
    max_new_tokens=CANVAS_LENGTH,
)


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 48
    num_experts: int = 4
    top_k_experts: int = 2
    intermediate_size: int = 384
    moe_intermediate_size: int = 192


SIZES = {
    "micro": ModelSize(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                       num_experts=2, top_k_experts=1, intermediate_size=64, moe_intermediate_size=32),
    "small": ModelSize(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                       intermediate_size=256, moe_intermediate_size=128),
    "medium": ModelSize(hidden_size=160, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=40,
                        intermediate_size=320, moe_intermediate_size=160),
    "large": ModelSize(),
}


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``; no special tokens are added when encoding."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update(CHAR_ID)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(".", "0")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(size: ModelSize | str = "large"):
    from tools.tiny_checkpoint import small_config

    if isinstance(size, str):
        size = SIZES[size]
    return small_config(
        vocab_size=VOCAB_SIZE,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        moe_intermediate_size=size.moe_intermediate_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        num_kv_heads=size.num_kv_heads,
        head_dim=size.head_dim,
        num_experts=size.num_experts,
        top_k_experts=size.top_k_experts,
        sliding_window=512,  # larger than prompt + canvas: every layer sees everything
        max_position_embeddings=1024,
        canvas_length=CANVAS_LENGTH,
        reserved_token_id=UNK_ID,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
    )



def size_to_dict(size: ModelSize) -> dict:
    return asdict(size)


def build_generation_config(**overrides):
    from tools.tiny_checkpoint import diffusion_generation_config

    return diffusion_generation_config({**GENERATION_DEFAULTS, **overrides},
                                       eos_ids=(EOS_ID, END_OF_TURN_ID), pad_id=PAD_ID, bos_id=BOS_ID)
