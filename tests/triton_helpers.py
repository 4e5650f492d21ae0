"""What the Triton kernel tests share: skip marks for a missing Triton or NVIDIA backend."""

from __future__ import annotations

import importlib.util

import pytest


def nvidia_backend() -> bool:
    """Whether Triton is installed with its NVIDIA backend (compiles to PTX without a GPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from triton.backends import backends

    return "nvidia" in backends


requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="triton is not installed")
requires_nvidia_backend = pytest.mark.skipif(not nvidia_backend(),
                                             reason="triton has no NVIDIA backend")
