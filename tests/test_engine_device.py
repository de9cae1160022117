"""``--device auto`` on a machine with an NVIDIA driver that torch cannot use: the server serves on the
CPU and says why, once, at load."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import EngineSettings
from engine import loader

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a usable GPU: device auto takes it")


@pytest.fixture
def driver_file(tmp_path):
    path = tmp_path / "version"
    path.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04\n")
    return path


def test_no_driver_no_note(tmp_path):
    assert loader.unused_gpu_note(str(tmp_path / "absent")) is None


def test_a_cpu_build_of_torch_beside_a_driver(driver_file, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert loader.unused_gpu_note(str(driver_file)) == (
        f"this machine has an NVIDIA driver, but torch {torch.__version__} is a CPU build: install the CUDA build "
        "to serve on the GPU (docs/gpu.md), or pass --device cpu")


def test_a_cuda_build_the_driver_cannot_run(driver_file, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # as a CUDA wheel reports it; no GPU is usable here
    assert loader.unused_gpu_note(str(driver_file)) == (
        f"this machine has an NVIDIA driver, but torch {torch.__version__} (CUDA 13.0) finds no GPU it can use: "
        "CUDA_VISIBLE_DEVICES may hide them, the container may lack access to them, or the driver may not support "
        "CUDA 13.0 (nvidia-smi shows the newest CUDA version it supports); or pass --device cpu")


@pytest.mark.parametrize("device,warned", [("auto", True), ("cpu", False)])
def test_the_load_says_why_it_serves_on_the_cpu(server_tiny_checkpoint, driver_file, monkeypatch, caplog,
                                                device, warned):
    monkeypatch.setattr(loader, "NVIDIA_DRIVER", str(driver_file))
    with caplog.at_level(logging.WARNING, logger="engine.loader"):
        loaded = loader.load_model(EngineSettings(model=str(server_tiny_checkpoint), device=device))
    assert loaded.device.type == "cpu"
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving on the CPU: ")]
    assert notes == ([f"serving on the CPU: {loader.unused_gpu_note(str(driver_file))}"] if warned else [])
