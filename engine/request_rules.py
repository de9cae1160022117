"""RequestRules: what a request must satisfy before the engine takes it, as plain data.

The engine core holds one; a front that serves several engine processes (``engine.replicas``)
holds a copy and refuses bad requests without asking any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import InvalidRequestError
from .kv_budget import fits_alone, kv_reservation, most_max_tokens_alone
from .multimodal import ImageInputs, check_images
from .sampling_params import SamplingParams, validate_resolved


@dataclass(frozen=True)
class RequestRules:
    """The checkpoint's limits and defaults and the engine's budgets, as a request meets them."""

    canvas_length: int
    vocab_size: int
    max_model_len: int
    defaults: SamplingParams  # the checkpoint's generation config, fully resolved
    model_config: object  # the checkpoint's transformers config (image placeholders, vision tower)
    max_images_per_prompt: int
    max_encoder_tokens: int
    max_num_seqs: int
    max_num_kv_tokens: int

    def resolve(self, prompt_ids: list[int], params: SamplingParams, *, prompt_checked: bool = False,
                images: ImageInputs | None = None) -> SamplingParams:
        """Fill defaults and validate; raises ``InvalidRequestError`` before any work is done.

        ``prompt_checked=True`` skips the per-token vocabulary check of a prompt that an earlier
        ``resolve`` call already accepted (the server resolves once per prompt, not per choice).
        ``images``: the prompt's images (``engine.multimodal``), checked against its placeholders.
        """
        if params.infill_suffix and params.max_tokens is None:  # the gap fills the canvas up to the suffix
            if len(params.infill_suffix) >= self.canvas_length:
                raise InvalidRequestError(
                    f"the suffix has {len(params.infill_suffix)} tokens: an infill is written in one canvas of "
                    f"{self.canvas_length} tokens and needs at least one free position before its suffix", "suffix")
            params = replace(params, max_tokens=self.canvas_length - len(params.infill_suffix))
        resolved = params.resolve(self.defaults)
        if not prompt_checked:
            self.check_prompt(prompt_ids)
            if images is not None:
                check_images(images, prompt_ids, self.model_config, max_images=self.max_images_per_prompt,
                             max_encoder_tokens=self.max_encoder_tokens)
        validate_resolved(resolved, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                          prompt_len=len(prompt_ids), canvas_length=self.canvas_length)
        self._check_kv_budget(len(prompt_ids), resolved.max_tokens)
        return resolved

    def _check_kv_budget(self, prompt_len: int, max_tokens: int) -> None:
        """A request must fit the KV budget with nothing else running: 400 ``limit_exceeded`` naming the
        prompt when it alone is over it, else ``max_tokens`` with the most that would fit."""
        budget, canvas = self.max_num_kv_tokens, self.canvas_length
        need = kv_reservation(prompt_len, max_tokens, canvas)
        if fits_alone(need, self.max_num_seqs, budget):
            return
        where = (f"this server's KV budget for one request ({budget} tokens; settings max_num_kv_tokens and "
                 "memory_fraction)")
        most = most_max_tokens_alone(prompt_len, canvas, budget)
        if most == 0:
            raise InvalidRequestError(f"the prompt alone needs {prompt_len} KV tokens, more than {where}",
                                      "prompt", "limit_exceeded")
        raise InvalidRequestError(
            f"the prompt and max_tokens need {need} KV tokens (the prompt and every canvas of {canvas} but the "
            f"last), more than {where}: with this prompt, max_tokens can be at most {most}", "max_tokens",
            "limit_exceeded")

    def check_prompt(self, prompt_ids) -> None:
        """Every prompt token must be an int in [0, vocab). C-speed min/max after a type check."""
        if any(type(t) is not int for t in prompt_ids):
            bad = next(t for t in prompt_ids if type(t) is not int)
            raise InvalidRequestError(f"prompt token id {bad!r} is not an integer", "prompt")
        if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size):
            bad = min(prompt_ids) if min(prompt_ids) < 0 else max(prompt_ids)
            raise InvalidRequestError(
                f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})", "prompt"
            )
