"""Every error status of the HTTP contract, provoked and its OpenAI-shaped body checked."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from engine.outputs import RequestOutput
from server.app import create_app, default_engine_factory
from server.settings import ServerSettings
from tests.engine_helpers import POISON, build_poisoned_checkpoint
from tests.test_server_metrics import reason, scrape, wait_for

# A request that keeps one slot busy for a long time unless aborted (never converges early,
# ignores eos, ~250 canvases of 64 steps on the tiny model).
SLOW = {"max_tokens": 4000, "ignore_eos": True, "max_denoising_steps": 64, "stability_threshold": 1000}


def assert_error(r: httpx.Response, status: int, code=None, param=None, type_=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


# -- on the main live server ------------------------------------------------------------------


def post(live_server, path, body=None, headers=None, **kw):
    h = dict(live_server.headers if headers is None else headers)
    return httpx.post(live_server.base_url + path, json=body, headers=h, timeout=60, **kw)


def test_401_missing_or_wrong_key(live_server):
    body = {"prompt": "hi", "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {live_server.api_key}"},
                    {"Authorization": f"Bearer {live_server.api_key}x"}, {"Authorization": "Bearer"}):
        r = post(live_server, "/completions", body, headers=headers)
        assert_error(r, 401, code="invalid_api_key")
        assert r.headers.get("www-authenticate") == "Bearer"
    assert_error(httpx.get(live_server.base_url + "/models", timeout=10), 401)
    # health and metrics stay open
    assert httpx.get(live_server.url + "/health", timeout=10).status_code == 200
    assert httpx.get(live_server.url + "/metrics", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=live_server.base_url, api_key="nope", max_retries=0).models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def test_404_unknown_model_and_route(live_server):
    r = post(live_server, "/completions", {"model": "gpt-4", "prompt": "hi"})
    err = assert_error(r, 404, code="model_not_found", param="model", type_="invalid_request_error")
    assert "gpt-4" in err["message"]
    assert_error(post(live_server, "/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                 404, code="model_not_found")
    assert_error(httpx.get(live_server.base_url + "/models/nope", headers=live_server.headers, timeout=10), 404,
                 code="model_not_found")
    assert_error(httpx.get(live_server.base_url + "/nothing", headers=live_server.headers, timeout=10), 404)
    assert_error(httpx.get(live_server.base_url + "/completions", headers=live_server.headers, timeout=10), 405)
    client = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x")
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/completions", {"max_tokens": 4}, "prompt"),
        ("/completions", {"prompt": "hi", "n": "x"}, "n"),
        ("/completions", {"prompt": "hi", "n": 0}, "n"),
        ("/completions", {"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ("/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/completions", {"prompt": "hi", "temperature": 5}, "temperature"),
        ("/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
        ("/completions", {"prompt": "hi", "stream_drafts": "yes"}, "stream_drafts"),
        ("/completions", {"prompt": [1.5]}, "prompt"),
        ("/chat/completions", {"messages": []}, "messages"),
        ("/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/chat/completions", {"prompt": "hi"}, "messages"),
    ],
)
def test_400_schema_errors(live_server, path, body, param):
    assert_error(post(live_server, path, body), 400, param=param, type_="invalid_request_error")


def test_context_length_refusals_name_what_the_request_sent(live_server):
    """Prompt and max_tokens over the context (4096 tokens) are a 400 with OpenAI's code
    context_length_exceeded. With no max_tokens sent, the refusal says which default it got and names
    the prompt, not a field the client never sent."""
    cases = [
        ({"prompt": [7] * 4000, "max_tokens": 100}, "max_tokens",
         "This model's maximum context length is 4096 tokens, but the prompt has 4000 tokens and max_tokens is 100 "
         "(4100 in total); reduce the prompt or max_tokens."),
        ({"prompt": [7] * 4090}, "prompt",
         "This model's maximum context length is 4096 tokens, but the prompt has 4090 tokens and max_tokens, which "
         "this request does not set, defaults to 16 (4106 in total); set max_tokens to at most 6, or shorten the "
         "prompt."),
        ({"prompt": "x" * 5000}, "prompt", "this model's maximum context length is 4096 tokens, prompt and completion "
         "together, so a prompt may have at most 4095."),
        # several prompts: the one refused is named, and the most max_tokens may be fits the longest
        ({"prompt": [[7] * 10, [7] * 4085, [7] * 4088]}, "prompt",
         "This model's maximum context length is 4096 tokens, but prompt 1 has 4085 tokens and max_tokens, which "
         "this request does not set, defaults to 16 (4101 in total); set max_tokens to at most 8, or shorten the "
         "prompt."),
    ]
    for body, param, message in cases:
        err = assert_error(post(live_server, "/completions", body), 400, code="context_length_exceeded", param=param)
        assert message in err["message"], err
    chat = {"messages": [{"role": "user", "content": "x" * 4070}]}
    err = assert_error(post(live_server, "/chat/completions", chat), 400, code="context_length_exceeded",
                       param="messages")
    assert "and max_completion_tokens, which this request does not set, defaults to 16" in err["message"], err


def test_400_not_json(live_server):
    h = {**live_server.headers, "Content-Type": "application/json"}
    for raw in (b"{not json", b"[1, 2]", b"", "\"text\"".encode()):
        r = httpx.post(live_server.base_url + "/completions", content=raw, headers=h, timeout=10)
        assert_error(r, 400, code="invalid_json")


@pytest.mark.parametrize(
    "path,body,param,needle",
    [
        ("/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens", "context length"),
        ("/completions", {"prompt": "x" * 4000, "max_tokens": 100}, "max_tokens", "context length"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5000},
         "max_completion_tokens", "max_completion_tokens is 5000"),  # the message names the field sent
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
         "max_completion_tokens", "max_completion_tokens must be"),
        ("/completions", {"prompt": "hi", "t_min": 0.9, "t_max": 0.5}, "t_max", "t_max"),
        ("/completions", {"prompt": "hi", "max_denoising_steps": 0}, "max_denoising_steps", "max_denoising_steps"),
        ("/completions", {"prompt": "hi", "entropy_bound": -1}, "entropy_bound", "entropy_bound"),
        ("/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens"),
        ("/completions", {"prompt": "hi", "stop": [""]}, "stop", "stop"),
        ("/completions", {"prompt": [[5, 6, 999999]]}, "prompt", None),
        ("/completions", {"prompt": [-1]}, "prompt", None),
        ("/completions", {"prompt": []}, "prompt", None),
        ("/completions", {"prompt": "hi", "logprobs": 6}, "logprobs", None),
        ("/completions", {"prompt": "hi", "logprobs": 1, "echo": True}, "logprobs", "prompt tokens"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
         "functions", "declare them in tools"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "function_call": "auto"},
         "function_call", "use tool_choice"),
        ("/completions", {"prompt": "hi", "max_tokens": 10, "suffix": "abcdefgh"}, "suffix", "one canvas of 16"),
        ("/completions", {"prompt": "hi", "logit_bias": {"5": 100.5}}, "logit_bias", "[-100, 100]"),
        ("/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias", "vocabulary"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs",
         "logprobs to be true"),
        ("/completions", {"prompt": "hi", "n": 40, "max_tokens": 2, "best_of": 3}, "best_of", None),
        ("/completions", {"prompt": ["a"] * 10, "n": 30}, "n", "choices"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         "tools[0].function", "Field required"),
        ("/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         "messages", "does not take images"),  # the test server's checkpoint is text-only
    ],
)
def test_400_parameter_errors(live_server, path, body, param, needle):
    err = assert_error(post(live_server, path, body), 400, param=param, type_="invalid_request_error")
    if needle:
        assert needle in err["message"], err


def test_sdk_raises_bad_request(live_server):
    client = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=live_server.model_name, prompt="hi", max_tokens=100000)
    assert info.value.status_code == 400 and info.value.param == "max_tokens"


def test_unknown_fields_are_ignored(live_server):
    """Fields the server does not use are accepted and change nothing: the same seeded output."""
    plain = {"model": live_server.model_name, "prompt": "hi", "max_tokens": 20, "seed": 3}
    extra = {**plain, "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.1,
             "logit_bias": {"5": 0}, "user": "u1", "some_future_field": {"nested": [1, 2]}, "best_of": 1,
             "logprobs": None}
    r, base = post(live_server, "/completions", extra), post(live_server, "/completions", plain)
    assert r.status_code == 200 == base.status_code, r.text
    assert r.json()["choices"][0]["text"] == base.json()["choices"][0]["text"]
    assert r.json()["usage"] == base.json()["usage"]
    chat_plain = {"model": live_server.model_name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 20,
                  "seed": 4}
    chat = {**chat_plain, "messages": [{"role": "user", "content": "x", "extra": 1}], "parallel_tool_calls": False,
            "metadata": {"a": "b"}, "response_format": {"type": "text"}}
    r, base = post(live_server, "/chat/completions", chat), post(live_server, "/chat/completions", chat_plain)
    assert r.status_code == 200 == base.status_code, r.text
    assert r.json()["choices"][0]["message"] == base.json()["choices"][0]["message"]


def test_413_body_too_large(live_server):
    big = {"prompt": "x" * (live_server.body_limit + 10), "max_tokens": 4}
    err = assert_error(post(live_server, "/completions", big), 413, code="request_too_large")
    assert str(live_server.body_limit) in err["message"]

    def chunks():  # no Content-Length: chunked transfer encoding
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    r = httpx.post(live_server.base_url + "/completions", content=chunks(),
                   headers={**live_server.headers, "Content-Type": "application/json"}, timeout=30)
    assert_error(r, 413, code="request_too_large")
    # just under the limit is fine (a 400 for the context length, not a 413)
    ok = {"prompt": "x" * (live_server.body_limit - 100)}
    err = assert_error(post(live_server, "/completions", ok), 400, param="prompt")  # refused before tokenizing
    assert "context length" in err["message"]


def test_disconnect_aborts_the_request(live_server):
    """A streaming client that goes away frees its slot (the request would otherwise run for minutes)."""
    before = live_server.wait_idle()
    body = {"model": live_server.model_name, "prompt": "slow", "stream": True, "stream_drafts": True, **SLOW}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", live_server.base_url + "/completions", json=body, headers=live_server.headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                    if got >= 3:
                        break
    after = live_server.wait_idle(timeout=60)
    key = ("diffusion_server:request_success_total", frozenset({("finished_reason", "abort")}))
    assert after[key] == before[key] + 1
    # the same for a non-streaming request whose client times out (SLOW is thousands of decoder passes:
    # many seconds on any machine, and only longer on a loaded one, so the 1 s client timeout always fires)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.base_url + "/completions", json={"prompt": "slow", **SLOW}, headers=live_server.headers,
                   timeout=1.0)
    after2 = live_server.wait_idle(timeout=60)
    assert after2[key] == before[key] + 2


# -- 429: a server with one running slot and one waiting slot ----------------------------------


@pytest.fixture(scope="module")
def queue_server(server_launcher, server_tiny_checkpoint):
    return server_launcher(["--model", str(server_tiny_checkpoint), "--max-num-seqs", "1", "--max-waiting", "1"],
                           model_name=str(server_tiny_checkpoint))


def test_429_when_the_queue_is_full(queue_server):
    url = queue_server.base_url
    before = queue_server.wait_idle()
    stream_body = {"prompt": "slow", "stream": True, **SLOW}
    with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
        with c1.stream("POST", url + "/completions", json={**stream_body, "stream_drafts": True}) as r1:
            assert r1.status_code == 200
            lines1 = r1.iter_lines()  # keep a reference: a collected iterator closes the connection
            for line in lines1:  # a draft: the first request is running
                if '"diffusion"' in line:
                    break
            with c2.stream("POST", url + "/chat/completions",
                           json={**stream_body, "messages": [{"role": "user", "content": "x"}]}) as r2:
                assert r2.status_code == 200  # queued: the one waiting slot
                lines2 = r2.iter_lines()
                assert next(lines2).startswith("data: ")  # the role chunk
                for body, path in (({"prompt": "x", "max_tokens": 4}, "/completions"),
                                   ({"prompt": "x", "max_tokens": 4, "stream": True}, "/completions"),
                                   ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "/chat/completions"),
                                   ({"prompt": "x", "n": 2}, "/completions")):
                    r = httpx.post(url + path, json=body, timeout=30)
                    err = assert_error(r, 429, code="queue_full", type_="rate_limit_error")
                    assert r.headers["retry-after"] == "1"
                    assert "queue" in err["message"]
                # the gauges are published after the engine's next pass, which may come after the 429s
                running = ("diffusion_server:num_requests_running", frozenset())
                wait_for(queue_server, running, 1)
                m = wait_for(queue_server, ("diffusion_server:num_requests_waiting", frozenset()), 1)
                assert m[running] == 1
                assert 0 < m[("diffusion_server:kv_cache_usage_perc", frozenset())] <= 1
                client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=queue_server.model_name, prompt="x", max_tokens=2)
    after = queue_server.wait_idle(timeout=60)
    assert after[("diffusion_server:kv_cache_usage_perc", frozenset())] == 0
    too_many = ("diffusion_server:http_errors_total", frozenset({("code", "429")}))
    assert after[too_many] - before.get(too_many, 0) == 5
    abort = ("diffusion_server:request_success_total", frozenset({("finished_reason", "abort")}))
    assert after[abort] - before.get(abort, 0) == 2
    # and the server serves again
    r = httpx.post(url + "/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


# -- in-process servers: loading, internal faults, a dead engine ------------------------------


class InProcessServer:
    """uvicorn in a background thread around ``create_app(settings, engine_factory)``."""

    def __init__(self, settings: ServerSettings, engine_factory):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # the server's own socket: no port probe that another process could take
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, engine_factory=engine_factory)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "in-process server did not start"
            time.sleep(0.05)

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "engine did not load"
            time.sleep(0.1)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def test_503_while_loading(server_tiny_checkpoint):
    gate = threading.Event()

    def slow_factory(settings, sink):
        gate.wait(120)
        return default_engine_factory(settings, sink)

    srv = InProcessServer(ServerSettings(model=str(server_tiny_checkpoint)), slow_factory)
    try:
        r = httpx.get(srv.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "loading"} and r.headers["retry-after"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert_error(r, 503, code="server_loading", type_="server_error")
        assert int(r.headers["retry-after"]) > 0
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        assert_error(r, 503, code="server_loading")
        r = httpx.post(srv.url + "/v1/completions", content=b"{not json", timeout=10)  # not parsed while loading
        assert_error(r, 503, code="server_loading")
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 200
        gate.set()
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        gate.set()
        srv.stop()


def test_kv_budget_refusals_name_what_would_help(server_tiny_checkpoint):
    """A request over the KV budget for one request is a 400 limit_exceeded: naming the prompt (or a
    chat's messages) when the prompt alone is over it, else the endpoint's max_tokens field with the most
    that would fit (canvas 16, budget 40: a 10-token prompt fits two canvases)."""
    srv = InProcessServer(ServerSettings.from_flat(model=str(server_tiny_checkpoint), max_num_kv_tokens=40),
                          default_engine_factory)
    try:
        srv.wait_ready()
        url = srv.url + "/v1"
        r = httpx.post(url + "/completions", json={"prompt": [7] * 10, "max_tokens": 48}, timeout=60)
        err = assert_error(r, 400, code="limit_exceeded", param="max_tokens")
        assert err["message"].endswith("with this prompt, max_tokens can be at most 32"), err
        r = httpx.post(url + "/completions", json={"prompt": [7] * 10, "max_tokens": 32}, timeout=60)
        assert r.status_code == 200, r.text
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 64}
        err = assert_error(httpx.post(url + "/chat/completions", json=chat, timeout=60), 400, code="limit_exceeded",
                           param="max_completion_tokens")
        assert "max_completion_tokens can be at most" in err["message"], err
        r = httpx.post(url + "/completions", json={"prompt": [7] * 41, "max_tokens": 1}, timeout=60)
        err = assert_error(r, 400, code="limit_exceeded", param="prompt")
        assert err["message"].startswith("the prompt alone needs 41 KV tokens"), err
        chat = {"messages": [{"role": "user", "content": "word " * 100}], "max_completion_tokens": 1}
        assert_error(httpx.post(url + "/chat/completions", json=chat, timeout=60), 400, code="limit_exceeded",
                     param="messages")
    finally:
        srv.stop()


def test_a_default_over_a_server_limit_is_named_as_the_default(server_tiny_checkpoint):
    """Limits set below the checkpoint's defaults (16 tokens, 8 denoising steps): a request that leaves
    the field out is told the value is the default and what to send, not that it sent too much."""
    srv = InProcessServer(ServerSettings.from_flat(model=str(server_tiny_checkpoint), max_completion_tokens=12,
                                                   max_request_denoising_steps=4), default_engine_factory)
    try:
        srv.wait_ready()
        url = srv.url + "/v1"
        cases = [({"prompt": "x", "max_denoising_steps": 4}, "max_tokens",
                  "max_tokens, which this request does not set, defaults to 16 (the model's generation config), more "
                  "than the 12 this server allows (setting max_completion_tokens): set max_tokens to at most 12."),
                 ({"prompt": "x", "max_tokens": 12}, "max_denoising_steps",
                  "max_denoising_steps, which this request does not set, defaults to 8 (the model's generation "
                  "config), more than the 4 this server allows (setting max_request_denoising_steps): set "
                  "max_denoising_steps to at most 4.")]
        for body, param, message in cases:
            err = assert_error(httpx.post(url + "/completions", json=body, timeout=60), 400, code="limit_exceeded",
                               param=param)
            assert err["message"] == message, err
        chat = {"messages": [{"role": "user", "content": "x"}], "max_denoising_steps": 4}
        err = assert_error(httpx.post(url + "/chat/completions", json=chat, timeout=60), 400, code="limit_exceeded",
                           param="max_completion_tokens")
        assert err["message"].startswith("max_completion_tokens, which this request does not set, defaults to 16")
        r = httpx.post(url + "/completions", json={"prompt": "x", "max_tokens": 12, "max_denoising_steps": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()


def test_choices_failing_in_one_pass_are_each_counted_as_failed(tmp_path_factory):
    """n=3 choices of a poisoned prompt all fail in the same pass: the request fails, and
    request_success_total counts three errors every time (not one error and two aborted siblings)."""
    path = build_poisoned_checkpoint(tmp_path_factory.mktemp("poisoned"))
    srv = InProcessServer(ServerSettings.from_flat(model=str(path)), default_engine_factory)
    error, abort = (("diffusion_server:request_success_total", reason(r)) for r in ("error", "abort"))
    try:
        srv.wait_ready()
        for stream in (False, True) * 4:
            m0 = scrape(srv.url)
            body = {"prompt": [5, POISON, 7], "max_tokens": 16, "n": 3, "stream": stream}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == (200 if stream else 500) and "non-finite" in r.text, r.text
            deadline = time.monotonic() + 30
            while (m1 := scrape(srv.url)).get(error, 0) - m0.get(error, 0) < 3:
                assert time.monotonic() < deadline, "three errors were not counted"
                time.sleep(0.05)
            assert (m1[error] - m0.get(error, 0), m1.get(abort, 0) - m0.get(abort, 0)) == (3, 0), stream
    finally:
        srv.stop()


class FaultyEngine:
    """Wraps the real engine; ``mode`` injects faults after the first output of each request."""

    def __init__(self, inner):
        self.inner = inner
        self.mode = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def resolve(self, prompt_ids, params, **kwargs):
        if self.mode == "resolve_raises":  # a bug in a handler's path, outside any stream
            raise KeyError("secret internal detail")
        return self.inner.resolve(prompt_ids, params, **kwargs)

    def generate(self, prompt_ids, params, request_id, **kwargs):
        # submitted at once, as EngineClient.generate says (it may take a place reserved by admit)
        agen = self.inner.generate(prompt_ids, params, request_id, **kwargs)
        return self._faulty(agen, request_id)

    async def _faulty(self, agen, request_id):
        n = 0
        try:
            async for out in agen:
                if n >= 1 and self.mode == "error_output":
                    yield RequestOutput(request_id, finished=True, finish_reason="error", error="injected fault")
                    return
                if n >= 1 and self.mode == "raise":
                    raise RuntimeError("secret internal detail")
                yield out
                n += 1
        finally:
            await agen.aclose()


@pytest.fixture(scope="module")
def faulty_server(server_tiny_checkpoint):
    holder = {}

    def factory(settings, sink):
        holder["engine"] = FaultyEngine(default_engine_factory(settings, sink))
        return holder["engine"]

    srv = InProcessServer(ServerSettings(model=str(server_tiny_checkpoint), served_model_name="faulty"), factory)
    srv.wait_ready()
    srv.engine = holder["engine"]
    yield srv
    srv.stop()


@pytest.fixture
def faulty(faulty_server):
    faulty_server.engine.mode = None
    yield faulty_server
    faulty_server.engine.mode = None


LONG = {"max_tokens": 40, "ignore_eos": True}


@pytest.mark.parametrize("mode", ["error_output", "raise", "resolve_raises"])
def test_500_internal_fault(faulty, mode):
    faulty.engine.mode = mode
    r = httpx.post(faulty.url + "/v1/completions", json={"prompt": "hi", **LONG}, timeout=60)
    err = assert_error(r, 500, code="internal_error", type_="server_error")
    assert "secret internal detail" not in r.text
    assert r.headers["x-request-id"]  # answered inside the middleware, whatever raised
    r = httpx.post(faulty.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **LONG},
                   timeout=60)
    assert_error(r, 500, code="internal_error")
    if mode == "error_output":
        assert "injected fault" in err["message"]
    faulty.engine.mode = None
    assert httpx.post(faulty.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60).status_code == 200


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})])
@pytest.mark.parametrize("mode", ["error_output", "raise"])
def test_error_after_stream_started(faulty, server_sse, path, body, mode):
    faulty.engine.mode = mode
    r = httpx.post(faulty.url + path, json={**body, **LONG, "stream": True, "stream_drafts": True,
                                            "stream_options": {"include_usage": True}}, timeout=60)
    assert r.status_code == 200
    frames = server_sse.parse_json(r.content)
    assert frames[-1] == "[DONE]"
    err = frames[-2]
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["code"] == "internal_error" and err["error"]["type"] == "server_error"
    assert "secret internal detail" not in r.text
    assert len(frames) >= 3  # something was streamed before the error
    # no usage chunk and no finish before the error (with include_usage every chunk has "usage": null)
    assert all(f["usage"] is None and f["choices"][0]["finish_reason"] is None for f in frames[:-2])
    # the official SDK raises on the error chunk
    client = openai.OpenAI(base_url=faulty.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.completions.create(model="faulty", prompt="hi", stream=True, max_tokens=40,
                                           extra_body={"ignore_eos": True, "stream_drafts": True}):
            pass


# -- preprocessing turns -----------------------------------------------------------------------------

class GatedTemplates:
    """The engine's tokenizer, whose rendering of long chats waits for ``release`` and counts how many
    run at once (short chats render at once, on the event loop: they are not held)."""

    def __init__(self, inner):
        self.inner, self.running, self.most = inner, 0, 0
        self.lock, self.release = threading.Lock(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        if len(messages) <= 32:
            return self.inner.apply_chat_template(messages, *args, **kwargs)
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(60)
            return self.inner.apply_chat_template(messages, *args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("concurrency", [1, 2])
def test_long_chats_are_rendered_preprocess_concurrency_at_a_time(server_tiny_checkpoint, concurrency):
    """--preprocess-concurrency: of three long chats (rendered in worker threads), that many render at
    once and the others wait their turn, while a short chat is answered meanwhile; all three then finish."""
    from concurrent.futures import ThreadPoolExecutor

    from server.chat import RENDER_IN_THREAD_MESSAGES

    holder = {}

    def factory(settings, sink):
        engine = default_engine_factory(settings, sink)
        engine.tokenizer = holder["tokenizer"] = GatedTemplates(engine.tokenizer)
        return engine

    srv = InProcessServer(ServerSettings(model=str(server_tiny_checkpoint), preprocess_concurrency=concurrency), factory)
    try:
        srv.wait_ready()
        gated = holder["tokenizer"]
        user = {"role": "user", "content": "hi"}
        long_chat = [user, {"role": "assistant", "content": "ok"}] * 20 + [user]
        assert RENDER_IN_THREAD_MESSAGES < len(long_chat)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, srv.url + "/v1/chat/completions", timeout=60,
                                   json={"messages": long_chat, "max_tokens": 4}) for _ in range(3)]
            deadline = time.monotonic() + 30
            while gated.running < concurrency:  # the turns are taken
                assert time.monotonic() < deadline
                time.sleep(0.02)
            short = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [user], "max_tokens": 4}, timeout=30)
            assert short.status_code == 200, short.text
            time.sleep(0.3)  # room for a request past the turns to start rendering (it must not)
            assert gated.running == concurrency and not any(f.done() for f in futures)
            gated.release.set()
            assert [f.result().status_code for f in futures] == [200] * 3
        assert gated.most == concurrency
    finally:
        holder.get("tokenizer") and holder["tokenizer"].release.set()
        srv.stop()
