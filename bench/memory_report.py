"""Memory arithmetic for a DiffusionGemma configuration, computed from its config (no weights):
weights, KV bytes per token and per request, per-request state, the sampling transient, and how
many requests fit on a card.

    python -m bench.memory_report --config configs/models/diffusiongemma-26b-a4b-shape.json --gpu-gib 80

The parameter count comes from instantiating the model on the meta device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine.memory import auto_sampling_tile_bytes, plan_memory
from engine.sampling.reference import SamplingTiles, sampling_tiles

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "fp8": torch.float8_e4m3fn}


def load_config(path: str):
    from transformers import DiffusionGemmaConfig

    data = json.loads(Path(path).read_text())
    data.pop("_comment", None)
    data.pop("model_type", None)
    return DiffusionGemmaConfig(**data)


def count_parameters(config) -> tuple[int, int]:
    """(all parameters, text-model parameters), from a meta-device instantiation."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision" in n)
    return total, total - vision


def report(config, *, weight_dtype: str, kv_dtype: str, gpu_gib: float, context: int, max_num_seqs: int,
           tile_budget_mib: int | None, draws_in_flight: int = 1, max_encoder_tokens: int = 0,
           encoder_beside_decoder: bool = False) -> dict:
    """``draws_in_flight``: 1 on CUDA, 2 on CPU (where the next tile's draws are taken ahead).
    ``tile_budget_mib=None``: the engine's default from the memory left beside the weights."""
    text = config.text_config
    kv_torch = _DTYPES[kv_dtype]
    total, text_params = count_parameters(config)
    weight_bytes = total * (torch.finfo(_DTYPES[weight_dtype]).bits // 8)
    tile_bytes = (auto_sampling_tile_bytes(int(gpu_gib * 2**30 - weight_bytes)) if tile_budget_mib is None
                  else tile_budget_mib * 2**20)
    tiles = sampling_tiles(tile_bytes, config.canvas_length, text.vocab_size, draws_in_flight)
    tiles = SamplingTiles(min(tiles.rows, max_num_seqs), tiles.positions, tiles.draws_in_flight)  # a batch's tiles
    plan = plan_memory(text, config.canvas_length, kv_torch, max_num_seqs=max_num_seqs,
                       sampling_transient_bytes=tiles.transient_bytes(config.canvas_length, text.vocab_size),
                       max_encoder_tokens=max_encoder_tokens, encoder_beside_decoder=encoder_beside_decoder)
    # KV + state, plus its share of attention's per-layer copies (see engine.memory)
    per_request = plan.per_request_bytes(context)
    free = gpu_gib * 2**30 - weight_bytes - plan.sampling_transient_bytes - plan.decoder_transient_bytes
    return {
        "parameters": total,
        "text_parameters": text_params,
        "weights_gib": weight_bytes / 2**30,
        "kv_bytes_per_token_full_layers": plan.kv_bytes_per_token,
        "attention_bytes_per_token": plan.attention_bytes_per_token,
        "sliding_kv_mib_per_request": plan.sliding_kv_bytes_per_request / 2**20,
        "state_kib_per_request": plan.state_bytes_per_request / 2**10,
        "state_if_logits_were_kept_mib": config.canvas_length * text.vocab_size * 4 / 2**20,
        "request_mib_at_context": per_request / 2**20,
        "sampling_tile_bytes": tile_bytes,
        "sampling_tile_rows": min(tiles.rows, max_num_seqs),
        "sampling_chunk_positions": tiles.positions,
        "sampling_transient_gib": plan.sampling_transient_bytes / 2**30,
        "one_fp32_logits_copy_batch8_gib": 8 * config.canvas_length * text.vocab_size * 4 / 2**30,
        "decoder_transient_gib": plan.decoder_transient_bytes / 2**30,
        "free_for_kv_gib": free / 2**30,
        "requests_that_fit": max(0, int(free // per_request)),
        "context": context,
        "gpu_gib": gpu_gib,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/models/diffusiongemma-26b-a4b-shape.json")
    ap.add_argument("--weight-dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--context", type=int, default=4096, help="prompt + output tokens per request")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--tile-mib", type=int, default=None,
                    help="sampling_tile_bytes in MiB (default: the engine's default, 10%% of the memory beside "
                         "the weights within 512 MiB..8 GiB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = report(load_config(args.config), weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype, gpu_gib=args.gpu_gib,
               context=args.context, max_num_seqs=args.max_num_seqs, tile_budget_mib=args.tile_mib)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"config: {args.config}; weights {args.weight_dtype}, KV {args.kv_dtype}, {args.gpu_gib:g} GiB card")
    print(f"parameters: {r['parameters'] / 1e9:.2f} B ({r['weights_gib']:.1f} GiB of weights)")
    print(f"KV per committed token (full-attention layers): {r['kv_bytes_per_token_full_layers'] / 1024:.1f} KiB")
    print(f"sliding-window KV per request (window-1 tokens): {r['sliding_kv_mib_per_request']:.1f} MiB")
    print(f"state per request (canvas, soft-embedding self-conditioning, history): {r['state_kib_per_request']:.0f} KiB "
          f"(vs {r['state_if_logits_were_kept_mib']:.0f} MiB if [canvas, vocab] fp32 logits were kept)")
    print(f"one request at {r['context']} tokens: {r['request_mib_at_context']:.1f} MiB")
    print(f"largest transient: sampling tile ({r['sampling_tile_bytes'] / 2**30:.2f} GiB budget) of "
          f"{r['sampling_tile_rows']} canvas row(s) in chunks of "
          f"{r['sampling_chunk_positions']} positions (a remainder of 1-3 joins the last) = "
          f"{r['sampling_transient_gib']:.2f} GiB "
          f"(an untiled fp32 logits copy at batch 8 alone is {r['one_fp32_logits_copy_batch8_gib']:.1f} GiB)")
    print(f"decoder activations bound at batch {args.max_num_seqs}: {r['decoder_transient_gib']:.2f} GiB")
    print(f"left for KV: {r['free_for_kv_gib']:.1f} GiB -> {r['requests_that_fit']} requests of {r['context']} tokens "
          f"({r['request_mib_at_context']:.0f} MiB each, KV, state and attention's copies of one layer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
