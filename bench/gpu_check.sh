#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see docs/gpu.md): CUDA tests, a DiffusionGemma-shaped
# random checkpoint, the benchmark, a kernel-time profile of the engine, the CUDA-graph check, the
# FP8-experts load and the engine without CUDA graphs. Results land in $RESULTS (default a new folder,
# bench/results-gpu-<UTC date-time>, so that no earlier run's file comes back as this one's);
# where $OUT is set (the device tool's folder, which returns a few files only), they are also packed into
# $OUT/gpu-results.tgz after every step, so that a call cut at its limit still returns the finished steps.
#
#   bash bench/gpu_check.sh                      # the default steps (list: bash bench/gpu_check.sh --help)
#   bash bench/gpu_check.sh tests model bench    # some steps, in this order
#
# A machine without a package registry (the lent GPU machines) installs the wheels in .whl/, made here
# with scripts/gpu_wheels.sh and carried with the call.
#
# Sampler steps (issue: the fast sampler): sampler-tests, samplers (4-layer shape), samplers-full (the
# full 30-layer shape from its config alone, --load-format dummy: no 50 GB written), sampler-profile,
# sampler-profile-full (kernel time by stage at full depth, batch 1).
#
# Quantized checkpoints (issue 22): ct-fp8 runs tests/test_compressed_tensors_cuda.py, the FP8 grouped GEMM
# and _scaled_mm against the dequantized reference on random inputs (stated tolerance), and the engine
# over a tiny FP8-dynamic checkpoint in the published compressed-tensors layout. fp8-full serves the
# full 30-layer shape in bf16 and as the FP8-dynamic layout (both --load-format dummy: random weights
# built on the GPU from the config alone) at concurrency 1, 4 and 8, one server after the other, then
# the FP8 one again with the RTX 5090 preset's flags, capped at that card's memory (--device-memory-limit-gib 31.8)
# and dequantized as on that card (--no-fp8-gemm).
#
# Batch invariance on CUDA (issue 19): batch-invariant runs tests/test_batch_invariant_cuda.py (the kernels in
# bfloat16, an engine's rows against their solo runs) and the 4-layer shape's pass with and without
# --batch-invariant at concurrency 1 and 16 (run "model" first).
#
# The benchmark steps that serve a checkpoint as stored (bench, eager-bench, samplers, samplers-full, fp8-full)
# also write roofline.md beside their bench.json: the passes' share of the GPU's memory bandwidth and matrix
# throughput (python -m bench.roofline; not fp8, which quantizes at load time).
#
# Environment: PYTHON (default python3), LAYERS (decoder layers of the random model, default 4),
# CONCURRENCY (default 1,4,16; fp8-full 1,4,8; samplers 1,4,16,32; samplers-full 1,16,32),
# DEADLINE (epoch seconds; no step starts after it and each is cut at it),
# SHAPE (the model config the random models take their shape from; default DiffusionGemma's).
#
# Rehearsal on a CPU (every step's commands and flags, in minutes; CUDA tests skip, GPU-only flags fail):
#   SHAPE=configs/models/diffusiongemma-tiny-shape.json PYTHON=.venv/bin/python RESULTS=/tmp/rehearsal \
#     bash bench/gpu_check.sh tests model bench ...
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-bench/results-gpu-$(date -u +%Y%m%d-%H%M%S)}"
PY="${PYTHON:-python3}"
MODEL_DIR="${MODEL_DIR:-/tmp/dg-shape}"
FULL_DIR="${FULL_DIR:-/tmp/dg-shape-full}"  # config only: served with --load-format dummy
SHAPE="${SHAPE:-configs/models/diffusiongemma-26b-a4b-shape.json}"
DEADLINE="${DEADLINE:-$(( $(date +%s) + 86400 ))}"
ALL_STEPS=(tests model bench profile graphs fp8 profile-fp8 eager-bench sampler-tests samplers samplers-full
           ct-fp8 fp8-full sampler-profile sampler-profile-full batch-invariant)
DEFAULT_STEPS=(tests model bench profile graphs fp8 profile-fp8 eager-bench)
steps=("$@")
case "${1:-}" in
  -h|--help|list) echo "steps: ${ALL_STEPS[*]}"; echo "default: ${DEFAULT_STEPS[*]}"; exit 0 ;;
esac
(( ${#steps[@]} )) || steps=("${DEFAULT_STEPS[@]}")
for step in "${steps[@]}"; do  # every name checked before any device time is spent
  [[ " ${ALL_STEPS[*]} " == *" $step "* ]] || { echo "unknown step: $step (steps: ${ALL_STEPS[*]})" >&2; exit 2; }
done
mkdir -p "$RESULTS"

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
imports() { "$PY" -c "import engine, server.app, fastapi, sse_starlette, transformers.models.diffusion_gemma"; }
if ! imports 2>/dev/null; then
  if [ -d .whl ]; then  # no registry: the carried wheels (scripts/gpu_wheels.sh), beside the image's packages
    export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    "$PY" -m pip install -q -e ".[test]" matplotlib >/dev/null
  fi
  imports || { echo "the project does not import with $PY (.whl: scripts/gpu_wheels.sh)" >&2; exit 1; }
fi

# pack: every result so far in $OUT/gpu-results.tgz, where the device tool set $OUT (it returns few files)
pack() {
  if [ -n "${OUT:-}" ] && [ "$(realpath -m "$OUT")" != "$(realpath -m "$RESULTS")" ]; then
    mkdir -p "$OUT" && tar -czf "$OUT/gpu-results.tgz.part" -C "$RESULTS" . \
      && mv "$OUT/gpu-results.tgz.part" "$OUT/gpu-results.tgz"
  fi
}

exec 3>&2  # the steps' headers and failures: a step's own pipe (2>&1 | tail) would cut them
# run LIMIT_S CMD...: at most LIMIT_S seconds and never past DEADLINE; a failure is reported, not fatal
run() {
  local limit=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "!! skipped (deadline): $*" >&3; return 0; fi
  echo "== $(date +%T) ($limit s): $*" >&3
  timeout "$limit" "$@"; local rc=$?
  (( rc != 0 )) && echo "!! exit $rc: $*" >&3
  return 0
}

# roofline DIR MODEL: the memory and compute shares of DIR/bench.json's passes (bench.roofline)
roofline() {
  run 60 "$PY" -m bench.roofline --bench "$1/bench.json" --model "$2" --out "$1/roofline.md" 2>&1 | grep -v "^$" | tail -6
}

# 3 requests per client, not the default 8: the time limits below were measured with 3; generate's
# baselines at the server's 4 threads only (on a GPU the host's thread count hardly changes them)
bench_args=(--model "$MODEL_DIR" --concurrency "${CONCURRENCY:-1,4,16}" --steps 12 --canvases 1,2
            --prompt-len 64,256 --threads 4 --requests-per-slot 3 --baseline-threads 4)
for step in "${steps[@]}"; do
  case "$step" in
    tests)  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
            run 150 "$PY" -m pytest -v -rfEs tests/test_cuda.py 2>&1 | tee "$RESULTS/cuda-tests.txt" | tail -15 ;;
    model)  run 120 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$MODEL_DIR" --layers "${LAYERS:-4}" --dtype bfloat16 \
              | tee "$RESULTS/model.txt" ;;
    bench)  run 240 "$PY" -m bench.run "${bench_args[@]}" --out "$RESULTS/bf16" 2>&1 | tee "$RESULTS/bench-bf16.log" | tail -25
            roofline "$RESULTS/bf16" "$MODEL_DIR" ;;
    graphs) run 120 "$PY" -m bench.cuda_graph_check --model "$MODEL_DIR" --batches 1,4,16 \
              --out "$RESULTS/cuda-graphs.json" 2>&1 | grep -v "Loading weights" ;;
    # where a pass goes on the GPU: kernel time against wall time at concurrency 16 and 1, the top kernels
    profile) run 120 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency 16 --requests 48 --steps 12 \
              --warmup 4 --threads 4 --device-profile 2>&1 | grep -v "Loading weights" | tee "$RESULTS/profile.txt" | sed -n 1,12p
            run 90 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency 1 --requests 6 --steps 12 \
              --warmup 2 --threads 4 --device-profile 2>&1 | grep -v "Loading weights" | tee "$RESULTS/profile-c1.txt" | sed -n 1,12p ;;
    # the same profile with the MoE experts in FP8: what their dequantization costs on the GPU
    profile-fp8)
            run 150 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency 4 --requests 8 --steps 12 \
              --warmup 2 --threads 4 --device-profile --quantization fp8-experts 2>&1 | grep -v "Loading weights" \
              | tee "$RESULTS/profile-fp8.txt" | sed -n 1,12p ;;
    # the same load with the MoE experts in FP8 (--quantization fp8-experts): speed and server memory
    fp8)    run 200 "$PY" -m bench.run "${bench_args[@]}" --no-baselines \
              --server-arg=--quantization=fp8-experts --out "$RESULTS/fp8-experts" 2>&1 | tee "$RESULTS/bench-fp8.log" | tail -12 ;;
    # the engine with every decoder pass eager (against "bench", where batches of up to 4 replay CUDA graphs)
    eager-bench)
            run 200 "$PY" -m bench.run "${bench_args[@]}" --no-baselines \
              --server-arg=--cuda-graph-max-batch=0 --out "$RESULTS/bf16-eager" 2>&1 | tee "$RESULTS/bench-eager.log" | tail -12
            roofline "$RESULTS/bf16-eager" "$MODEL_DIR" ;;
    # the fast sampler's CUDA tests: the Triton kernel against its PyTorch spec, rows independent of the batch
    sampler-tests)
            run 120 "$PY" -m pytest -v -rfEs tests/test_sampler_cuda.py 2>&1 \
              | tee "$RESULTS/sampler-tests.txt" | tail -8 ;;
    # each sampler on the 4-layer shape, same workloads in one invocation (tok/s, server GPU memory)
    samplers)
            run 300 "$PY" -m bench.run "${bench_args[@]}" --concurrency "${CONCURRENCY:-1,4,16,32}" \
              --sampler reference --sampler fast --no-baselines --out "$RESULTS/samplers" 2>&1 \
              | tee "$RESULTS/bench-samplers.log" | tail -14
            roofline "$RESULTS/samplers" "$MODEL_DIR" ;;
    # the full-depth shape (30 layers, bf16, about 52 GB of random weights built on the GPU)
    samplers-full)
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR" --layers 30 --dtype bfloat16 --config-only
            run 420 "$PY" -m bench.run "${bench_args[@]}" --model "$FULL_DIR" --load-format dummy \
              --concurrency "${CONCURRENCY:-1,16,32}" --sampler reference --sampler fast --no-baselines \
              --check-outputs 0 --out "$RESULTS/samplers-full" 2>&1 | tee "$RESULTS/bench-samplers-full.log" | tail -12
            roofline "$RESULTS/samplers-full" "$FULL_DIR" ;;
    # compressed-tensors FP8 on the GPU: the FP8 GEMMs against the dequantized reference (issue 22)
    ct-fp8) run 150 "$PY" -m pytest -v -rfEs tests/test_compressed_tensors_cuda.py 2>&1 \
              | tee "$RESULTS/compressed-tensors-cuda.txt" | tail -10 ;;
    # issue 22: the full-depth shape in bf16 against its FP8-dynamic layout (tok/s, server GPU memory)
    fp8-full)
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR" --layers 30 --dtype bfloat16 --config-only
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR-fp8" --layers 30 --dtype bfloat16 --config-only \
              --scheme fp8
            for model in "$FULL_DIR" "$FULL_DIR-fp8"; do
              run 300 "$PY" -m bench.run "${bench_args[@]}" --model "$model" --load-format dummy --concurrency "${CONCURRENCY:-1,4,8}" \
                --no-baselines --check-outputs 0 --out "$RESULTS/full-$(basename "$model")" 2>&1 \
                | tee "$RESULTS/bench-full-$(basename "$model").log" | tail -8
              roofline "$RESULTS/full-$(basename "$model")" "$model"
            done
            # the RTX 5090 preset (its flags, its 4 sequences over the bench's; the model is the FP8 shape) under the card's 31.8 GiB
            # (nvidia-smi total 32,607 MiB) as a cap on this GPU, without FP8 GEMMs as on that card (each layer dequantized)
            run 300 "$PY" -m bench.run "${bench_args[@]}" --model "$FULL_DIR-fp8" --load-format dummy \
              --concurrency "${CONCURRENCY:-1,4,8}" --no-baselines --check-outputs 0 --server-arg=--config=configs/rtx5090-32gb.yaml \
              --server-arg=--max-num-seqs=4 --server-arg=--device-memory-limit-gib=31.8 --server-arg=--no-fp8-gemm \
              --out "$RESULTS/full-fp8-capped-31.8gib" 2>&1 | tee "$RESULTS/bench-full-fp8-capped.log" | tail -8
            roofline "$RESULTS/full-fp8-capped-31.8gib" "$FULL_DIR-fp8" ;;
    # kernel time per pass with each sampler, split by stage (encoder, decoder, lm head, sampler) and by kernel
    sampler-profile)
            for sampler in reference fast; do
              for c in 1 16; do
                run 100 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency $c --requests $((c * 3)) \
                  --steps 12 --warmup 2 --threads 4 --device-profile --sampler $sampler 2>&1 \
                  | grep -v "Loading weights" | tee "$RESULTS/profile-$sampler-c$c.txt" | sed -n 1,14p
              done
            done ;;
    # the same at full depth and batch 1 (the lm head's share at 4 layers overstates it): issue 18's target,
    # lm head + sampler under 15% of a batch-1 pass's kernel time
    sampler-profile-full)
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR" --layers 30 --dtype bfloat16 --config-only
            for sampler in reference fast; do
              run 200 "$PY" -m bench.profile_engine --model "$FULL_DIR" --load-format dummy --concurrency 1 --requests 1 \
                --steps 12 --warmup 1 --threads 4 --device-profile --sampler $sampler 2>&1 \
                | grep -v "Loading weights" | tee "$RESULTS/profile-full-$sampler-c1.txt" | sed -n 1,14p
            done ;;
    # --batch-invariant on CUDA: its tests, then what it costs per pass against the default engine
    batch-invariant)
            run 150 "$PY" -m pytest -v -rfEs tests/test_batch_invariant_cuda.py 2>&1 \
              | tee "$RESULTS/batch-invariant-tests.txt" | tail -10
            for c in 1 16; do
              for mode in no-batch-invariant batch-invariant; do
                run 100 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency $c --requests $((c * 3)) \
                  --steps 12 --warmup 2 --threads 4 --no-profile --$mode 2>&1 | grep -v "Loading weights" \
                  | tee "$RESULTS/profile-$mode-c$c.txt" | tail -4
              done
            done ;;
  esac
  pack
done
