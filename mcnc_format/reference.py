"""A float64 NumPy oracle for the spec's numerics: Philox (§8), the generator phi (§5).

Why a second implementation: the library's fast paths (torch on CPU and GPU, Triton kernels)
round in float32 and reorder sums, so "is this reader right?" needs an answer that does not
share their code or their precision. This module is written from SPEC.md alone, uses no torch
in its math, does every float computation in float64, and is small enough to audit by eye.
Third parties can import it (``mcnc_format.reference``) to check their own readers against
the tolerances of §10.

It is meant for test-sized inputs (up to a few million values), not for speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for annotations: the math below never touches torch
    from .generator import GeneratorSpec

__all__ = [
    "generator_weights_ref",
    "layer_bounds_ref",
    "normal_ref",
    "phi_ref",
    "philox4x32_ref",
    "philox_blocks_ref",
    "signed_unit_ref",
    "stream_words_ref",
    "uniform_signed_ref",
]

# Philox4x32-10 constants (Salmon et al., SC'11), restated here rather than imported so that
# this oracle does not inherit a typo from the code it checks.
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_ROUNDS = 10


def _philox_np(
    counter: Sequence[np.ndarray], key: Sequence[np.ndarray], rounds: int = _ROUNDS
) -> list[np.ndarray]:
    """Philox4x32 on uint64 arrays holding uint32 words.

    A uint32 times a uint32 is below 2**64, so the full product fits a uint64 exactly and the
    high and low words are a shift and a mask: no tricks to audit.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    for r in range(rounds):
        if r > 0:  # the key is bumped between rounds (Random123's philox4x32_bumpkey)
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
    return [c0, c1, c2, c3]


def philox4x32_ref(
    counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = _ROUNDS
) -> tuple[int, int, int, int]:
    """One Philox4x32 block: four uint32 counter words and two key words in, four words out.

    This is the raw bijection of Random123, so its known-answer vectors apply directly.
    """
    for word in (*counter, *key):
        if not 0 <= word <= 0xFFFFFFFF:
            raise ValueError(f"Philox words are uint32, got {word}")
    out = _philox_np([np.uint64(c) for c in counter], [np.uint64(k) for k in key], rounds)
    return tuple(int(w) for w in out)  # type: ignore[return-value]


def philox_blocks_ref(seed: int, stream: int, first_block: int, count: int) -> np.ndarray:
    """Blocks ``first_block .. first_block + count - 1`` of stream ``(seed, stream)`` (§8.1).

    Returns uint32 ``[count, 4]``. Block ``b`` is Philox of counter ``(b mod 2**32, b >> 32,
    0, 0)`` under key ``(seed, stream)``; ``b`` may be any uint64.
    """
    if not (0 <= seed <= 0xFFFFFFFF and 0 <= stream <= 0xFFFFFFFF):
        raise ValueError(f"seed and stream are uint32, got {seed}, {stream}")
    if count < 0 or first_block < 0 or first_block + count > 1 << 64:
        raise ValueError(f"blocks {first_block} + {count} are outside 0 .. 2**64")
    # Split the uint64 block index in Python ints so that first_block near 2**64 cannot wrap.
    lo0, hi0 = first_block & 0xFFFFFFFF, first_block >> 32
    steps = np.arange(count, dtype=np.uint64) + np.uint64(lo0)
    c0 = steps & _MASK32
    c1 = (steps >> _SHIFT32) + np.uint64(hi0)
    zero = np.zeros(count, dtype=np.uint64)
    words = _philox_np([c0, c1, zero, zero], [np.uint64(seed), np.uint64(stream)])
    return np.stack(words, axis=-1).astype(np.uint32)


def stream_words_ref(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Elements ``start .. start + count - 1`` of a stream as uint32: element ``i`` is word
    ``i mod 4`` of block ``i div 4`` (§8.1)."""
    if count <= 0:
        return np.empty(0, dtype=np.uint32)
    first, last = start // 4, (start + count - 1) // 4
    words = philox_blocks_ref(seed, stream, first, last - first + 1).reshape(-1)
    skip = start - 4 * first
    return words[skip : skip + count]


def signed_unit_ref(words: np.ndarray) -> np.ndarray:
    """The exact map of §8.2, ``((x >> 8) - 2**23) * 2**-23``, as float64 in ``[-1, 1)``.

    Every value has at most 24 significant bits, so float64 holds the same number a float32
    implementation must produce; compare them with ``==``.
    """
    top24 = np.asarray(words, dtype=np.uint32).astype(np.int64) >> 8
    return (top24 - (1 << 23)).astype(np.float64) * 2.0**-23


def uniform_signed_ref(seed: int, stream: int, start: int, count: int, bound: float) -> np.ndarray:
    """``float32(bound) * s`` rounded once to float32 (§8.2), as float32.

    The product of two 24-bit significands is exact in float64, so rounding that product to
    float32 gives the correctly rounded float32 product: the value every device must produce.
    """
    s = signed_unit_ref(stream_words_ref(seed, stream, start, count))
    return (np.float64(np.float32(bound)) * s).astype(np.float32)


def normal_ref(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """The Box-Muller normals of §8.3 evaluated in float64: the ``z64`` a reader is held to.

    Element ``i`` uses words ``x_a = 2 (i mod 2)`` and ``x_b = 2 (i mod 2) + 1`` of block
    ``i div 2``: ``u1 = ((x_a >> 8) + 1) 2**-24``, ``u2 = (x_b >> 8) 2**-24``,
    ``z = sqrt(-2 ln u1) cos(2 pi u2)``.
    """
    if count <= 0:
        return np.empty(0, dtype=np.float64)
    first, last = start // 2, (start + count - 1) // 2
    pairs = philox_blocks_ref(seed, stream, first, last - first + 1).reshape(-1, 2)
    skip = start - 2 * first
    pairs = pairs[skip : skip + count].astype(np.int64)
    u1 = ((pairs[:, 0] >> 8) + 1).astype(np.float64) * 2.0**-24
    u2 = (pairs[:, 1] >> 8).astype(np.float64) * 2.0**-24
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def layer_bounds_ref(spec: GeneratorSpec, layer: int) -> tuple[float, float]:
    """(weight bound, bias bound) of layer ``layer`` per the table of §5.2, float32-rounded."""
    widths = (spec.k, *spec.hidden, spec.d)
    fan_in = widths[layer]
    weight = 1.0 / fan_in if layer == 0 else math.sqrt(6.0 / fan_in)
    return float(np.float32(weight)), float(np.float32(1.0 / math.sqrt(fan_in)))


def generator_weights_ref(spec: GeneratorSpec) -> list[np.ndarray]:
    """The float32 weights ``[W_1, b_1, ..., W_out, b_out]`` a Philox generator draws (§5.2).

    Layer ``t`` takes its weight matrix from stream ``2t`` and its bias from ``2t + 1``, from
    element 0, row-major. The result is exact, so compare it bit for bit.
    """
    if spec.seed is None:
        raise ValueError("generator_weights_ref needs a generator with weights kind 'philox'")
    widths = (spec.k, *spec.hidden, spec.d)
    out: list[np.ndarray] = []
    for t in range(len(widths) - 1):
        w_bound, b_bound = layer_bounds_ref(spec, t)
        fan_out, fan_in = widths[t + 1], widths[t]
        w = uniform_signed_ref(spec.seed, 2 * t, 0, fan_out * fan_in, w_bound)
        out.append(w.reshape(fan_out, fan_in))
        if spec.bias:
            out.append(uniform_signed_ref(spec.seed, 2 * t + 1, 0, fan_out, b_bound))
    return out


def phi_ref(weights: Sequence[np.ndarray], spec: GeneratorSpec, alpha: np.ndarray) -> np.ndarray:
    """``phi(alpha)`` of §5.1 in float64, for the generator's float32 weights.

    ``weights`` is the flat storage order ``[W_1, b_1, ..., W_out, b_out]`` (no biases when
    ``spec.bias`` is false), each ``[fan_out, fan_in]`` / ``[fan_out]``. ``alpha`` is
    ``[..., k]``; the result is float64 ``[..., d]``. The weights are widened exactly, so the
    only difference from a float32 reader is the reader's own rounding.
    """
    step = 2 if spec.bias else 1
    n_layers = len(spec.hidden) + 1
    if len(weights) != step * n_layers:
        raise ValueError(f"expected {step * n_layers} weight arrays, got {len(weights)}")
    mats = [np.asarray(w, dtype=np.float64) for w in weights[::step]]
    biases = [np.asarray(b, dtype=np.float64) for b in weights[1::2]] if spec.bias else None
    x = np.asarray(alpha, dtype=np.float64)
    for t, w in enumerate(mats[:-1]):  # hidden layers: sine; omega0 scales the first only
        y = x @ w.T + (biases[t] if biases is not None else 0.0)
        x = np.sin(spec.omega0 * y if t == 0 else y)
    x = x @ mats[-1].T + (biases[-1] if biases is not None else 0.0)  # output layer: linear
    if spec.normalize:
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def regen_rtol(weights: Sequence[np.ndarray], spec: GeneratorSpec, dtype: str = "f32"
               ) -> float:
    """The relative bound of SPEC.md §10.1 for a generator and a tensor of ``dtype``: ``rtol *
    max(1, P / 20)`` with ``rtol`` 1e-5 (``1e-4`` for f16 and bf16, before their rounding) and
    ``P = |omega0| * max_i (L * sum_j |W_1[i, j]| + |b_1[i]|)``, the largest first-layer sine
    argument, whose float32 rounding dominates the error of a float32 evaluation."""
    w1 = np.abs(np.asarray(weights[0], dtype=np.float64))
    b1 = np.abs(np.asarray(weights[1], dtype=np.float64)) if spec.bias else 0.0
    peak = abs(spec.omega0) * float(np.max(spec.L * w1.sum(axis=1) + b1))
    rtol = 1e-4 if dtype in ("f16", "bf16") else 1e-5
    return rtol * max(1.0, peak / 20.0)
