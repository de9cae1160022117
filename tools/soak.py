"""Soak test: mixed valid and invalid traffic with disconnects against a diffusion-server on loopback.

    python -m tools.soak --duration 120                  # starts a server on a tiny random checkpoint
    python -m tools.soak --model PATH --duration 600     # starts a server on PATH
    python -m tools.soak --url http://127.0.0.1:8000 --pid 1234 --api-key KEY --body-bytes 16777216

Checks, after the traffic stops, that the server's live request state is back to zero (running and
waiting requests, the engine's live per-request states, HTTP requests in flight, from /metrics),
that its RSS (from /proc/PID/status) is back near its level after the warm-up, that no response was a
5xx or outside OpenAI's error shape, that valid traffic was answered 200 or 429 (a 4xx there is a
failure too), and that each kind of traffic that ran did what it is for (served, or cut by the client).
Prints a JSON summary; exit status 1 when a check fails.
With --url, --body-bytes must be that server's --max-request-body-bytes: the oversized traffic expects
a 413 one byte past it. Not part of the test suite; bounded by --duration. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
GAUGES = {
    "running": "diffusion_server:num_requests_running",
    "waiting": "diffusion_server:num_requests_waiting",
    "live_states": "diffusion_server:engine_live_states",
    "in_flight": "diffusion_server:http_requests_in_flight",
}

BAD_BODIES = [
    ("/completions", b"{not json"),
    ("/completions", b"[1, 2]"),
    ("/completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("/completions", b'{"prompt": "\xff\xfe"}'),
    ("/completions", b'{"prompt": "hi", "x": ' + b"[" * 100 + b"]" * 100 + b"}"),
    ("/completions", json.dumps({"prompt": "hi", "max_tokens": "10"}).encode()),
    ("/completions", json.dumps({"prompt": "hi", "n": 10**6}).encode()),
    ("/completions", json.dumps({"prompt": [5, -1]}).encode()),
    ("/completions", json.dumps({"prompt": [10**7]}).encode()),
    ("/completions", json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode()),
    ("/completions", json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode()),
    ("/completions", json.dumps({"prompt": "hi", "stream_options": {"include_usage": True}}).encode()),
    ("/completions", json.dumps({"model": "nope", "prompt": "hi"}).encode()),
    ("/chat/completions", json.dumps({"messages": []}).encode()),
    ("/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()),
]


# the share of each kind of traffic: [lo, hi) of a uniform roll
# What each kind of traffic is for: a soak where a kind ran and never got this tested nothing of it.
INTENDED = {"valid": "200", "stream": "200", "stream_cut": "cut", "plain_cut": "cut"}
KIND_ROLLS = {"valid": (0.0, 0.25), "stream": (0.25, 0.45), "stream_cut": (0.45, 0.60), "plain_cut": (0.60, 0.70),
              "invalid": (0.70, 0.95), "oversized": (0.95, 1.0)}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"soak: {url} is not a loopback address; this tool only talks to 127.0.0.1/::1/localhost")


class Soak:
    def __init__(self, args, url: str, headers: dict):
        self.args = args
        self.base = url.rstrip("/") + "/v1"
        self.url = url.rstrip("/")
        self.headers = headers
        self.counts: Counter = Counter()
        self.unexpected: list[str] = []
        self.rng = random.Random(args.seed)
        self.long_tokens = 2000  # the cut traffic's max_tokens: long enough to be cut (set_long_tokens)

    def set_long_tokens(self) -> None:
        """The cut traffic's max_tokens: ``--long-tokens``, else 2000 within the served model's context (less
        room for its prompts)."""
        if self.args.long_tokens is not None:
            self.long_tokens = self.args.long_tokens
            return
        card = httpx.get(self.base + "/models", headers=self.headers, timeout=10).json()["data"][0]
        self.long_tokens = max(1, min(2000, card.get("max_model_len", 2000) - 256))

    def refused(self, kind: str, r: httpx.Response, content: bytes) -> None:
        """Valid traffic answered with neither 200 nor 429: an error in OpenAI's shape still fails the soak."""
        self.check_error(kind, r, content)
        try:
            reason = json.loads(content)["error"]["message"]
        except Exception:  # noqa: BLE001 - check_error reported the shape
            reason = ""
        self.bad(kind, f"status {r.status_code} {reason}")

    def bad(self, kind: str, detail: str) -> None:
        self.counts[f"{kind}:UNEXPECTED"] += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {detail}"[:300])

    def check_error(self, kind: str, r: httpx.Response, content: bytes) -> None:
        if r.status_code >= 500:
            return self.bad(kind, f"{r.status_code} {content[:200]!r}")
        try:
            err = json.loads(content)["error"]
            assert set(err) == {"message", "type", "param", "code"}
        except Exception:  # noqa: BLE001
            return self.bad(kind, f"{r.status_code} not an OpenAI error: {content[:200]!r}")
        self.counts[f"{kind}:{r.status_code}"] += 1

    async def one(self, client: httpx.AsyncClient) -> None:
        rng = self.rng
        roll = rng.random()
        if self.args.only:  # one kind of traffic only (to find which one grows memory)
            lo, hi = KIND_ROLLS[self.args.only]
            roll = lo + (hi - lo) * roll
        prompt = rng.choice(["hello", "soak test", "x" * rng.randint(1, 200), "Ünïcödé ✓"])
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 64), "seed": rng.randint(0, 1000)}
        if roll < 0.25:
            kind = "valid"
            if rng.random() < 0.3:
                body["n"] = rng.randint(2, 3)
            r = await client.post(self.base + "/completions", json=body, headers=self.headers)
            if r.status_code == 200:
                self.counts["valid:200"] += 1
            elif r.status_code == 429:
                self.counts["valid:429"] += 1
            else:
                self.refused(kind, r, r.content)
        elif roll < 0.45:
            kind = "stream"
            path, b = ("/chat/completions", {"messages": [{"role": "user", "content": prompt}]}) if rng.random() < 0.5 \
                else ("/completions", dict(body))
            b.update(stream=True, max_tokens=body["max_tokens"], stream_options={"include_usage": True},
                     stream_drafts=rng.random() < 0.5)
            async with client.stream("POST", self.base + path, json=b, headers=self.headers) as r:
                content = await r.aread()
            if r.status_code == 200:
                text = content.decode()
                if not text.rstrip().endswith("data: [DONE]") or '"error"' in text:
                    self.bad(kind, text[-200:])
                else:
                    self.counts["stream:200"] += 1
            elif r.status_code == 429:
                self.counts["stream:429"] += 1
            else:
                self.refused(kind, r, content)
        elif roll < 0.60:
            kind = "stream_cut"
            b = {**body, "stream": True, "stream_drafts": True, "max_tokens": self.long_tokens, "ignore_eos": True}
            async with client.stream("POST", self.base + "/completions", json=b, headers=self.headers) as r:
                if r.status_code != 200:
                    content = await r.aread()
                    if r.status_code == 429:
                        self.counts["stream_cut:429"] += 1
                    else:
                        self.refused(kind, r, content)
                    return
                want, seen = rng.randint(1, 4), 0
                try:
                    async with asyncio.timeout(10):
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                seen += 1
                                if seen >= want:
                                    break
                except TimeoutError:  # queued behind others: hang up while waiting
                    pass
            self.counts["stream_cut:cut"] += 1
        elif roll < 0.70:
            kind = "plain_cut"
            b = {**body, "max_tokens": self.long_tokens, "ignore_eos": True}
            try:
                r = await client.post(self.base + "/completions", json=b, headers=self.headers,
                                      timeout=httpx.Timeout(rng.uniform(0.2, 1.5), connect=10))
                if r.status_code in (200, 429):
                    self.counts[f"plain_cut:{r.status_code}"] += 1
                else:
                    self.refused(kind, r, r.content)
            except httpx.ReadTimeout:
                self.counts["plain_cut:cut"] += 1
        elif roll < 0.95:
            path, raw = rng.choice(BAD_BODIES)
            r = await client.post(self.base + path, content=raw, headers={**self.headers, "Content-Type": "application/json"})
            if r.status_code < 400:
                self.bad("invalid", f"accepted {raw[:80]!r}")
            else:
                self.check_error("invalid", r, r.content)
        else:
            raw = b'{"prompt": "' + b"x" * (self.args.body_bytes + 1) + b'"}'
            r = await client.post(self.base + "/completions", content=raw, headers={**self.headers, "Content-Type": "application/json"})
            self.check_error("oversized", r, r.content)
            if r.status_code != 413:
                self.bad("oversized", f"status {r.status_code}")

    async def worker(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
            while time.monotonic() < deadline:
                try:
                    await self.one(client)
                except httpx.TransportError as exc:
                    self.bad("transport", repr(exc))

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(self.worker(deadline) for _ in range(self.args.concurrency)))

    def gauges(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[s.name] = s.value
        return {k: values.get(v) for k, v in GAUGES.items()}

    def wait_idle(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            g = self.gauges()
            if all(v == 0 for v in g.values()) or time.monotonic() > deadline:
                return g
            time.sleep(0.2)


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    model = args.model
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    if model is None:
        sys.path.insert(0, str(REPO_ROOT))
        from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

        model = str(build_tiny_checkpoint(tmp / "tiny", TinySpec()))
    port = free_port()
    log = tmp / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting),
           "--max-request-body-bytes", str(args.body_bytes), *args.server_arg]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: the server exited with {proc.returncode}; log: {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"soak: the server did not become ready; log: {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (loopback only); default: start one")
    p.add_argument("--pid", type=int, help="with --url: the server's PID, for its RSS")
    p.add_argument("--model", help="checkpoint for the server this tool starts (default: a tiny random one)")
    p.add_argument("--api-key", help="bearer key (sent, and given to the started server)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of mixed traffic (default 120)")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of the same traffic before the baseline (default 15)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent client loops (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=4, help="for the started server (default 4)")
    p.add_argument("--max-waiting", type=int, default=4, help="for the started server (default 4: some 429s)")
    p.add_argument("--body-bytes", type=int, default=None,
                   help="the server's body limit: given to the started server (default 65536); with --url, "
                        "required: the running server's --max-request-body-bytes")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server (repeatable)")
    p.add_argument("--rss-tolerance-mb", type=float, default=32.0,
                   help="allowed RSS growth from the post-warm-up baseline to the end (default 32 MiB)")
    p.add_argument("--only", choices=sorted(KIND_ROLLS), help="send one kind of traffic only (default: the mix)")
    p.add_argument("--long-tokens", type=int, default=None,
                   help="max_tokens of the cut traffic (default: 2000 within the model's context less 256); "
                        "at most the server's --max-completion-tokens")
    p.add_argument("--json-out", help="also write the summary here")
    args = p.parse_args(argv)
    if args.duration > 3600:
        raise SystemExit("soak: --duration is capped at 3600 s")
    if not args.duration > 0 or not args.warmup >= 0 or args.concurrency < 1:
        p.error("--duration must be positive, --warmup at least 0 and --concurrency at least 1")
    if args.long_tokens is not None and args.long_tokens < 1:
        p.error("--long-tokens must be at least 1")
    if args.body_bytes is None:
        if args.url:  # its oversized traffic would expect a 413 at a limit the server does not have
            p.error("--url needs --body-bytes: the running server's --max-request-body-bytes")
        args.body_bytes = 65536
    if args.body_bytes < 1:
        p.error("--body-bytes must be at least 1")

    proc = None
    if args.url:
        require_loopback(args.url)
        url, pid, log = args.url, args.pid, None
    else:
        proc, url, log = start_server(args)
        pid = proc.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    soak = Soak(args, url, headers)
    try:
        t0 = time.monotonic()
        soak.set_long_tokens()
        asyncio.run(soak.run(args.warmup))
        idle_start = soak.wait_idle(60)
        rss_start = rss_bytes(pid) if pid else None
        samples = []

        async def sample_rss(deadline: float):
            while time.monotonic() < deadline:
                if pid:
                    samples.append(round(rss_bytes(pid) / 2**20, 1))
                await asyncio.sleep(max(1.0, args.duration / 24))

        async def traffic():
            deadline = time.monotonic() + args.duration
            await asyncio.gather(soak.run(args.duration), sample_rss(deadline))

        warm_counts = sum(soak.counts.values())
        t1 = time.monotonic()
        asyncio.run(traffic())
        traffic_s = time.monotonic() - t1
        idle_end = soak.wait_idle(60)
        time.sleep(1.0)
        rss_end = rss_bytes(pid) if pid else None
        healthy = httpx.get(url + "/health", timeout=10).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": "after the soak", "max_tokens": 8}, headers=headers, timeout=60)
        served_after = r.status_code == 200
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    requests_total = sum(soak.counts.values())
    summary = {
        "url": url,
        "duration_s": round(traffic_s, 1),
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "requests": requests_total - warm_counts,
        "requests_per_s": round((requests_total - warm_counts) / max(traffic_s, 1e-9), 1),
        "outcomes_incl_warmup": dict(sorted(soak.counts.items())),
        "unexpected": soak.unexpected,
        "gauges_after_warmup": idle_start,
        "gauges_at_end": idle_end,
        "rss_mib_after_warmup": round(rss_start / 2**20, 1) if rss_start else None,
        "rss_mib_samples": samples,
        "rss_mib_peak": max(samples) if samples else None,
        "rss_mib_at_end": round(rss_end / 2**20, 1) if rss_end else None,
        "healthy_after": healthy,
        "served_after": served_after,
        "server_exit_status": proc.returncode if proc is not None else None,
        "server_log": str(log) if log else None,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    failures = []
    if soak.unexpected:
        failures.append("unexpected responses")
    failures += [f"{kind} traffic ran but was never {outcome}" for kind, outcome in INTENDED.items()
                 if any(k.startswith(kind + ":") for k in soak.counts) and not soak.counts[f"{kind}:{outcome}"]]
    if any(v != 0 for v in idle_end.values()):
        failures.append("live request state did not return to zero")
    if rss_start and rss_end and (rss_end - rss_start) / 2**20 > args.rss_tolerance_mb:
        failures.append(f"RSS grew by {(rss_end - rss_start) / 2**20:.1f} MiB")
    if not (healthy and served_after):
        failures.append("not serving after the soak")
    if proc is not None and proc.returncode != 0:
        failures.append(f"server exit status {proc.returncode}")
    summary["failures"] = failures
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
