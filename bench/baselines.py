"""Baselines: transformers' own ``model.generate``, one request at a time and as static batches."""

from __future__ import annotations

import time

import torch

from .workload import WorkItem


def load_baseline_model(path: str, load_format: str = "auto"):
    """The checkpoint as transformers alone loads it (its own attention and experts, not the engine's
    row-wise modules), in the server's dtype and on its device: bf16 on CUDA, fp32 on CPU. With
    ``load_format`` "dummy" (no weight files) the engine's loader builds the same random weights the
    server serves, with transformers' attention and experts (batch invariance off)."""
    from engine import EngineSettings
    from engine.loader import load_model, resolve_device, resolve_dtype

    if load_format == "dummy":
        return load_model(EngineSettings(model=path, load_format=load_format, batch_invariant=False)).model
    from transformers import DiffusionGemmaForBlockDiffusion

    device = resolve_device("auto")
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=resolve_dtype("auto", device))
    return model.to(device).eval()


def _generate(model, batch: list[WorkItem], pad_id: int) -> int:
    """Run ``batch`` through ``generate`` as one static batch. Returns the canvas steps it computed: the
    decoder's passes times the batch's rows (a row that has converged is still computed until every row
    has, and a row that asked for fewer canvases runs as many as the longest)."""
    width = max(len(it.prompt_ids) for it in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, it in enumerate(batch):
        ids[row, width - len(it.prompt_ids):] = torch.tensor(it.prompt_ids)
        mask[row, width - len(it.prompt_ids):] = 1
    kwargs = dict(
        max_new_tokens=max(it.max_tokens for it in batch),  # a static batch runs as long as its longest member
        max_denoising_steps=batch[0].max_denoising_steps,
        eos_token_id=None,  # fixed-length outputs, as the engine runs them with ignore_eos
    )
    if len(batch) > 1:
        kwargs["attention_mask"] = mask.to(model.device)
    torch.manual_seed(batch[0].seed)
    passes = 0

    def count(*_) -> None:
        nonlocal passes
        passes += 1

    hook = model.model.decoder.register_forward_hook(count)  # one call per denoising step of the whole batch
    try:
        with torch.inference_mode():
            model.generate(ids.to(model.device), **kwargs)
    finally:
        hook.remove()
    return passes * len(batch)


def one_at_a_time(model, items: list[WorkItem], pad_id: int) -> dict:
    """Committed tokens/s when requests run alone, one after another; ``canvas_steps``: the denoising
    steps the requests took, each alone (the work they need)."""
    t0 = time.perf_counter()
    steps = sum(_generate(model, [it], pad_id) for it in items)
    wall = time.perf_counter() - t0
    tokens = sum(it.max_tokens for it in items)
    return {"requests": len(items), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "canvas_steps": steps}


def static_batches(model, items: list[WorkItem], batch_size: int, pad_id: int) -> dict:
    """Committed tokens/s when requests run in fixed batches of ``batch_size`` (arrival order);
    ``canvas_steps``: the canvas steps the batches computed (``_generate``)."""
    t0 = time.perf_counter()
    steps = sum(_generate(model, items[start:start + batch_size], pad_id) for start in range(0, len(items), batch_size))
    wall = time.perf_counter() - t0
    tokens = sum(it.max_tokens for it in items)
    return {"requests": len(items), "batch_size": batch_size, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "canvas_steps": steps}
