#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see docs/gpu.md): CUDA tests, a DiffusionGemma-shaped
# random checkpoint, the benchmark, a kernel-time profile of the engine, the CUDA-graph check, the
# FP8-experts load and the engine without CUDA graphs. Results land in $OUT (default bench/results-gpu).
#
#   bash bench/gpu_check.sh                      # every step
#   bash bench/gpu_check.sh tests model bench    # some steps, in this order
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
# Environment: PYTHON (default python), LAYERS (decoder layers of the random model, default 4),
# CONCURRENCY (default 1,4,16; fp8-full 1,4,8; samplers 1,4,16,32; samplers-full 1,16,32),
# DEADLINE (epoch seconds; no step starts after it and each is cut at it),
# SHAPE (the model config the random models take their shape from; default DiffusionGemma's).
#
# Rehearsal on a CPU (every step's commands and flags, in minutes; CUDA tests skip, GPU-only flags fail):
#   SHAPE=configs/models/diffusiongemma-tiny-shape.json PYTHON=.venv/bin/python OUT=/tmp/rehearsal \
#     bash bench/gpu_check.sh tests model bench ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results-gpu}"
PY="${PYTHON:-python}"
MODEL_DIR="${MODEL_DIR:-/tmp/dg-shape}"
FULL_DIR="${FULL_DIR:-/tmp/dg-shape-full}"  # config only: served with --load-format dummy
SHAPE="${SHAPE:-configs/models/diffusiongemma-26b-a4b-shape.json}"
DEADLINE="${DEADLINE:-$(( $(date +%s) + 86400 ))}"
mkdir -p "$OUT"

# Install the project unless it imports already (a machine without a registry brings wheels instead).
"$PY" -c "import engine, server.app, fastapi, sse_starlette, transformers.models.diffusion_gemma" 2>/dev/null \
  || "$PY" -m pip install -q -e ".[test]" matplotlib >/dev/null

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

# 3 requests per client, not the default 8: the time limits below were measured with 3
bench_args=(--model "$MODEL_DIR" --concurrency "${CONCURRENCY:-1,4,16}" --steps 12 --canvases 1,2
            --prompt-len 64,256 --threads 4 --requests-per-slot 3)
steps=("$@")
(( ${#steps[@]} )) || steps=(tests model bench profile graphs fp8 profile-fp8 eager-bench)
for step in "${steps[@]}"; do
  case "$step" in
    tests)  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
            run 150 "$PY" -m pytest -q tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/cuda-tests.txt" ;;
    model)  run 120 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$MODEL_DIR" --layers "${LAYERS:-4}" --dtype bfloat16 \
              | tee "$OUT/model.txt" ;;
    bench)  run 240 "$PY" -m bench.run "${bench_args[@]}" --out "$OUT/bf16" 2>&1 | tee "$OUT/bench-bf16.log" | tail -25
            roofline "$OUT/bf16" "$MODEL_DIR" ;;
    graphs) run 120 "$PY" -m bench.cuda_graph_check --model "$MODEL_DIR" --batches 1,4,16 \
              --out "$OUT/cuda-graphs.json" 2>&1 | grep -v "Loading weights" ;;
    # where a pass goes on the GPU: kernel time against wall time at concurrency 16 and 1, the top kernels
    profile) run 120 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency 16 --requests 48 --steps 12 \
              --warmup 4 --threads 4 --device-profile 2>&1 | grep -v "Loading weights" | tee "$OUT/profile.txt" | sed -n 1,12p
            run 90 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency 1 --requests 6 --steps 12 \
              --warmup 2 --threads 4 --device-profile 2>&1 | grep -v "Loading weights" | tee "$OUT/profile-c1.txt" | sed -n 1,12p ;;
    # the same profile with the MoE experts in FP8: what their dequantization costs on the GPU
    profile-fp8)
            run 150 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency 4 --requests 8 --steps 12 \
              --warmup 2 --threads 4 --device-profile --quantization fp8-experts 2>&1 | grep -v "Loading weights" \
              | tee "$OUT/profile-fp8.txt" | sed -n 1,12p ;;
    # the same load with the MoE experts in FP8 (--quantization fp8-experts): speed and server memory
    fp8)    run 200 "$PY" -m bench.run "${bench_args[@]}" --no-baselines \
              --server-arg=--quantization=fp8-experts --out "$OUT/fp8-experts" 2>&1 | tee "$OUT/bench-fp8.log" | tail -12 ;;
    # the engine with every decoder pass eager (against "bench", where batches of up to 4 replay CUDA graphs)
    eager-bench)
            run 200 "$PY" -m bench.run "${bench_args[@]}" --no-baselines \
              --server-arg=--cuda-graph-max-batch=0 --out "$OUT/bf16-eager" 2>&1 | tee "$OUT/bench-eager.log" | tail -12
            roofline "$OUT/bf16-eager" "$MODEL_DIR" ;;
    # the fast sampler's CUDA tests: the Triton kernel against its PyTorch spec, rows independent of the batch
    sampler-tests)
            run 120 "$PY" -m pytest -q tests/test_sampler_cuda.py tests/test_sampler_fast.py 2>&1 | tail -8 \
              | tee "$OUT/sampler-tests.txt" ;;
    # each sampler on the 4-layer shape, same workloads in one invocation (tok/s, server GPU memory)
    samplers)
            run 300 "$PY" -m bench.run "${bench_args[@]}" --concurrency "${CONCURRENCY:-1,4,16,32}" \
              --sampler reference --sampler fast --no-baselines --out "$OUT/samplers" 2>&1 \
              | tee "$OUT/bench-samplers.log" | tail -14
            roofline "$OUT/samplers" "$MODEL_DIR" ;;
    # the full-depth shape (30 layers, bf16, about 52 GB of random weights built on the GPU)
    samplers-full)
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR" --layers 30 --dtype bfloat16 --config-only
            run 420 "$PY" -m bench.run "${bench_args[@]}" --model "$FULL_DIR" --load-format dummy \
              --concurrency "${CONCURRENCY:-1,16,32}" --sampler reference --sampler fast --no-baselines \
              --check-outputs 0 --out "$OUT/samplers-full" 2>&1 | tee "$OUT/bench-samplers-full.log" | tail -12
            roofline "$OUT/samplers-full" "$FULL_DIR" ;;
    # compressed-tensors FP8 on the GPU: the FP8 GEMMs against the dequantized reference (issue 22)
    ct-fp8) run 150 "$PY" -m pytest -q -rs tests/test_compressed_tensors_cuda.py 2>&1 | tail -10 \
              | tee "$OUT/compressed-tensors-cuda.txt" ;;
    # issue 22: the full-depth shape in bf16 against its FP8-dynamic layout (tok/s, server GPU memory)
    fp8-full)
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR" --layers 30 --dtype bfloat16 --config-only
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR-fp8" --layers 30 --dtype bfloat16 --config-only \
              --scheme fp8
            for model in "$FULL_DIR" "$FULL_DIR-fp8"; do
              run 300 "$PY" -m bench.run "${bench_args[@]}" --model "$model" --load-format dummy --concurrency "${CONCURRENCY:-1,4,8}" \
                --no-baselines --check-outputs 0 --out "$OUT/full-$(basename "$model")" 2>&1 \
                | tee "$OUT/bench-full-$(basename "$model").log" | tail -8
              roofline "$OUT/full-$(basename "$model")" "$model"
            done
            # the RTX 5090 preset (its flags, its 4 sequences over the bench's; the model is the FP8 shape) under the card's 31.8 GiB
            # (nvidia-smi total 32,607 MiB) as a cap on this GPU, without FP8 GEMMs as on that card (each layer dequantized)
            run 300 "$PY" -m bench.run "${bench_args[@]}" --model "$FULL_DIR-fp8" --load-format dummy \
              --concurrency "${CONCURRENCY:-1,4,8}" --no-baselines --check-outputs 0 --server-arg=--config=configs/rtx5090-32gb.yaml \
              --server-arg=--max-num-seqs=4 --server-arg=--device-memory-limit-gib=31.8 --server-arg=--no-fp8-gemm \
              --out "$OUT/full-fp8-capped-31.8gib" 2>&1 | tee "$OUT/bench-full-fp8-capped.log" | tail -8
            roofline "$OUT/full-fp8-capped-31.8gib" "$FULL_DIR-fp8" ;;
    # kernel time per pass with each sampler, split by stage (encoder, decoder, lm head, sampler) and by kernel
    sampler-profile)
            for sampler in reference fast; do
              for c in 1 16; do
                run 100 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency $c --requests $((c * 3)) \
                  --steps 12 --warmup 2 --threads 4 --device-profile --sampler $sampler 2>&1 \
                  | grep -v "Loading weights" | tee "$OUT/profile-$sampler-c$c.txt" | sed -n 1,14p
              done
            done ;;
    # the same at full depth and batch 1 (the lm head's share at 4 layers overstates it): issue 18's target,
    # lm head + sampler under 15% of a batch-1 pass's kernel time
    sampler-profile-full)
            run 60 "$PY" -m bench.make_random_model --config "$SHAPE" --out "$FULL_DIR" --layers 30 --dtype bfloat16 --config-only
            for sampler in reference fast; do
              run 200 "$PY" -m bench.profile_engine --model "$FULL_DIR" --load-format dummy --concurrency 1 --requests 1 \
                --steps 12 --warmup 1 --threads 4 --device-profile --sampler $sampler 2>&1 \
                | grep -v "Loading weights" | tee "$OUT/profile-full-$sampler-c1.txt" | sed -n 1,14p
            done ;;
    # --batch-invariant on CUDA: its tests, then what it costs per pass against the default engine
    batch-invariant)
            run 150 "$PY" -m pytest -q -rs tests/test_batch_invariant_cuda.py 2>&1 | tail -10 \
              | tee "$OUT/batch-invariant-tests.txt"
            for c in 1 16; do
              for mode in no-batch-invariant batch-invariant; do
                run 100 "$PY" -m bench.profile_engine --model "$MODEL_DIR" --concurrency $c --requests $((c * 3)) \
                  --steps 12 --warmup 2 --threads 4 --no-profile --$mode 2>&1 | grep -v "Loading weights" \
                  | tee "$OUT/profile-$mode-c$c.txt" | tail -4
              done
            done ;;
    *)      echo "unknown step: $step"; exit 2 ;;
  esac
done
