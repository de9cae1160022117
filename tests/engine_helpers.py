"""Helpers shared by the engine tests: tiny checkpoints (a poisoned one), the transformers reference, a driver."""

from __future__ import annotations

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model


POISON = 200  # a byte token whose *encoder* embedding row is NaN in a poisoned checkpoint


BOOM = [201] * 6  # a prompt tail that makes the encoder raise under ``fail_encoder_on_boom``


def fail_encoder_on_boom(core: EngineCore, monkeypatch) -> None:
    """Make ``core``'s encoder raise (as an out-of-memory error would) on any call whose input holds
    ``BOOM``: the encoder work of a prompt ending in it, prefilled in chunks or not, fails."""
    encoder = core.loaded.model.model.encoder
    forward = encoder.forward

    def failing_forward(*args, input_ids=None, **kwargs):
        if input_ids is not None and bool(((input_ids == BOOM[0]).sum(dim=-1) >= len(BOOM)).any()):
            raise RuntimeError("out of memory")
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(encoder, "forward", failing_forward)


def untie_weights(model) -> None:
    """Give every tied weight its own tensor (the lm head and the decoder's embedding, the encoder's
    layers and the decoder's) and mark the config untied, so that one side can be changed alone.

    ``save_pretrained`` writes a tied weight once; with ``tie_word_embeddings=False`` the loader would
    then find the encoder's weights missing and initialise them at random. Cloned first, every weight
    is written and loads back as it was (``save_untied`` checks)."""
    model.config.tie_word_embeddings = False
    seen = set()
    for _, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in seen:
                module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
            else:
                seen.add(id(param))


def save_untied(model, path, dtype) -> None:
    """``save_pretrained`` a model changed after ``untie_weights``; checks every weight loads back."""
    from transformers import DiffusionGemmaForBlockDiffusion

    model.save_pretrained(path)
    _, info = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info


def build_poisoned_checkpoint(path, dtype: torch.dtype = torch.float32):
    """A real tiny checkpoint (float32 by default, as users run) with untied embeddings and one NaN row
    (``POISON``) in the encoder's table: any prompt containing that token fills its own KV with NaN and
    gets non-finite logits; nothing else is affected."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    path = build_tiny_checkpoint(path, TinySpec(dtype=dtype))
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, experts_implementation="eager")
    untie_weights(model)
    with torch.no_grad():
        model.model.encoder.language_model.embed_tokens.weight[POISON] = float("nan")
    save_untied(model, path, dtype)
    return path


def make_core(path, dtype: str = "float64", **overrides) -> EngineCore:
    """An engine over ``path``, in float64 unless ``dtype`` says otherwise ("auto": float32 on CPU, as users
    run): float64 where a test compares with generate on the near-flat random model's logits."""
    settings = EngineSettings(model=str(path), dtype=dtype, **overrides)
    return EngineCore(load_model(settings), settings)


_STOCK_MODELS: dict[tuple, object] = {}


def reference_model(core: EngineCore):
    """The core's checkpoint as transformers alone loads it, in the core's dtype and on its device: its own
    attention and experts, not the engine's row-wise modules (registered into transformers), so that
    ``generate`` on it is a reference independent of the code under test."""
    from transformers import DiffusionGemmaForBlockDiffusion

    loaded = core.loaded
    key = (core.settings.model, loaded.dtype, str(loaded.device))
    if key not in _STOCK_MODELS:
        # no float64 grouped_mm; in half precision grouped_mm rounds otherwise than eager, which the engine's
        # experts match
        eager = loaded.dtype in (torch.float64, torch.bfloat16, torch.float16)
        kwargs = {"experts_implementation": "eager"} if eager else {}
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(core.settings.model, dtype=loaded.dtype, **kwargs)
        assert model.config._experts_implementation in ("grouped_mm", "eager"), model.config._experts_implementation
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
        _STOCK_MODELS[key] = model.to(loaded.device).eval()
    return _STOCK_MODELS[key]


def reference_tokens(model, prompt: list[int], seed: int, params: SamplingParams) -> list[int]:
    """What ``model.generate`` gives at batch 1 after ``torch.manual_seed(seed)``, trimmed like the server:
    the first ``max_tokens`` tokens, cut after the first eos (the reference pads after it)."""
    return reference_run(model, prompt, seed, params)[0]


def reference_run(model, prompt: list[int], seed: int, params: SamplingParams,
                  logits_processor=None, **inputs) -> tuple[list[int], int | None]:
    """``reference_tokens`` and the number of decoder passes ``generate`` ran for the request (from its
    ``tokens_per_forward``, generated non-pad tokens per pass; None when it generated only pads).
    ``logits_processor``: a ``LogitsProcessorList`` generate applies before its temperature schedule;
    ``inputs``: more model inputs for ``generate`` (an image prompt's ``pixel_values`` and the like)."""
    kwargs = dict(max_new_tokens=params.max_tokens, logits_processor=logits_processor, **inputs)
    for name in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
        if getattr(params, name) is not None:
            kwargs[name] = getattr(params, name)
    if params.entropy_bound is not None:
        kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(params.entropy_bound))
    if params.eos_token_ids is not None:
        kwargs["eos_token_id"] = list(params.eos_token_ids)
    torch.manual_seed(seed)
    result = model.generate(torch.tensor([prompt], device=model.device), **kwargs)
    generated = result.sequences[0, len(prompt):]
    non_pad = int((generated != model.generation_config.pad_token_id).sum())
    per_pass = float(result.tokens_per_forward[0])
    passes = round(non_pad / per_pass) if per_pass > 0 else None
    out = generated.tolist()[: params.max_tokens]
    eos = set(params.eos_token_ids if params.eos_token_ids is not None else model.generation_config.eos_token_id)
    for i, tok in enumerate(out):
        if tok in eos:
            return out[: i + 1], passes
    return out, passes


class DecoderOutputs:
    """Records, while active, the final hidden states of every decoder pass (the sampler's input) of the
    engine ``core`` and of ``generate`` on ``reference`` (the decoder norm's output), to compare them
    bitwise: equal tokens can hide last-bit differences on near-flat models, equal hidden states cannot."""

    def __init__(self, core: EngineCore, reference):
        self.core, self.reference = core, reference
        self.engine: list[torch.Tensor] = []
        self.generate: list[torch.Tensor] = []

    def __enter__(self) -> "DecoderOutputs":
        sampler = self.core.runner.sampler
        sample = sampler.sample

        def spy(hidden, work):
            self.engine.append(hidden.detach().clone())
            return sample(hidden, work)

        sampler.sample = spy
        self._hook = self.reference.model.decoder.norm.register_forward_hook(
            lambda module, inputs, output: self.generate.append(output.detach().clone()))
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        del self.core.runner.sampler.sample  # the class's method again

    def differing_passes(self) -> list[int]:
        """The passes whose hidden states differ (every pass when the counts differ)."""
        if len(self.engine) != len(self.generate):
            return list(range(max(len(self.engine), len(self.generate))))
        return [i for i, (a, b) in enumerate(zip(self.engine, self.generate)) if not torch.equal(a, b)]


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
