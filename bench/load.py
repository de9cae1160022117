"""Load generator over the OpenAI-compatible HTTP API (asyncio + httpx, streaming).

Works against any OpenAI-compatible server: the diffusion extension fields are sent, and used
when the reply carries them (draft chunks, usage.denoising_steps / usage.canvases).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

from .workload import WorkItem


@dataclass
class RequestResult:
    ok: bool
    latency: float
    ttft: float | None  # first committed text
    ttfd: float | None  # first draft
    completion_tokens: int
    denoising_steps: int | None
    canvases: int | None
    error: str | None = None
    seed: int | None = None  # the work item's seed (unique per item): which request this was
    text: str = ""  # the completion's text, as streamed
    tokens: list[str] | None = None  # with logprobs asked for: each committed token, as the server shows it


async def _sse_lines(resp):
    """The stream's lines, cut at "\n" only, as SSE frames them (httpx's aiter_lines also cuts at U+0085,
    U+2028 and U+2029, which a server may send raw inside a frame's JSON)."""
    pending = ""
    async for text in resp.aiter_text():
        pending += text
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


def _failed(t0: float, error: str, ttft: float | None = None, ttfd: float | None = None) -> RequestResult:
    return RequestResult(False, time.perf_counter() - t0, ttft, ttfd, 0, None, None, error)


async def _one(client: httpx.AsyncClient, url: str, model: str, item: WorkItem, headers: dict,
               drafts: bool, logprobs: bool = False, t0: float | None = None) -> RequestResult:
    """One streamed completion. Its clock starts at ``t0`` (a Poisson arrival's scheduled time), else now.
    A stream counts as a success only when it ends with ``[DONE]`` after its usage chunk."""
    body = {
        "model": model,
        "prompt": list(item.prompt_ids),
        "max_tokens": item.max_tokens,
        "seed": item.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "max_denoising_steps": item.max_denoising_steps,
        "stream_drafts": drafts,
    }
    if logprobs:
        body["logprobs"] = 0
    t0 = time.perf_counter() if t0 is None else t0
    ttft = ttfd = None
    usage = None
    done = False
    pieces: list[str] = []
    tokens: list[str] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return _failed(t0, f"{resp.status_code} {text[:200]}")
            async for line in _sse_lines(resp):
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return _failed(t0, str(chunk["error"]), ttft, ttfd)
                now = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice.get("diffusion") is not None or chunk.get("diffusion") is not None:
                        ttfd = now if ttfd is None else ttfd
                    if choice.get("text"):
                        pieces.append(choice["text"])
                        ttft = now if ttft is None else ttft
                        ttfd = now if ttfd is None else ttfd
                    if choice.get("logprobs"):
                        tokens.extend(choice["logprobs"].get("tokens") or [])
    except Exception as exc:  # a refused connection, a broken or malformed stream: this request failed
        return _failed(t0, repr(exc), ttft, ttfd)
    if not done or usage is None:
        return _failed(t0, "the stream ended before [DONE]" if not done else "the stream carried no usage",
                       ttft, ttfd)
    latency = time.perf_counter() - t0
    try:
        completion_tokens = int(usage["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        return _failed(t0, f"usage without a completion token count: {usage!r}"[:200], ttft, ttfd)
    return RequestResult(True, latency, ttft, ttfd, completion_tokens, usage.get("denoising_steps"),
                         usage.get("canvases"), seed=item.seed, text="".join(pieces),
                         tokens=tokens if logprobs else None)


async def run_load(base_url: str, model: str, items: list[WorkItem], *, concurrency: int,
                   request_rate: float | None = None, api_key: str | None = None, seed: int = 0,
                   timeout: float = 600.0, drafts: bool = False,
                   logprobs_for: frozenset[int] = frozenset()) -> tuple[list[RequestResult], float]:
    """Send every item; closed loop with ``concurrency`` workers, or Poisson arrivals at
    ``request_rate`` requests/s (still capped at ``concurrency`` in flight: a request's latency counts
    from its scheduled arrival, time spent waiting for the cap included). The items whose seed is in
    ``logprobs_for`` ask for log-probabilities (their results carry ``tokens``). Returns results and wall
    time."""
    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    results: list[RequestResult] = []
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        if request_rate is None:
            async def worker():
                while not queue.empty():
                    item = queue.get_nowait()
                    results.append(await _one(client, url, model, item, headers, drafts,
                                              item.seed in logprobs_for))
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            async def send(item):
                arrival = time.perf_counter()
                async with gate:
                    results.append(await _one(client, url, model, item, headers, drafts,
                                              item.seed in logprobs_for, t0=arrival))
            tasks = []
            for i, item in enumerate(items):
                tasks.append(asyncio.create_task(send(item)))
                if i + 1 < len(items):  # no gap after the last arrival
                    await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return results, wall
