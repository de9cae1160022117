"""The official openai SDK against a live server (sync and async clients)."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest


CANVAS = 16  # TinySpec().canvas_length
SERVER_MODEL_NAME = "tiny-diffusion"  # the live_server fixture's --served-model-name


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient(live_server):
    return openai.AsyncOpenAI(base_url=live_server.base_url, api_key=live_server.api_key, max_retries=0, timeout=60)


def test_models_list_and_retrieve(client, live_server):
    assert live_server.model_name == SERVER_MODEL_NAME
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [SERVER_MODEL_NAME]
    assert models.data[0].object == "model"
    assert client.models.retrieve(SERVER_MODEL_NAME).id == SERVER_MODEL_NAME


def test_completion_length_and_usage(client):
    r = client.completions.create(model=SERVER_MODEL_NAME, prompt="Hello there", max_tokens=20, seed=7,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str) and r.choices[0].text
    assert r.usage.prompt_tokens == len("Hello there".encode())  # byte tokenizer, no bos added
    assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    extra = r.usage.model_extra
    assert extra["canvases"] == math.ceil(20 / CANVAS)
    assert extra["denoising_steps"] >= extra["canvases"]


def _stream_text(stream, n=1):
    texts = {i: "" for i in range(n)}
    finish = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        for c in chunk.choices:
            texts[c.index] += getattr(c, "text", None) or ""
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_completion_stream_equals_non_stream(client, seed):
    kwargs = dict(model=SERVER_MODEL_NAME, prompt="The sky is", max_tokens=40, seed=seed)
    full = client.completions.create(**kwargs)
    texts, finish, usage = _stream_text(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert texts[0] == full.choices[0].text
    assert finish[0] == full.choices[0].finish_reason
    assert usage.model_dump() == full.usage.model_dump()
    u = full.usage
    assert u.completion_tokens <= 40
    # every committed canvas holds CANVAS tokens except the last (trimmed at eos or max_tokens)
    assert u.model_extra["canvases"] == math.ceil(u.completion_tokens / CANVAS)
    if full.choices[0].finish_reason == "length":
        assert u.completion_tokens == 40


def test_completion_n2_and_prompt_list(client):
    kwargs = dict(model=SERVER_MODEL_NAME, prompt=["abc", "defg"], n=2, max_tokens=12, seed=100,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    assert full.usage.prompt_tokens == 3 + 4  # each prompt counted once, whatever n
    assert full.usage.completion_tokens == 4 * 12
    texts, finish, usage = _stream_text(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs), n=4
    )
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert usage.completion_tokens == 48
    # choice i uses seed + i: choice 1 of prompt 0 equals a single request with seed 101
    alone = client.completions.create(model=SERVER_MODEL_NAME, prompt="abc", max_tokens=12, seed=101,
                                      extra_body={"ignore_eos": True})
    assert alone.choices[0].text == full.choices[1].text
    alone3 = client.completions.create(model=SERVER_MODEL_NAME, prompt="defg", max_tokens=12, seed=103,
                                       extra_body={"ignore_eos": True})
    assert alone3.choices[0].text == full.choices[3].text


def test_choice_seeds_wrap_past_the_largest_seed(client):
    """seed + i wraps past 2**64 - 1 to 0: the largest seed with n=2 is valid, and its second choice is
    the request seeded 0."""
    kwargs = dict(model=SERVER_MODEL_NAME, prompt="abc", max_tokens=12, extra_body={"ignore_eos": True})
    both = client.completions.create(n=2, seed=2**64 - 1, **kwargs)
    assert both.choices[0].text == client.completions.create(seed=2**64 - 1, **kwargs).choices[0].text
    assert both.choices[1].text == client.completions.create(seed=0, **kwargs).choices[0].text


def test_completion_token_id_prompts_and_echo(client):
    ids = list(b"Hi!")
    by_text = client.completions.create(model=SERVER_MODEL_NAME, prompt="Hi!", max_tokens=8, seed=5)
    # the byte tokenizer maps byte b to id b + 5 (5 special tokens first)
    by_ids = client.completions.create(model=SERVER_MODEL_NAME, prompt=[b + 5 for b in ids], max_tokens=8, seed=5)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(model=SERVER_MODEL_NAME, prompt=[[b + 5 for b in ids]], max_tokens=8, seed=5, echo=True)
    assert echoed.choices[0].text == "Hi!" + by_text.choices[0].text
    texts, _, _ = _stream_text(client.completions.create(model=SERVER_MODEL_NAME, prompt="Hi!", max_tokens=8, seed=5,
                                                         echo=True, stream=True))
    assert texts[0] == echoed.choices[0].text


def test_stop_string_is_cut(client):
    # choose a stop string from the middle of an unconstrained output (the first seed whose random
    # bytes have a printable ASCII character there)
    for seed in range(9, 40):
        text = client.completions.create(model=SERVER_MODEL_NAME, prompt="x", max_tokens=48, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
        cut = next((i for i in range(5, len(text)) if text[i].isascii() and text[i].isprintable()), None)
        if cut is not None:
            break
    assert cut is not None, "no output with a printable ASCII character past position 5"
    stop = text[cut]
    r = client.completions.create(model=SERVER_MODEL_NAME, prompt="x", max_tokens=48, seed=seed, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]
    assert stop not in r.choices[0].text


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(model=SERVER_MODEL_NAME, messages=messages, max_completion_tokens=30, seed=11)
    assert full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert full.usage.completion_tokens <= 30
    stream = client.chat.completions.create(model=SERVER_MODEL_NAME, messages=messages, max_completion_tokens=30,
                                            seed=11, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    first = chunks[0]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_max_tokens_alias_and_n(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    a = client.chat.completions.create(model=SERVER_MODEL_NAME, messages=messages, max_tokens=10, n=2, seed=3,
                                       extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model=SERVER_MODEL_NAME, messages=messages, max_completion_tokens=10, n=2, seed=3,
                                       extra_body={"ignore_eos": True})
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 20
    assert a.choices[0].message.content != a.choices[1].message.content  # seeds 3 and 4


def test_requests_without_a_seed_are_random(client):
    """No seed: each choice, and each request, draws its own numbers (32 tokens of the random model: equal
    texts by chance are out of reach), where a seed repeats them."""
    common = dict(model=SERVER_MODEL_NAME, prompt="abc", max_tokens=32, extra_body={"ignore_eos": True})
    four = client.completions.create(**common, n=4)
    texts = [c.text for c in four.choices]
    assert len(set(texts)) == 4, texts
    again = client.completions.create(**common)
    assert again.choices[0].text not in texts
    seeded = [client.completions.create(**common, seed=9).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_diffusion_extension_fields_change_the_run(client):
    common = dict(model=SERVER_MODEL_NAME, prompt="abc", max_tokens=16, seed=21)
    few = client.completions.create(**common, extra_body={"max_denoising_steps": 2, "ignore_eos": True})
    assert few.usage.model_extra["denoising_steps"] <= 2
    many = client.completions.create(**common, extra_body={"max_denoising_steps": 12, "stability_threshold": 100,
                                                           "ignore_eos": True, "t_min": 0.3, "t_max": 0.9,
                                                           "entropy_bound": 0.2, "confidence_threshold": 0.001})
    assert many.usage.model_extra["denoising_steps"] == 12  # never stable: runs every step
    # temperature/top_p are accepted and do not change the diffusion sampling
    t = client.completions.create(**common, temperature=1.7, top_p=0.3, extra_body={"ignore_eos": True})
    plain = client.completions.create(**common, extra_body={"ignore_eos": True})
    assert t.choices[0].text == plain.choices[0].text


def test_sdk_iterates_draft_streams(client):
    stream = client.chat.completions.create(
        model=SERVER_MODEL_NAME, messages=[{"role": "user", "content": "hey"}], max_tokens=20, seed=4, stream=True,
        extra_body={"stream_drafts": True},
    )
    drafts = 0
    text = ""
    for chunk in stream:
        c = chunk.choices[0]
        ext = (c.model_extra or {}).get("diffusion")
        if ext is not None:
            drafts += 1
            assert c.delta.content is None and c.finish_reason is None
            assert {"canvas", "step", "max_steps", "draft", "changed", "changed_token_ids"} <= set(ext)
        text += c.delta.content or ""
    assert drafts >= 2
    plain = client.chat.completions.create(model=SERVER_MODEL_NAME, messages=[{"role": "user", "content": "hey"}],
                                           max_tokens=20, seed=4)
    assert text == plain.choices[0].message.content

    cstream = client.completions.create(model=SERVER_MODEL_NAME, prompt="hey", max_tokens=20, seed=4, stream=True,
                                        extra_body={"stream_drafts": True})
    ctext = ""
    cdrafts = 0
    for chunk in cstream:
        c = chunk.choices[0]
        if (c.model_extra or {}).get("diffusion") is not None:
            cdrafts += 1
            assert c.text == ""
        ctext += c.text
    assert cdrafts >= 2
    assert ctext == client.completions.create(model=SERVER_MODEL_NAME, prompt="hey", max_tokens=20, seed=4).choices[0].text


def test_async_client_and_concurrent_streams(aclient, client):
    """8+ concurrent streaming clients each get what they get alone (same seeds)."""
    prompts = [f"prompt number {i}" for i in range(10)]

    alone = {}
    for i, p in enumerate(prompts):
        r = client.completions.create(model=SERVER_MODEL_NAME, prompt=p, max_tokens=36, seed=1000 + i)
        alone[i] = r.choices[0].text

    async def one(i, p):
        stream = await aclient.completions.create(model=SERVER_MODEL_NAME, prompt=p, max_tokens=36, seed=1000 + i,
                                                  stream=True, extra_body={"stream_drafts": i % 2 == 0})
        text = ""
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
        return i, text

    async def chat_one(i):
        r = await aclient.chat.completions.create(model=SERVER_MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=20, seed=i)
        return r.choices[0].message.content

    async def main():
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        models = await aclient.models.list()
        chats = await asyncio.gather(chat_one(1), chat_one(1))
        return results, models, chats

    results, models, chats = asyncio.run(main())
    assert [m.id for m in models.data] == [SERVER_MODEL_NAME]
    for i, text in results:
        assert text == alone[i], f"client {i} differs from its solo run"
    assert chats[0] == chats[1]


def test_ignored_fields_change_nothing(client):
    """Fields the server accepts and ignores (temperature and top_p, which the t_max -> t_min schedule
    replaces; the penalties, which have no earlier canvas tokens to act on; OpenAI and vLLM fields it
    has no use for; unknown fields) leave the output as it is:
    the same seed gives the same text and usage with or without them."""
    plain = client.completions.create(model=SERVER_MODEL_NAME, prompt="same", max_tokens=24, seed=21)
    ignored = client.completions.create(
        model=SERVER_MODEL_NAME, prompt="same", max_tokens=24, seed=21, temperature=1.9, top_p=0.05,
        frequency_penalty=1.5, presence_penalty=-1.0, user="u1", best_of=1,
        extra_body={"repetition_penalty": 1.3, "some_future_field": {"nested": [1, 2]}})
    assert ignored.choices[0].text == plain.choices[0].text
    assert ignored.usage == plain.usage
    messages = [{"role": "user", "content": "same"}]
    chat_plain = client.chat.completions.create(model=SERVER_MODEL_NAME, messages=messages, max_tokens=24, seed=22)
    chat_ignored = client.chat.completions.create(
        model=SERVER_MODEL_NAME, messages=messages, max_tokens=24, seed=22, temperature=0.01, top_p=0.5,
        parallel_tool_calls=False, metadata={"a": "b"}, response_format={"type": "text"}, user="u2")
    assert chat_ignored.choices[0].message.content == chat_plain.choices[0].message.content
    assert chat_ignored.usage == chat_plain.usage
