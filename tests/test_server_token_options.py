"""logprobs, logit_bias and the penalties over HTTP, with the official openai SDK and raw httpx, on
the tiny random-weight server (the values themselves are checked against generate's logits in
test_engine_token_options.py)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests.conftest import parse_sse_json
from tools.tiny_checkpoint import SPECIAL_TOKENS

MODEL = "tiny-diffusion"  # the live_server fixture's --served-model-name


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.api_key, max_retries=0, timeout=60)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json={"model": MODEL, **body}, headers=server.headers, timeout=60)


def shown_bytes(token: str) -> bytes:
    """The bytes a token as logprobs show it adds to the text: its text, ``bytes:\\xNN...`` for a piece of
    a character, none for a special token the text skips."""
    if token in SPECIAL_TOKENS:
        return b""
    if token.startswith("bytes:"):
        return bytes.fromhex(token[len("bytes:"):].replace("\\x", ""))
    return token.encode()


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, seed=5, logprobs=3,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    lp = choice.logprobs
    n = r.usage.completion_tokens
    assert n == 20 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    # the random model writes random bytes: pieces of characters show as bytes:...
    assert b"".join(map(shown_bytes, lp.tokens)).decode(errors="replace") == choice.text
    assert any(t.startswith("bytes:") for t in lp.tokens)
    # text_offset: where each token's text starts in the choice's text (the pieces of a character all
    # start where it does): every token shown as text is found there
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    whole = [(t, o) for t, o in zip(lp.tokens, lp.text_offset)
             if not t.startswith("bytes:") and t not in SPECIAL_TOKENS]
    assert any(o > 0 for _, o in whole) and any(t.startswith("bytes:") for t in lp.tokens[:-1])
    for token, offset in whole:
        assert choice.text[offset:offset + len(token)] == token, (token, offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and math.isfinite(logprob)
        assert len(top) == 3 and top[token] == logprob  # the committed token is the step's argmax
        assert max(top.values()) == logprob


def test_text_offset_after_an_unfinished_character():
    """A token after the first byte of a character it does not finish starts after that byte's
    replacement character; one that finishes it starts where the character does."""
    from engine.outputs import TokenLogprob
    from server.logprobs import TextPosition, completion_logprobs
    from tools.tiny_checkpoint import build_byte_tokenizer

    tok = build_byte_tokenizer()
    lead, cont = (tok.convert_tokens_to_ids(t) for t in tok.convert_ids_to_tokens(tok("\u00e9").input_ids[-2:]))
    p, q = tok("p", add_special_tokens=False).input_ids + tok("q", add_special_tokens=False).input_ids
    for ids, offsets in (([p, lead, q, lead, cont, p], [0, 1, 2, 3, 3, 4]),  # "p\ufffdqép"
                         ([lead, lead, cont], [0, 1, 1])):  # "\ufffdé"
        text = tok.decode(ids)
        lp, _ = completion_logprobs([TokenLogprob(i, -1.0) for i in ids], tok, TextPosition())
        assert lp["text_offset"] == offsets, (text, lp["tokens"])
        assert [text[o] for o, t in zip(offsets, lp["tokens"]) if not t.startswith("bytes:")] == \
            [t[0] for t in lp["tokens"] if not t.startswith("bytes:")]


def test_alternatives_that_show_as_one_text_keep_the_better_value():
    """Gemma-style byte fallback: the piece "a" and the byte token <0x61> both show as "a"; in the completions
    shape (a mapping from text to value) the alternatives, best first, keep the better one's value."""
    from engine.outputs import TokenLogprob
    from server.logprobs import TextPosition, completion_logprobs
    from tests.test_engine_detokenizer import _byte_fallback_tokenizer

    tok = _byte_fallback_tokenizer()
    s, a, byte_a = (tok.convert_tokens_to_ids(t) for t in ("s", "a", "<0x61>"))
    lp, _ = completion_logprobs([TokenLogprob(s, -0.5, ((s, -0.5), (a, -1.0), (byte_a, -6.0)))], tok, TextPosition())
    assert lp["top_logprobs"] == [{"s": -0.5, "a": -1.0}]


def test_the_tokens_of_a_stop_string_keep_their_entries(client):
    """A stop string cuts the text before it, but the tokens that complete it count in completion_tokens
    and keep their logprobs entries: exactly those start at or past the end of the text (docs/api.md)."""
    base = dict(model=MODEL, prompt="Hello", max_tokens=48, seed=7, logprobs=1, extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    at = next(i for i in range(5, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[at:at + 2]
    r = client.completions.create(**{**base, "stop": [stop]})
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert (choice.finish_reason, choice.text) == ("stop", full[:full.index(stop)])
    assert len(lp.tokens) == len(lp.text_offset) == r.usage.completion_tokens
    first = next(k for k, offset in enumerate(lp.text_offset) if offset >= len(choice.text))
    assert "".join(lp.tokens[first:]) == stop  # one character a token here
    assert all(offset < len(choice.text) for offset in lp.text_offset[:first])


def test_completion_logprobs_zero(client):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, seed=5, logprobs=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert [len(t) for t in lp.top_logprobs] == [1] * 8  # the chosen token only
    assert [top[t] for top, t in zip(lp.top_logprobs, lp.tokens)] == lp.token_logprobs


def test_no_logprobs_unless_asked(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, seed=5)
    assert r.choices[0].logprobs is None
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8, seed=5)
    assert c.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_response(live_server):
    body = {"prompt": "Stream me", "max_tokens": 40, "seed": 9, "logprobs": 2, "ignore_eos": True}
    whole = post(live_server, "/completions", body).json()["choices"][0]["logprobs"]
    streamed = post(live_server, "/completions", {**body, "stream": True})
    chunks = [c for c in parse_sse_json(streamed.content) if isinstance(c, dict) and c.get("choices")]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"] is not None]
    assert len(parts) == 3  # one per committed canvas (16 + 16 + 8 tokens)
    joined = {key: [v for p in parts for v in p[key]] for key in whole}
    assert joined == whole


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                       seed=2, logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert bytes(b for t in content for b in t.bytes).decode(errors="replace") == r.choices[0].message.content
    for t in content:
        assert t.bytes == list(shown_bytes(t.token))
        assert len(t.top_logprobs) == 4 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == t.logprob
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                           seed=2, logprobs=True, extra_body={"ignore_eos": True})
    assert [t.top_logprobs for t in plain.choices[0].logprobs.content] == [[]] * 12
    assert plain.choices[0].message.content == r.choices[0].message.content  # logprobs change no token


def test_chat_stream_carries_logprobs(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                                            seed=2, logprobs=True, stream=True, extra_body={"ignore_eos": True})
    raw, text, count = b"", "", 0
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                raw += bytes(b for t in c.logprobs.content for b in t.bytes)
                count += len(c.logprobs.content)
    assert count == 20 and raw.decode(errors="replace") == text


def test_logit_bias_minus_100_removes_a_token(client):
    from tools.tiny_checkpoint import build_byte_tokenizer  # the tiny checkpoint's tokenizer

    def tokens(seed: int, bias=None) -> list[str]:
        r = client.completions.create(model=MODEL, prompt="abc", max_tokens=48, seed=seed, logit_bias=bias, logprobs=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].logprobs.tokens

    plain = tokens(0)
    common = max((t for t in plain if not t.startswith("bytes:")), key=plain.count)
    [token_id] = build_byte_tokenizer()(common, add_special_tokens=False).input_ids
    for seed in range(4):
        assert common not in tokens(seed, {str(token_id): -100})


def test_penalties_are_range_checked_and_ignored(live_server):
    base = {"prompt": "p", "max_tokens": 10, "seed": 1}
    plain = post(live_server, "/completions", base).json()["choices"][0]["text"]
    with_penalties = post(live_server, "/completions", {**base, "presence_penalty": 1.5, "frequency_penalty": -2})
    assert with_penalties.status_code == 200 and with_penalties.json()["choices"][0]["text"] == plain
    r = post(live_server, "/completions", {**base, "frequency_penalty": 2.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frequency_penalty"


def test_logprobs_stay_finite_under_a_large_bias(live_server, client):
    """logit_bias +100 puts every other token's probability below float32's range; their
    log-probabilities stay finite numbers (JSON has no -Infinity), streamed or not."""
    body = {"prompt": "Hello", "max_tokens": 8, "seed": 1, "logprobs": 5, "logit_bias": {"100": 100}}
    r = post(live_server, "/completions", body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert all(math.isfinite(v) for top in lp["top_logprobs"] for v in top.values())
    assert min(v for top in lp["top_logprobs"] for v in top.values()) < -100  # far below, and still a number
    streamed = post(live_server, "/completions", {**body, "stream": True})
    assert b"Infinity" not in streamed.content and b"NaN" not in streamed.content
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                          seed=1, logprobs=True, top_logprobs=3, logit_bias={"100": 100})
    assert all(math.isfinite(a.logprob) for t in chat.choices[0].logprobs.content for a in t.top_logprobs)


def test_special_tokens_add_nothing_to_the_text(client):
    """A committed special token the text skips (here <pad>, made near-certain by a bias) is listed with
    its log-probability but adds no characters to text_offset and has no bytes (null in chat)."""
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, seed=1, logprobs=0,
                                  logit_bias={"0": 30}, extra_body={"ignore_eos": True, "t_min": 1, "t_max": 2})
    lp = r.choices[0].logprobs
    assert "<pad>" in lp.tokens
    chars = [0 if t.startswith("bytes:") or t in SPECIAL_TOKENS else len(t) for t in lp.tokens]
    assert lp.text_offset == [sum(chars[:i]) for i in range(len(chars))]
    assert b"".join(map(shown_bytes, lp.tokens)).decode(errors="replace") == r.choices[0].text
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=6, seed=1,
                                       logprobs=True, logit_bias={"0": 30},
                                       extra_body={"ignore_eos": True, "t_min": 1, "t_max": 2})
    pads = [t for t in c.choices[0].logprobs.content if t.token == "<pad>"]
    assert pads and all(t.bytes is None for t in pads)  # OpenAI: null where a token has no bytes
