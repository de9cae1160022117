"""/metrics parsed with prometheus_client's parser; series move by the expected amounts."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

P = "diffusion_server:"
NO_LABELS = frozenset()


def reason(r: str):
    return frozenset({("finished_reason", r)})


def wait_for(live_server, key, value, timeout=30.0) -> dict:
    """Scrape until ``key`` reaches ``value`` (stats arrive from the engine thread); return the scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = live_server.metrics()
        if m.get(key) == value:
            return m
        assert time.monotonic() < deadline, f"{key} is {m.get(key)}, expected {value}"
        time.sleep(0.05)


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of ``url``/metrics, parsed with prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def delta(m1: dict, m0: dict, name: str, labels=NO_LABELS) -> float:
    return m1.get((P + name, labels), 0.0) - m0.get((P + name, labels), 0.0)


def test_exposition_format(live_server):
    r = httpx.get(live_server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    expected = {
        "num_requests_running": "gauge",
        "num_requests_waiting": "gauge",
        "kv_cache_usage_perc": "gauge",
        "prompt_tokens": "counter",
        "generation_tokens": "counter",
        "request_success": "counter",
        "denoising_steps": "counter",
        "canvases": "counter",
        "time_to_first_token_seconds": "histogram",
        "e2e_request_latency_seconds": "histogram",
        "request_queue_time_seconds": "histogram",
        "request_inference_time_seconds": "histogram",
        "request_prompt_tokens": "histogram",
        "request_generation_tokens": "histogram",
        "time_to_first_draft_seconds": "histogram",
        "denoising_steps_per_canvas": "histogram",
        "tokens_committed_per_step": "histogram",
        "canvas_latency_seconds": "histogram",
        "decoder_batch_size": "histogram",
        "engine_pass_seconds": "histogram",
        "http_errors": "counter",
    }
    for name, kind in expected.items():
        assert P + name in families, name
        assert families[P + name].type == kind, name
    for f in families.values():
        assert f.name.startswith(P)
        for s in f.samples:
            assert set(s.labels) <= {"finished_reason", "code", "le"}, s
            assert not s.name.endswith("_created"), s.name  # not documented, and vLLM has none
            if f.type == "counter":
                assert s.name.endswith("_total"), s.name
    # every finish reason is exported from the start, at 0 or more
    for r_ in ("stop", "length", "abort", "error"):
        assert any(s.labels.get("finished_reason") == r_ for s in families[P + "request_success"].samples)


def _check_histograms(m: dict) -> None:
    buckets: dict[str, list[tuple[float, float]]] = {}
    for (name, labels), value in m.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            buckets.setdefault(name[: -len("_bucket")], []).append((float(le), value))
    assert buckets
    for base, bs in buckets.items():
        bs.sort()
        values = [v for _, v in bs]
        assert values == sorted(values), f"{base}: buckets must be cumulative"
        assert bs[-1][0] == float("inf") and bs[-1][1] == m[(base + "_count", NO_LABELS)]


def test_counters_and_histograms_move_by_known_amounts(live_server):
    m0 = live_server.wait_idle()
    prompt = "metrics!"  # 8 byte tokens
    body = {"model": live_server.model_name, "prompt": prompt, "n": 2, "max_tokens": 20, "seed": 77, "ignore_eos": True}
    r = httpx.post(live_server.base_url + "/completions", json=body, headers=live_server.headers, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 40
    target = m0[(P + "request_success_total", reason("length"))] + 2
    m1 = wait_for(live_server, (P + "request_success_total", reason("length")), target)

    assert delta(m1, m0, "prompt_tokens_total") == 2 * len(prompt)
    assert delta(m1, m0, "generation_tokens_total") == 40
    for r_ in ("stop", "abort", "error"):
        assert delta(m1, m0, "request_success_total", reason(r_)) == 0
    for h in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
              "request_inference_time_seconds", "time_to_first_draft_seconds", "request_prompt_tokens",
              "request_generation_tokens"):
        assert delta(m1, m0, h + "_count") == 2, h
    assert delta(m1, m0, "request_prompt_tokens_sum") == 16
    assert delta(m1, m0, "request_generation_tokens_sum") == 40
    assert delta(m1, m0, "e2e_request_latency_seconds_sum") > 0
    steps, canvases = usage["denoising_steps"], usage["canvases"]
    assert canvases == 4  # two choices of two canvases (16 + 4 tokens)
    assert delta(m1, m0, "denoising_steps_total") == steps
    assert delta(m1, m0, "canvases_total") == canvases
    assert delta(m1, m0, "denoising_steps_per_canvas_count") == canvases
    assert delta(m1, m0, "denoising_steps_per_canvas_sum") == steps
    assert delta(m1, m0, "canvas_latency_seconds_count") == canvases
    assert delta(m1, m0, "tokens_committed_per_step_count") == canvases
    # every denoising step of every canvas was one row of some pass's decoder batch
    assert delta(m1, m0, "decoder_batch_size_sum") == steps
    assert 1 <= delta(m1, m0, "decoder_batch_size_count") <= steps
    assert delta(m1, m0, "engine_pass_seconds_count") >= delta(m1, m0, "decoder_batch_size_count")
    assert m1[(P + "num_requests_running", NO_LABELS)] == 0
    assert m1[(P + "num_requests_waiting", NO_LABELS)] == 0
    _check_histograms(m1)


def test_stop_string_and_errors_are_counted(live_server):
    m0 = live_server.wait_idle()
    for seed in range(9, 40):  # the first seed whose random output has a printable ASCII character past 5
        base = {"model": live_server.model_name, "prompt": "x", "max_tokens": 48, "seed": seed, "ignore_eos": True}
        text = httpx.post(live_server.base_url + "/completions", json=base, headers=live_server.headers,
                          timeout=60).json()["choices"][0]["text"]
        stop = next((ch for ch in text[5:] if ch.isascii() and ch.isprintable()), None)
        if stop is not None:
            break
    assert stop is not None, "no output with a printable ASCII character past position 5"
    tried = seed - 9 + 1  # runs to length before the one with the stop string
    r = httpx.post(live_server.base_url + "/completions", json={**base, "stop": stop}, headers=live_server.headers,
                   timeout=60)
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    m1 = wait_for(live_server, (P + "request_success_total", reason("stop")),
                  m0[(P + "request_success_total", reason("stop"))] + 1)
    assert delta(m1, m0, "request_success_total", reason("length")) == tried
    assert delta(m1, m0, "request_success_total", reason("abort")) == 0

    code = lambda c: frozenset({("code", c)})  # noqa: E731
    httpx.post(live_server.base_url + "/completions", json={"model": "nope", "prompt": "x"}, headers=live_server.headers)
    httpx.post(live_server.base_url + "/completions", json={"prompt": "x", "n": "y"}, headers=live_server.headers)
    httpx.post(live_server.base_url + "/completions", json={"prompt": "x"})
    m2 = live_server.metrics()
    assert delta(m2, m1, "http_errors_total", code("404")) == 1
    assert delta(m2, m1, "http_errors_total", code("400")) == 1
    assert delta(m2, m1, "http_errors_total", code("401")) == 1
