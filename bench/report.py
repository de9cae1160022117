"""Turn benchmark results into a Markdown table and a PNG plot."""

from __future__ import annotations

from pathlib import Path


def _ttfd(run: dict):
    """Client-side p50 when drafts were streamed, else the server's mean (its histogram)."""
    return run["ttfd_p50"] if run.get("ttfd_p50") is not None else run.get("ttfd_server_mean")


def _gap(value: float | None) -> float:
    """A value to plot: a missing one (no request succeeded, no draft measured) leaves a gap, not a zero."""
    return float("nan") if value is None else value


def _requests(run: dict) -> str:
    """"ok/sent" of the round shown, and the failures of the rounds not shown (``bench.run.kept_round``)."""
    shown = f"{run['requests_ok']}/{run['requests']}"
    other = sum(run.get("rounds_failed", ())) - (run["requests"] - run["requests_ok"])
    return shown + (f" ({other} failed in other rounds)" if other else "")


def _variant(run: dict) -> str | None:
    """The server variant a run measured (``bench.run --sampler / --variant``), if any."""
    return run.get("variant") or (f"{run['sampler']} sampler" if run.get("sampler") else None)


def _padding(static: dict | None, alone: dict) -> str:
    """A static batch's canvas steps over those its requests take one at a time (``bench.baselines``)."""
    if static is None or not static.get("canvas_steps") or not alone.get("canvas_steps"):
        return "—"
    return f"{static['canvas_steps'] / alone['canvas_steps']:.2f}x"


def markdown(result: dict) -> str:
    m = result["machine"]
    gpu = any(run.get("server_gpu_mib") is not None for run in result["runs"])
    variants = any(_variant(run) for run in result["runs"])
    if result.get("server_url"):  # someone else's server: only the load generator's machine is known
        where = f"server: {result['server_url']} · load generated on: {m['description']}"
    else:
        where = f"machine: {m['description']} · server threads: {result['server_threads']} (unless a variant sets them)"
    rounds = result.get("rounds", 1)
    if rounds > 1:
        where += f" · each measurement the fastest of {rounds} rounds"
    lines = [
        f"Model: `{result['model']}` · {where} · command: `{result['command']}`",
        "",
        ("| variant " if variants else "") + "| concurrency | requests | committed tok/s | vs one-at-a-time | vs static batch | req/s | first draft (s) | "
        "TTFT p50 (s) | e2e p50 / p90 / p99 (s) | steps/canvas | tok/step | decoder batch | server RSS peak (MiB) |"
        + (" server GPU memory (MiB) |" if gpu else ""),
        ("|---" if variants else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for run in result["runs"]:
        def fmt(x, spec=".2f", unit=""):
            return "—" if x is None else format(x, spec) + unit
        lines.append(
            (f"| {_variant(run) or 'default'} " if variants else "") +
            f"| {run['concurrency']} | {_requests(run)} | {run['tokens_per_s']:.0f} | "
            f"{fmt(run.get('ratio_vs_one_at_a_time'), unit='x')} | {fmt(run.get('ratio_vs_static_batch'), unit='x')} | "
            f"{run['requests_per_s']:.2f} | {fmt(_ttfd(run), '.3f')} | {fmt(run['ttft_p50'], '.3f')} | "
            f"{fmt(run['latency_p50'])} / {fmt(run['latency_p90'])} / {fmt(run['latency_p99'])} | "
            f"{fmt(run['steps_per_canvas'])} | {fmt(run['tokens_per_step'])} | {fmt(run['decoder_batch_mean'])} | "
            f"{fmt(run['server_rss_peak_mib'], '.0f')} |"
            + (f" {fmt(run.get('server_gpu_mib'), '.0f')} |" if gpu else "")
        )
    base = result.get("baselines", {})
    if base:
        counts = result.get("baseline_threads")
        threads = f", the fastest at {' and '.join(map(str, counts))} torch threads" if counts else ""
        lines += ["", f"Baselines (transformers `generate` on the checkpoint as transformers loads it, each level's "
                      f"own requests{threads}):", ""]
        lines.append("| concurrency | requests | one at a time (tok/s) | static batch of that size (tok/s) | "
                     "static batch: canvas steps computed per step needed |")
        lines.append("|---|---|---|---|---|")

        def cell(r: dict) -> str:
            if "threads" not in r:
                return f"{r['tokens_per_s']:.0f}"
            return f"{r['tokens_per_s']:.0f} ({r['threads']} thread{'' if r['threads'] == 1 else 's'})"

        for level, alone in sorted(base.get("one_at_a_time", {}).items(), key=lambda kv: int(kv[0])):
            static = base.get("static_batch", {}).get(level)
            static_cell = "—" if static is None else cell(static)
            padding = _padding(static, alone)
            lines.append(f"| {level} | {alone['requests']} | {cell(alone)} | {static_cell} | {padding} |")
        lines += ["", "A static batch computes every row until its slowest row has converged, and as many canvases "
                      "as its longest request asked for; the last column is those canvas steps over the steps its "
                      "requests take alone. At `generate`'s cost per canvas step, a server that computed no "
                      "other step would reach that ratio against the static batch."]
    checks = dict(result.get("outputs_alone_by_variant") or result.get("outputs_alone_by_sampler") or {})
    if result.get("outputs_alone"):
        checks[None] = result["outputs_alone"]
    for variant, check in checks.items():
        which = f" ({variant})" if variant else ""
        lines += ["", f"Outputs at concurrency {check['concurrency']}{which} identical (tokens and text) to the same "
                      f"requests sent alone (same seeds, one at a time): {check['identical']}/{check['checked']}."]
        if check.get("failed"):
            lines.append(f"{check['failed']} requests of that check failed.")
    lines += ["", "first draft: client-side p50 with `--drafts`, otherwise the server's mean from "
              "`diffusion_server:time_to_first_draft_seconds`. steps/canvas and tok/step come from the usage "
              "extension fields; decoder batch from `diffusion_server:decoder_batch_size`."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups: dict = {}  # one line per variant (runs of one invocation may compare server settings)
    for r in result["runs"]:
        groups.setdefault(_variant(r), []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, runs in groups.items():
        suffix = f" ({variant})" if variant else ""
        ax1.plot([r["concurrency"] for r in runs], [r["tokens_per_s"] for r in runs], "o-",
                 label="engine via HTTP" + suffix)
    base = result.get("baselines", {})
    alone = base.get("one_at_a_time", {})
    if alone:
        xs = sorted(int(k) for k in alone)
        ax1.plot(xs, [alone[str(x)]["tokens_per_s"] for x in xs], "x--", color="gray", label="generate, one at a time")
    static = base.get("static_batch", {})
    if static:
        xs = sorted(int(k) for k in static)
        ax1.plot(xs, [static[str(x)]["tokens_per_s"] for x in xs], "s:", label="generate, static batch")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrency")
    ax1.set_ylabel("committed tokens/s")
    ax1.legend()
    ax1.set_title("Throughput")
    for variant, runs in groups.items():
        conc = [r["concurrency"] for r in runs]
        suffix = f" ({variant})" if variant else ""
        ax2.plot(conc, [_gap(r["latency_p50"]) for r in runs], "o-", label="e2e p50" + suffix)
        ax2.plot(conc, [_gap(r["latency_p90"]) for r in runs], "o--", label="e2e p90" + suffix)
        ax2.plot(conc, [_gap(_ttfd(r)) for r in runs], "^-", label="first draft" + suffix)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("seconds")
    ax2.legend()
    ax2.set_title("Latency")
    where = result.get("server_url") or result["machine"]["description"]
    fig.suptitle(f"{result['model']} on {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
