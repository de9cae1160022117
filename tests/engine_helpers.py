"""Helpers shared by the engine tests: a float64 tiny checkpoint, the transformers reference, a driver."""

from __future__ import annotations

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model


POISON = 200  # a byte token whose *encoder* embedding row is NaN in a poisoned checkpoint


def build_poisoned_checkpoint(path):
    """A real float64 tiny checkpoint with untied embeddings and one NaN row (``POISON``) in the
    encoder's table: any prompt containing that token fills its own KV with NaN and gets non-finite
    logits; nothing else is affected."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    path = build_tiny_checkpoint(path, TinySpec(dtype=torch.float64))
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float64, experts_implementation="eager")
    model.config.tie_word_embeddings = False
    table = model.model.encoder.language_model.embed_tokens
    weight = table.weight.detach().clone()
    weight[POISON] = float("nan")
    table.weight = torch.nn.Parameter(weight)
    model.save_pretrained(path)
    return path


def make_core(path, **overrides) -> EngineCore:
    settings = EngineSettings(model=str(path), dtype="float64", **overrides)
    return EngineCore(load_model(settings), settings)


def reference_tokens(model, prompt: list[int], seed: int, params: SamplingParams) -> list[int]:
    """What ``model.generate`` gives at batch 1 after ``torch.manual_seed(seed)``, trimmed like the server:
    the first ``max_tokens`` tokens, cut after the first eos (the reference pads after it)."""
    kwargs = dict(max_new_tokens=params.max_tokens)
    for name in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
        if getattr(params, name) is not None:
            kwargs[name] = getattr(params, name)
    if params.entropy_bound is not None:
        kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(params.entropy_bound))
    if params.eos_token_ids is not None:
        kwargs["eos_token_id"] = list(params.eos_token_ids)
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt], device=model.device), **kwargs).sequences[0, len(prompt):].tolist()
    out = out[: params.max_tokens]
    eos = set(params.eos_token_ids if params.eos_token_ids is not None else model.generation_config.eos_token_id)
    for i, tok in enumerate(out):
        if tok in eos:
            return out[: i + 1]
    return out


def run_to_completion(core: EngineCore, requests, arrivals: dict | None = None):
    """Drive ``core`` pass by pass. ``requests``: [(request_id, prompt, SamplingParams)].
    ``arrivals`` maps request_id -> pass index at which it is submitted (default 0).
    Returns {request_id: dict(tokens, finish_reason, finished_pass, first_pass, outputs)}."""
    arrivals = arrivals or {}
    pending = sorted(requests, key=lambda r: arrivals.get(r[0], 0))
    results = {rid: dict(tokens=[], finish_reason=None, finished_pass=None, first_pass=None, outputs=[]) for rid, _, _ in requests}
    passes = 0
    while pending or core.has_work():
        while pending and arrivals.get(pending[0][0], 0) <= passes:
            rid, prompt, params = pending.pop(0)
            core.add_request(rid, prompt, core.resolve(prompt, params))
        outputs = core.step()
        passes += 1
        for out in outputs:
            res = results[out.request_id]
            res["outputs"].append(out)
            res["tokens"].extend(out.token_ids)
            if res["first_pass"] is None:
                res["first_pass"] = passes
            if out.finished:
                res["finish_reason"] = out.finish_reason
                res["finished_pass"] = passes
    return results
