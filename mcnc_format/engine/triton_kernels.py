"""The fused output-layer kernel: one pass that writes each regenerated value once.

For a batch of chunks, ``fused_regenerate`` takes the left factor of ``FusedGenerator`` (the
hidden activations already scaled by ``c = beta / ||W h + b||``, computed in IEEE float32 by
torch; SPEC.md §10.2) and computes, per output tile ``[BLOCK_C chunks, BLOCK_D values]``::

    out = cast(theta0 + left[:, :K] @ W_stack + csum * b_out)

``left`` rows stay in registers while tiles of the (small, L2-resident) stacked output weight
stream past; theta0 is drawn from Philox in registers (``tl.randint4x`` computes exactly the
spec's block, §8.1) or read from a dense base tensor (which may be the output tensor itself:
a base streamed into the final storage is updated in place). Values land straight in the
member's final storage with its dtype: there is no float32 intermediate of the output.

How the output-layer product runs (``Precision``, SPEC.md §10.1): ``"ieee"``, float32 FMA,
for float32 outputs (33 multiply-adds per value for the LLaMA generator, so FMA-bound while the
tensor cores idle); ``"bf16x3"`` for float16 and bfloat16 outputs: both operands split into a
bfloat16 high part and a bfloat16 remainder, ``a_lo w_hi + a_hi w_lo + a_hi w_hi`` accumulated
in float32 on the tensor cores (the weights split once per generator, ``FusedGenerator.split``;
the activations in registers). Each partial product is exact in float32 and the dropped terms
are about ``2**-16`` of each product, within §10.1's bound for 16-bit outputs and far below
their rounding. ``"tf32x3"`` is Triton's three-TF32 emulation of float32, kept for comparison.
The hidden layers never run here, so §10.1's IEEE rule for them is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..constants import generator_bias_stream, generator_weight_stream
from ..generator import GeneratorSpec, GeneratorWeights, layer_bounds
from ..header import (
    FanInUniformTheta0,
    NormalTheta0,
    Theta0Entry,
    UniformTheta0,
    ZerosTheta0,
)
from ..philox import round_to_f32
from .fused import split_bf16
from .options import Precision
from .theta0 import fan_in_bound

__all__ = [
    "DEFAULT_TILE",
    "KERNEL_DTYPES",
    "THETA0_DENSE",
    "THETA0_NORMAL",
    "THETA0_UNIFORM",
    "THETA0_ZEROS",
    "KernelTheta0",
    "compiled",
    "draw_generator_weights",
    "fused_regenerate",
    "kernel_precision",
    "kernel_theta0",
    "philox_uniform",
]

THETA0_ZEROS = 0
THETA0_UNIFORM = 1
THETA0_NORMAL = 2
THETA0_DENSE = 3

#: Output dtypes the kernel stores (float64 members take the eager path). Dense bases may
#: have any float dtype, float64 included.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: (chunks, values, warps) per program: the fastest of the tiles ``benchmarks/profile_gpu.py``
#: swept on an H200 with the ieee product (0.259 T values/s; 128 x 128 x 8: 0.255, 64 x 128 x 4:
#: 0.230, 128 x 256 x 8: 0.114).
DEFAULT_TILE = (128, 64, 4)
# Globals read inside @triton.jit functions must be constexpr: compiled Triton rejects any
# other global ("only constexpr"), while the interpreter would accept it. Write them to the
# right of a tensor (``x * _TWO_PI``): the interpreter cannot multiply a constexpr by a tensor.
_TWO_POW_M23 = tl.constexpr(1.0 / 8388608.0)
_TWO_POW_M24 = tl.constexpr(1.0 / 16777216.0)
_TWO_PI = tl.constexpr(6.283185307179586)  # rounded to float32 where it multiplies u2


@dataclass(frozen=True)
class KernelTheta0:
    """theta0 as the kernel evaluates it: a Philox scheme by its key and constants, or a dense
    tensor (flat, any float dtype, indexed by the member's element index; read as float32,
    as the reader reads a dense theta0)."""

    kind: int = THETA0_ZEROS
    seed: int = 0
    stream: int = 0
    bound: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    base: torch.Tensor | None = None

    @property
    def key(self) -> int:
        """``tl.randint4x``'s 64-bit key: ``seed | stream << 32`` (§8.1)."""
        return self.seed | (self.stream << 32)


@triton.jit
def _uniform_units(x):
    """§8.2: ``((x >> 8) - 2**23) * 2**-23``, exact in float32."""
    return ((x >> 8).to(tl.int32) - 8388608).to(tl.float32) * _TWO_POW_M23


@triton.jit
def _box_muller(xa, xb, LIBDEVICE: tl.constexpr):
    """§8.3: ``sqrt(-2 ln u1) * cos(2 pi u2)`` from two words, in float32.

    Precise math, so that NORMAL_ATOL * max(1, |z|) holds on every device: a correctly
    rounded square root (``tl.sqrt`` compiles to ``sqrt.approx.ftz.f32`` for NVIDIA GPUs) and,
    when compiled, libdevice's ``logf``/``cosf`` named explicitly. Triton 3.9 already lowers
    ``tl.log``/``tl.cos`` to those on NVIDIA; naming them keeps the accuracy from hanging on a
    backend's lowering (hardware ``lg2``/``cos`` approximations lose accuracy as the argument
    of ``cos`` grows to 2 pi). The interpreter cannot call libdevice (extern functions are not
    interpreted); its ``tl.log``/``tl.cos`` are NumPy's float32 functions, which are precise.
    """
    u1 = ((xa >> 8).to(tl.int32) + 1).to(tl.float32) * _TWO_POW_M24
    u2 = (xb >> 8).to(tl.int32).to(tl.float32) * _TWO_POW_M24
    if LIBDEVICE:
        return tl.sqrt_rn(-2.0 * libdevice.log(u1)) * libdevice.cos(u2 * _TWO_PI)
    return tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(u2 * _TWO_PI)


@triton.jit
def _dot_bf16(a, b, acc, COMPILED: tl.constexpr):
    """``acc + a @ b`` for bfloat16 ``a``, ``b``: each product exact in the float32
    accumulator. Triton 3.6's interpreter multiplies bfloat16 operands' raw bits, so there
    they are widened first (the same exact products, the same float32 sums)."""
    if COMPILED:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _regen_kernel(
    left_ptr, w_ptr, w_lo_ptr, bias_ptr, out_ptr, base_ptr, rows_ptr,
    rows, K, stride_left, d, first_local, numel, theta_first,
    key, bound, mean, std,
    HAS_BIAS: tl.constexpr, THETA: tl.constexpr, ALIGNED: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPILED: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_d = tl.cdiv(d, BLOCK_D)
    pid_c = pid // tiles_d
    pid_d = pid % tiles_d
    r = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = r < rows
    col_ok = cols < d
    r64 = r.to(tl.int64)

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(left_ptr + r64[:, None] * stride_left + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_at = kk[:, None].to(tl.int64) * d + cols[None, :]
        w_ok = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + w_at, mask=w_ok, other=0.0)
        if PRECISION == "bf16x3":
            # a = a_hi + a_lo exactly up to a_lo's own rounding; smallest products first.
            a_hi = a.to(tl.bfloat16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
            w_lo = tl.load(w_lo_ptr + w_at, mask=w_ok, other=0.0)
            acc = _dot_bf16(a_lo, w, acc, COMPILED)
            acc = _dot_bf16(a_hi, w_lo, acc, COMPILED)
            acc = _dot_bf16(a_hi, w, acc, COMPILED)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        # Column K of ``left`` is the component sum of c, which scales the output bias.
        csum = tl.load(left_ptr + r64 * stride_left + K, mask=row_ok, other=0.0)
        b_out = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += csum[:, None] * b_out[None, :]

    row_start = first_local + r64 * d + pid_d * BLOCK_D  # output index of each row's col 0
    local = row_start[:, None] + tl.arange(0, BLOCK_D)[None, :]
    mask = row_ok[:, None] & col_ok[None, :] & (local >= 0) & (local < numel)
    # The tensor's element index of each value, which keys its Philox draw (§8): the output
    # may be a box starting at element ``theta_first`` of the tensor, or (GATHER) rows of
    # chunks that are not consecutive, each starting at element ``rows_ptr[r]``.
    if GATHER:
        row_elem = tl.load(rows_ptr + r64, mask=row_ok, other=0) + pid_d * BLOCK_D
    else:
        row_elem = row_start + theta_first
    element = row_elem[:, None] + tl.arange(0, BLOCK_D)[None, :]
    if THETA == 1:
        if ALIGNED:
            # Rows start on a block boundary: one Philox block gives 4 consecutive values.
            blk = row_elem[:, None] // 4 + tl.arange(0, BLOCK_D // 4)[None, :]
            w0, w1, w2, w3 = tl.randint4x(key, blk)
            words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_C, BLOCK_D))
        else:
            safe = tl.where(element >= 0, element, 0)
            w0, w1, w2, w3 = tl.randint4x(key, safe // 4)
            lane = safe % 4
            words = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        acc += _uniform_units(words) * bound
    elif THETA == 2:
        if ALIGNED:
            blk = row_elem[:, None] // 2 + tl.arange(0, BLOCK_D // 2)[None, :]
            w0, w1, w2, w3 = tl.randint4x(key, blk)
            z = tl.reshape(tl.join(_box_muller(w0, w1, COMPILED), _box_muller(w2, w3, COMPILED)),
                           (BLOCK_C, BLOCK_D))
        else:
            safe = tl.where(element >= 0, element, 0)
            w0, w1, w2, w3 = tl.randint4x(key, safe // 2)
            odd = (safe % 2) == 1
            z = _box_muller(tl.where(odd, w2, w0), tl.where(odd, w3, w1), COMPILED)
        acc += z * std + mean
    elif THETA == 3:
        acc += tl.load(base_ptr + local, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + local, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _uniform_kernel(out_ptr, n, key, bound, BLOCK: tl.constexpr):
    """Elements ``[0, n)`` of a Philox stream as §8.2 uniforms times ``bound``."""
    blk = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = tl.randint4x(key, blk)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK,))
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + index, _uniform_units(words) * bound, mask=index < n)


def compiled() -> bool:
    """Whether the kernels are compiled (``TRITON_INTERPRET=1`` at import interprets them)."""
    return isinstance(_regen_kernel, triton.JITFunction)


def philox_uniform(seed: int, stream: int, count: int, bound: float, device: torch.device
                   ) -> torch.Tensor:
    """``philox.uniform_signed(seed, stream, 0, count, bound)`` in one launch: exact, the
    same bits. Generator weights are drawn with it (the torch version takes hundreds of
    small launches on a GPU)."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        block = 1024
        _uniform_kernel[(triton.cdiv(count, block),)](out, count, seed | (stream << 32), bound,
                                                     BLOCK=block)
    return out


def draw_generator_weights(spec: GeneratorSpec, device: torch.device) -> GeneratorWeights:
    """A Philox generator's weights (§5.2) drawn on ``device`` by ``philox_uniform``."""
    assert spec.seed is not None
    tensors = []
    widths = spec.widths
    for t in range(spec.n_layers):
        w_bound, b_bound = layer_bounds(spec, t)
        fan_out, fan_in = widths[t + 1], widths[t]
        tensors.append(philox_uniform(spec.seed, generator_weight_stream(t), fan_out * fan_in,
                                      w_bound, device).reshape(fan_out, fan_in))
        if spec.bias:
            tensors.append(philox_uniform(spec.seed, generator_bias_stream(t), fan_out, b_bound,
                                          device))
    return GeneratorWeights.from_flat(spec, tensors)


def kernel_theta0(entry: Theta0Entry, shape: tuple[int, ...], base: torch.Tensor | None
                  ) -> KernelTheta0 | None:
    """How the kernel evaluates a member's theta0: ``base`` (a dense theta0 already on the
    device) or the entry's Philox scheme; ``None`` for kinds and schemes it does not know."""
    if base is not None:
        return KernelTheta0(THETA0_DENSE, base=base)
    if isinstance(entry, ZerosTheta0):
        return KernelTheta0()
    if isinstance(entry, UniformTheta0):
        return KernelTheta0(THETA0_UNIFORM, entry.seed, entry.stream,
                            bound=round_to_f32(entry.bound))
    if isinstance(entry, FanInUniformTheta0):
        return KernelTheta0(THETA0_UNIFORM, entry.seed, entry.stream, bound=fan_in_bound(shape))
    if isinstance(entry, NormalTheta0):
        return KernelTheta0(THETA0_NORMAL, entry.seed, entry.stream,
                            mean=round_to_f32(entry.mean), std=round_to_f32(entry.std))
    return None


def kernel_precision(precision: Precision, dtype: torch.dtype, device: torch.device) -> str:
    """The product the kernel runs for an output of ``dtype``. Split bfloat16 products meet
    §10.1's bound for 16-bit outputs only, so ``BF16X3`` keeps IEEE FMA for wider ones;
    ``AUTO`` is ``BF16X3`` where tensor cores multiply bfloat16 (NVIDIA compute capability
    8.0 and later; the interpreter emulates them) and IEEE elsewhere."""
    narrow = dtype in (torch.float16, torch.bfloat16)
    if precision is Precision.AUTO:
        capable = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
        precision = Precision.BF16X3 if capable else Precision.IEEE
    if precision is Precision.BF16X3 and not narrow:
        return Precision.IEEE.value
    return precision.value


def fused_regenerate(
    left: torch.Tensor,
    stacked: torch.Tensor,
    has_bias: bool,
    dest: torch.Tensor,
    first_local: int,
    theta0: KernelTheta0,
    precision: str = Precision.IEEE.value,
    tile: tuple[int, int, int] = DEFAULT_TILE,
    theta_first: int = 0,
    row_elements: torch.Tensor | None = None,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write ``theta0 + delta`` of ``left.shape[0]`` consecutive chunks into ``dest``.

    ``left`` is ``FusedGenerator.coefficients`` (``[rows, K (+1)]``, the last column the
    component sum when the generator has an output bias) and ``stacked`` the matching
    ``[K (+1), d]`` weights. Chunk ``r``, value ``j`` goes to ``dest[first_local + r * d + j]``
    (negative or past ``dest.numel()`` for neighbouring members or outside a box: masked);
    ``dest[0]`` is the member's element ``theta_first``, which keys Philox theta0 draws, and a
    dense ``theta0.base`` is indexed like ``dest``. ``dest`` is flat and contiguous in one of
    ``KERNEL_DTYPES``. ``tile`` is ``(BLOCK_C, BLOCK_D, num_warps)``, powers of two with
    ``BLOCK_C, BLOCK_D >= 16``. ``row_elements`` (int64 on the CPU, one per row; a Philox
    theta0 only) gives the tensor element of each row's first value instead, for rows of
    chunks that are not consecutive (a column box): ``theta_first`` is then unused.
    ``precision``: ``"ieee"`` (float32 FMA, the default), ``"bf16x3"`` (split bfloat16
    tensor-core products; ``split`` is ``split_bf16`` of the stacked weights' first ``K`` rows,
    computed here when not given) or ``"tf32x3"`` (Triton's three TF32 products).
    """
    rows = left.shape[0]
    d = stacked.shape[1]
    if rows == 0 or dest.numel() == 0:
        return
    k_main = stacked.shape[0] - (1 if has_bias else 0)
    weights = low = stacked
    if precision == Precision.BF16X3.value:
        weights, low = split if split is not None else split_bf16(stacked[:k_main])
    if left.stride(1) != 1:
        left = left.contiguous()
    bias = stacked[k_main] if has_bias else stacked
    block_k = min(64, max(16, triton.next_power_of_2(k_main)))
    starts = [first_local + theta_first] if row_elements is None else row_elements.tolist()
    if theta0.kind == THETA0_UNIFORM:
        aligned = all(x % 4 == 0 for x in starts) and d % 4 == 0
    elif theta0.kind == THETA0_NORMAL:
        aligned = all(x % 2 == 0 for x in starts) and d % 2 == 0
    else:
        aligned = False
    if row_elements is not None and theta0.base is not None:
        raise ValueError("row_elements keys Philox draws; a dense base is indexed like dest")
    base = theta0.base if theta0.base is not None else dest
    table = dest if row_elements is None else row_elements.to(dest.device, torch.int64)
    block_c, block_d, num_warps = tile
    grid = (triton.cdiv(rows, block_c) * triton.cdiv(d, block_d),)
    _regen_kernel[grid](
        left, weights, low, bias, dest, base, table,
        rows, k_main, left.stride(0), d, first_local, dest.numel(), theta_first,
        theta0.key, theta0.bound, theta0.mean, theta0.std,
        HAS_BIAS=has_bias, THETA=theta0.kind, ALIGNED=aligned, GATHER=row_elements is not None,
        BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_K=block_k, PRECISION=precision,
        COMPILED=compiled(), num_warps=num_warps,
    )
