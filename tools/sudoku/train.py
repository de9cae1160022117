"""Train the Sudoku DiffusionGemma with the uniform-state diffusion objective.

Per step, for a batch of (puzzle, solution) pairs:

* encoder: the prompt (81 cell ids, sometimes with ``<bos>`` in front) is encoded causally into a
  KV cache; its next-token loss (lm_head on the encoder states, shifted) is added with weight
  ``--encoder-loss-weight``. The answer never enters the encoder.
* decoder: the clean canvas (81 solved cells + ``<eos>``) is corrupted by uniform-state noise:
  t ~ U(0, 1) per example, each canvas token replaced by a uniformly random vocabulary id with
  probability t. Cross-entropy over all canvas positions against the clean canvas.
* self-conditioning: for a random half of the examples, a first no-grad decoder pass gives
  logits that are fed (detached) as ``self_conditioning_logits`` to the second, trained pass
  (``self_conditioning_mask`` selects the examples).

Data: a cached pool of random grids with *unique* puzzles at ~24-26 givens (solutions drawn by
randomised backtracking); each step augments them (relabelling, band/stack permutations,
transposition, all of which keep uniqueness) and adds givens back from the solution down a
curriculum (many givens first, then down to the pool's minimum). Adding givens keeps the
solution unique.

    nice -n 10 python -m tools.sudoku.train --workdir runs/sudoku --steps 6000
    python -m tools.sudoku.train --workdir runs/sudoku --export engine/default_model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.sudoku import generator
from tools.sudoku.common import positive_int
from tools.sudoku.model import (
    BOS_ID,
    CANVAS_LENGTH,
    DIGIT_ID,
    EOS_ID,
    PAD_ID,
    SIZES,
    VOCAB_SIZE,
    ModelSize,
    build_config,
    build_generation_config,
    build_tokenizer,
    size_to_dict,
)

DIGIT_LUT = torch.tensor(DIGIT_ID, dtype=torch.long)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/sudoku")
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="model size (default: the shipped model's)")
    ap.add_argument("--steps", type=positive_int, default=6000, help="total optimizer steps (sets the cosine schedule)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="minutes of training (summed over resumes); schedule and curriculum follow "
                         "max(step / steps, elapsed / budget) and training stops when either is used up")
    ap.add_argument("--max-steps-this-run", type=int, default=None, help="stop this process after N steps")
    ap.add_argument("--new-phase", action="store_true",
                    help="on resume, start a new phase: warmup, cosine schedule, curriculum and --time-budget "
                         "count from the resumed step (to --steps) instead of from step 0 (e.g. to continue a CPU "
                         "run on a GPU with a larger batch)")
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--self-cond-prob", type=float, default=0.5)
    ap.add_argument("--bos-prob", type=float, default=0.2, help="fraction of batches with <bos> before the prompt")
    ap.add_argument("--encoder-loss-weight", type=float, default=0.1)
    ap.add_argument("--givens-max", type=int, default=60)
    ap.add_argument("--givens-start", type=int, default=45, help="lowest #givens at step 0")
    ap.add_argument("--curriculum-frac", type=float, default=0.4, help="fraction of steps to reach the pool minimum")
    ap.add_argument("--pool-size", type=positive_int, default=12000)
    ap.add_argument("--pool-givens", type=int, nargs=2, default=[24, 26])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--experts-implementation", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                    help="transformers' MoE kernel for training (default: transformers' choice, grouped_mm)")
    ap.add_argument("--save-every", type=positive_int, default=250)
    ap.add_argument("--log-every", type=positive_int, default=10)
    ap.add_argument("--export", default=None, metavar="DIR", help="only export the latest checkpoint to DIR")
    ap.add_argument("--checkpoint", default=None, help="with --export: checkpoint file (default: latest)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    low, high = args.pool_givens
    if not generator.MIN_UNIQUE_GIVENS <= low <= high <= 80:  # the pool's puzzles have one solution each
        ap.error(f"--pool-givens must be two counts from {generator.MIN_UNIQUE_GIVENS} to 80, the first the lower "
                 f"(got {low} {high})")
    if not low <= args.givens_start <= args.givens_max <= 80:
        ap.error(f"--givens-start ({args.givens_start}) must be from the pool's lowest count ({low}) to "
                 f"--givens-max ({args.givens_max}), which is at most 80")
    return args


# ------------------------------------------------------------------------------------------ data

def load_pool(workdir: Path, seed: int, count: int, givens: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(puzzles, solutions) [count, 81] uint8, unique puzzles; cached in the work dir."""
    path = workdir / f"pool_seed{seed}_n{count}_g{givens[0]}-{givens[1]}.npz"
    if path.exists():
        z = np.load(path)
        return z["puzzles"], z["solutions"]
    rng = random.Random(seed)
    puzzles, solutions = [], []
    t0 = time.time()
    for k in range(count):
        n = rng.randint(givens[0], givens[1])
        p, s = generator.make_puzzle(rng, n, unique=True)
        puzzles.append([int(c) for c in p])
        solutions.append([int(c) for c in s])
        if (k + 1) % 2000 == 0:
            print(f"pool: {k + 1}/{count} puzzles ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    pz = np.asarray(puzzles, dtype=np.uint8)
    so = np.asarray(solutions, dtype=np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, puzzles=pz, solutions=so)
    os.replace(tmp, path)
    return pz, so


def augment_pairs(puzzles: np.ndarray, solutions: np.ndarray, rng: np.random.Generator):
    """The same random symmetry applied to puzzle and solution (keeps uniqueness)."""
    b = puzzles.shape[0]
    p = puzzles.reshape(b, 9, 9)
    s = solutions.reshape(b, 9, 9)
    op, os_ = np.empty_like(p), np.empty_like(s)
    for k in range(b):
        rows = (rng.permutation(3)[:, None] * 3 + np.stack([rng.permutation(3) for _ in range(3)])).ravel()
        cols = (rng.permutation(3)[:, None] * 3 + np.stack([rng.permutation(3) for _ in range(3)])).ravel()
        relabel = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
        xp, xs = p[k][rows][:, cols], s[k][rows][:, cols]
        if rng.random() < 0.5:
            xp, xs = xp.T, xs.T
        op[k], os_[k] = relabel[xp], relabel[xs]
    return op.reshape(b, 81), os_.reshape(b, 81)


def add_givens(puzzles: np.ndarray, solutions: np.ndarray, target: np.ndarray, rng: np.random.Generator):
    """Reveal random blank cells until each puzzle has max(target, current) givens."""
    b = puzzles.shape[0]
    blank = puzzles == 0
    have = 81 - blank.sum(axis=1)
    need = np.maximum(target - have, 0)
    keys = np.where(blank, rng.random((b, 81)), 2.0)
    ranks = keys.argsort(axis=1).argsort(axis=1)
    reveal = blank & (ranks < need[:, None])
    return np.where(reveal, solutions, puzzles).astype(np.uint8)


def givens_range(progress: float, args) -> tuple[int, int]:
    lo_end = args.pool_givens[0]
    frac = min(1.0, progress / max(1e-9, args.curriculum_frac))
    lo = round(args.givens_start + (lo_end - args.givens_start) * frac)
    return lo, args.givens_max


def make_batch(pool, progress: float, args, rng: np.random.Generator):
    puzzles, solutions = pool
    idx = rng.integers(0, puzzles.shape[0], size=args.batch_size)
    p, s = augment_pairs(puzzles[idx], solutions[idx], rng)
    lo, hi = givens_range(progress, args)
    target = rng.integers(lo, hi + 1, size=args.batch_size)
    p = add_givens(p, s, target, rng)
    prompt = DIGIT_LUT[torch.from_numpy(p.astype(np.int64))]
    if rng.random() < args.bos_prob:
        prompt = torch.cat([torch.full((prompt.shape[0], 1), BOS_ID), prompt], dim=1)
    canvas = torch.full((s.shape[0], CANVAS_LENGTH), PAD_ID, dtype=torch.long)
    canvas[:, :81] = DIGIT_LUT[torch.from_numpy(s.astype(np.int64))]
    canvas[:, 81] = EOS_ID
    return prompt, canvas, int((p != 0).sum(axis=1).mean())


# ----------------------------------------------------------------------------------------- model

def build_model(size: ModelSize | str, seed: int):
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = build_config(size)
    model = DiffusionGemmaForBlockDiffusion(config).float()
    model.generation_config = build_generation_config()
    return model


def softcap(model, logits: torch.Tensor) -> torch.Tensor:
    cap = model.final_logit_softcapping
    logits = logits.float()
    return torch.tanh(logits / cap) * cap if cap else logits


def diffusion_loss(model, prompt, canvas, args, gen: torch.Generator):
    """(total loss, decoder CE, encoder CE) for one batch; see the module docstring."""
    from transformers import DynamicCache

    device = prompt.device
    b = prompt.shape[0]
    cache = DynamicCache(config=model.config.get_text_config())
    enc = model.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
    cache = enc.past_key_values

    t = torch.rand(b, 1, generator=gen, device=device)
    noise = torch.randint(0, VOCAB_SIZE, canvas.shape, generator=gen, device=device)
    corrupt = torch.rand(canvas.shape, generator=gen, device=device) < t
    noisy = torch.where(corrupt, noise, canvas)

    sc_mask = torch.rand(b, generator=gen, device=device) < args.self_cond_prob
    sc_logits = None
    if sc_mask.any():
        with torch.no_grad():
            sc_logits = model(past_key_values=cache, decoder_input_ids=noisy).logits.detach()
    out = model(
        past_key_values=cache,
        decoder_input_ids=noisy,
        self_conditioning_logits=sc_logits,
        self_conditioning_mask=sc_mask if sc_logits is not None else None,
    )
    dec_loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), canvas.reshape(-1))

    enc_logits = softcap(model, model.lm_head(enc.last_hidden_state))
    enc_loss = F.cross_entropy(enc_logits[:, :-1].reshape(-1, enc_logits.shape[-1]), prompt[:, 1:].reshape(-1))
    total = dec_loss + args.encoder_loss_weight * enc_loss
    return total, dec_loss.detach(), enc_loss.detach()


def progress_at(step: int, elapsed: float, args, phase: dict) -> float:
    """Fraction of the current phase done: by steps, or by minutes when --time-budget is set."""
    p = (step - phase["step"]) / max(1, args.steps - phase["step"])
    if args.time_budget:
        p = max(p, (elapsed - phase["elapsed"]) / (60.0 * args.time_budget))
    return min(1.0, p)


def lr_at(step: int, progress: float, args, phase: dict) -> float:
    step -= phase["step"]
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    warm = args.warmup / max(1, args.steps - phase["step"])
    frac = min(1.0, max(0.0, (progress - warm) / max(1e-9, 1 - warm)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------- checkpoints

# flags that change how a run trains, not what it trains: a rerun that differs only in them is the same phase
RUN_ONLY_FLAGS = ("threads", "device", "experts_implementation", "max_steps_this_run", "save_every", "log_every")


def same_phase(saved: dict, flags: dict) -> bool:
    """Whether two runs' flags (``runs`` in a checkpoint) set the same phase: its schedule, data and model."""
    def phase(f: dict) -> dict:
        return {k: v for k, v in f.items() if k not in RUN_ONLY_FLAGS}

    return phase(saved) == phase(flags)


def latest_checkpoint(workdir: Path) -> Path | None:
    p = workdir / "checkpoint.pt"
    return p if p.exists() else None


def save_checkpoint(workdir: Path, model, opt, step: int, args, np_rng, gen, py_state, elapsed: float = 0.0,
                    phase: dict | None = None, runs: list | None = None):
    state = {
        "runs": runs or [],  # each command that trained this checkpoint: its first step and its flags
        "elapsed": elapsed,
        "phase": phase or {"step": 0, "elapsed": 0.0},
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "size": args.size,
        "args": vars(args),
        "np_rng": np_rng.bit_generator.state,
        "torch_gen": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "py_rng": py_state,
    }
    tmp = workdir / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, workdir / "checkpoint.pt")
    # keep a copy of every 1000th step for later comparison
    if step % 1000 == 0:
        torch.save({"model": model.state_dict(), "step": step, "size": args.size}, workdir / f"model_step{step}.pt")


def export(checkpoint: Path, out_dir: Path) -> Path:
    """Write a clean save_pretrained folder (float32 safetensors, tokenizer, generation config)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_model(state["size"], seed=0)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model = model.float().eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = build_generation_config()
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer().save_pretrained(out_dir)
    info = {"step": state["step"], "size": state["size"], "size_params": size_to_dict(SIZES[state["size"]]),
            "runs": state.get("runs", [])}  # a checkpoint saved before runs were recorded has none
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    if args.export:
        ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(workdir)
        if ckpt is None:
            raise SystemExit(f"no checkpoint in {workdir}")
        out = export(ckpt, Path(args.export))
        print(f"exported {ckpt} -> {out}")
        return

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pool = load_pool(workdir, args.seed, args.pool_size, tuple(args.pool_givens))

    model = build_model(args.size, args.seed).to(device)
    if args.experts_implementation:
        model.set_experts_implementation(args.experts_implementation)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    np_rng = np.random.default_rng(args.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    random.seed(args.seed)
    step = 0
    elapsed0 = 0.0
    phase = {"step": 0, "elapsed": 0.0}  # where the schedule's current phase began
    runs: list = []
    flags = {k: v for k, v in vars(args).items() if k not in ("workdir", "export", "checkpoint", "no_progress")}

    ckpt = latest_checkpoint(workdir)
    if ckpt is not None:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["size"] != args.size:
            raise SystemExit(f"checkpoint in {workdir} is size {state['size']}, not {args.size}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        elapsed0 = state.get("elapsed", 0.0)
        np_rng.bit_generator.state = state["np_rng"]
        try:
            gen.set_state(state["torch_gen"].cpu())
        except RuntimeError:  # saved on another device type (a CPU run resumed on a GPU, or back)
            gen.manual_seed(args.seed + step)
        torch.set_rng_state(state["torch_rng"].cpu())
        random.setstate(state["py_rng"])
        phase = state.get("phase", phase)
        runs = state.get("runs", [])
        # the command of the phase that saved this checkpoint, rerun before that phase was done
        unfinished = runs and same_phase(runs[-1]["flags"], flags) and progress_at(step, elapsed0, args, phase) < 1
        if args.new_phase and unfinished:
            print("the checkpoint's phase had these flags and is not done: it goes on", file=sys.stderr)
        elif args.new_phase:
            phase = {"step": step, "elapsed": elapsed0}
        print(f"resumed from {ckpt} at step {step} (phase from step {phase['step']})", file=sys.stderr, flush=True)

    runs = runs + [{"start_step": step, "flags": flags}]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.size}: {n_params / 1e6:.2f}M parameters on {device}, {args.threads} thread(s)",
          file=sys.stderr, flush=True)

    log_path = workdir / "loss_log.jsonl"
    end = args.steps if args.max_steps_this_run is None else min(args.steps, step + args.max_steps_this_run)
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, dynamic_ncols=True, mininterval=5)
    acc = {"loss": 0.0, "dec": 0.0, "enc": 0.0, "n": 0, "givens": 0}
    t_last = t_start = time.time()
    elapsed = elapsed0
    with open(log_path, "a") as log:
        while step < end:
            elapsed = elapsed0 + time.time() - t_start
            progress = progress_at(step, elapsed, args, phase)
            if progress >= 1.0:
                break
            lr = lr_at(step, progress, args, phase)
            for g in opt.param_groups:
                g["lr"] = lr
            prompt, canvas, mean_givens = make_batch(pool, progress, args, np_rng)
            prompt, canvas = prompt.to(device), canvas.to(device)
            loss, dec, enc = diffusion_loss(model, prompt, canvas, args, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            step += 1
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}")
            acc["loss"] += loss.item()
            acc["dec"] += dec.item()
            acc["enc"] += enc.item()
            acc["givens"] += mean_givens
            acc["n"] += 1
            bar.update(1)
            if step % args.log_every == 0 or step == end:
                n = acc["n"]
                now = time.time()
                rec = {
                    "step": step, "loss": acc["loss"] / n, "decoder_loss": acc["dec"] / n,
                    "encoder_loss": acc["enc"] / n, "lr": lr, "grad_norm": float(grad_norm),
                    "mean_givens": acc["givens"] / n, "sec_per_step": (now - t_last) / n, "time": now,
                    "progress": progress, "elapsed_min": elapsed / 60,
                }
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", dec=f"{rec['decoder_loss']:.4f}", lr=f"{lr:.2e}",
                                giv=f"{rec['mean_givens']:.0f}")
                acc = {"loss": 0.0, "dec": 0.0, "enc": 0.0, "n": 0, "givens": 0}
                t_last = now
            if step % args.save_every == 0 or step == end:
                elapsed = elapsed0 + time.time() - t_start
                save_checkpoint(workdir, model, opt, step, args, np_rng, gen, random.getstate(), elapsed, phase, runs)
    elapsed = elapsed0 + time.time() - t_start
    save_checkpoint(workdir, model, opt, step, args, np_rng, gen, random.getstate(), elapsed, phase, runs)
    bar.close()
    print(f"stopped at step {step}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
