"""POST /v1/chat/completions: messages through the checkpoint's chat template, chat-shaped choices
(served by ``serving.serve``)."""

from __future__ import annotations

from fastapi import Request

from . import errors
from .choices import ChoiceResult, ChoiceSpec
from .images import ImageReader
from .protocol import ChatCompletionRequest
from .completions import TOKENIZE_IN_THREAD_CHARS
from .request_limits import PromptLimit
from .serving import EndpointNames, Prompts, off_loop, serve, unsupported

# Conversations with more messages than this, or more characters than TOKENIZE_IN_THREAD_CHARS, are
# rendered and tokenized off the event loop.
RENDER_IN_THREAD_MESSAGES = 32


class Chat:
    names = EndpointNames("chat", "chatcmpl", ChatCompletionRequest, "chat.completion", "chat.completion.chunk",
                          prompt_param="messages")

    def check(self, req: ChatCompletionRequest) -> None:
        rf_type = (req.response_format or {}).get("type", "text")
        unsupported(
            logprobs=(bool(req.logprobs) or bool(req.top_logprobs), "logprobs are not supported by this server."),
            tools=(bool(req.tools), "tools (function calling) are not supported by this server."),
            response_format=(rf_type != "text", f"response_format type '{rf_type}' is not supported; only 'text'."),
        )

    def num_prompts(self, req: ChatCompletionRequest) -> int:
        return 1

    def max_tokens(self, req: ChatCompletionRequest) -> tuple[int | None, str]:
        if req.max_completion_tokens is not None:
            return req.max_completion_tokens, "max_completion_tokens"
        return req.max_tokens, "max_tokens"

    async def prompts(self, req: ChatCompletionRequest, tokenizer, limit: PromptLimit, gate,
                      images: ImageReader) -> Prompts:
        messages = messages_as_dicts(req)
        # the template writes every message's content into the prompt: contents that cannot fit are
        # refused before anything is rendered
        content = "".join(text_of(m["content"]) for m in messages)
        limit.check_text(content, "messages", "the prompt")
        urls = image_urls(req)
        if urls:
            return await image_prompts(req, tokenizer, limit, gate, images, messages, urls)
        # rendering and tokenizing take a while on large bodies: those go off the event loop
        if len(messages) > RENDER_IN_THREAD_MESSAGES or len(content) > TOKENIZE_IN_THREAD_CHARS:
            ids, text = await off_loop(gate, lambda: apply_template(tokenizer, req, messages))
        else:
            ids, text = apply_template(tokenizer, req, messages)
        limit.check_tokens(len(ids), "messages", "the prompt")
        return Prompts([ids], text)

    def opening(self, spec: ChoiceSpec, prompts: Prompts) -> dict | None:
        return self.chunk_choice(spec.index, "", delta={"role": "assistant", "content": ""})

    def chunk_choice(self, index: int, text: str, finish_reason: str | None = None, delta: dict | None = None,
                     **extra) -> dict:
        """``text`` becomes ``delta.content`` (an empty delta when there is none)."""
        if delta is None:
            delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **extra}

    def response_choice(self, spec: ChoiceSpec, result: ChoiceResult, prompts: Prompts) -> dict:
        return {
            "index": spec.index,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }


CHAT = Chat()


async def create_chat_completion(request: Request):
    """OpenAI's chat completions: the messages through the checkpoint's chat template."""
    return await serve(request, CHAT)


def messages_as_dicts(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them. A message of text parts has their texts joined by
    newlines as its content; one with image parts keeps its parts, ``{"type": "text", "text": ...}``
    and ``{"type": "image"}`` (the template writes the processor's image token for each)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.content is None:
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            parts = []
            for j, part in enumerate(m.content):
                if part.type == "text" and part.text is not None:
                    parts.append({"type": "text", "text": part.text})
                elif part.type == "image_url" and part.image_url is not None:
                    parts.append({"type": "image"})
                elif part.type in ("text", "image_url"):
                    raise errors.bad_request(f"This {part.type} content part has no '{part.type}' field.",
                                             f"messages[{i}].content[{j}]")
                else:
                    raise errors.bad_request(f"Content parts must be text or image_url parts, got type '{part.type}'.",
                                             f"messages[{i}].content[{j}]")
            content = parts if any(p["type"] == "image" for p in parts) else "\n".join(p["text"] for p in parts)
        d = {"role": m.role, "content": content}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def text_of(content: str | list[dict]) -> str:
    """A message's text, without its images."""
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def image_urls(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(url, param naming its part) of every image part, in the order the template meets them."""
    return [(part.image_url.url, f"messages[{i}].content[{j}].image_url")
            for i, m in enumerate(req.messages) if isinstance(m.content, list)
            for j, part in enumerate(m.content) if part.type == "image_url" and part.image_url is not None]


async def image_prompts(req: ChatCompletionRequest, tokenizer, limit: PromptLimit, gate, images: ImageReader,
                        messages: list[dict], urls: list[tuple[str, str]]) -> Prompts:
    """A conversation with images: their number checked first, then (off the event loop) each read and
    decoded within the limits, the template rendered, and the text and images through the processor."""
    images.check_count(len(urls))

    def work():
        from engine.multimodal import process_images  # torch: loaded with the engine, not with the server

        pictures = [images.read(url, param) for url, param in urls]
        _, text = apply_template(tokenizer, req, messages)
        try:
            ids, inputs = process_images(images.processor, text, pictures)
        except ValueError as exc:  # e.g. the text holds more image tokens than there are images
            raise errors.bad_request(f"These messages cannot take their images: {exc}.", "messages") from None
        return ids, text, inputs

    ids, text, inputs = await off_loop(gate, work)
    limit.check_tokens(len(ids), "messages", "the prompt")
    return Prompts([ids], text, images=[inputs])


# Keys of apply_chat_template that would let a client swap the template (arbitrary Jinja: a CPU and
# memory bomb) or change what the server renders; anything else is passed to the checkpoint's template.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "add_generation_prompt", "continue_final_message", "conversation", "messages", "tools", "documents",
    "padding", "truncation", "max_length", "tokenizer_kwargs",
})


def template_kwargs(raw: dict | None) -> dict:
    """Extra variables for the checkpoint's own chat template: plain scalars only, no reserved keys."""
    kwargs = dict(raw or {})
    for key, value in kwargs.items():
        if key in RESERVED_TEMPLATE_KWARGS:
            raise errors.bad_request(f"chat_template_kwargs may not set '{key}'.", "chat_template_kwargs")
        if not (value is None or isinstance(value, (str, int, float, bool))) or (isinstance(value, str) and len(value) > 1024):
            raise errors.bad_request(
                f"chat_template_kwargs['{key}'] must be a string (at most 1024 characters), number, boolean or null.",
                "chat_template_kwargs",
            )
    return kwargs


def apply_template(tokenizer, req: ChatCompletionRequest, messages: list[dict] | None = None) -> tuple[list[int], str]:
    messages = messages_as_dicts(req) if messages is None else messages
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise errors.bad_request("continue_final_message needs the last message to be from the assistant.", "messages")
    kwargs = template_kwargs(req.chat_template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # jinja2 errors, a template that raises on a role, missing template
        raise errors.bad_request(f"The chat template could not render these messages: {exc}", "messages") from None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, text
