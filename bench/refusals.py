"""How fast, and at what memory cost, the server refuses the large requests of docs/reliability.md
("Large requests"), and how fast ``/health`` answers meanwhile.

    OMP_NUM_THREADS=1 python -m bench.refusals [--model PATH] [--json-out FILE]

Starts its own servers on loopback (a tiny random checkpoint unless ``--model``): one with the
default limits, one with ``--max-prompt-tokens 1024``. For each case it sends the request once as a
warm-up, then ``--repeat`` times, and reports the median and worst time from the last byte sent to
the answer (the upload itself is timed apart), the server's resident memory (RSS) before, after and
at its peak (``VmHWM``), and, for the concurrent cases, the slowest ``/health`` seen while they ran.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.rss import proc_status, reset_peak

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, extra: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "server", "--model", model, "--port", str(self.port), "--no-ui", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def raw_post(port: int, path: str, body: bytes) -> tuple[float, float, int, bytes]:
    """(upload seconds, seconds from the last byte sent to the whole answer, status, answer body)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.perf_counter()
        sock.sendall(head + body)
        t1 = time.perf_counter()
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        t2 = time.perf_counter()
    status = int(data.split(b" ", 2)[1])
    return t1 - t0, t2 - t1, status, data.partition(b"\r\n\r\n")[2]


class HealthProbe:
    """Polls /health on a kept-alive connection while a case runs; records the slowest answer."""

    def __init__(self, url: str):
        self.url = url
        self.worst = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t = time.perf_counter()
                client.get(self.url + "/health")
                self.worst = max(self.worst, time.perf_counter() - t)
                self.count += 1
                time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_case(server: Server, name: str, path: str, body: bytes, concurrency: int, repeat: int) -> dict:
    pid = server.proc.pid
    raw_post(server.port, path, body)  # warm-up (first-use allocations, code paths)
    before = proc_status(pid)["VmRSS"]
    reset_peak(pid)
    times, uploads, statuses = [], [], set()
    with HealthProbe(server.url) as probe:
        for _ in range(repeat):
            results: list = [None] * concurrency
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, raw_post(server.port, path, body)))
                       for i in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for upload, answer, status, text in results:
                uploads.append(upload)
                times.append(answer)
                statuses.add(status)
                last_text = text
    after = proc_status(pid)
    return {
        "case": name, "body_bytes": len(body), "concurrency": concurrency, "requests": len(times),
        "status": sorted(statuses), "answer": json.loads(last_text)["error"]["message"][:160] if 400 <= max(statuses) else "",
        "refusal_ms_median": round(statistics.median(times) * 1000, 1), "refusal_ms_max": round(max(times) * 1000, 1),
        "upload_ms_median": round(statistics.median(uploads) * 1000, 1),
        "rss_before_mib": round(before / 2**20, 1), "rss_after_mib": round(after["VmRSS"] / 2**20, 1),
        "rss_peak_mib": round(after["VmHWM"] / 2**20, 1),
        "health_ms_max": round(probe.worst * 1000, 1), "health_probes": probe.count,
    }


def cases(max_prompt_tokens_server: bool) -> list[tuple[str, str, bytes, int]]:
    chat_300k = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 300_000}).encode()
    if max_prompt_tokens_server:
        return [("5 MB prompt, --max-prompt-tokens 1024", "/v1/completions",
                 json.dumps({"prompt": "x" * 5_000_000}).encode(), 1)]
    return [
        ("15,000,000-character prompt", "/v1/completions", json.dumps({"prompt": "x" * 15_000_000}).encode(), 1),
        ("256 prompts of 60 KB", "/v1/completions", json.dumps({"prompt": ["y" * 60_000] * 256}).encode(), 1),
        ("7,000,000 token ids", "/v1/completions",
         json.dumps({"prompt": [1] * 7_000_000}, separators=(",", ":")).encode(), 1),
        ("4 x 300,000 chat messages at once", "/v1/chat/completions", chat_300k, 4),
        ("16 MB of prose with commas", "/v1/completions",
         json.dumps({"prompt": "Hello, world, and [more], text. " * 480_000}).encode(), 1),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: a tiny random one built in a temporary folder)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

            model = str(build_tiny_checkpoint(Path(tmp) / "tiny", TinySpec()))
        rows = []
        for extra, limited in (([], False), (["--max-prompt-tokens", "1024"], True)):
            server = Server(model, extra, Path(tmp) / f"server{len(rows)}.log")
            try:
                for name, path, body, concurrency in cases(limited):
                    row = run_case(server, name, path, body, concurrency, args.repeat)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                server.stop()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
