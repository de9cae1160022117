"""Write a DiffusionGemma-shaped checkpoint with random weights, for GPU benchmarks without a download.

    python -m bench.make_random_model --out runs/dg-shape-4l --layers 4 --dtype bfloat16

The shape comes from a config file (default: configs/models/diffusiongemma-26b-a4b-shape.json) with
the layer count reduced to ``--layers`` (keep the 5:1 sliding/full pattern; the last layer is full).
Per-layer cost scales linearly, so a full-depth figure is the measured one times
``num_hidden_layers / layers`` for the decoder part. The tokenizer is the byte-level test tokenizer:
ids above its vocabulary decode to nothing, which is fine for throughput.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tools.tiny_checkpoint import BOS_ID, EOS_ID, PAD_ID, build_byte_tokenizer


def shape_config(path: str, layers: int):
    """The DiffusionGemma config of shape file ``path`` with ``layers`` decoder layers (the 5:1
    sliding/full pattern, the last layer full) and the test tokenizer's special ids."""
    from transformers import DiffusionGemmaConfig

    data = json.loads(Path(path).read_text())
    data.pop("_comment", None)
    data.pop("model_type", None)
    text = data["text_config"]
    text["num_hidden_layers"] = layers
    text["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention"
                           for i in range(layers)]
    text.update(pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID)
    return DiffusionGemmaConfig(**data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/models/diffusiongemma-26b-a4b-shape.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config-only", action="store_true",
                    help="write the config, generation config and tokenizer but no weights: serve the folder "
                         "with --load-format dummy (random weights built on the device at start-up)")
    ap.add_argument("--scheme", choices=["fp8", "nvfp4"], default=None,
                    help="with --config-only: a compressed-tensors quantization_config as the published checkpoints "
                         "have, so --load-format dummy builds FP8 (or NVFP4) experts and dense layers")
    args = ap.parse_args(argv)
    if args.scheme and not args.config_only:
        ap.error("--scheme needs --config-only (quantize real weights with python -m tools.quantized_checkpoint)")

    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    config = shape_config(args.config, args.layers)
    dtype = getattr(torch, args.dtype)
    generation = DiffusionGemmaGenerationConfig(
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1), max_denoising_steps=48, t_min=0.4, t_max=0.8,
        stability_threshold=1, confidence_threshold=0.005, max_new_tokens=256, eos_token_id=[EOS_ID],
        pad_token_id=PAD_ID, bos_token_id=BOS_ID,
    )
    out = Path(args.out)
    build_byte_tokenizer().save_pretrained(out)
    if args.config_only:
        config.dtype = dtype
        config.save_pretrained(out)
        if args.scheme:
            from tools.quantized_checkpoint import quantization_config

            path = out / "config.json"
            data = json.loads(path.read_text())
            data["quantization_config"] = quantization_config(args.scheme, ["lm_head"])
            path.write_text(json.dumps(data, indent=2))
        generation.save_pretrained(out)
        print(f"wrote {out}: config only ({args.layers} layers, {args.dtype}{', ' + args.scheme if args.scheme else ''}); "
              "serve it with --load-format dummy")
        return 0
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DiffusionGemmaForBlockDiffusion(config).to(dtype)
    model.generation_config = generation
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n / 1e9:.2f} B parameters, {args.layers} layers, {args.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
