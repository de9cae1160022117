"""Quiet the warnings torchao logs when transformers imports it on a host without CUDA."""

from __future__ import annotations

import logging


def quiet_torchao_import_noise() -> None:
    """Call before transformers loads a model class. torchao (for ``--quantization``), which transformers
    imports whenever it is installed, warns at import that its CUDA-only kernels did not load, and
    about enum registrations: noise on a CPU host, so those loggers are set to ERROR there."""
    import torch

    if not torch.cuda.is_available():
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
