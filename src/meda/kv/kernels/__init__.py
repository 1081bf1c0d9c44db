"""Fused GPU kernels for the prefill statistics (Triton), with a test of whether they can run here.

Triton is optional: :func:`fused_available` is False without it, and every caller falls back to the
PyTorch reference in :mod:`meda.kv.scoring` / :mod:`meda.kv.entropy`. The kernels themselves live in
:mod:`meda.kv.kernels.attention_stats` and are imported only when used.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# "0" disables the fused kernels (for A/B timing and debugging); anything else leaves them on.
ENV_SWITCH = "MEDA_FUSED_STATS"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``), as the CPU tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(tensor: torch.Tensor) -> bool:
    """Whether the fused statistics kernels can run on ``tensor``'s device.

    True on CUDA with Triton installed, or on the CPU under ``TRITON_INTERPRET=1``; always False when
    the environment variable ``MEDA_FUSED_STATS=0``.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0" or not triton_installed():
        return False
    if tensor.is_cuda:
        return not interpreting()
    return interpreting() and tensor.device.type == "cpu"
