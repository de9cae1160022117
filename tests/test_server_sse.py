"""Raw server-sent events: exact frame sequences, draft chunks, and curl."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest

from tools.tiny_checkpoint import END_OF_TURN_ID, EOS_ID

CANVAS = 16
EOS_IDS = {EOS_ID, END_OF_TURN_ID}


def post_stream(live_server, path: str, body: dict) -> httpx.Response:
    r = httpx.post(live_server.base_url + path, json=body, headers=live_server.headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r


def test_completion_default_stream_frames(live_server, server_sse):
    body = {"model": live_server.model_name, "prompt": "Once upon", "max_tokens": 40, "seed": 12, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    r = post_stream(live_server, "/completions", body)
    frames = server_sse.parse_json(r.content)
    assert frames[-1] == "[DONE]"
    *chunks, finish, usage_chunk, _ = frames
    ids = {c["id"] for c in frames[:-1]}
    assert len(ids) == 1 and next(iter(ids)).startswith("cmpl-")
    assert r.headers["x-request-id"] == frames[0]["id"]  # the id in the server's log line
    for c in frames[:-1]:
        assert c["object"] == "text_completion" and c["model"] == live_server.model_name
    assert all(c["usage"] is None for c in frames[:-2])  # OpenAI: null in every chunk before the usage chunk
    assert chunks, "no text chunks"
    for c in chunks:
        (choice,) = c["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] is None and choice["text"] != ""
        assert "diffusion" not in choice
    (fc,) = finish["choices"]
    assert fc == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    assert usage_chunk["choices"] == []
    u = usage_chunk["usage"]
    assert u["completion_tokens"] == 40 and u["prompt_tokens"] == len("Once upon")
    assert u["total_tokens"] == u["prompt_tokens"] + 40 and u["canvases"] == 3
    full = httpx.post(live_server.base_url + "/completions", json={**body, "stream": False, "stream_options": None}, headers=live_server.headers,
                      timeout=60).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert full["usage"] == u


def test_chat_default_stream_frames_without_usage(live_server, server_sse):
    body = {"model": live_server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
            "seed": 3, "stream": True}
    frames = server_sse.parse_json(post_stream(live_server, "/chat/completions", body).content)
    role, *chunks, finish, done = frames
    assert done == "[DONE]"
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    assert chunks, "no content chunks"
    for c in chunks:
        (choice,) = c["choices"]
        assert set(choice["delta"]) == {"content"} and choice["delta"]["content"] and choice["finish_reason"] is None
    (fc,) = finish["choices"]
    assert fc["delta"] == {} and fc["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in frames[:-1])


def reconstruct_canvases(draft_exts: list[dict], max_steps: int) -> list[list[int]]:
    """Check the draft sequence of one choice and return each canvas's last draft (token ids)."""
    canvases: dict[int, list[dict]] = {}
    for ext in draft_exts:
        canvases.setdefault(ext["canvas"], []).append(ext)
    assert sorted(canvases) == list(range(len(canvases))), "canvases must be numbered 0, 1, 2, ..."
    last = []
    order = [e["canvas"] for e in draft_exts]
    assert order == sorted(order), "a canvas's drafts must all come before the next canvas's"
    for k in sorted(canvases):
        steps = canvases[k]
        assert [e["step"] for e in steps] == list(range(1, len(steps) + 1)), f"canvas {k}: missing steps"
        assert all(e["max_steps"] == max_steps for e in steps)
        assert len(steps) <= max_steps
        tokens = [None] * CANVAS
        for i, e in enumerate(steps):
            if i == 0:
                assert sorted(e["changed"]) == list(range(CANVAS)), "the first draft of a canvas lists every position"
            assert len(e["changed"]) == len(e["changed_token_ids"])
            for pos, tok in zip(e["changed"], e["changed_token_ids"]):
                assert tokens[pos] != tok or i == 0, "changed lists only positions that changed"
                tokens[pos] = tok
            assert isinstance(e["draft"], str)
        last.append(tokens)
    return last


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("seed,ignore_eos,max_tokens", [(5, True, 40), (6, False, 64), (8, False, 64), (31, True, 16)])
def test_draft_stream(live_server, server_sse, endpoint, seed, ignore_eos, max_tokens):
    """Every step of every canvas arrives as a draft chunk; the last draft of a canvas is what it commits."""
    steps = 6
    body = {"model": live_server.model_name, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "stream_drafts": True, "ignore_eos": ignore_eos, "max_denoising_steps": steps,
            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        path, body["messages"] = "/chat/completions", [{"role": "user", "content": "draw"}]
    else:
        path, body["prompt"] = "/completions", "draw"
    frames = server_sse.parse_json(post_stream(live_server, path, body).content)
    assert frames[-1] == "[DONE]"
    usage = frames[-2]["usage"]
    assert frames[-2]["choices"] == []
    exts, text, finish = [], "", None
    for c in frames[:-2]:
        (choice,) = c["choices"]
        if "diffusion" in choice:
            exts.append(choice["diffusion"])
            assert choice["finish_reason"] is None
            assert (choice["delta"] == {}) if endpoint == "chat" else (choice["text"] == "")
        else:
            text += choice["delta"].get("content", "") if endpoint == "chat" else choice["text"]
            finish = choice["finish_reason"] or finish
    last_drafts = reconstruct_canvases(exts, steps)
    assert len(last_drafts) == usage["canvases"]
    assert len(exts) == usage["denoising_steps"]
    committed = [t for canvas in last_drafts for t in canvas]
    # trim like the engine: the first max_tokens tokens, cut after the first eos
    committed = committed[:max_tokens]
    expected_finish = "length"
    if not ignore_eos:
        for i, t in enumerate(committed):
            if t in EOS_IDS:
                committed = committed[: i + 1]
                expected_finish = "stop"
                break
    assert usage["completion_tokens"] == len(committed)
    assert finish == expected_finish
    # byte tokenizer: id = byte + 5; special tokens (< 5) are not text
    expected_text = bytes(t - 5 for t in committed if t >= 5).decode("utf-8", errors="replace")
    assert text == expected_text
    # the same request without drafts streams the same text
    plain = {**body, "stream_drafts": False}
    plain_frames = server_sse.parse_json(post_stream(live_server, path, plain).content)
    plain_text = "".join(
        (c["choices"][0]["delta"].get("content", "") if endpoint == "chat" else c["choices"][0]["text"])
        for c in plain_frames[:-2]
    )
    assert plain_text == text
    assert plain_frames[-2]["usage"] == usage


def test_draft_chunk_draft_text_is_the_canvas(live_server, server_sse):
    body = {"model": live_server.model_name, "prompt": "a", "max_tokens": 16, "seed": 2, "stream": True,
            "stream_drafts": True, "ignore_eos": True}
    frames = server_sse.parse_json(post_stream(live_server, "/completions", body).content)
    exts = [c["choices"][0]["diffusion"] for c in frames[:-1] if "diffusion" in c["choices"][0]]
    assert exts, "no draft chunk"
    tokens = [None] * CANVAS
    for e in exts:
        for pos, tok in zip(e["changed"], e["changed_token_ids"]):
            tokens[pos] = tok
        assert e["draft"] == bytes(t - 5 for t in tokens if t >= 5).decode("utf-8", errors="replace")


def test_n2_stream_interleaves_valid_choices(live_server, server_sse):
    body = {"model": live_server.model_name, "prompt": "zz", "n": 2, "max_tokens": 20, "seed": 40, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    frames = server_sse.parse_json(post_stream(live_server, "/completions", body).content)
    texts = {0: "", 1: ""}
    finishes = {}
    for c in frames[:-2]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            assert choice["index"] not in finishes
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "length", 1: "length"}
    assert frames[-2]["usage"]["completion_tokens"] == 40
    full = httpx.post(live_server.base_url + "/completions", json={**body, "stream": False, "stream_options": None}, headers=live_server.headers,
                      timeout=60).json()
    assert [c["text"] for c in full["choices"]] == [texts[0], texts[1]]


def choice_streams(frames: list) -> dict[int, list[dict]]:
    """Each choice index's chunk entries, in order (the usage chunk and [DONE] left out)."""
    per: dict[int, list[dict]] = {}
    for frame in frames[:-1]:
        for choice in frame["choices"]:
            per.setdefault(choice["index"], []).append(choice)
    return per


def test_echoed_prompts_stream_as_they_answer(live_server, server_sse):
    """Two prompts, two choices each, with echo: each of the four streamed choices carries its own prompt
    and text, as the plain response does."""
    body = {"model": live_server.model_name, "prompt": ["abc", "xyz"], "n": 2, "echo": True, "max_tokens": 20,
            "seed": 7, "ignore_eos": True, "stream": True}
    per = choice_streams(server_sse.parse_json(post_stream(live_server, "/completions", body).content))
    full = httpx.post(live_server.base_url + "/completions", json={**body, "stream": False},
                      headers=live_server.headers, timeout=60).json()
    assert sorted(per) == [0, 1, 2, 3]
    assert ["".join(c["text"] for c in per[i]) for i in range(4)] == [c["text"] for c in full["choices"]]
    assert [full["choices"][i]["text"][:3] for i in range(4)] == ["abc", "abc", "xyz", "xyz"]


def test_chat_choices_stream_as_they_answer(live_server, server_sse):
    """Chat with n=3: each choice opens with its own role chunk, then its content, then its finish reason;
    together they are the plain response's messages."""
    body = {"model": live_server.model_name, "messages": [{"role": "user", "content": "hi"}], "n": 3,
            "max_tokens": 24, "seed": 5, "stream": True}
    per = choice_streams(server_sse.parse_json(post_stream(live_server, "/chat/completions", body).content))
    full = httpx.post(live_server.base_url + "/chat/completions", json={**body, "stream": False},
                      headers=live_server.headers, timeout=60).json()
    assert sorted(per) == [0, 1, 2]
    for i, choice in enumerate(full["choices"]):
        first, *rest = per[i]
        assert first["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in rest)
        assert "".join(c["delta"].get("content", "") for c in rest) == choice["message"]["content"]
        assert [c["finish_reason"] for c in rest if c["finish_reason"]] == [choice["finish_reason"]]


def curl_examples(live_server) -> list[tuple[list[str], str]]:
    """The README's curl examples, pointed at the live server: (argv, kind)."""
    auth = ["-H", f"Authorization: Bearer {live_server.api_key}"]
    json_h = ["-H", "Content-Type: application/json"]
    m = live_server.model_name
    return [
        (["curl", "-sS", *auth, live_server.base_url + "/models"], "json"),
        (["curl", "-sS", *auth, *json_h, live_server.base_url + "/completions",
          "-d", json.dumps({"model": m, "prompt": "Once upon a time", "max_tokens": 32, "seed": 1})], "json"),
        (["curl", "-sS", "-N", *auth, *json_h, live_server.base_url + "/chat/completions",
          "-d", json.dumps({"model": m, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32,
                            "stream": True, "stream_options": {"include_usage": True}})], "sse"),
        (["curl", "-sS", "-N", *auth, *json_h, live_server.base_url + "/completions",
          "-d", json.dumps({"model": m, "prompt": "Once upon a time", "max_tokens": 32, "stream": True,
                            "stream_drafts": True, "max_denoising_steps": 8})], "sse"),
        (["curl", "-sS", live_server.url + "/health"], "json"),
        (["curl", "-sS", live_server.url + "/metrics"], "text"),
    ]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_examples(live_server, server_sse):
    for argv, kind in curl_examples(live_server):
        out = subprocess.run(argv, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        if kind == "json":
            data = json.loads(out.stdout)
            assert "error" not in data
        elif kind == "sse":
            frames = server_sse.parse_json(out.stdout)
            assert frames[-1] == "[DONE]" and len(frames) >= 3
        else:
            assert b"diffusion_server:num_requests_running" in out.stdout
    # curl -d without a Content-Type header (form encoding) is still read as JSON
    out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {live_server.api_key}",
                          live_server.base_url + "/completions", "-d",
                          json.dumps({"prompt": "hi", "max_tokens": 4})], capture_output=True, timeout=60)
    assert json.loads(out.stdout)["object"] == "text_completion"


def test_keep_alive_pings_on_an_idle_stream(server_variant, server_sse):
    """A stream with nothing to send for a while (no drafts, a canvas of 64 steps before the first
    text) gets SSE comments (': ping ...') every --sse-ping-seconds (50 ms on this server); each is a
    comment line on its own, which SSE clients skip, and the data frames go on after it."""
    body = {"model": server_variant.model_name, "prompt": "quiet", "max_tokens": 4000, "ignore_eos": True,
            "max_denoising_steps": 64, "stability_threshold": 1000, "seed": 1, "stream": True}
    raw = b""
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server_variant.base_url + "/completions", json=body) as r:
            assert r.status_code == 200
            # read until a ping has come and a data frame has followed it (the stream itself would run
            # for minutes; the client's read timeout only bounds a hang)
            for part in r.iter_raw():
                raw += part
                ping = raw.find(b"\n\n: ping")
                if ping == -1 and raw.startswith(b": ping"):
                    ping = 0
                if ping != -1 and raw.find(b"data: {", ping) != -1 and raw.endswith(b"\n\n"):
                    break
    blocks = raw.decode().split("\n\n")[:-1]
    pings = [b for b in blocks if b.startswith(":")]
    assert pings and all(len(b.splitlines()) == 1 and b.startswith(": ping") for b in pings), pings
    data = server_sse.parse(raw.decode())  # the comments are skipped; every other block is one data frame
    assert len(data) == len(blocks) - len(pings) >= 1
    assert all(json.loads(d)["object"] == "text_completion" for d in data)


@pytest.mark.parametrize("ping_seconds, pings", [(0.05, True), (0, False)])
def test_ping_interval_zero_sends_no_keep_alive_comments(ping_seconds, pings):
    """``--sse-ping-seconds 0`` turns the keep-alive comments off (they never come, however long the
    stream is idle); any other interval sends them while it is."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from server import sse

    closed = []

    async def frames():
        await asyncio.sleep(0.3)  # idle: six intervals of 50 ms
        yield sse.chunk({"object": "text_completion"})
        yield sse.done()

    async def endpoint(request):
        return sse.SSEResponse(frames(), on_close=lambda: closed.append(True), ping_seconds=ping_seconds)

    with TestClient(Starlette(routes=[Route("/", endpoint)])) as client:
        body = client.get("/").text
    assert body.endswith('data: {"object":"text_completion"}\n\ndata: [DONE]\n\n')
    assert (": ping" in body) == pings, body
    assert closed == [True]
    # 0 becomes an interval that never elapses, whatever the installed sse-starlette makes of 0
    response = sse.SSEResponse(frames(), on_close=lambda: None, ping_seconds=ping_seconds)
    assert response.ping_interval == (ping_seconds or sse.NO_PING_SECONDS)


def test_a_frame_is_one_line_for_line_based_readers(live_server):
    """Text with NEL (U+0085), which the tiny byte-level model writes as bytes C2 85 (ids 199 and 138,
    here favoured by logit_bias), read as httpx's iter_lines reads a stream (lines as str.splitlines
    cuts them, U+0085, U+2028 and U+2029 included): every data line is a whole frame."""
    from server.sse import json_text

    text = "a\u2028b\x85c\u2029d"
    assert json_text({"text": text}).splitlines() == ['{"text":"a\\u2028b\\u0085c\\u2029d"}']
    body = {"model": live_server.model_name, "prompt": "hi", "max_tokens": 16, "seed": 1, "stream": True,
            "stream_drafts": True, "ignore_eos": True, "logit_bias": {"199": 100, "138": 100}}
    with httpx.stream("POST", live_server.base_url + "/completions", json=body, headers=live_server.headers,
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])
    frames = [json.loads(line[6:]) for line in lines[:-1]]
    assert "\x85" in "".join(c["choices"][0]["text"] for c in frames if c["choices"])
