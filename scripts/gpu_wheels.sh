#!/usr/bin/env bash
# Download into .whl/ the wheels a lent GPU machine lacks (docs/gpu.md, "Checking a GPU machine"): its
# image has PyTorch, Triton and most of the stack, but not the HTTP front, torchao or this transformers.
# Versions are the ones this checkout's .venv runs (scripts/bootstrap.sh makes it); the machine's Python
# is 3.12 on x86_64, and nothing can be fetched there. bench/gpu_check.sh installs .whl/ when it is there;
# a device call names .whl in its carry (64 MiB with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
# what the image lacks, or has in another version than the project needs (fastapi's and pydantic's own
# needs included: the image's typing-extensions may be older than pydantic's; transformers checks regex's
# version at import). tests/test_gpu_check_script.py checks that every requirement of these is carried or
# in the image (tests/gpu_image_packages.txt).
NAMES=(transformers fastapi starlette pydantic pydantic-core annotated-types typing-inspection
       typing-extensions uvicorn sse-starlette torchao opentelemetry-api regex)
specs=()
for name in "${NAMES[@]}"; do
  specs+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${specs[@]}"
du -sh .whl
ls .whl
