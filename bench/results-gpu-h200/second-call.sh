#!/usr/bin/env bash
# GPU session 4, second call on the warm machine (model in /tmp/dg-shape, wheels in /tmp/site):
# eager again (no baselines) right after the graphs run, graphs up to batch 16, and fp32 output check.
set -uo pipefail
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
[ -f /tmp/dg-shape/config.json ] || python3 -m bench.make_random_model --out /tmp/dg-shape --layers 4 --dtype bfloat16
A=(--model /tmp/dg-shape --steps 12 --canvases 1,2 --prompt-len 64,256 --threads 4 --requests-per-slot 3 --no-baselines)
b() { local name=$1; shift; echo "== $(date +%T) $name: $*"; timeout 110 python3 -m bench.run "${A[@]}" "$@" --out /tmp/o/$name 2>&1 | grep -E "^\| (1|4|16) \||identical|failed" ; cp /tmp/o/$name/bench.json $OUT/$name.json; }
b eager2 --concurrency 1,4,16
b graphs16 --concurrency 16 --server-arg=--cuda-graph-max-batch=16
b eager3 --concurrency 16
b fp32 --concurrency 16 --server-arg=--dtype=float32
echo "== $(date +%T) done"
