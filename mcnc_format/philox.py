"""Philox4x32-10, the spec's portable PRNG (SPEC.md §8), as vectorised torch integer code.

Why our own PRNG: torch's seeded generators differ between CPU and CUDA, across GPU models
and across releases, so a file that stores only a seed needs a generator defined by the
spec. Philox is counter-based: value ``i`` of a stream is a pure function of
``(seed, stream, i)``, so any device can draw any slice in parallel.

Layout (chosen so Triton's ``tl.randint4x(seed | stream << 32, block)`` gives the same
words): key = ``(seed, stream)`` as two uint32 words; counter = ``(block mod 2**32,
block >> 32, 0, 0)``; element ``i`` of the stream is word ``i mod 4`` of block ``i // 4``.

On accelerators all arithmetic is done in torch int64 holding uint32 values; the 32x32-bit
products are split in 16-bit halves so that no intermediate exceeds 2**63 (signed overflow is
undefined in C++). On the CPU the same rounds run in NumPy uint64, where a product is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from .constants import (
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
)

__all__ = [
    "normal",
    "philox4x32",
    "round_to_f32",
    "stream_words",
    "uniform_signed",
    "words_to_signed_unit",
]

_MASK32 = 0xFFFFFFFF


def _mulhilo(x: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product ``x * multiplier`` for uint32 ``x``."""
    m_hi, m_lo = multiplier >> 16, multiplier & 0xFFFF
    p_hi = x * m_hi  # < 2**48
    p_lo = x * m_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int | torch.Tensor,
    k1: int | torch.Tensor,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Philox4x32 bijection on int64 tensors holding uint32 words; returns four words."""
    k0 = k0 if isinstance(k0, torch.Tensor) else torch.tensor(k0, dtype=torch.int64)
    k1 = k1 if isinstance(k1, torch.Tensor) else torch.tensor(k1, dtype=torch.int64)
    k0 = k0.to(c0.device)
    k1 = k1.to(c0.device)
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def round_to_f32(value: float) -> float:
    """Round a float64 to the nearest float32 (ties to even), as the spec's bounds are."""
    return float(torch.tensor(value, dtype=torch.float64).to(torch.float32))


def _check_key(seed: int, stream: int) -> None:
    if not 0 <= seed <= _MASK32:
        raise ValueError(f"seed must be a uint32 (0..{_MASK32}), got {seed}")
    if not 0 <= stream <= _MASK32:
        raise ValueError(f"stream must be a uint32 (0..{_MASK32}), got {stream}")


def _philox4x32_numpy(
    c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, k0: int, k1: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same bijection on uint64 NumPy arrays: a 32x32-bit product fits in uint64 exactly,
    so each multiply is one operation; on the CPU this is an order of magnitude faster than the
    split products the torch version needs."""
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    key0, key1 = np.uint64(k0), np.uint64(k1)
    for r in range(PHILOX_ROUNDS):
        if r:
            key0 = (key0 + np.uint64(PHILOX_W0)) & mask
            key1 = (key1 + np.uint64(PHILOX_W1)) & mask
        p0 = c0 * m0
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ key0, p1 & mask, (p0 >> shift) ^ c3 ^ key1, p0 & mask
    return c0, c1, c2, c3


def blocks(
    seed: int, stream: int, first_block: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Blocks ``first_block .. first_block + count - 1`` of a stream, as int64 ``[count, 4]``."""
    _check_key(seed, stream)
    # A negative block would silently give non-uint32 "words"; int64 indices stop at 2**63.
    if first_block < 0 or first_block + count > 1 << 63:
        raise ValueError(f"blocks {first_block} .. {first_block + count - 1} outside 0 .. 2**63")
    if torch.device(device).type == "cpu":
        index_np = np.arange(first_block, first_block + count, dtype=np.uint64)
        zero_np = np.zeros_like(index_np)
        words_np = _philox4x32_numpy(
            index_np & np.uint64(_MASK32), index_np >> np.uint64(32), zero_np, zero_np, seed,
            stream,
        )
        return torch.from_numpy(np.stack(words_np, axis=-1).astype(np.int64))
    index = torch.arange(first_block, first_block + count, dtype=torch.int64, device=device)
    c0 = index & _MASK32
    c1 = index >> 32
    zero = torch.zeros_like(c0)
    words = philox4x32(c0, c1, zero, zero, seed, stream)
    return torch.stack(words, dim=-1)


def stream_words(
    seed: int, stream: int, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of stream ``(seed, stream)``, as int64 words."""
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first_block = start // 4
    last_block = (start + count - 1) // 4
    words = blocks(seed, stream, first_block, last_block - first_block + 1, device).reshape(-1)
    skip = start - 4 * first_block
    return words[skip : skip + count]


def words_to_signed_unit(words: torch.Tensor) -> torch.Tensor:
    """The exact map of §8.2: ``((x >> 8) - 2**23) * 2**-23``, a float32 in ``[-1, 1)``.

    Every value is a multiple of 2**-23 with at most 24 significant bits, so the conversion
    is exact in float32 on every device.
    """
    return ((words >> 8) - (1 << 23)).to(torch.float32) * (2.0**-23)


def uniform_signed(
    seed: int,
    stream: int,
    start: int,
    count: int,
    bound: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``bound * s`` for the signed units ``s`` of §8.2: uniform on ``[-bound, bound)``.

    ``bound`` is first rounded to float32; the product of two float32 values rounded once
    to float32 is exact IEEE arithmetic, identical everywhere.
    """
    units = words_to_signed_unit(stream_words(seed, stream, start, count, device))
    return units * torch.tensor(bound, dtype=torch.float32, device=units.device)


def normal(
    seed: int,
    stream: int,
    start: int,
    count: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal float32 values by the Box-Muller transform of §8.3.

    Element ``i`` uses words ``2(i mod 2)`` and ``2(i mod 2) + 1`` of block ``i // 2``:
    ``u1 = ((w_a >> 8) + 1) * 2**-24`` in ``(0, 1]`` and ``u2 = (w_b >> 8) * 2**-24``;
    ``z = sqrt(-2 ln u1) * cos(2 pi u2)``. Transcendentals differ by device, so the spec
    states a tolerance (``NORMAL_ATOL``) rather than bit equality.
    """
    if count <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    _check_key(seed, stream)
    first_block = start // 2
    last_block = (start + count - 1) // 2
    words = blocks(seed, stream, first_block, last_block - first_block + 1, device).reshape(-1, 2)
    skip = start - 2 * first_block
    pairs = words[skip : skip + count]
    u1 = ((pairs[:, 0] >> 8) + 1).to(torch.float32) * (2.0**-24)
    u2 = (pairs[:, 1] >> 8).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
