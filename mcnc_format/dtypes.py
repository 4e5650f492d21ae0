"""Spec dtype names (SPEC.md §1) and their torch dtypes."""

from __future__ import annotations

import torch

from .errors import UnsupportedFeatureError

__all__ = ["from_torch", "to_torch"]

_TO_TORCH = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}


def to_torch(name: str) -> torch.dtype:
    return _TO_TORCH[name]


def from_torch(dtype: torch.dtype) -> str:
    """The spec name of a torch dtype; refuses dtypes the format cannot store."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise UnsupportedFeatureError(
            f"dtype {dtype} cannot be stored in an .mcnc file; convert the tensor to one of "
            f"{', '.join(str(d) for d in _FROM_TORCH)}"
        ) from None
