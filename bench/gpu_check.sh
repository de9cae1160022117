#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see README "GPU benchmark"): CUDA tests, then the
# benchmark on a DiffusionGemma-shaped random model. Results land in $OUT (or bench/results-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results-gpu}"
mkdir -p "$OUT"
python -m pip install -q -e ".[test]" matplotlib >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -m cuda tests 2>&1 | tail -5 | tee "$OUT/cuda-tests.txt"
python -m bench.make_random_model --out /tmp/dg-shape --layers "${LAYERS:-6}" --dtype bfloat16 | tee "$OUT/model.txt"
python -m bench.run --model /tmp/dg-shape --concurrency "${CONCURRENCY:-1,4,16}" --steps 12 --canvases 1,2 \
    --prompt-len 64,256 --threads 4 --out "$OUT" 2>&1 | tail -30
# the same load with the MoE experts in FP8 (--quantization fp8-experts): speed and server memory
python -m bench.run --model /tmp/dg-shape --concurrency "${CONCURRENCY:-1,4,16}" --steps 12 --canvases 1,2 \
    --prompt-len 64,256 --threads 4 --no-baselines --server-arg=--quantization=fp8-experts \
    --out "$OUT/fp8-experts" 2>&1 | tail -30
