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
# Gemma 4's named multimodal tokens, added after the bytes by ``build_byte_tokenizer(multimodal=True)``
# (the processor reads the audio ones too, though no audio is taken)
MULTIMODAL_TOKENS = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>",
                     "boa_token": "<|audio>", "audio_token": "<|audio|>", "eoa_token": "<audio|>"}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# CHAT_TEMPLATE, with content given as parts: text parts' text, and Gemma 4's image token for an image part
VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
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
    global_head_dim: int | None = None  # the full-attention layers' head size (None: head_dim; the real model: 512)
    num_global_kv_heads: int | None = None  # their KV heads (None: num_kv_heads; the real model: 2 of 8)
    num_experts: int = 4
    top_k_experts: int = 2
    sliding_window: int = 24
    canvas_length: int = 16
    max_position_embeddings: int = 4096
    extra_vocab: int = 0  # unused ids above the byte tokens, to test out-of-range handling
    vision: bool = False  # save a processor (tiny image processor, image tokens, VISION_CHAT_TEMPLATE)
    dtype: torch.dtype = torch.float32
    seed: int = 0


def build_byte_tokenizer(multimodal: bool = False):
    """A byte-level ``PreTrainedTokenizerFast``: 5 special tokens, then the 256 bytes; with
    ``multimodal``, then ``MULTIMODAL_TOKENS`` (named as Gemma 4's tokenizer names them) and
    ``VISION_CHAT_TEMPLATE``."""
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
    named = {}
    if multimodal:
        tok.add_special_tokens(list(MULTIMODAL_TOKENS.values()))
        named = dict(extra_special_tokens=dict(MULTIMODAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        **named,
    )
    fast.chat_template = VISION_CHAT_TEMPLATE if multimodal else CHAT_TEMPLATE
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
# A checkpoint that takes images (TinySpec.vision) has small patches, and position embeddings for as
# many patches along a side as its image processor's budget allows (210 at most)
TINY_VISION_GEOMETRY = dict(patch_size=4, pooling_kernel_size=3, position_embedding_size=256)
# ... and Gemma 4's image processor with that geometry and its smallest budget: an image becomes at
# most 70 placeholder tokens
TINY_IMAGE_PROCESSOR = dict(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)


def small_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, moe_intermediate_size: int,
                 num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, num_experts: int,
                 top_k_experts: int, sliding_window: int, max_position_embeddings: int, canvas_length: int,
                 reserved_token_id: int, pad_id: int = PAD_ID, eos_id: int = EOS_ID, bos_id: int = BOS_ID,
                 image_token_ids: tuple[int, int, int] | None = None, global_head_dim: int | None = None,
                 num_global_kv_heads: int | None = None):
    """A small ``DiffusionGemmaConfig``: all sliding layers but the last (full, as in the real model),
    one head size and KV-head count for both layer kinds unless ``global_head_dim`` or
    ``num_global_kv_heads`` set the full-attention layers' own, a tiny vision tower, image tokens mapped to
    ``reserved_token_id``; or, with ``image_token_ids`` (begin, image, end), to those tokens, with image
    placeholders attending to each other in both directions (``use_bidirectional_attention="vision"``, as larger
    Gemma 4 models)."""
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
        global_head_dim=global_head_dim or head_dim,
        num_experts=num_experts,
        top_k_experts=top_k_experts,
        sliding_window=sliding_window,
        max_position_embeddings=max_position_embeddings,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
    )
    if num_global_kv_heads is not None:
        text_config["num_global_key_value_heads"] = num_global_kv_heads
    boi, image, eoi = (reserved_token_id,) * 3 if image_token_ids is None else image_token_ids
    vision_config = dict(TINY_VISION_CONFIG)
    if image_token_ids is not None:
        text_config["use_bidirectional_attention"] = "vision"
        vision_config.update(TINY_VISION_GEOMETRY)
    return DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        canvas_length=canvas_length,
        image_token_id=image,
        boi_token_id=boi,
        eoi_token_id=eoi,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
    )


def tiny_config(spec: TinySpec, vocab_size: int, image_token_ids: tuple[int, int, int] | None = None):
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
        image_token_ids=image_token_ids,
        global_head_dim=spec.global_head_dim,
        num_global_kv_heads=spec.num_global_kv_heads,
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
    tokenizer = tokenizer or build_byte_tokenizer(multimodal=spec.vision)
    vocab_size = len(tokenizer) + spec.extra_vocab
    image_token_ids = None
    if spec.vision:
        image_token_ids = tuple(tokenizer.convert_tokens_to_ids(MULTIMODAL_TOKENS[name])
                                for name in ("boi_token", "image_token", "eoi_token"))
    torch.manual_seed(spec.seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(spec, vocab_size, image_token_ids)).to(spec.dtype)
    # each unlike transformers' own default, so that a checkpoint's values misread would show
    gen = dict(
        max_denoising_steps=8,
        entropy_bound=0.2,
        t_min=0.3,
        t_max=0.9,
        stability_threshold=2,
        confidence_threshold=0.004,
        max_new_tokens=spec.canvas_length,
    )
    gen.update(generation or {})
    model.generation_config = diffusion_generation_config(gen)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if spec.vision:
        save_image_processor(path)
    return path


def save_image_processor(path: Path) -> None:
    """Write processor_config.json as a Gemma 4 checkpoint has it (processor and image processor
    named by their transformers classes), with ``TINY_IMAGE_PROCESSOR``'s geometry."""
    import json

    image_processor = dict(
        image_processor_type="Gemma4ImageProcessor", do_convert_rgb=True, do_resize=True, resample=3,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=False, image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0], **TINY_IMAGE_PROCESSOR)
    config = dict(processor_class="Gemma4Processor", image_seq_length=TINY_IMAGE_PROCESSOR["max_soft_tokens"],
                  image_processor=image_processor)
    (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
