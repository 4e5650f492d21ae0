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
undefined in C++). On the CPU the draws run in the compiled kernels of ``_philox.c`` (vector
rounds, chosen for the CPU at run time, in as many threads as there are cores) when the
extension was built, else the same rounds in NumPy uint64, where a product is exact. Both give
the same words and uniform values; normal values agree within §8.3's tolerance.
``MCNC_PHILOX=python`` in the environment forces the NumPy path, ``MCNC_PHILOX=compiled``
makes a missing extension an error (for CI); ``backend()`` says which one runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

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
    "backend",
    "normal",
    "normal_at",
    "philox4x32",
    "round_to_f32",
    "stream_words",
    "uniform_signed",
    "uniform_signed_at",
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


#: The environment variable that picks the CPU path: ``python``, ``compiled`` or ``auto``.
BACKEND_VARIABLE = "MCNC_PHILOX"


def _load_compiled() -> ModuleType | None:
    """The compiled kernels, unless the environment asks for the NumPy path."""
    choice = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in ("auto", "python", "compiled"):
        raise ValueError(f"{BACKEND_VARIABLE}={choice!r}: use 'python' (the NumPy path), "
                         "'compiled' (the C kernels, an error if they were not built) or 'auto'")
    if choice == "python":
        return None
    try:
        from . import _philox
    except ImportError as error:
        if choice == "compiled":
            raise ImportError(f"{BACKEND_VARIABLE}=compiled, but mcnc_format._philox was not "
                              "built: reinstall with a C compiler (pip install -e .)") from error
        return None
    return _philox


_COMPILED = _load_compiled()


def backend() -> str:
    """The CPU path of the draws: ``"compiled (avx512)"``, ``"compiled (avx2)"``,
    ``"compiled (scalar)"`` or ``"python"`` (NumPy)."""
    return f"compiled ({_COMPILED.isa()})" if _COMPILED is not None else "python"


_CPU_TILE = 16384  # blocks per tile: six uint64 work arrays of 128 KiB stay in L2
_CPU_POOL: ThreadPoolExecutor | None = None


def _cpu_pool() -> ThreadPoolExecutor:
    """Threads for large CPU draws; NumPy releases the GIL inside its integer ufuncs. One
    worker per core, whatever torch's thread setting is when the pool is first used."""
    global _CPU_POOL
    if _CPU_POOL is None:
        _CPU_POOL = ThreadPoolExecutor(max_workers=_usable_cores(),
                                       thread_name_prefix="mcnc-philox")
    return _CPU_POOL


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _forget_pool_after_fork() -> None:
    """A forked child inherits the pool object but not its threads: start afresh there."""
    global _CPU_POOL
    _CPU_POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _philox_tile_numpy(first_block: int, n: int, k0: int, k1: int) -> tuple[np.ndarray, ...]:
    """Words of blocks ``first_block .. first_block + n - 1`` as four uint64 arrays. A 32x32-bit
    product fits in uint64 exactly, so each multiply is one in-place NumPy operation; a tile's
    work arrays stay in cache."""
    index = np.arange(first_block, first_block + n, dtype=np.uint64)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    c0 = index & mask
    c1 = index >> shift
    c2 = np.zeros(n, dtype=np.uint64)
    c3 = np.zeros(n, dtype=np.uint64)
    p0 = np.empty(n, dtype=np.uint64)
    p1 = np.empty(n, dtype=np.uint64)
    key0, key1 = np.uint64(k0), np.uint64(k1)
    for r in range(PHILOX_ROUNDS):
        if r:
            key0 = (key0 + np.uint64(PHILOX_W0)) & mask
            key1 = (key1 + np.uint64(PHILOX_W1)) & mask
        np.multiply(c0, m0, out=p0)
        np.multiply(c2, m1, out=p1)
        np.right_shift(p1, shift, out=c0)
        c0 ^= c1
        c0 ^= key0
        np.right_shift(p0, shift, out=c2)
        c2 ^= c3
        c2 ^= key1
        np.bitwise_and(p1, mask, out=c1)
        np.bitwise_and(p0, mask, out=c3)
    return c0, c1, c2, c3


def _store_words(out: np.ndarray, words: tuple[np.ndarray, ...]) -> None:
    for lane, word in enumerate(words):
        out[:, lane] = word


def _store_signed_units(bound: np.float32) -> Callable[[np.ndarray, tuple[np.ndarray, ...]], None]:
    """A tile finisher writing ``bound * s`` of §8.2 as float32: ``x >> 8`` is below 2**24, so
    its float32 conversion, the subtraction of 2**23 and the scaling by 2**-23 are exact, and
    the product with the float32 bound rounds once."""

    def store(out: np.ndarray, words: tuple[np.ndarray, ...]) -> None:
        for lane, word in enumerate(words):
            np.right_shift(word, np.uint64(8), out=word)
            unit = word.astype(np.float32)
            unit -= np.float32(1 << 23)
            unit *= np.float32(2.0**-23)
            unit *= bound
            out[:, lane] = unit

    return store


def _draw_numpy(seed: int, stream: int, first_block: int, count: int, dtype: type,
                store: Callable[[np.ndarray, tuple[np.ndarray, ...]], None]) -> np.ndarray:
    """``[count, 4]`` values of blocks from ``first_block``, tile by tile, in threads when
    there are many tiles."""
    out = np.empty((count, 4), dtype=dtype)

    def tile(i: int) -> None:
        n = min(_CPU_TILE, count - i)
        store(out[i : i + n], _philox_tile_numpy(first_block + i, n, seed, stream))

    starts = range(0, count, _CPU_TILE)
    if len(starts) == 1:
        tile(0)
    else:
        for job in [_cpu_pool().submit(tile, i) for i in starts]:
            job.result()
    return out


#: Values per thread below which a compiled draw stays on the calling thread: a hand-off to
#: the pool costs tens of microseconds, a thread draws about 1.5 values per nanosecond.
_PARALLEL_MIN = 1 << 17


def _in_parallel(count: int, fill: Callable[[int, int], None]) -> None:
    """``fill(lo, hi)`` over disjoint parts of ``range(count)``, one per core when the parts
    are large enough; the compiled kernels release the GIL."""
    parts = min(_usable_cores(), count // _PARALLEL_MIN)
    if parts <= 1:
        fill(0, count)
        return
    per_part = -(-count // parts)
    step = -(-per_part // 64) * 64  # whole vectors per part
    bounds = [(lo, min(lo + step, count)) for lo in range(0, count, step)]
    jobs = [_cpu_pool().submit(fill, lo, hi) for lo, hi in bounds[1:]]
    try:
        fill(*bounds[0])
    finally:
        for job in jobs:
            job.result()


def _compiled_range(kernel: Callable[..., None], per_block: int, seed: int, stream: int,
                    start: int, out: np.ndarray, *extra: float) -> np.ndarray:
    """``out[i]`` = element ``start + i`` of a stream with ``per_block`` elements per block,
    by the compiled ``kernel``."""

    def fill(lo: int, hi: int) -> None:
        block, lane = divmod(start + lo, per_block)
        kernel(out[lo:hi], seed, stream, block, lane, *extra)

    _in_parallel(out.size, fill)
    return out


def _compiled_at(kernel: Callable[..., None], seed: int, stream: int, index: torch.Tensor,
                 *extra: float) -> torch.Tensor:
    """Float32 values at the element indices ``index`` (a CPU int64 tensor) by ``kernel``."""
    _check_key(seed, stream)
    flat = index.reshape(-1).to(torch.int64).contiguous().numpy()
    out = np.empty(flat.size, dtype=np.float32)

    def fill(lo: int, hi: int) -> None:
        kernel(out[lo:hi], seed, stream, flat[lo:hi], *extra)

    try:
        _in_parallel(flat.size, fill)
    except ValueError as error:  # a negative index
        raise ValueError(f"element indices outside 0 .. 2**63: {error}") from None
    return torch.from_numpy(out).reshape(index.shape)


def _compiled_cpu(device: torch.device | str) -> ModuleType | None:
    """The compiled kernels when they serve a draw on ``device``."""
    return _COMPILED if _COMPILED is not None and torch.device(device).type == "cpu" else None


def _into(out: torch.Tensor, count: int, device: torch.device | str,
          draw: Callable[[], torch.Tensor], kernel: Callable[[], Callable[..., None] | None],
          per_block: int, seed: int, stream: int, start: int, *extra: float) -> torch.Tensor:
    """Write a draw of ``count`` values into ``out``: by the compiled ``kernel()`` in place
    for a contiguous float32 CPU tensor, else through ``draw()`` and a copy."""
    if (out.dtype != torch.float32 or out.numel() != count or not out.is_contiguous()
            or out.device != torch.device(device)):
        raise ValueError(f"out must be a contiguous float32 tensor of {count} elements on "
                         f"{device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    compiled = kernel() if out.device.type == "cpu" and count else None
    if compiled is None:
        out.view(-1).copy_(draw())
        return out
    last_block = (start + count - 1) // per_block
    _check_blocks(seed, stream, start // per_block, last_block - start // per_block + 1)
    _compiled_range(compiled, per_block, seed, stream, start, out.view(-1).numpy(), *extra)
    return out


def _check_blocks(seed: int, stream: int, first_block: int, count: int) -> None:
    _check_key(seed, stream)
    # A negative block would silently give non-uint32 "words"; int64 indices stop at 2**63.
    if first_block < 0 or first_block + count > 1 << 63:
        raise ValueError(f"blocks {first_block} .. {first_block + count - 1} outside 0 .. 2**63")


def blocks(
    seed: int, stream: int, first_block: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Blocks ``first_block .. first_block + count - 1`` of a stream, as int64 ``[count, 4]``."""
    _check_blocks(seed, stream, first_block, count)
    compiled = _compiled_cpu(device)
    if compiled is not None:
        flat = np.empty(4 * count, dtype=np.int64)
        _compiled_range(compiled.words, 4, seed, stream, 4 * first_block, flat)
        return torch.from_numpy(flat.reshape(count, 4))
    if torch.device(device).type == "cpu":
        words = _draw_numpy(seed, stream, first_block, count, np.uint64, _store_words)
        return torch.from_numpy(words.view(np.int64))
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bound * s`` for the signed units ``s`` of §8.2: uniform on ``[-bound, bound)``.

    ``bound`` is first rounded to float32; the product of two float32 values rounded once
    to float32 is exact IEEE arithmetic, identical everywhere. ``out`` (a contiguous float32
    tensor of ``count`` elements on ``device``): the values are written there, and it is
    returned; on the CPU the compiled kernels write them straight in (a load's output).
    """
    if out is not None:
        return _into(out, count, device, lambda: uniform_signed(seed, stream, start, count,
                                                                bound, device),
                     lambda: _COMPILED.uniform if _COMPILED else None, 4, seed, stream, start,
                     float(bound))
    if torch.device(device).type == "cpu" and count > 0:
        first_block = start // 4
        n_blocks = (start + count - 1) // 4 - first_block + 1
        _check_blocks(seed, stream, first_block, n_blocks)
        if _COMPILED is not None:
            values = np.empty(count, dtype=np.float32)
            return torch.from_numpy(_compiled_range(_COMPILED.uniform, 4, seed, stream, start,
                                                    values, float(bound)))
        values = _draw_numpy(seed, stream, first_block, n_blocks, np.float32,
                             _store_signed_units(np.float32(bound)))
        skip = start - 4 * first_block
        return torch.from_numpy(values.reshape(-1)[skip : skip + count])
    units = words_to_signed_unit(stream_words(seed, stream, start, count, device))
    return units * torch.tensor(bound, dtype=torch.float32, device=units.device)


def normal(
    seed: int,
    stream: int,
    start: int,
    count: int,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normal float32 values by the Box-Muller transform of §8.3 (``out``: as for
    ``uniform_signed``).

    Element ``i`` uses words ``2(i mod 2)`` and ``2(i mod 2) + 1`` of block ``i // 2``:
    ``u1 = ((w_a >> 8) + 1) * 2**-24`` in ``(0, 1]`` and ``u2 = (w_b >> 8) * 2**-24``;
    ``z = sqrt(-2 ln u1) * cos(2 pi u2)``. Transcendentals differ by device, so the spec
    states a tolerance (``NORMAL_ATOL``) rather than bit equality.
    """
    if out is not None:
        return _into(out, count, device, lambda: normal(seed, stream, start, count, device),
                     lambda: _COMPILED.normal if _COMPILED else None, 2, seed, stream, start)
    if count <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    _check_key(seed, stream)
    first_block = start // 2
    last_block = (start + count - 1) // 2
    compiled = _compiled_cpu(device)
    if compiled is not None:
        _check_blocks(seed, stream, first_block, last_block - first_block + 1)
        values = np.empty(count, dtype=np.float32)
        return torch.from_numpy(_compiled_range(compiled.normal, 2, seed, stream, start,
                                                values))
    words = blocks(seed, stream, first_block, last_block - first_block + 1, device).reshape(-1, 2)
    skip = start - 2 * first_block
    pairs = words[skip : skip + count]
    u1 = ((pairs[:, 0] >> 8) + 1).to(torch.float32) * (2.0**-24)
    u2 = (pairs[:, 1] >> 8).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)


def _words_at(seed: int, stream: int, blocks_index: torch.Tensor) -> torch.Tensor:
    """Blocks ``blocks_index`` (int64, any order) of a stream, as int64 ``[n, 4]``."""
    _check_key(seed, stream)
    if blocks_index.numel() and (int(blocks_index.min()) < 0
                                 or int(blocks_index.max()) >= 1 << 63):
        raise ValueError("blocks outside 0 .. 2**63")
    zero = torch.zeros_like(blocks_index)
    words = philox4x32(blocks_index & _MASK32, blocks_index >> 32, zero, zero, seed, stream)
    return torch.stack(words, dim=-1)


def uniform_signed_at(seed: int, stream: int, index: torch.Tensor, bound: float
                      ) -> torch.Tensor:
    """``uniform_signed`` at the element indices ``index`` (int64, any order, on the device
    where the values are wanted): the same values, element by element, for boxes of a
    tensor whose elements are not one range."""
    if _compiled_cpu(index.device) is not None:
        assert _COMPILED is not None
        return _compiled_at(_COMPILED.uniform_at, seed, stream, index, float(bound))
    words = _words_at(seed, stream, index // 4)
    word = words.gather(1, (index % 4)[:, None]).reshape(-1)
    return words_to_signed_unit(word) * torch.tensor(bound, dtype=torch.float32,
                                                     device=index.device)


def normal_at(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """``normal`` at the element indices ``index`` (int64, any order)."""
    if _compiled_cpu(index.device) is not None:
        assert _COMPILED is not None
        return _compiled_at(_COMPILED.normal_at, seed, stream, index)
    words = _words_at(seed, stream, index // 2)
    lane = 2 * (index % 2)[:, None]
    w_a = words.gather(1, lane).reshape(-1)
    w_b = words.gather(1, lane + 1).reshape(-1)
    u1 = ((w_a >> 8) + 1).to(torch.float32) * (2.0**-24)
    u2 = (w_b >> 8).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
