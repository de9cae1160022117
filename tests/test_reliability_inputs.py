"""Bad inputs against a real server with tight limits: every one gets its exact OpenAI-shaped error,
and the server stays healthy. Also CORS, X-Request-Id, and a bounded schemathesis run against the
server's own OpenAPI document."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

PROMPT_TOKENS = ("diffusion_server:prompt_tokens_total", frozenset())

KEY = "rel-key-1"
OTHER_KEY = "rel-key-2"
MODEL = "rel-tiny"
BODY_LIMIT = 65536
ORIGIN = "https://allowed.example"  # as a browser sends it; configured as people paste it:
CONFIGURED_ORIGIN = "HTTPS://Allowed.Example:443/"

LIMIT_ARGS = [
    "--served-model-name", MODEL, "--api-key", KEY, "--api-key", OTHER_KEY,
    "--max-request-body-bytes", str(BODY_LIMIT), "--max-model-len", "160",
    "--max-prompt-tokens", "64", "--max-completion-tokens", "128", "--max-n", "4",
    "--max-prompts-per-request", "4", "--max-request-tokens", "256", "--max-stop-length", "16",
    "--max-json-depth", "8", "--max-json-values", "20500", "--max-request-denoising-steps", "32",
    "--max-tools", "2", "--max-tools-chars", "200", "--max-choices-per-request", "8",
    "--max-template-kwarg-chars", "16", "--max-logprob-entries", "600", "--max-logit-bias", "200",
    "--cors-allow-origin", CONFIGURED_ORIGIN,
    "--max-num-seqs", "4", "--no-ui",
]


def limit_flag(flag: str) -> int:
    """The value LIMIT_ARGS gives ``flag``."""
    return int(LIMIT_ARGS[LIMIT_ARGS.index(flag) + 1])


@pytest.fixture(scope="module")
def limits_server(server_launcher, server_tiny_checkpoint):
    return server_launcher(["--model", str(server_tiny_checkpoint), *LIMIT_ARGS], api_key=KEY, model_name=MODEL)


def assert_error(r: httpx.Response, status: int, type_: str, param, code, needle: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert (err["type"], err["param"], err["code"]) == (type_, param, code), err
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    if needle is not None:
        assert needle in err["message"], err
    return err


C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "x"}]
TOOL = {"type": "function", "function": {"name": "f", "description": "d"}}
IRE = "invalid_request_error"


def raw(b: bytes):
    return ("raw", b)


def deep(levels: int) -> bytes:
    return b'{"prompt": "hi", "x": ' + b"[" * levels + b"1" + b"]" * levels + b"}"


# (id, method, path, body (dict, or raw(bytes)), headers override or None, status, type, param, code, needle)
CASES = [
    # -- not JSON, or JSON we refuse ---------------------------------------------------------------
    ("not-json", "POST", C, raw(b"{not json"), None, 400, IRE, None, "invalid_json", "not valid JSON"),
    ("empty-body", "POST", C, raw(b""), None, 400, IRE, None, "invalid_json", "not valid JSON"),
    ("array-body", "POST", C, raw(b"[1, 2]"), None, 400, IRE, None, "invalid_json", "must be a JSON object"),
    ("string-body", "POST", C, raw(b'"text"'), None, 400, IRE, None, "invalid_json", "must be a JSON object"),
    ("null-body", "POST", CH, raw(b"null"), None, 400, IRE, None, "invalid_json", "must be a JSON object"),
    ("nan", "POST", C, raw(b'{"prompt": "hi", "temperature": NaN}'), None, 400, IRE, None, "invalid_json", "NaN"),
    ("infinity", "POST", C, raw(b'{"prompt": "hi", "entropy_bound": -Infinity}'), None, 400, IRE, None,
     "invalid_json", "Infinity"),
    ("float-overflow", "POST", C, raw(b'{"prompt": "hi", "top_p": 1e999}'), None, 400, IRE, None, "invalid_json",
     "out of range"),
    ("int-5000-digits", "POST", C, raw(b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"), None, 400, IRE, None,
     "invalid_json", "not valid JSON"),
    ("invalid-utf8", "POST", C, raw(b'{"prompt": "\xff\xfe abc"}'), None, 400, IRE, None, "invalid_json", "utf-8"),
    ("lone-surrogate", "POST", C, raw(b'{"prompt": "a\\ud800b"}'), None, 400, IRE, None, "invalid_json", "surrogate"),
    ("too-deep", "POST", C, raw(deep(8)), None, 400, IRE, None, "json_too_deep", "max_json_depth"),
    ("far-too-deep", "POST", C, raw(deep(20000)), None, 400, IRE, None, "json_too_deep", "max_json_depth"),
    ("body-too-large", "POST", C, {"prompt": "x" * (BODY_LIMIT + 1)}, None, 413, IRE, None, "request_too_large",
     str(BODY_LIMIT)),
    # -- schema: missing fields, wrong types -------------------------------------------------------
    ("missing-prompt", "POST", C, {"max_tokens": 4}, None, 400, IRE, "prompt", None, "Field required"),
    ("prompt-number", "POST", C, {"prompt": 5}, None, 400, IRE, "prompt", None, None),
    ("prompt-null", "POST", C, {"prompt": None}, None, 400, IRE, "prompt", None, None),
    ("prompt-floats", "POST", C, {"prompt": [1.5, 2]}, None, 400, IRE, "prompt", None, None),
    ("max-tokens-string", "POST", C, {"prompt": "hi", "max_tokens": "10"}, None, 400, IRE, "max_tokens", None, None),
    ("max-tokens-float", "POST", C, {"prompt": "hi", "max_tokens": 1.5}, None, 400, IRE, "max_tokens", None, None),
    ("max-tokens-bool", "POST", C, {"prompt": "hi", "max_tokens": True}, None, 400, IRE, "max_tokens", None, None),
    ("n-zero", "POST", C, {"prompt": "hi", "n": 0}, None, 400, IRE, "n", None, "greater than or equal to 1"),
    ("temperature-negative", "POST", C, {"prompt": "hi", "temperature": -1}, None, 400, IRE, "temperature", None, None),
    ("temperature-string", "POST", C, {"prompt": "hi", "temperature": "hot"}, None, 400, IRE, "temperature", None, None),
    # numbers only, as OpenAI's API: a numeric string is not a number either
    ("temperature-numeric-string", "POST", C, {"prompt": "hi", "temperature": "0.5"}, None, 400, IRE, "temperature",
     None, "valid number"),
    ("entropy-bound-numeric-string", "POST", CH, {"messages": MSG, "entropy_bound": "0.1"}, None, 400, IRE,
     "entropy_bound", None, "valid number"),
    ("logit-bias-numeric-string", "POST", C, {"prompt": "hi", "logit_bias": {"5": "1"}}, None, 400, IRE,
     "logit_bias[5]", None, "valid number"),
    ("top-p-2", "POST", C, {"prompt": "hi", "top_p": 2}, None, 400, IRE, "top_p", None, None),
    ("stream-string", "POST", C, {"prompt": "hi", "stream": "yes"}, None, 400, IRE, "stream", None, None),
    ("stop-five", "POST", C, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, 400, IRE, "stop", None,
     "at most 4 stop sequences"),
    ("stop-int", "POST", C, {"prompt": "hi", "stop": [1]}, None, 400, IRE, "stop", None, None),
    ("seed-string", "POST", C, {"prompt": "hi", "seed": "1"}, None, 400, IRE, "seed", None, None),
    ("messages-empty", "POST", CH, {"messages": []}, None, 400, IRE, "messages", None, None),
    ("messages-string", "POST", CH, {"messages": "hi"}, None, 400, IRE, "messages", None, None),
    ("role-unknown", "POST", CH, {"messages": [{"role": "robot", "content": "x"}]}, None, 400, IRE,
     "messages[0].role", None, None),
    ("role-missing", "POST", CH, {"messages": [{"content": "x"}]}, None, 400, IRE, "messages[0].role", None,
     "Field required"),
    ("content-number", "POST", CH, {"messages": [{"role": "user", "content": 5}]}, None, 400, IRE,
     "messages[0].content", None, None),
    # -- semantics and values ---------------------------------------------------------------------
    ("stream-options-no-stream", "POST", C, {"prompt": "hi", "stream_options": {"include_usage": True}}, None, 400,
     IRE, "stream_options", None, "only allowed when stream is true"),
    ("stream-options-no-stream-chat", "POST", CH, {"messages": MSG, "stream": False,
                                                   "stream_options": {"include_usage": True}}, None, 400, IRE,
     "stream_options", None, "only allowed when stream is true"),
    ("max-tokens-negative", "POST", C, {"prompt": "hi", "max_tokens": -1}, None, 400, IRE, "max_tokens", None,
     "positive integer"),
    ("max-tokens-zero", "POST", C, {"prompt": "hi", "max_tokens": 0}, None, 400, IRE, "max_tokens", None,
     "positive integer"),
    ("context-length", "POST", C, {"prompt": [7] * 60, "max_tokens": 120}, None, 400, IRE, "max_tokens",
     "context_length_exceeded", "This model's maximum context length is 160 tokens, but the prompt has 60 tokens and "
     "max_tokens is 120 (180 in total); reduce the prompt or max_tokens."),
    ("seed-huge", "POST", C, {"prompt": "hi", "seed": 2**70}, None, 400, IRE, "seed", None, "64-bit"),
    ("seed-2**64-n2", "POST", C, {"prompt": "hi", "seed": 2**64, "n": 2}, None, 400, IRE, "seed", None,
     "got 18446744073709551616"),  # out of range before choice seeds wrap
    ("stop-empty", "POST", C, {"prompt": "hi", "stop": [""]}, None, 400, IRE, "stop", None, "non-empty"),
    ("token-negative", "POST", C, {"prompt": [5, -1]}, None, 400, IRE, "prompt", None, "outside the vocabulary"),
    ("token-oov", "POST", C, {"prompt": [5, 10**6]}, None, 400, IRE, "prompt", None, "outside the vocabulary"),
    ("token-oov-second-prompt", "POST", C, {"prompt": [[5, 6], [300000]]}, None, 400, IRE, "prompt", None,
     "outside the vocabulary"),
    ("token-huge", "POST", C, {"prompt": [10**30]}, None, 400, IRE, "prompt", None, "outside the vocabulary"),
    # echo decodes the prompt's ids, which the tokenizer cannot do for these: checked first
    ("echo-token-negative", "POST", C, {"prompt": [5, -1], "echo": True}, None, 400, IRE, "prompt", None,
     "outside the vocabulary"),
    ("echo-token-2**32", "POST", C, {"prompt": [[5], [2**32]], "echo": True, "stream": True}, None, 400, IRE, "prompt",
     None, "outside the vocabulary"),
    ("prompt-empty-list", "POST", C, {"prompt": []}, None, 400, IRE, "prompt", None, "must not be empty"),
    ("prompt-empty-token-list", "POST", C, {"prompt": [[]]}, None, 400, IRE, "prompt", None, "must not be empty"),
    ("prompt-empty-string", "POST", C, {"prompt": ""}, None, 400, IRE, "prompt", None, "at least one token"),
    ("t-min-above-t-max", "POST", C, {"prompt": "hi", "t_min": 0.9, "t_max": 0.5}, None, 400, IRE, "t_max", None,
     "greater than t_min"),
    ("last-step-temperature-tiny", "POST", C, {"prompt": "hi", "t_min": 0, "t_max": 1e-9}, None, 400, IRE, "t_min",
     None, "the last step's temperature, t_min + (t_max - t_min) / max_denoising_steps = "),
    ("t-min-negative", "POST", C, {"prompt": "hi", "t_min": -0.1}, None, 400, IRE, "t_min", None, ">= 0"),
    ("entropy-negative", "POST", C, {"prompt": "hi", "entropy_bound": -1}, None, 400, IRE, "entropy_bound", None, None),
    ("steps-zero", "POST", C, {"prompt": "hi", "max_denoising_steps": 0}, None, 400, IRE, "max_denoising_steps", None,
     "positive integer"),
    ("unknown-model", "POST", C, {"model": "gpt-4", "prompt": "hi"}, None, 404, IRE, "model", "model_not_found",
     "gpt-4"),
    ("unknown-model-chat", "POST", CH, {"model": "nope", "messages": MSG}, None, 404, IRE, "model", "model_not_found",
     None),
    ("suffix-over-canvas", "POST", C, {"prompt": "hi", "suffix": "xy", "max_tokens": 15}, None, 400, IRE, "suffix",
     None, "one canvas"),
    # a suffix that cannot fit a canvas by its characters: refused before it, or any prompt, is tokenized
    ("suffix-cannot-fit-the-canvas", "POST", C, {"prompt": "x" * 20_000, "suffix": "s" * 30_000}, None, 400, IRE,
     "suffix", None, "the suffix has at least "),
    ("logit-bias-key", "POST", C, {"prompt": "hi", "logit_bias": {"a": 1}}, None, 400, IRE, "logit_bias", None, None),
    ("logit-bias-same-token-twice", "POST", C, {"prompt": "hi", "logit_bias": {"70": 100, "070": -100}}, None, 400, IRE,
     "logit_bias", None, "logit_bias names token 70 twice ('70' and '070')"),
    ("logit-bias-value", "POST", C, {"prompt": "hi", "logit_bias": {"5": -101}}, None, 400, IRE, "logit_bias", None,
     "[-100, 100]"),
    ("logit-bias-entries", "POST", C, {"prompt": "hi", "logit_bias": {
        str(i): 1 for i in range(limit_flag("--max-logit-bias") + 1)}}, None, 400, IRE, "logit_bias", "limit_exceeded",
     "setting max_logit_bias"),
    ("penalty-range", "POST", C, {"prompt": "hi", "presence_penalty": 2.5}, None, 400, IRE, "presence_penalty", None,
     None),
    ("tools-no-function", "POST", CH, {"messages": MSG, "tools": [{"type": "function"}]}, None, 400, IRE,
     "tools[0].function", None, "Field required"),
    ("tool-choice-required", "POST", CH, {"messages": MSG, "tools": [TOOL], "tool_choice": "required"}, None, 400,
     IRE, "tool_choice", "unsupported_parameter", "cannot force"),
    ("image-part-without-url", "POST", CH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None,
     400, IRE, "messages[0].content[0]", None, "has no 'image_url' field"),
    ("continue-final-user", "POST", CH, {"messages": MSG, "continue_final_message": True}, None, 400, IRE,
     "messages", None, "assistant"),
    # -- the limits (settings) --------------------------------------------------------------------
    ("tools-over-max-tools", "POST", CH, {"messages": MSG, "tools": [TOOL] * 3}, None, 400, IRE, "tools",
     "limit_exceeded", "max_tools"),
    ("tools-over-max-tools-chars", "POST", CH, {"messages": MSG, "tools": [{**TOOL, "function": {
        "name": "f", "description": "x" * 300}}]}, None, 400, IRE, "tools", "limit_exceeded", "max_tools_chars"),
    ("n-over-max-n", "POST", C, {"prompt": "hi", "n": 5}, None, 400, IRE, "n", "limit_exceeded", "max_n"),
    ("n-huge", "POST", C, {"prompt": "hi", "n": 10**30}, None, 400, IRE, "n", "limit_exceeded", "max_n"),
    ("n-over-max-n-chat", "POST", CH, {"messages": MSG, "n": 5}, None, 400, IRE, "n", "limit_exceeded", "max_n"),
    ("too-many-prompts", "POST", C, {"prompt": ["a", "b", "c", "d", "e"]}, None, 400, IRE, "prompt",
     "limit_exceeded", "max_prompts_per_request"),
    ("choices-over-max-choices", "POST", C, {"prompt": ["a", "b", "c"], "n": 3}, None, 400, IRE, "n",
     "limit_exceeded", "3 prompts x n=3 is over the limit of 8 (setting max_choices_per_request)"),
    ("template-kwarg-too-long", "POST", CH, {"messages": MSG, "chat_template_kwargs": {"note": "y" * 17}}, None, 400,
     IRE, "chat_template_kwargs", "limit_exceeded", "17 characters long, the limit is 16 (setting max_template_kwarg_chars)"),
    ("prompt-too-long-ids", "POST", C, {"prompt": [7] * 65}, None, 400, IRE, "prompt", "limit_exceeded",
     "max_prompt_tokens"),
    ("prompt-too-long-text", "POST", C, {"prompt": ["ok", "y" * 70]}, None, 400, IRE, "prompt", "limit_exceeded",
     "prompt 1 has"),
    ("prompt-too-long-chat", "POST", CH, {"messages": [{"role": "user", "content": "z" * 60}]}, None, 400, IRE,
     "messages", "limit_exceeded", "max_prompt_tokens"),
    ("max-tokens-over-limit", "POST", C, {"prompt": "hi", "max_tokens": 129}, None, 400, IRE, "max_tokens",
     "limit_exceeded", "max_completion_tokens"),
    ("max-tokens-huge", "POST", C, {"prompt": "hi", "max_tokens": 10**20}, None, 400, IRE, "max_tokens",
     "limit_exceeded", "max_completion_tokens"),
    ("max-completion-tokens-over-limit", "POST", CH, {"messages": MSG, "max_completion_tokens": 1000}, None, 400,
     IRE, "max_completion_tokens", "limit_exceeded", "max_completion_tokens"),
    ("request-tokens-n", "POST", C, {"prompt": "hi", "n": 3, "max_tokens": 100}, None, 400, IRE, "n",
     "limit_exceeded", "max_request_tokens"),
    ("request-tokens-prompts", "POST", C, {"prompt": ["a", "b", "c"], "max_tokens": 100}, None, 400, IRE, "prompt",
     "limit_exceeded", "max_request_tokens"),
    ("stop-too-long", "POST", C, {"prompt": "hi", "stop": "x" * 17}, None, 400, IRE, "stop", "limit_exceeded",
     "max_stop_length"),
    ("logprob-entries", "POST", C, {"prompt": "hi", "n": 2, "max_tokens": 100, "logprobs": 3}, None, 400, IRE,
     "logprobs", "limit_exceeded", "up to 800 log-probability entries (200 completion tokens x 4"),
    ("logprob-entries-chat", "POST", CH, {"messages": MSG, "max_tokens": 100, "logprobs": True, "top_logprobs": 6},
     None, 400, IRE, "top_logprobs", "limit_exceeded", "the limit is 600 (setting max_logprob_entries)"),
    ("steps-over-limit", "POST", C, {"prompt": "hi", "max_denoising_steps": 33}, None, 400, IRE,
     "max_denoising_steps", "limit_exceeded", "max_request_denoising_steps"),
    ("prompt-far-too-long-text", "POST", C, {"prompt": "y" * 60000}, None, 400, IRE, "prompt", "limit_exceeded",
     "the prompt has at least 4000 tokens (60000 characters"),
    ("prompt-far-too-long-chat", "POST", CH, {"messages": [{"role": "user", "content": "z" * 60000}]}, None, 400, IRE,
     "messages", "limit_exceeded", "at least"),
    ("too-many-values", "POST", C, {"prompt": "hi", "x": [[]] * 20600}, None, 400, IRE, None, "limit_exceeded",
     "max_json_values"),
    # -- out of range (issue 20, item 8) ----------------------------------------------------------
    ("logprobs-negative", "POST", C, {"prompt": "hi", "logprobs": -1}, None, 400, IRE, "logprobs", None, None),
    ("logprobs-over-5", "POST", C, {"prompt": "hi", "logprobs": 6}, None, 400, IRE, "logprobs", None, None),
    ("best-of-zero", "POST", C, {"prompt": "hi", "best_of": 0}, None, 400, IRE, "best_of", None, None),
    ("best-of-negative", "POST", C, {"prompt": "hi", "best_of": -5}, None, 400, IRE, "best_of", None, None),
    ("top-logprobs-over-20", "POST", CH, {"messages": MSG, "top_logprobs": 21}, None, 400, IRE, "top_logprobs", None,
     None),
    ("t-max-over-float32", "POST", C, {"prompt": "hi", "t_max": 1e39}, None, 400, IRE, "t_max", None,
     "largest float32"),
    ("t-min-over-float32", "POST", C, {"prompt": "hi", "t_min": 1e39, "t_max": 2e39}, None, 400, IRE, "t_min", None,
     "largest float32"),
    ("entropy-over-float32", "POST", C, {"prompt": "hi", "entropy_bound": 1e39}, None, 400, IRE, "entropy_bound",
     None, "largest float32"),
    ("confidence-below-float32", "POST", CH, {"messages": MSG, "confidence_threshold": 1e-300}, None, 400, IRE,
     "confidence_threshold", None, "smallest normal float32"),
    # -- auth and routes --------------------------------------------------------------------------
    ("no-key", "POST", C, {"prompt": "hi"}, {}, 401, IRE, None, "invalid_api_key", "API key"),
    ("wrong-key", "POST", C, {"prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, IRE, None, "invalid_api_key",
     None),
    ("basic-auth", "POST", C, {"prompt": "hi"}, {"Authorization": f"Basic {KEY}"}, 401, IRE, None, "invalid_api_key",
     None),
    ("key-prefix", "GET", "/v1/models", None, {"Authorization": f"Bearer {KEY[:-1]}"}, 401, IRE, None,
     "invalid_api_key", None),
    ("get-completions", "GET", C, None, None, 405, IRE, None, "method_not_allowed", None),
    ("unknown-route", "POST", "/v1/embeddings", {"input": "x"}, None, 404, IRE, None, "not_found", "Unknown route"),
    ("unknown-model-retrieve", "GET", "/v1/models/nope", None, None, 404, IRE, "model", "model_not_found", None),
]


def test_case_names_are_unique():
    """Each case's name is its test id and its row in docs/reliability.md."""
    assert len({c[0] for c in CASES}) == len(CASES)


def send_case(server, case) -> httpx.Response:
    """One table row's request: the key unless the row sets its own headers; a (label, bytes) body as
    raw JSON bytes, any other body as JSON."""
    _, method, path, body, headers, *_ = case
    h = {"Authorization": f"Bearer {KEY}"} if headers is None else dict(headers)
    kw = {}
    if isinstance(body, tuple):
        kw["content"] = body[1]
        h["Content-Type"] = "application/json"
    elif body is not None:
        kw["json"] = body
    return httpx.request(method, server.url + path, headers=h, timeout=60, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(limits_server, case):
    *_, status, type_, param, code, needle = case
    r = send_case(limits_server, case)
    assert_error(r, status, type_, param, code, needle)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["x-request-id"]  # every response carries one


def test_healthy_after_bad_inputs(limits_server):
    """Every bad input of the table in a row (this test sends them itself: it does not depend on
    test_bad_input having run): each is counted once under its status code, and afterwards the server
    still serves, with every key and both endpoints, and holds nothing in the engine."""
    from collections import Counter

    def errors_by_code(m: dict) -> Counter:
        return Counter({dict(labels)["code"]: v for (name, labels), v in m.items()
                        if name == "diffusion_server:http_errors_total"})

    before = errors_by_code(limits_server.wait_idle())
    for case in CASES:
        assert send_case(limits_server, case).status_code == case[5]  # the row's status
    counted = errors_by_code(limits_server.metrics())
    counted.subtract(before)
    assert +counted == Counter(str(c[5]) for c in CASES)
    assert httpx.get(limits_server.url + "/health", timeout=10).json() == {"status": "ok"}
    for key in (KEY, OTHER_KEY):  # several keys work
        r = httpx.post(limits_server.base_url + "/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 8,
                                                                      "seed": 3, "ignore_eos": True},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 8
    r = httpx.post(limits_server.base_url + "/chat/completions", json={"messages": MSG, "max_tokens": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    m = limits_server.wait_idle()
    assert m[("diffusion_server:engine_live_states", frozenset())] == 0


# -- request ids -------------------------------------------------------------------------------


def test_request_id_echoed_or_generated(limits_server):
    h = {"Authorization": f"Bearer {KEY}"}
    url = limits_server.base_url
    r = httpx.post(url + "/completions", json={"prompt": "hi", "max_tokens": 2}, headers={**h, "X-Request-Id": "abc-1.2_3:x"},
                   timeout=60)
    assert r.headers["x-request-id"] == "abc-1.2_3:x" and r.json()["id"] == "cmpl-abc-1.2_3:x"
    # the same id again, concurrently-safe: the engine ids stay unique
    r = httpx.post(url + "/chat/completions", json={"messages": MSG, "max_tokens": 2, "n": 2},
                   headers={**h, "X-Request-Id": "abc-1.2_3:x"}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "chatcmpl-abc-1.2_3:x"
    for bad in ("a" * 129, "has space", "semi;colon", "back\\slash", "ünïcode".encode(), ""):
        r = httpx.post(url + "/completions", json={"prompt": "hi", "max_tokens": 2}, headers={**h, "X-Request-Id": bad},
                       timeout=60)
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        assert rid.startswith("cmpl-") and len(rid) == 37 and r.json()["id"] == rid
    # streams and errors carry it too; the log line uses it
    with httpx.stream("POST", url + "/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True},
                      headers={**h, "X-Request-Id": "stream-7"}, timeout=60) as r:
        frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.headers["x-request-id"] == "stream-7" and frames[0]["id"] == "cmpl-stream-7"
    r = httpx.post(url + "/completions", json={"prompt": "hi", "n": 99}, headers={**h, "X-Request-Id": "err-9"}, timeout=60)
    assert r.status_code == 400 and r.headers["x-request-id"] == "err-9"
    assert httpx.get(limits_server.url + "/health", headers={"X-Request-Id": "probe"}).headers["x-request-id"] == "probe"
    log = limits_server.log()
    assert "cmpl-stream-7 completions status=200" in log
    assert "cmpl-err-9 completions status=400" in log


def test_t_min_zero_is_accepted(limits_server):
    """t_min 0 is transformers' own lower bound: the schedule's last step still divides by
    t_max / max_denoising_steps, never by t_min."""
    r = httpx.post(limits_server.base_url + "/completions", json={"prompt": "hi", "max_tokens": 2, "t_min": 0},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text


# -- at the limit --------------------------------------------------------------------------------
# Each setting the table above refuses one past, met exactly. The context-length prompt bound
# (max_model_len - 1) is out of reach here: max_prompt_tokens is below it.

MAX_N = limit_flag("--max-n")
MAX_PROMPTS = limit_flag("--max-prompts-per-request")
MAX_CHOICES = limit_flag("--max-choices-per-request")
MAX_TOKENS = limit_flag("--max-completion-tokens")
MAX_REQUEST_TOKENS = limit_flag("--max-request-tokens")
MAX_PROMPT = limit_flag("--max-prompt-tokens")
CONTEXT = limit_flag("--max-model-len")
MAX_STEPS = limit_flag("--max-request-denoising-steps")
MAX_STOP = limit_flag("--max-stop-length")
MAX_KWARG = limit_flag("--max-template-kwarg-chars")
MAX_TOOLS = limit_flag("--max-tools")
MAX_TOOLS_CHARS = limit_flag("--max-tools-chars")
MAX_LOGIT_BIAS = limit_flag("--max-logit-bias")
MAX_LOGPROBS = limit_flag("--max-logprob-entries")
TOP_LOGPROBS = max(k for k in range(21) if MAX_LOGPROBS % (1 + k) == 0)  # chat's top_logprobs, at most 20


def tool_of_chars(chars: int, fill: str = "x") -> dict:
    """One tool whose compact JSON, as the server measures the tools (characters, not escapes), is ``chars``
    characters long."""
    bare = len(json.dumps([{**TOOL, "function": {"name": "f", "description": ""}}], separators=(",", ":")))
    return {**TOOL, "function": {"name": "f", "description": fill * (chars - bare)}}


# (id, path, body, what the response shows: choices, usage.prompt_tokens / completion_tokens, and
# how many tokens of each choice carry log-probabilities)
ONE = {"max_tokens": 1, "ignore_eos": True}
NO_TOOL = {"tool_choice": "none"}  # the tiny template renders no tools: the limits are checked all the same
AT_LIMIT = [
    ("n-at-max-n", C, {"prompt": "hi", "n": MAX_N, **ONE}, {"choices": MAX_N, "completion_tokens": MAX_N}),
    ("n-at-max-n-chat", CH, {"messages": MSG, "n": MAX_N, **ONE}, {"choices": MAX_N, "completion_tokens": MAX_N}),
    ("prompts-at-max-prompts", C, {"prompt": ["a"] * MAX_PROMPTS, **ONE},
     {"choices": MAX_PROMPTS, "completion_tokens": MAX_PROMPTS}),
    ("choices-at-max-choices", C, {"prompt": ["a"] * (MAX_CHOICES // MAX_N), "n": MAX_N, **ONE},
     {"choices": MAX_CHOICES, "completion_tokens": MAX_CHOICES}),
    ("max-tokens-at-limit", C, {"prompt": "hi", "max_tokens": MAX_TOKENS, "ignore_eos": True},
     {"completion_tokens": MAX_TOKENS}),
    ("max-completion-tokens-at-limit", CH, {"messages": MSG, "max_completion_tokens": MAX_TOKENS, "ignore_eos": True},
     {"completion_tokens": MAX_TOKENS}),
    ("request-tokens-at-limit", C, {"prompt": ["a", "b"], "n": 2, "max_tokens": MAX_REQUEST_TOKENS // 4,
                                    "ignore_eos": True}, {"choices": 4, "completion_tokens": MAX_REQUEST_TOKENS}),
    ("prompt-at-max-prompt-tokens-ids", C, {"prompt": [7] * MAX_PROMPT, **ONE}, {"prompt_tokens": MAX_PROMPT}),
    ("prompt-at-max-prompt-tokens-text", C, {"prompt": ["ok", "y" * MAX_PROMPT], **ONE},
     {"choices": 2, "prompt_tokens": 2 + MAX_PROMPT}),
    ("context-at-limit", C, {"prompt": [7] * (MAX_PROMPT - 1), "max_tokens": CONTEXT - (MAX_PROMPT - 1),
                             "ignore_eos": True},
     {"prompt_tokens": MAX_PROMPT - 1, "completion_tokens": CONTEXT - (MAX_PROMPT - 1)}),
    ("steps-at-limit", C, {"prompt": "hi", "max_denoising_steps": MAX_STEPS, **ONE}, {"completion_tokens": 1}),
    ("stop-at-max-length", C, {"prompt": "hi", "stop": "x" * MAX_STOP, **ONE}, {}),
    ("template-kwarg-at-limit", CH, {"messages": MSG, "chat_template_kwargs": {"note": "y" * MAX_KWARG}, **ONE}, {}),
    ("tools-at-max-tools", CH, {"messages": MSG, "tools": [TOOL] * MAX_TOOLS, **NO_TOOL, **ONE}, {}),
    ("tools-at-max-tools-chars", CH, {"messages": MSG, "tools": [tool_of_chars(MAX_TOOLS_CHARS)], **NO_TOOL, **ONE},
     {}),
    ("tools-at-max-tools-chars-accented", CH, {"messages": MSG, "tools": [tool_of_chars(MAX_TOOLS_CHARS, "\u00e9")],
                                               **NO_TOOL, **ONE}, {}),
    ("logit-bias-at-limit", C, {"prompt": "hi", "logit_bias": {str(i): 0.0 for i in range(MAX_LOGIT_BIAS)}, **ONE},
     {"completion_tokens": 1}),
    ("logprob-entries-at-limit", C, {"prompt": "hi", "logprobs": 5, "max_tokens": MAX_LOGPROBS // 6,
                                     "ignore_eos": True}, {"logprob_tokens": MAX_LOGPROBS // 6}),
    ("logprob-entries-at-limit-chat", CH, {"messages": MSG, "logprobs": True, "top_logprobs": TOP_LOGPROBS,
                                           "max_tokens": MAX_LOGPROBS // (1 + TOP_LOGPROBS), "ignore_eos": True},
     {"logprob_tokens": MAX_LOGPROBS // (1 + TOP_LOGPROBS)}),
]


def test_at_limit_rows_sit_on_their_limits():
    """The arithmetic the rows rely on: each lands exactly on its own limit and under the others."""
    assert MAX_CHOICES // MAX_N * MAX_N == MAX_CHOICES and MAX_CHOICES // MAX_N <= MAX_PROMPTS
    assert MAX_REQUEST_TOKENS % 4 == 0 and MAX_REQUEST_TOKENS // 4 < MAX_TOKENS  # 2 prompts x n=2, under the rest
    assert 2 < min(MAX_N, MAX_PROMPTS) and 4 < MAX_CHOICES
    assert MAX_PROMPT < CONTEXT - 1 and CONTEXT - (MAX_PROMPT - 1) <= MAX_TOKENS
    assert MAX_LOGPROBS % 6 == 0 and MAX_LOGPROBS // 6 <= MAX_TOKENS
    assert MAX_LOGPROBS // (1 + TOP_LOGPROBS) <= MAX_TOKENS
    assert len(json.dumps([tool_of_chars(MAX_TOOLS_CHARS)], separators=(",", ":"))) == MAX_TOOLS_CHARS
    assert len(json.dumps([TOOL] * MAX_TOOLS, separators=(",", ":"))) <= MAX_TOOLS_CHARS
    assert len({c[0] for c in AT_LIMIT}) == len(AT_LIMIT)


@pytest.mark.parametrize("case", AT_LIMIT, ids=[c[0] for c in AT_LIMIT])
def test_at_the_limit_accepted(limits_server, case):
    """A request exactly at a limit is served, and as asked: a limit refuses only what is over it."""
    _, path, body, expect = case
    r = httpx.post(limits_server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["choices"]) == expect.get("choices", 1), out
    for key in ("prompt_tokens", "completion_tokens"):
        if key in expect:
            assert out["usage"][key] == expect[key], out["usage"]
    if "logprob_tokens" in expect:
        for choice in out["choices"]:
            entries = choice["logprobs"]["content"] if path == CH else choice["logprobs"]["tokens"]
            assert len(entries) == expect["logprob_tokens"], choice["logprobs"]


# -- CORS --------------------------------------------------------------------------------------


def test_cors_allowed_origin_only(limits_server):
    url = limits_server.base_url + "/completions"
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(url, headers=pre, timeout=10)  # preflight: no key needed
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    # the openai JS SDK's own headers, which it sends from a browser too
    sdk = "authorization,content-type,x-stainless-lang,x-stainless-os,x-stainless-retry-count,openai-organization"
    r = httpx.options(url, headers={**pre, "Access-Control-Request-Headers": sdk}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert set(r.headers["access-control-allow-headers"].lower().replace(" ", "").split(",")) >= set(sdk.split(","))
    r = httpx.options(url, headers={**pre, "Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    assert_error(r, 400, "invalid_request_error", None, "cors_preflight_refused", "Disallowed CORS origin")
    r = httpx.options(url, headers={**pre, "Access-Control-Request-Method": "DELETE"}, timeout=10)
    assert_error(r, 400, "invalid_request_error", None, "cors_preflight_refused", "Disallowed CORS method")
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = httpx.post(url, json={"prompt": "hi"}, headers={"Origin": ORIGIN}, timeout=60)  # errors too
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, headers={"Origin": "https://evil.example"}, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers


def test_cors_closed_by_default(live_server):
    """Without --cors-allow-origin no page of another site may send work, though CORS alone would only keep
    it from reading the answer: a "simple" text/plain POST needs no preflight. The server's own page,
    and clients that are not browsers (no Origin), are served."""
    url = live_server.base_url + "/completions"
    r = httpx.options(url, headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    before = live_server.metrics()
    port = live_server.port
    rebound = f"evil.example:{port}"  # a site's DNS name pointed at the server: to the browser, the server's own page
    for headers in ({"Origin": "https://a.example"}, {"Origin": "https://a.example", "Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}, {"Origin": f"http://localhost:{port}", "Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://a.example", "Host": "a.example:8080"}, {"Origin": "https://a.example", "Host": "a.example:80"},
                    {"Origin": f"http://{rebound}", "Host": rebound, "Sec-Fetch-Site": "same-origin"},
                    {"Origin": f"http://{rebound}", "Host": rebound}, {"Origin": "http://a.example", "Host": "a.example:80"},
                    {"Origin": "http://["}, {"Origin": "http://a.example", "Host": "[oops"}):  # malformed: no 500
        r = httpx.post(url, content=json.dumps({"prompt": "hi", "max_tokens": 2}),
                       headers={**headers, "Content-Type": "text/plain"}, timeout=60)
        assert r.status_code == 403 and not any(k.startswith("access-control-") for k in r.headers), headers
        assert r.headers["x-request-id"], headers
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                     "param": None, "code": "origin_not_allowed"}
        assert "cors_allow_origins" in r.json()["error"]["message"]
    after = live_server.metrics()
    assert after[PROMPT_TOKENS] == before[PROMPT_TOKENS]  # none reached the engine
    own = live_server.url.removeprefix("http://")
    # the server's own page under a name no other site can take over: an IP address, localhost or a name under it
    for headers in ({}, {"Origin": live_server.url}, {"Origin": "http://elsewhere.example", "Sec-Fetch-Site": "same-origin"},
                    {"Origin": live_server.url.replace("127.0.0.1", "localhost"), "Host": own.replace("127.0.0.1", "localhost")},
                    {"Origin": "http://localhost", "Host": "localhost:80"}, {"Origin": "https://LOCALHOST:443", "Host": "localhost"},
                    {"Origin": "http://app.localhost:81", "Host": "app.localhost:81", "Sec-Fetch-Site": "same-origin"},
                    {"Origin": "http://[::1]:8080", "Host": "[::1]:8080"}):
        r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, headers={**live_server.headers, **headers}, timeout=60)
        assert r.status_code == 200, (headers, r.text)
    # a client that is not a page but sends an Origin (an extension, an app's webview) with its key: the key decides
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, timeout=60,
                   headers={"Origin": "chrome-extension://abc", "Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, headers={**live_server.headers, "Origin": "chrome-extension://abc"},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_on_a_server_without_keys_an_authorization_header_opens_no_door(server_launcher, server_tiny_checkpoint):
    """Without keys nothing checks an Authorization header, and a rebound page (the server's own to the browser)
    may send one unasked: it lets no page through. The server's own page still gets in with one."""
    server = server_launcher(["--model", str(server_tiny_checkpoint), "--no-ui"])
    url = server.base_url + "/completions"
    port = server.port
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}", "Sec-Fetch-Site": "same-origin"},
                    {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"},
                    {"Origin": "chrome-extension://abc"}):
        r = httpx.post(url, json=body, headers={**headers, "Authorization": "Bearer anything"}, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (headers, r.text)
    for headers in ({"Origin": server.url, "Sec-Fetch-Site": "same-origin"}, {}):
        r = httpx.post(url, json=body, headers={**headers, "Authorization": "Bearer anything"}, timeout=60)
        assert r.status_code == 200, (headers, r.text)


@pytest.mark.parametrize("host, bind_host, trusted", [
    ("127.0.0.1:8000", "127.0.0.1", True), ("[::1]", "127.0.0.1", True), ("localhost", "0.0.0.0", True),
    ("gpu-box:8000", "gpu-box", True), ("GPU-Box:8000", "gpu-box", True),  # the --host value, any case
    ("gpu-box:8000", "0.0.0.0", False), ("localhost.evil.example", "127.0.0.1", False), ("[oops", "127.0.0.1", False),
    (None, "127.0.0.1", False),
])
def test_a_page_counts_as_the_servers_own_only_under_a_trusted_host(host, bind_host, trusted):
    """DNS rebinding: a page whose site's name now points at the server is the server's own to the browser;
    only the Host header tells it apart, so a name other than these must be a listed origin."""
    from server.origins import same_origin

    origin = "http://" + (host or "x")
    assert same_origin(origin, host, "same-origin", bind_host) is trusted
    assert same_origin(origin, host, None, bind_host) is trusted


def test_with_keys_a_keyless_client_cannot_make_the_server_read_a_body(limits_server):
    """Every request that is not a read needs the key, on any path: a 401 at once, the body unread, where an
    unknown path used to buffer up to the body limit before its 404."""
    host, port = limits_server.url.removeprefix("http://").split(":")
    for path in ("/nope", "/ui/detokenize", "/health"):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 60000\r\n\r\n".encode())
            answer = b""
            while b"invalid_api_key" not in answer:  # within the timeout: the server did not wait for the body
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in answer, (path, answer[:300])
    r = httpx.post(limits_server.url + "/nope", json={}, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 404  # with the key: on to the router
    assert httpx.get(limits_server.url + "/health", timeout=10).status_code == 200  # reads stay open


def test_the_documented_200_bodies_are_checked_field_by_field(live_server):
    """The OpenAPI document's 200 schemas (which the schemathesis run below checks every body against) hold
    for real responses and fail a body missing a choice's field or with a count that is not a number."""
    import copy

    from jsonschema import Draft202012Validator

    doc = httpx.get(live_server.url + "/openapi.json", timeout=10).json()
    cases = [("/v1/completions", {"prompt": "hi", "max_tokens": 4, "logprobs": 1}, "text"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, "message")]
    for path, body, field in cases:
        schema = doc["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        validator = Draft202012Validator(schema)
        r = httpx.post(live_server.url + path, json=body, headers=live_server.headers, timeout=60)
        assert r.status_code == 200, r.text
        validator.validate(r.json())
        missing, wrong = copy.deepcopy(r.json()), copy.deepcopy(r.json())
        del missing["choices"][0][field]
        wrong["usage"]["prompt_tokens"] = str(wrong["usage"]["prompt_tokens"])
        assert not validator.is_valid(missing) and not validator.is_valid(wrong), path


# -- schemathesis against the server's own OpenAPI document -----------------------------------
# A bounded, derandomized run for CI; docs/reliability.md has the command for a longer one.

FUZZ_EXAMPLES = 60  # per operation and mode
FUZZ_PATHS = "^/(v1/|health$|metrics$)"


@pytest.mark.parametrize("mode_name", ["positive", "negative"])
def test_schemathesis(limits_server, mode_name):
    """No 5xx, every status documented, bodies match the schema, every error has OpenAI's shape.

    Hypothesis drives schemathesis' strategies directly (its pytest plugin's ``from_fixture`` does
    not run under pytest 9); derandomized, so CI runs the same examples every time.
    """
    schemathesis = pytest.importorskip("schemathesis")  # the test extra: schemathesis>=4.32,<5
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    mode = GenerationMode(mode_name)
    schema = schemathesis.openapi.from_url(limits_server.url + "/openapi.json").include(path_regex=FUZZ_PATHS)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    seen: dict[str, set[int]] = {}
    for op in operations:
        headers = {"Authorization": f"Bearer {KEY}"} if op.path.startswith("/v1/") else {}

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call_and_validate(headers=headers, timeout=60, checks=checks)
            seen.setdefault(f"{op.method.upper()} {op.path}", set()).add(response.status_code)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body

        try:
            run()
        except Unsatisfiable:  # negative mode: nothing to break in a GET without a constrained parameter
            assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET", op.path
    print(mode, {k: sorted(v) for k, v in seen.items()})
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= set(seen), seen
    if mode == GenerationMode.POSITIVE:
        assert any(200 in codes for codes in seen.values()), seen
    assert httpx.get(limits_server.url + "/health", timeout=10).status_code == 200
