"""Build small, randomly initialised DiffusionGemma checkpoints on disk.

The tests and the server's fallback default model use these: they are saved with
``save_pretrained`` and loaded back through exactly the same path as a user's model.
The tokenizer is byte-level (every UTF-8 byte is one token), so any text round-trips
and multi-byte characters exercise incremental detokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.import_noise import quiet_torchao_import_noise

quiet_torchao_import_noise()  # before transformers imports torchao (its import warnings are noise on CPU)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID = range(5)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny checkpoint. Defaults keep a CPU decoder step in the millisecond range."""

    hidden_size: int = 32
    num_layers: int = 2  # layer 0 sliding, last layer full (as in the real model)
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 16
    num_experts: int = 4
    top_k_experts: int = 2
    sliding_window: int = 24
    canvas_length: int = 16
    max_position_embeddings: int = 4096
    extra_vocab: int = 0  # unused ids above the byte tokens, to test out-of-range handling
    dtype: torch.dtype = torch.float32
    seed: int = 0


def build_byte_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast``: 5 special tokens, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from engine.token_bytes import byte_of_char

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: byte_of_char()[ch])
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[], unk_token=None)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# vision_config=None would silently build the full Gemma 4 vision tower (~150M parameters): keep it tiny.
TINY_VISION_CONFIG = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=16,
    output_proj_dims=16,
    position_embedding_size=16,
)


def small_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, moe_intermediate_size: int,
                 num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, num_experts: int,
                 top_k_experts: int, sliding_window: int, max_position_embeddings: int, canvas_length: int,
                 reserved_token_id: int, pad_id: int = PAD_ID, eos_id: int = EOS_ID, bos_id: int = BOS_ID):
    """A small ``DiffusionGemmaConfig``: all sliding layers but the last (full, as in the real model),
    one head size for both layer kinds, a tiny vision tower, image tokens mapped to ``reserved_token_id``."""
    from transformers import DiffusionGemmaConfig

    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        global_head_dim=head_dim,
        num_experts=num_experts,
        top_k_experts=top_k_experts,
        sliding_window=sliding_window,
        max_position_embeddings=max_position_embeddings,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
    )
    return DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=dict(TINY_VISION_CONFIG),
        canvas_length=canvas_length,
        image_token_id=reserved_token_id,
        boi_token_id=reserved_token_id,
        eoi_token_id=reserved_token_id,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
    )


def tiny_config(spec: TinySpec, vocab_size: int):
    return small_config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        moe_intermediate_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        top_k_experts=spec.top_k_experts,
        sliding_window=spec.sliding_window,
        max_position_embeddings=spec.max_position_embeddings,
        canvas_length=spec.canvas_length,
        reserved_token_id=vocab_size - 1,
    )


def diffusion_generation_config(params: dict, *, eos_ids=(EOS_ID, END_OF_TURN_ID), pad_id: int = PAD_ID,
                                bos_id: int = BOS_ID):
    """A ``DiffusionGemmaGenerationConfig`` from plain diffusion parameters; ``entropy_bound``
    becomes the sampler config, everything else is passed through."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    params = dict(params)
    entropy_bound = float(params.pop("entropy_bound"))
    return DiffusionGemmaGenerationConfig(
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=entropy_bound),
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        **params,
    )


def build_tiny_checkpoint(path: str | Path, spec: TinySpec = TinySpec(), generation: dict | None = None,
                          tokenizer=None) -> Path:
    """Write a random tiny DiffusionGemma checkpoint with tokenizer and generation config to ``path``.
    ``tokenizer`` (the byte tokenizer by default) must have ``SPECIAL_TOKENS`` as its first ids."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_byte_tokenizer()
    vocab_size = len(tokenizer) + spec.extra_vocab
    torch.manual_seed(spec.seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(spec, vocab_size)).to(spec.dtype)
    gen = dict(
        max_denoising_steps=8,
        entropy_bound=0.1,
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        max_new_tokens=spec.canvas_length,
    )
    gen.update(generation or {})
    model.generation_config = diffusion_generation_config(gen)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
