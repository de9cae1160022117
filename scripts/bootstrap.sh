#!/usr/bin/env bash
# Create .venv (if needed), install the project with the right PyTorch build, then run a command.
#   bash scripts/bootstrap.sh serve [server flags]   start the server (default model, port 8000)
#   bash scripts/bootstrap.sh test [pytest args]     run the test suite
#   bash scripts/bootstrap.sh install                only install
# PyTorch: with an NVIDIA GPU (nvidia-smi works) the CUDA build from PyPI is installed; otherwise
# the CPU build (torch==2.13.0+cpu, from the PyTorch CPU index or a local wheel).
set -euo pipefail
CALLER_DIR="$PWD"  # the server's relative paths (--config, --model) are the caller's
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
NEW_ENOUGH='import sys; assert sys.version_info >= (3, 11)'
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then BUILD=cuda; else BUILD=cpu; fi
STAMP="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)-$BUILD"

# a .venv left half made (no pip: python3-venv was missing) or made by an older Python is made again
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c "$NEW_ENOUGH; import pip" >/dev/null 2>&1; then
    echo "bootstrap: $VENV has no pip or a Python older than 3.11: making it again" >&2
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c "$NEW_ENOUGH" >/dev/null 2>&1; then
        echo "bootstrap: needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1) (set PYTHON=...)" >&2
        exit 1
    fi
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # the pinned torch, built for this machine (a CUDA build where nvidia-smi works); another one is replaced
    if ! "$VENV/bin/python" -c "import sys, torch
sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or (torch.version.cuda is not None) != ('$BUILD' == 'cuda'))" \
            >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip uninstall --quiet -y torch >/dev/null 2>&1 || true
        if [ "$BUILD" = cuda ]; then
            "$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION}"
        else
            # the CPU build: from the configured package sources if they carry it (a local wheel
            # mirror), else from the PyTorch CPU index (PyPI itself has no +cpu builds)
            "$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
                || "$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION}+cpu" \
                    --extra-index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi

# Threads: see docs/performance.md, "CPU threads". One intra-op thread unless the caller says otherwise.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

cmd="${1:-serve}"
shift || true
case "$cmd" in
    # -P: the caller's folder is not on sys.path (a server/ or engine/ folder there would be imported instead)
    serve) cd "$CALLER_DIR" && exec "$ROOT/$VENV/bin/python" -P -m server "$@" ;;
    test) exec "$VENV/bin/python" -m pytest -q -rs "$@" ;;
    install) ;;
    *) echo "usage: bash scripts/bootstrap.sh {serve|test|install} [args]" >&2; exit 2 ;;
esac
