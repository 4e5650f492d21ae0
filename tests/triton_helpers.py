"""What the Triton kernel tests share: skip marks for a missing (or too old) Triton and for a
Triton without its NVIDIA backend."""

from __future__ import annotations

import pytest

from mcnc_format.engine.backend import triton_available


def nvidia_backend() -> bool:
    """Whether Triton is installed with its NVIDIA backend (compiles to PTX without a GPU)."""
    if not triton_available():
        return False
    from triton.backends import backends

    return "nvidia" in backends


requires_triton = pytest.mark.skipif(not triton_available(),
                                     reason="needs Triton 3.0 or newer (the gpu extra)")
requires_nvidia_backend = pytest.mark.skipif(not nvidia_backend(),
                                             reason="triton has no NVIDIA backend")
