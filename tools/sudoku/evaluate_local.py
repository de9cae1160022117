"""Evaluate an exported Sudoku checkpoint in-process with ``model.generate``.

Held-out puzzles (unique solutions, seed never used in training) in four buckets of givens;
prints solve rate, accuracy on the blank cells, and mean denoising steps per canvas.

    python -m tools.sudoku.evaluate_local --model engine/default_model --per-bucket 50
    python -m tools.sudoku.evaluate_local --model engine/default_model --chat --blank .
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tools.sudoku.common import BUCKET_NAMES, EVAL_SEED, BucketStats, eval_set, format_table, positive_int


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="engine/default_model")
    ap.add_argument("--checkpoint", default=None, help="a training checkpoint.pt instead of --model (no export)")
    ap.add_argument("--per-bucket", type=positive_int, default=50)
    ap.add_argument("--buckets", nargs="*", default=None, choices=BUCKET_NAMES,
                    help="bucket names to run (default: all; sampling draws from one seed across them, in order)")
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="puzzle seed (held out from training)")
    ap.add_argument("--gen-seed", type=int, default=0, help="torch seed for sampling")
    ap.add_argument("--batch-size", type=positive_int, default=50)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--blank", default="0", choices=["0", "."])
    ap.add_argument("--chat", action="store_true", help="build prompts with the chat template")
    ap.add_argument("--bos", action="store_true", help="prepend <bos> to the prompt ids")
    ap.add_argument("--max-denoising-steps", type=int, default=None)
    ap.add_argument("--entropy-bound", type=float, default=None)
    ap.add_argument("--t-min", type=float, default=None)
    ap.add_argument("--t-max", type=float, default=None)
    ap.add_argument("--stability-threshold", type=int, default=None)
    ap.add_argument("--confidence-threshold", type=float, default=None)
    return ap.parse_args(argv)


def load(args):
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    if args.checkpoint:
        from tools.sudoku.model import build_tokenizer
        from tools.sudoku.train import build_model

        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model = build_model(state["size"], seed=0)
        model.load_state_dict(state["model"], strict=False)
        model.tie_weights()
        return model.eval(), build_tokenizer()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(args.model)


def generation_overrides(args, model) -> dict:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    out = {}
    for name in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
        v = getattr(args, name)
        if v is not None:
            out[name] = v
    if args.entropy_bound is not None:
        out["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(args.entropy_bound))
    return out


def prompt_ids(tokenizer, puzzle: str, chat: bool, bos: bool) -> list[int]:
    if chat:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": puzzle}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(enc["input_ids"] if not isinstance(enc, list) else enc)
    else:
        ids = tokenizer(puzzle).input_ids
    if bos:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def run(args) -> dict[str, BucketStats]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.gen_seed)
    model, tokenizer = load(args)
    overrides = generation_overrides(args, model)
    pad_id = tokenizer.pad_token_id
    canvas_length = model.config.canvas_length
    sets = eval_set(args.per_bucket, seed=args.seed, blank=args.blank)
    wanted = args.buckets or BUCKET_NAMES
    stats: dict[str, BucketStats] = {}
    for name in wanted:
        pairs = sets[name]
        st = stats[name] = BucketStats()
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start : start + args.batch_size]
            ids = [prompt_ids(tokenizer, p, args.chat, args.bos) for p, _ in chunk]
            if len({len(x) for x in ids}) != 1:
                raise SystemExit("prompts of different lengths")
            input_ids = torch.tensor(ids, dtype=torch.long)
            out = model.generate(input_ids, **overrides)
            new = out.sequences[:, input_ids.shape[1] :]
            valid = (new != pad_id).sum(dim=-1).float()
            decoder_passes = valid / out.tokens_per_forward.float()
            for row, (puzzle, solution) in enumerate(chunk):
                text = tokenizer.decode(new[row].tolist(), skip_special_tokens=True)
                canvases = max(1, math.ceil(int(valid[row]) / canvas_length))
                st.add(puzzle, solution, text, float(decoder_passes[row]) / canvases, canvases)
    return stats


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    stats = run(args)
    print(f"model={args.checkpoint or args.model} per_bucket={args.per_bucket} seed={args.seed} "
          f"chat={args.chat} blank={args.blank!r} bos={args.bos} ({time.time() - t0:.0f}s)")
    print(format_table(stats))


if __name__ == "__main__":
    main()
