"""Settings that work without tuning, and the chunk size ``d`` for a storage budget.

``LORA_RECIPE`` is what ``benchmarks/bench_quality.py`` found for MCNC-LoRA (docs/quality.md,
"Recipe", lists the same values and a test keeps the two equal): ``add_mcnc_lora`` without a
config uses it. ``choose_d`` answers "how finely can I chunk and still fit": the stored
payload of a segment of ``n`` values is ``ceil(n / d)`` chunks of ``m * (k + 1)`` numbers
(alpha and beta), so the smallest ``d`` that fits a budget keeps the most trainable numbers.
The ``.mcnc`` file adds its header to the payload (names, shapes, the base's hashes: a few
hundred bytes per adapted layer, docs/quality.md), which the budget here does not count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .. import constants as C
from ..dtypes import to_torch
from ..errors import ReparametrizeError

__all__ = ["LORA_RECIPE", "LoRARecipe", "choose_d", "payload_values"]


@dataclass(frozen=True)
class LoRARecipe:
    """MCNC-LoRA settings a user gets without tuning (measured, docs/quality.md).

    ``learning_rate`` is for Adam on alpha and beta, with ``lora_alpha`` left at its default
    (``scale = 1``); ``ratio`` is the compression (adapter values per stored alpha/beta number)
    ``add_mcnc_lora`` picks ``d`` for when no config is given.
    """

    k: int
    hidden: tuple[int, ...]
    L: float
    beta_init: float
    learning_rate: float
    rank: int
    ratio: float


LORA_RECIPE = LoRARecipe(k=8, hidden=(32, 32), L=20.0, beta_init=0.0, learning_rate=0.2,
                         rank=8, ratio=28.0)


def payload_values(sizes: Sequence[int], k: int, d: int, m: int = 1) -> int:
    """Alpha and beta numbers stored for segments of ``sizes`` values each."""
    return sum(math.ceil(n / d) for n in sizes) * m * (k + 1)


def choose_d(sizes: Sequence[int], k: int, *, budget_bytes: int | None = None,
             ratio: float | None = None, m: int = 1, dtype: str = "f32") -> int:
    """The smallest chunk size ``d`` whose alpha/beta payload fits.

    ``sizes``: the values of each segment (one per compressed tensor with ``chunking=
    "tensor"``, their sum with ``"model"``). Exactly one of ``budget_bytes`` (payload bytes,
    alpha and beta stored as ``dtype``) or ``ratio`` (at least ``sum(sizes) / ratio`` values
    per stored number) sets the target. Raises ``ReparametrizeError`` when even one chunk per
    segment does not fit, saying what to change.
    """
    if (budget_bytes is None) == (ratio is None):
        raise ReparametrizeError("choose_d: give exactly one of budget_bytes and ratio")
    if dtype not in C.ALPHA_BETA_DTYPES:
        raise ReparametrizeError(f"choose_d: dtype must be one of {C.ALPHA_BETA_DTYPES}, got "
                                 f"{dtype!r}")
    for value, name, high in ((k, "k", C.MAX_K), (m, "m", C.MAX_M)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ReparametrizeError(f"choose_d: {name} must be an integer in [1, {high}] (as "
                                     f"MCNCConfig.{name}), got {value!r}")
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 1:
        raise ReparametrizeError(f"choose_d: segment sizes must be positive, got {sizes}")
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise ReparametrizeError(f"choose_d: budget_bytes must be > 0, got {budget_bytes}")
        limit = budget_bytes // to_torch(dtype).itemsize
        target = f"{budget_bytes:,} bytes of {dtype}"
    else:
        assert ratio is not None
        if not (math.isfinite(ratio) and ratio > 0):
            raise ReparametrizeError(f"choose_d: ratio must be a finite number > 0, got {ratio}")
        limit = math.floor(sum(sizes) / ratio)
        target = f"ratio {ratio:g} ({limit:,} numbers for {sum(sizes):,} values)"
    high = min(max(sizes), C.MAX_D)
    if payload_values(sizes, k, high, m) > limit:
        raise ReparametrizeError(
            f"choose_d: {target} cannot hold even one chunk per segment ({len(sizes)} segments "
            f"of {m * (k + 1)} numbers: {payload_values(sizes, k, high, m):,}); use a smaller k, "
            "fewer target modules, or chunking='model' (one segment), or a larger budget")
    low = 1
    while low < high:  # payload_values falls as d grows: the first d that fits
        mid = (low + high) // 2
        if payload_values(sizes, k, mid, m) <= limit:
            high = mid
        else:
            low = mid + 1
    return low
