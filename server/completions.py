"""POST /v1/completions: OpenAI's text completion request and choices (served by ``serving.serve``)."""

from __future__ import annotations

from fastapi import Request

from . import errors
from .choices import ChoiceResult, ChoiceSpec
from .logprobs import TextPosition, completion_logprobs
from .protocol import CompletionRequest
from .request_limits import PromptLimit, where
from .request_log import LOG_TEXT_LIMIT
from .serving import EndpointNames, Prompts, plain_stream_choices, serve, unsupported

# Prompts longer than this (in characters, all together) are tokenized off the event loop.
TOKENIZE_IN_THREAD_CHARS = 20000


class Completions:
    names = EndpointNames("completions", "cmpl", CompletionRequest, "text_completion", "text_completion",
                          prompt_param="prompt", token_prompts=True)

    def check(self, req: CompletionRequest, settings) -> None:
        unsupported(
            best_of=(req.best_of is not None and req.best_of > 1, "best_of > 1 is not supported; use n."),
            # OpenAI's echo gives the prompt's tokens log-probabilities too; a diffusion model has none for them
            logprobs=(req.logprobs is not None and bool(req.echo),
                      "logprobs with echo is not supported: this model gives no log-probabilities for prompt tokens."),
        )

    def logprobs(self, req: CompletionRequest) -> int | None:
        return req.logprobs

    def logprobs_object(self, entries, tokenizer, position: TextPosition) -> tuple[dict, TextPosition]:
        return completion_logprobs(entries, tokenizer, position)

    def num_prompts(self, req: CompletionRequest) -> int:
        """Prompts in any of OpenAI's four shapes (a string, token ids, or a list of either)."""
        prompt = req.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return 1
        return len(prompt)

    def max_tokens(self, req: CompletionRequest) -> tuple[int | None, str]:
        return req.max_tokens, "max_tokens"

    async def prompts(self, req: CompletionRequest, tokenizer, limit: PromptLimit, gate,
                      images) -> Prompts:  # completion prompts have no images
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise errors.bad_request("prompt must not be empty.", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        suffix_ids = ()
        if req.suffix:  # infill, before any prompt is tokenized: it must fit in one canvas (the engine checks it)
            limit.check_suffix_text(req.suffix)

            def encode_suffix():
                return tuple(tokenizer(req.suffix, add_special_tokens=False)["input_ids"])

            long = len(req.suffix) > TOKENIZE_IN_THREAD_CHARS  # only without a character bound (an odd tokenizer)
            suffix_ids = await gate.run(encode_suffix) if long else encode_suffix()
        count = len(prompt)
        if isinstance(prompt[0], str):
            texts = list(prompt)
            for i, t in enumerate(texts):  # a prompt that cannot fit is refused before any is tokenized
                limit.check_text(t, "prompt", where(i, count))

            def encode():
                out = []
                for i, t in enumerate(texts):
                    ids_i = list(tokenizer(t, add_special_tokens=True)["input_ids"])
                    limit.check_tokens(len(ids_i), "prompt", where(i, count))
                    out.append(ids_i)
                return out

            ids = await gate.run(encode) if sum(map(len, texts)) > TOKENIZE_IN_THREAD_CHARS else encode()
        else:
            ids = [list(p) for p in prompt]
            for i, p in enumerate(ids):
                if not p:
                    raise errors.bad_request("prompt token lists must not be empty.",
                                             f"prompt[{i}]" if len(ids) > 1 else "prompt")
                limit.check_tokens(len(p), "prompt", where(i, count))
            texts = [None] * len(ids)
        prefixes = list(texts) if req.echo else None  # token prompts' text once the engine checked their ids

        def log_text() -> str:
            return " | ".join(t if t is not None else str(p[:LOG_TEXT_LIMIT]) for t, p in zip(texts, ids))

        return Prompts(ids, log_text, prefixes, suffix_ids)

    def opening(self, spec: ChoiceSpec, prompts: Prompts) -> dict | None:
        return None if prompts.prefixes is None else self.chunk_choice(spec.index, prompts.prefixes[spec.prompt_index])

    def chunk_choice(self, index: int, text: str, finish_reason: str | None = None, **extra) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, **extra}

    def response_choice(self, spec: ChoiceSpec, result: ChoiceResult, prompts: Prompts) -> dict:
        echo = "" if prompts.prefixes is None else prompts.prefixes[spec.prompt_index]
        return self.chunk_choice(spec.index, echo + result.text, result.finish_reason)

    def stream_choices(self, prompts: Prompts):
        return plain_stream_choices(self)


COMPLETIONS = Completions()


async def create_completion(request: Request):
    """OpenAI's text completions: one choice per prompt and `n`, as JSON or server-sent events."""
    return await serve(request, COMPLETIONS)
