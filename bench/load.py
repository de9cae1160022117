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


async def _one(client: httpx.AsyncClient, url: str, model: str, item: WorkItem, headers: dict,
               drafts: bool) -> RequestResult:
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
    t0 = time.perf_counter()
    ttft = ttfd = None
    usage = None
    pieces: list[str] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, time.perf_counter() - t0, None, None, 0, None, None, f"{resp.status_code} {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(False, time.perf_counter() - t0, ttft, ttfd, 0, None, None, str(chunk["error"]))
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
    except httpx.HTTPError as exc:
        return RequestResult(False, time.perf_counter() - t0, ttft, ttfd, 0, None, None, repr(exc))
    latency = time.perf_counter() - t0
    usage = usage or {}
    return RequestResult(True, latency, ttft, ttfd, int(usage.get("completion_tokens", 0)),
                         usage.get("denoising_steps"), usage.get("canvases"), seed=item.seed, text="".join(pieces))


async def run_load(base_url: str, model: str, items: list[WorkItem], *, concurrency: int,
                   request_rate: float | None = None, api_key: str | None = None, seed: int = 0,
                   timeout: float = 600.0, drafts: bool = False) -> tuple[list[RequestResult], float]:
    """Send every item; closed loop with ``concurrency`` workers, or Poisson arrivals at
    ``request_rate`` requests/s (still capped at ``concurrency`` in flight). Returns results and wall time."""
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
                    results.append(await _one(client, url, model, item, headers, drafts))
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            async def send(item):
                async with gate:
                    results.append(await _one(client, url, model, item, headers, drafts))
            tasks = []
            for item in items:
                tasks.append(asyncio.create_task(send(item)))
                await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return results, wall
