"""Why two row groups on two cores are not twice one: a matrix product against a model's forward,
each run alone and as two halves side by side (one intra-op thread each, as the engine's groups run).

    python -m bench.thread_scaling --model engine/default_model --rows 16

A product releases Python's GIL for its whole run, so two of them side by side scale with the cores.
A forward through transformers' modules holds the GIL between its operators (module calls, hooks,
shape checks), and two forwards side by side take turns there. The engine's decoder pass is timed
both ways: eager through the modules, and as its TorchScript trace (``engine.traced_decoder``, the
CPU default), which runs the same operators without the GIL. The medians of ``--repeat`` runs:
``one``: all rows in one call; ``two``: two halves side by side; ``half``: one half alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def scaling(work, repeat: int) -> dict:
    """``work(part)`` for part "all", "first" or "second": one, two side by side, and half alone."""
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        def two():
            other = pool.submit(work, "second")
            work("first")
            other.result()

        work("all")  # warm-up
        two()
        one_ms = _median_ms(lambda: work("all"), repeat)
        two_ms = _median_ms(two, repeat)
        half_ms = _median_ms(lambda: work("first"), repeat)
    return {"one_ms": one_ms, "two_ms": two_ms, "half_ms": half_ms, "speedup": one_ms / two_ms}


def decoder_passes(model: str, rows: int, parts: dict[str, slice]):
    """The engine's decoder pass over ``rows`` denoising canvases (prompts of one canvas length), eager and
    traced: ``work(part)`` functions for ``scaling``."""
    from engine import EngineSettings
    from engine.loader import load_model
    from engine.rowwise_attention import batch_layout

    from .cuda_graph_check import filled_engine

    settings = EngineSettings(model=model, max_num_seqs=rows, forward_threads=1, cuda_graph_max_batch=0)
    loaded = load_model(settings)
    core = filled_engine(loaded, settings, rows, loaded.model.config.canvas_length,
                         min(260, loaded.model.config.text_config.vocab_size - 1))
    runner = core.runner
    ids = sorted(runner.rows, key=lambda r: runner.kv.get(r).slot)
    inputs = {name: runner._decoder_inputs(ids[p], [runner.rows[r] for r in ids[p]], False, group=i)
              for i, (name, p) in enumerate(parts.items())}

    def eager(part):
        with torch.inference_mode(), batch_layout(inputs[part].layout):
            runner._decoder_forward(inputs[part].inputs)

    def traced(part):
        with torch.inference_mode():
            runner.traced.run(inputs[part].inputs, inputs[part].layout)

    return eager, traced


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="engine/default_model")
    ap.add_argument("--rows", type=int, default=16, help="canvases in the forward (split in two halves)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion

    config = AutoConfig.from_pretrained(args.model)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.model).eval()
    text = config.text_config
    C, H = config.canvas_length, text.hidden_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text.vocab_size, (args.rows, C), generator=generator)
    half = args.rows // 2
    parts = {"all": slice(None), "first": slice(0, half), "second": slice(half, None)}
    x = torch.randn(args.rows * C, H, generator=generator)
    w = torch.randn(2 * H, H, generator=generator)

    def product(part):  # the same work as the forward's products, one call each (the GIL released)
        rows = x.view(args.rows, C, H)[parts[part]].reshape(-1, H)
        for _ in range(200):
            torch.nn.functional.linear(rows, w)

    def forward(part):
        with torch.inference_mode():
            model.model.encoder(input_ids=ids[parts[part]])

    eager, traced = decoder_passes(args.model, args.rows, parts)
    for name, work in (("matrix products", product), ("model forward", forward),
                       ("decoder pass, eager", eager), ("decoder pass, traced", traced)):
        r = scaling(work, args.repeat)
        print(f"{name}: {args.rows} rows in one thread {r['one_ms']:.1f} ms, two halves side by side "
              f"{r['two_ms']:.1f} ms ({r['speedup']:.2f}x), one half alone {r['half_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
