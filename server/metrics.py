"""Prometheus metrics: the engine's plain stats turned into vLLM-style series.

Names mirror vLLM's (``vllm:`` becomes ``diffusion_server:``) so dashboards port by renaming;
the diffusion-native series are added under the same prefix. Base units (seconds, tokens),
``_total`` counters, no per-request labels. Each instance has its own registry.

The engine calls ``on_pass`` / ``on_canvas`` / ``on_request_finished`` from its step-loop
thread; prometheus_client's metric objects are thread-safe and these calls are cheap.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.stats import CanvasStats, PassStats, RequestStats

PREFIX = "diffusion_server:"

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
PER_STEP_BUCKETS = (0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

FINISH_REASONS = ("stop", "length", "abort", "error")

# name (without prefix), type, help. docs/metrics.md is generated from the same text (python -m tools.reference_docs).
METRIC_DOCS = [
    ("num_requests_running", "gauge", "Requests in the running set: prefilling their prompt or denoising a canvas."),
    ("num_requests_waiting", "gauge",
     "Requests queued, waiting for a place in the running set (counted from their submission)."),
    ("prompt_tokens_total", "counter", "Prompt tokens of finished engine requests (each choice counts its prompt)."),
    ("generation_tokens_total", "counter", "Completion tokens of finished engine requests, as usage.completion_tokens counts them (eos included; for a request whose client left, what it had committed)."),
    ("request_success_total", "counter", "Finished engine requests (one per choice), by the label finished_reason: stop, length, abort (client gone, shutdown, the engine died, or a sibling choice failed), error."),
    ("denoising_steps_total", "counter", "Decoder steps run, summed over requests."),
    ("canvases_total", "counter", "Canvases that left the decoder batch (committed)."),
    ("time_to_first_token_seconds", "histogram", "Arrival to first committed token."),
    ("e2e_request_latency_seconds", "histogram", "Arrival to finish."),
    ("request_queue_time_seconds", "histogram", "Arrival to admission into the running batch."),
    ("request_inference_time_seconds", "histogram", "Admission into the running batch to finish."),
    ("request_prompt_tokens", "histogram", "Prompt tokens per engine request."),
    ("request_generation_tokens", "histogram", "Completion tokens per engine request (as usage counts them)."),
    ("time_to_first_draft_seconds", "histogram", "Arrival to the first finished decoder step (first draft)."),
    ("denoising_steps_per_canvas", "histogram", "Decoder steps a canvas took before it was committed."),
    ("tokens_committed_per_step", "histogram", "Tokens a canvas committed divided by its decoder steps."),
    ("canvas_latency_seconds", "histogram", "A canvas's first decoder step to its commit."),
    ("decoder_batch_size", "histogram", "Canvases in the decoder batch of one scheduler pass (passes with a decoder call)."),
    ("engine_pass_seconds", "histogram", "Wall time of one scheduler pass."),
    ("kv_cache_usage_perc", "gauge", "Fraction (0-1) of the engine's KV token budget the running requests' slot buffers take (vLLM's name)."),
    ("engine_live_states", "gauge", "Per-request state objects the engine holds (requests, runner rows, KV entries); 0 when idle. A leak check."),
    ("http_requests_in_flight", "gauge", "HTTP requests to /v1 inside the server (a stream counts until its last byte)."),
    ("http_errors_total", "counter", "Error responses sent, by the label code (the HTTP status as a string, such as \"429\"; docs/api.md#errors lists them); an error chunk that ends a stream counts under the status its error has."),
]


# No `_created` timestamp series beside each counter and histogram: vLLM exports none, and they are not
# in docs/metrics.md. The switch is prometheus_client's, for the whole process.
disable_created_metrics()


class ServerMetrics:
    """Owns the registry; implements ``engine.stats.StatsSink``."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        doc = {name: text for name, _, text in METRIC_DOCS}

        def name(n: str) -> str:
            return PREFIX + n

        def hist(n: str, buckets) -> Histogram:
            return Histogram(name(n), doc[n], buckets=buckets, registry=r)

        def counter(n: str, labels=()) -> Counter:
            return Counter(name(n.removesuffix("_total")), doc[n], labelnames=labels, registry=r)

        self.num_requests_running = Gauge(name("num_requests_running"), doc["num_requests_running"], registry=r)
        self.num_requests_waiting = Gauge(name("num_requests_waiting"), doc["num_requests_waiting"], registry=r)
        self.prompt_tokens = counter("prompt_tokens_total")
        self.generation_tokens = counter("generation_tokens_total")
        self.request_success = counter("request_success_total", ("finished_reason",))
        for reason in FINISH_REASONS:
            self.request_success.labels(finished_reason=reason)
        self.denoising_steps = counter("denoising_steps_total")
        self.canvases = counter("canvases_total")
        self.ttft = hist("time_to_first_token_seconds", LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", LATENCY_BUCKETS)
        self.inference_time = hist("request_inference_time_seconds", LATENCY_BUCKETS)
        self.request_prompt_tokens = hist("request_prompt_tokens", TOKEN_BUCKETS)
        self.request_generation_tokens = hist("request_generation_tokens", TOKEN_BUCKETS)
        self.ttfd = hist("time_to_first_draft_seconds", LATENCY_BUCKETS)
        self.steps_per_canvas = hist("denoising_steps_per_canvas", STEP_BUCKETS)
        self.tokens_per_step = hist("tokens_committed_per_step", PER_STEP_BUCKETS)
        self.canvas_latency = hist("canvas_latency_seconds", LATENCY_BUCKETS)
        self.decoder_batch_size = hist("decoder_batch_size", BATCH_BUCKETS)
        self.pass_seconds = hist("engine_pass_seconds", LATENCY_BUCKETS)
        self.http_errors = counter("http_errors_total", ("code",))
        self.engine_live_states = Gauge(name("engine_live_states"), doc["engine_live_states"], registry=r)
        self.kv_cache_usage = Gauge(name("kv_cache_usage_perc"), doc["kv_cache_usage_perc"], registry=r)
        self.http_requests_in_flight = Gauge(name("http_requests_in_flight"), doc["http_requests_in_flight"], registry=r)

    def bind_engine_gauges(self, get_counts: Callable[[], tuple[int, int]],
                           get_live_states: Callable[[], int] | None = None,
                           get_kv_usage: Callable[[], float] | None = None) -> None:
        """Read running/waiting (and live states) from the engine at scrape time (cheap reads)."""

        def running() -> float:
            counts = get_counts()
            return counts[0] if counts else 0

        def waiting() -> float:
            counts = get_counts()
            return counts[1] if counts else 0

        self.num_requests_running.set_function(running)
        self.num_requests_waiting.set_function(waiting)
        if get_live_states is not None:
            self.engine_live_states.set_function(get_live_states)
        if get_kv_usage is not None:
            self.kv_cache_usage.set_function(get_kv_usage)

    def bind_in_flight(self, get_count: Callable[[], int]) -> None:
        self.http_requests_in_flight.set_function(get_count)

    def count_error(self, status: int) -> None:
        self.http_errors.labels(code=str(status)).inc()

    # StatsSink

    def on_pass(self, stats: PassStats) -> None:
        self.pass_seconds.observe(stats.seconds)
        if stats.decoder_batch_size > 0:
            self.decoder_batch_size.observe(stats.decoder_batch_size)

    def on_canvas(self, stats: CanvasStats) -> None:
        self.canvases.inc()
        self.steps_per_canvas.observe(stats.denoising_steps)
        self.canvas_latency.observe(stats.seconds)
        if stats.denoising_steps > 0:
            self.tokens_per_step.observe(stats.committed_tokens / stats.denoising_steps)

    def on_choice_finished(self, finish_reason: str, prompt_tokens: int, generated_tokens: int) -> None:
        """One engine request (one choice) ended, as the client saw it. Called on the event loop.

        Finish reasons and token counts are taken from what the server returned (the same numbers
        as ``usage``), so they also cover requests the server itself cut short (client gone).
        ``RequestStats`` supplies the timings.
        """
        self.request_success.labels(finished_reason=finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generated_tokens)

    def on_request_finished(self, stats: RequestStats) -> None:
        self.denoising_steps.inc(stats.num_denoising_steps)
        self.e2e.observe(max(0.0, stats.finished_time - stats.arrival_time))
        if stats.scheduled_time is not None:
            self.queue_time.observe(max(0.0, stats.scheduled_time - stats.arrival_time))
            self.inference_time.observe(max(0.0, stats.finished_time - stats.scheduled_time))
        if stats.first_token_time is not None:
            self.ttft.observe(max(0.0, stats.first_token_time - stats.arrival_time))
        if stats.first_draft_time is not None:
            self.ttfd.observe(max(0.0, stats.first_draft_time - stats.arrival_time))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
