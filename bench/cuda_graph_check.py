"""Would CUDA graphs pay? Times the engine's decoder pass eagerly and as a captured CUDA graph replay.

    python -m bench.cuda_graph_check --model /tmp/dg-shape --batches 1,4,16

For each batch size B, an engine is filled with B requests and stepped until every row is
denoising; then the same decoder pass (``ModelRunner._decoder_pass_inputs`` and ``_decoder_hidden``: embeddings,
self-conditioning, the decoder layers against each row's cached prefix, final norm) is timed with
CUDA events, eagerly and replayed from a ``torch.cuda.CUDAGraph`` captured over the same tensors.
The replay's output is compared with the eager output. Only the decoder pass is captured: the lm
head and the sampler follow it unchanged. Without CUDA only the eager time is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model


def _time_ms(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def filled_engine(loaded, settings: EngineSettings, batch: int, prompt_len: int, vocab_high: int) -> EngineCore:
    """An engine whose ``batch`` rows are all past their first decoder pass and far from finishing."""
    core = EngineCore(loaded, settings)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(5, vocab_high, (prompt_len,), generator=gen).tolist()
        params = SamplingParams(max_tokens=8 * loaded.model.config.canvas_length, seed=i, ignore_eos=True,
                                max_denoising_steps=64)
        core.add_request(f"g{i}", prompt, core.resolve(prompt, params))
    for _ in range(100):
        core.step()
        if len(core.runner.rows) == batch and all(s.canvas is not None for s in core.runner.rows.values()):
            break
    else:
        raise RuntimeError("the engine did not reach a full decoder batch")
    return core


def check(core: EngineCore, repeats: int) -> dict:
    runner = core.runner
    ids = sorted(runner.rows, key=lambda r: runner.kv.get(r).slot)
    states = [runner.rows[r] for r in ids]
    cuda = runner.device.type == "cuda"

    def decoder_pass():
        return runner._decoder_hidden(runner._decoder_pass_inputs(ids, states))

    with torch.inference_mode():
        eager_out = decoder_pass().clone()
        eager_ms = _time_ms(decoder_pass, repeats, cuda)
        result = {"batch": len(ids), "prefix_tokens": [runner.kv.get(r).total_len for r in ids][:4],
                  "eager_ms": eager_ms}
        if not cuda:
            return result
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                for _ in range(3):
                    decoder_pass()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = decoder_pass()
            graph.replay()
            torch.cuda.synchronize()
            diff = (graph_out.float() - eager_out.float()).norm() / eager_out.float().norm().clamp_min(1e-30)
            result["graph_ms"] = _time_ms(graph.replay, repeats, True)
            result["graph_rel_diff"] = float(diff)
            result["speedup"] = eager_ms / result["graph_ms"]
        except Exception as exc:  # report why capture failed (e.g. a host sync inside the MoE routing)
            result["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    # eager engine passes: this script captures its own graph of the same pass to compare with
    settings = EngineSettings(model=args.model, max_num_seqs=max(batches), cuda_graph_max_batch=0)
    loaded = load_model(settings)
    vocab_high = min(260, loaded.model.config.get_text_config().vocab_size - 1)
    results = []
    for b in batches:
        core = filled_engine(loaded, settings, b, args.prompt_len, vocab_high)
        try:
            res = check(core, args.repeats)
        finally:
            core.close()
        results.append(res)
        line = f"batch {res['batch']:>3}: eager {res['eager_ms']:.2f} ms"
        if "graph_ms" in res:
            line += (f", graph replay {res['graph_ms']:.2f} ms ({res['speedup']:.2f}x), "
                     f"relative difference {res['graph_rel_diff']:.1e}")
        elif "graph_error" in res:
            line += f", capture failed: {res['graph_error']}"
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model": args.model, "device": str(loaded.model.device), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
