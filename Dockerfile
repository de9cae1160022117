# syntax=docker/dockerfile:1
# diffusion-server images. Two variants from one file (see docs/deployment.md):
#
#   docker build -t diffusion-server:gpu .                          # CUDA (default)
#   docker build --build-arg VARIANT=cpu -t diffusion-server:cpu .  # CPU, serves the embedded model
#
# GPU: the CUDA 12.9 runtime image plus PyPI's torch wheel (a CUDA build on Linux x86_64, as
# scripts/bootstrap.sh installs on a GPU box). The host needs the NVIDIA driver and the NVIDIA
# Container Toolkit. CPU: python slim plus torch==2.13.0+cpu from the PyTorch CPU index.
# Both: the project installed without the test extra, a non-root user, HF_HOME and the server's
# cache on the /data volume, a HEALTHCHECK on /health, and deploy/entrypoint.py as entrypoint,
# which checks that DIFFUSION_SERVER_CONFIG names a file (the server reads the variables itself).

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- GPU base: Ubuntu 24.04 (Python 3.12) with the CUDA runtime ------------------------------------
FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive
# The distribution's python3 follows its security updates: not pinned to a version. gcc, libc6-dev
# and python3-dev: Triton (the fast sampler's kernel, the CUDA default, and --batch-invariant's
# matmuls) compiles its launcher with the host's C compiler against Python.h at first use.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"

# ---- CPU base: python slim with the CPU torch build ------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ARG TORCH_VERSION=2.13.0
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DIFFUSION_SERVER_CONFIG=/etc/diffusion-server/cpu-embedded.yaml
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}+cpu" --index-url https://download.pytorch.org/whl/cpu

# ---- the server ------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS server
ARG VARIANT
LABEL org.opencontainers.image.title="diffusion-server" \
      org.opencontainers.image.description="OpenAI-compatible server for text diffusion models (DiffusionGemma), ${VARIANT} build" \
      org.opencontainers.image.licenses="Apache-2.0"

# The project without dev tools (no [test] extra), with torchao for --quantization (the quant
# extra). The source is bind-mounted, not copied, so it leaves no layer; engine/default_model (the
# embedded model, package data) is installed with it.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir "/src[quant]" \
    && python -c "import server, engine, transformers; print('diffusion-server installed')"

COPY deploy/entrypoint.py deploy/healthcheck.py /opt/diffusion-server/
# The presets: DIFFUSION_SERVER_CONFIG=/etc/diffusion-server/h100-80gb.yaml (the CPU image defaults
# to cpu-embedded.yaml).
COPY configs/*.yaml /etc/diffusion-server/

# uid 1000 (ubuntu:24.04, under the CUDA image, ships a user "ubuntu" with it): the app user takes it.
RUN if id -u 1000 >/dev/null 2>&1; then userdel "$(id -nu 1000)"; fi \
    && useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /data/huggingface /data/diffusion-server \
    && chown -R app:app /data

# HF_HOME: hub downloads (the 26B checkpoint is about 50 GB): keep them on a volume.
# DIFFUSION_SERVER_CACHE: where the tiny fallback model is built when no model is embedded.
# OMP_NUM_THREADS=1: see docs/performance.md, "CPU threads" (raise it with --num-threads on an idle host).
# DIFFUSION_SERVER_EXIT_ON_ENGINE_DEATH: a dead engine ends the container (status 3), for the restart
# policy to act on (Docker does not restart an unhealthy container).
ENV HF_HOME=/data/huggingface \
    DIFFUSION_SERVER_CACHE=/data/diffusion-server \
    DIFFUSION_SERVER_HOST=0.0.0.0 \
    DIFFUSION_SERVER_PORT=8000 \
    DIFFUSION_SERVER_EXIT_ON_ENGINE_DEATH=true \
    OMP_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/data"]
WORKDIR /home/app
USER 1000
EXPOSE 8000

# /health is 503 while the model loads: a hub download of the 26B checkpoint can take many
# minutes, hence the long start period (failures inside it do not count).
HEALTHCHECK --interval=15s --timeout=6s --start-period=20m --retries=3 \
    CMD ["python", "/opt/diffusion-server/healthcheck.py"]

ENTRYPOINT ["python", "/opt/diffusion-server/entrypoint.py"]
