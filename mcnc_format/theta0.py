"""theta0 values for a range of a tensor's elements (SPEC.md §7).

Every kind is evaluated lazily, for element ranges, on the target device: PRNG values are drawn
where they are used; blob and external tensors are moved to the device once and sliced.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import philox
from .errors import UnsupportedFeatureError
from .header import (
    BlobTheta0,
    ExternalTheta0,
    FanInUniformTheta0,
    NormalTheta0,
    Theta0Entry,
    UniformTheta0,
    UnknownSchemeTheta0,
    ZerosTheta0,
)

__all__ = ["Theta0Resolver", "fan_in_bound"]


def fan_in_bound(shape: tuple[int, ...]) -> float:
    """``1 / sqrt(fan_in)`` as float32, ``fan_in = prod(shape[1:])``: PyTorch's default bound
    for Linear and Conv weights (``kaiming_uniform_(a=sqrt(5))``) and their biases."""
    return philox.round_to_f32(1.0 / math.sqrt(math.prod(shape[1:])))


class Theta0Resolver:
    """Evaluates theta0 entries of one file. ``dense`` maps a blob or external entry to its
    whole float32 tensor on a device (the reader supplies it, with checks and caching)."""

    def __init__(
        self,
        dense: Callable[[Theta0Entry, tuple[int, ...], torch.device], torch.Tensor],
        source: str,
    ) -> None:
        self.dense = dense
        self.source = source

    def values(
        self,
        entry: Theta0Entry,
        shape: tuple[int, ...],
        start: int,
        count: int,
        device: torch.device,
        label: str,
    ) -> torch.Tensor | None:
        """Float32 values of elements ``start .. start + count - 1``; ``None`` for zeros."""
        if isinstance(entry, ZerosTheta0):
            return None
        if isinstance(entry, UniformTheta0):
            return philox.uniform_signed(entry.seed, entry.stream, start, count, entry.bound,
                                         device)
        if isinstance(entry, FanInUniformTheta0):
            return philox.uniform_signed(entry.seed, entry.stream, start, count,
                                         fan_in_bound(shape), device)
        if isinstance(entry, NormalTheta0):
            z = philox.normal(entry.seed, entry.stream, start, count, device)
            mean = philox.round_to_f32(entry.mean)
            std = philox.round_to_f32(entry.std)
            return z * std + mean if (mean, std) != (0.0, 1.0) else z
        if isinstance(entry, BlobTheta0 | ExternalTheta0):
            return self.dense(entry, shape, device).reshape(-1)[start : start + count]
        scheme = isinstance(entry, UnknownSchemeTheta0)
        what = f"scheme {entry.scheme!r}" if scheme else f"kind {entry.kind!r}"
        raise UnsupportedFeatureError(
            f"{label}: unknown theta0 {what}; this reader knows zeros, prng (uniform, "
            "fan_in_uniform, normal), blob and external. Upgrade mcnc-format",
            rule="R71" if scheme else "R70", path=self.source)
