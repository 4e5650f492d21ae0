"""The fused output-layer kernel: one pass that writes each regenerated value once.

For a batch of chunks, ``regenerate_members`` takes the left factor of ``FusedGenerator`` (the
hidden activations already scaled by ``c = beta / ||W h + b||``, computed in IEEE float32 by
torch; SPEC.md §10.2) and computes, per output tile ``[BLOCK_C chunks, BLOCK_D values]``::

    out = cast(theta0 + left[:, :K] @ W_stack + csum * b_out)

``left`` rows stay in registers while tiles of the (small, L2-resident) stacked output weight
stream past; theta0 is drawn from Philox in registers (``tl.randint4x`` computes exactly the
spec's block, §8.1) or read from a dense base tensor (which may be the output tensor itself:
a base streamed into the final storage is updated in place). Values land straight in the
member's final storage with its dtype: there is no float32 intermediate of the output. One
launch covers all the members of a batch that share an output dtype and theta0 evaluation,
found through a member table on the device (``MemberJob``).

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

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..constants import generator_bias_stream, generator_weight_stream
from ..generator import GeneratorSpec, GeneratorWeights, layer_bounds
from ..header import Theta0Entry
from .fused import split_bf16
from .options import MEASURED_ON_GPU, GpuPath, Precision
from .staging import to_device_async
from .theta0 import (
    THETA0_DENSE,
    THETA0_NORMAL,
    THETA0_UNIFORM,
    THETA0_ZEROS,
    KernelTheta0,
    behaviour,
)

__all__ = [
    "DEFAULT_TILE",
    "KERNEL_DTYPES",
    "THETA0_DENSE",
    "THETA0_NORMAL",
    "THETA0_UNIFORM",
    "THETA0_ZEROS",
    "KernelTheta0",
    "MemberJob",
    "compiled",
    "dot_f32",
    "draw_generator_weights",
    "fused_regenerate",
    "kernel_precision",
    "kernel_theta0",
    "lora_merge",
    "philox_uniform",
    "regenerate_members",
]


#: Output dtypes the kernel stores (float64 members take the eager path). Dense bases may
#: have any float dtype, float64 included.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: (chunks, values, warps) per program: the fastest of the tiles ``benchmarks/profile_gpu.py``
#: swept on an H200 with the ieee product (docs/benchmarks.md, "Design measurements").
DEFAULT_TILE = (128, 64, 4)
# Globals read inside @triton.jit functions must be constexpr: compiled Triton rejects any
# other global ("only constexpr"), while the interpreter would accept it. Write them to the
# right of a tensor (``x * _TWO_PI``): the interpreter cannot multiply a constexpr by a tensor.
_TWO_POW_M23 = tl.constexpr(1.0 / 8388608.0)
_TWO_POW_M24 = tl.constexpr(1.0 / 16777216.0)
_TWO_PI = tl.constexpr(6.283185307179586)  # rounded to float32 where it multiplies u2


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
def dot_f32(p, q, acc, PRECISION: tl.constexpr, COMPILED: tl.constexpr):
    """``acc + p @ q`` accumulated in float32; ``PRECISION`` is ``tl.dot``'s for float32
    operands (16-bit ones take the tensor cores' exact products). Triton's interpreter
    multiplies 16-bit ``tl.dot`` operands' raw bits, so interpreted runs (not ``COMPILED``)
    widen both operands first: the same exact products, the same float32 sums."""
    if COMPILED:
        return tl.dot(p, q, acc, input_precision=PRECISION)
    return tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")


# The member table: per member an int64 row (``MemberJob.table_row``: storage and base
# addresses, its rows of ``left``, where row ``row0``'s first value lands, its size, the
# tensor element of its storage's first value, the Philox key) and a float32 row.
_DEST, _BASE, _ROW0, _ROW1, _FIRST_LOCAL, _NUMEL, _THETA_FIRST, _KEY = (
    tl.constexpr(i) for i in range(8))
_INT_FIELDS = tl.constexpr(8)
_BOUND, _MEAN, _STD = (tl.constexpr(i) for i in range(3))
_FLOAT_FIELDS = tl.constexpr(3)


@triton.jit
def _regen_kernel(
    left_ptr, w_ptr, w_lo_ptr, bias_ptr, out_ptr, base_ptr, rows_ptr, tiles_ptr, ints_ptr,
    floats_ptr, K, stride_left, d,
    HAS_BIAS: tl.constexpr, THETA: tl.constexpr, ALIGNED: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPILED: tl.constexpr, VEC: tl.constexpr,
):
    # One launch covers every member of a batch that shares the output dtype and theta0
    # evaluation: program ``pid`` takes row tile ``pid // tiles_d`` of the tile table (its
    # member and first row of ``left``) and value tile ``pid % tiles_d``. A member's storage
    # and base are addresses in its table row, typed like ``out_ptr`` and ``base_ptr``.
    pid = tl.program_id(0)
    tiles_d = tl.cdiv(d, BLOCK_D)
    pid_c = pid // tiles_d
    pid_d = pid % tiles_d
    member = tl.load(tiles_ptr + 2 * pid_c)
    ints = ints_ptr + member * _INT_FIELDS
    floats = floats_ptr + member * _FLOAT_FIELDS
    dest = tl.load(ints + _DEST).to(out_ptr.dtype, bitcast=True)
    row0 = tl.load(ints + _ROW0)
    first_local = tl.load(ints + _FIRST_LOCAL)
    numel = tl.load(ints + _NUMEL)
    r = tl.load(tiles_ptr + 2 * pid_c + 1) + tl.arange(0, BLOCK_C)
    row_ok = r < tl.load(ints + _ROW1)
    r64 = r.to(tl.int64)
    # With ``VEC`` > 1 every member's storage, start, size and ``d`` are multiples of ``VEC``
    # values: told to the compiler, runs of ``VEC`` values are loaded and stored as vectors
    # (masks are then uniform over each run: bounds per row, not comparisons per element).
    d64 = d.to(tl.int64)
    width = d64 - pid_d * BLOCK_D  # values of each row from this tile on
    if VEC > 1:
        d64 = tl.multiple_of(d64, VEC)
        width = tl.multiple_of(width, VEC)
        numel = tl.multiple_of(numel, VEC)
        dest = tl.multiple_of(dest, VEC * out_ptr.dtype.element_ty.primitive_bitwidth // 8)
    j = tl.arange(0, BLOCK_D)
    cols = pid_d * BLOCK_D + j
    col_ok = j < width

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(left_ptr + r64[:, None] * stride_left + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_at = kk[:, None].to(tl.int64) * d64 + cols[None, :]
        w_ok = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + w_at, mask=w_ok, other=0.0)
        if PRECISION == "bf16x3":
            # a = a_hi + a_lo exactly up to a_lo's own rounding; smallest products first.
            a_hi = a.to(tl.bfloat16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
            w_lo = tl.load(w_lo_ptr + w_at, mask=w_ok, other=0.0)
            acc = dot_f32(a_lo, w, acc, None, COMPILED)
            acc = dot_f32(a_hi, w_lo, acc, None, COMPILED)
            acc = dot_f32(a_hi, w, acc, None, COMPILED)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        # Column K of ``left`` is the component sum of c, which scales the output bias.
        csum = tl.load(left_ptr + r64 * stride_left + K, mask=row_ok, other=0.0)
        b_out = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += csum[:, None] * b_out[None, :]

    # Output index of each row's value ``pid_d * BLOCK_D``; the values of a row this member
    # holds are those from ``lo`` to ``hi`` (it may start or end inside the chunk, or the
    # row may end inside the tile).
    row_start = first_local + (r64 - row0) * d64 + pid_d * BLOCK_D
    if VEC > 1:
        row_start = tl.multiple_of(row_start, VEC)
    lo = tl.maximum(-row_start, 0)
    hi = tl.minimum(numel - row_start, width)
    local = row_start[:, None] + j[None, :]
    mask = row_ok[:, None] & (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    # The tensor's element index of each value, which keys its Philox draw (§8): the output
    # may be a box starting at element ``theta_first`` of the tensor, or (GATHER) rows of
    # chunks that are not consecutive, each starting at element ``rows_ptr[r]``.
    if GATHER:
        row_elem = tl.load(rows_ptr + r64, mask=row_ok, other=0) + pid_d * BLOCK_D
    else:
        row_elem = row_start + tl.load(ints + _THETA_FIRST)
    element = row_elem[:, None] + tl.arange(0, BLOCK_D)[None, :]
    if THETA == 1 or THETA == 2:
        key = tl.load(ints + _KEY)
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
        acc += _uniform_units(words) * tl.load(floats + _BOUND)
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
        acc += z * tl.load(floats + _STD) + tl.load(floats + _MEAN)
    elif THETA == 3:
        base = tl.load(ints + _BASE).to(base_ptr.dtype, bitcast=True)
        if VEC > 1:
            base = tl.multiple_of(base, VEC * base_ptr.dtype.element_ty.primitive_bitwidth // 8)
        acc += tl.load(base + local, mask=mask, other=0.0).to(tl.float32)
    tl.store(dest + local, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _uniform_kernel(out_ptr, n, key, bound, BLOCK: tl.constexpr):
    """Elements ``[0, n)`` of a Philox stream as §8.2 uniforms times ``bound``."""
    blk = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = tl.randint4x(key, blk)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK,))
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + index, _uniform_units(words) * bound, mask=index < n)


@triton.jit
def _lora_merge_kernel(
    out_ptr, b_ptr, a_ptr, base_ptr, rows, cols, rank, scale,
    stride_out, stride_b, stride_a, stride_base,
    HAS_BASE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # ``fused.lora_merge``'s arithmetic in one pass: the rank-1 terms summed in index order,
    # each product and sum rounded to float32 (launched without FMA contraction), the scale,
    # the base rounded to float32, one cast.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = r < rows
    c_ok = c < cols
    r64 = r.to(tl.int64)
    b_row = b_ptr + r64 * stride_b
    acc = (tl.load(b_row, mask=r_ok, other=0.0).to(tl.float32)[:, None]
           * tl.load(a_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :])
    for j in range(1, rank):
        b_j = tl.load(b_row + j, mask=r_ok, other=0.0).to(tl.float32)
        a_j = tl.load(a_ptr + j * stride_a + c, mask=c_ok, other=0.0).to(tl.float32)
        acc = acc + b_j[:, None] * a_j[None, :]
    acc = acc * scale
    mask = r_ok[:, None] & c_ok[None, :]
    if HAS_BASE:
        base = tl.load(base_ptr + r64[:, None] * stride_base + c[None, :], mask=mask, other=0.0)
        acc = acc + base.to(tl.float32)
    tl.store(out_ptr + r64[:, None] * stride_out + c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


#: Tile of the lora merge: (rows, columns, warps).
MERGE_TILE = (32, 128, 4)


def lora_merge(out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float,
               base: torch.Tensor | None) -> None:
    """``fused.lora_merge`` (``out = base + scale * (B @ A)``, §6.3) in one launch: every
    element's bits equal the torch version's, which needs as many passes over ``out`` as
    ``2 r + 3``. ``out [rows, cols]`` in one of ``KERNEL_DTYPES`` with unit column stride;
    ``b [rows, r]``, ``a [r, cols]`` contiguous, of any float dtype (read as float32);
    ``base`` (``None`` for zeros) of any float dtype with unit column stride. ``r >= 1``."""
    rows, cols = out.shape
    if out.numel() == 0:
        return
    b, a = b.contiguous(), a.contiguous()
    block_r, block_c, num_warps = MERGE_TILE
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _lora_merge_kernel[grid](
        out, b, a, base if base is not None else out, rows, cols, a.shape[0], scale,
        out.stride(0), b.stride(0), a.stride(0), base.stride(0) if base is not None else 0,
        HAS_BASE=base is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
        enable_fp_fusion=False,
    )


def compiled() -> bool:
    """Whether the kernels are compiled (``TRITON_INTERPRET=1`` at import interprets them)."""
    return isinstance(_regen_kernel, triton.JITFunction)


def philox_uniform(seed: int, stream: int, count: int, bound: float, device: torch.device
                   ) -> torch.Tensor:
    """``philox.uniform_signed(seed, stream, 0, count, bound)`` in one launch: exact, the
    same bits. Generator weights are drawn with it (the torch version takes hundreds of
    small launches on a GPU). Launched on ``device`` whichever device is current: Triton
    launches on the current one, and callers outside a load (``AdapterBank`` on ``cuda:1``)
    make none current."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        block = 1024
        with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
            _uniform_kernel[(triton.cdiv(count, block),)](out, count, seed | (stream << 32),
                                                         bound, BLOCK=block)
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
    device) or the kind's register form (``Theta0Behaviour.kernel_form``); ``None`` for kinds
    it does not evaluate."""
    if base is not None:
        return KernelTheta0.dense(base)
    return behaviour(entry).kernel_form(entry, shape)


def kernel_precision(precision: Precision, dtype: torch.dtype, device: torch.device,
                     drawn: bool = True,
                     measured: frozenset[GpuPath] = MEASURED_ON_GPU) -> Precision:
    """The product the kernel runs for a tensor whose bound (SPEC.md §10.1) is that of
    ``dtype``. Split bfloat16 products meet the bound of 16-bit tensors only, so ``BF16X3``
    keeps IEEE FMA for wider ones. ``AUTO`` picks ``BF16X3`` only where a GPU run has
    ``measured`` it (``MEASURED_ON_GPU``) and it is known to hold its bound with margin:
    generators ``drawn`` per §5.2 (inline weights may cancel more in the output layer), on
    NVIDIA GPUs whose tensor cores multiply bfloat16 (compute capability 8.0 and later; the
    interpreter emulates them); IEEE elsewhere."""
    narrow = dtype in (torch.float16, torch.bfloat16)
    if precision is Precision.AUTO:
        capable = GpuPath.KERNEL_BF16X3 in measured and (
            device.type != "cuda" or (torch.version.hip is None and
                                      torch.cuda.get_device_capability(device) >= (8, 0)))
        precision = Precision.BF16X3 if capable and drawn else Precision.IEEE
    if precision is Precision.BF16X3 and not narrow:
        return Precision.IEEE
    return precision


@dataclass(frozen=True)
class MemberJob:
    """One output a launch writes: flat contiguous ``dest`` (one of ``KERNEL_DTYPES``),
    covered by rows ``[row0, row1)`` of ``left``; value ``j`` of row ``r`` goes to
    ``dest[first_local + (r - row0) * d + j]`` (indices outside ``dest``, neighbouring members
    or outside a box, are masked off); ``dest[0]`` is the tensor's element ``theta_first``,
    which keys Philox theta0 draws, and a dense ``theta0.base`` is indexed like ``dest``."""

    dest: torch.Tensor
    row0: int
    row1: int
    first_local: int
    theta0: KernelTheta0
    theta_first: int = 0

    def table_row(self) -> list[int]:
        """The member table's int64 fields, in the kernel's order (``_DEST`` ...)."""
        base = self.theta0.base if self.theta0.base is not None else self.dest
        key = self.theta0.key
        return [self.dest.data_ptr(), base.data_ptr(), self.row0, self.row1,
                self.first_local, self.dest.numel(), self.theta_first,
                key - (1 << 64) if key >= 1 << 63 else key]  # the same 64 bits, signed


def regenerate_members(
    left: torch.Tensor,
    stacked: torch.Tensor,
    has_bias: bool,
    jobs: Sequence[MemberJob],
    precision: Precision | str = Precision.IEEE,
    tile: tuple[int, int, int] = DEFAULT_TILE,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write ``theta0 + delta`` of every job: one launch per group of jobs that share an
    output dtype and a theta0 evaluation (kind, Philox block alignment, dense base dtype),
    so a batch covering many members costs one launch, not one per member.

    ``left`` is ``FusedGenerator.coefficients`` (``[rows, K (+1)]``, the last column the
    component sum when the generator has an output bias) and ``stacked`` the matching
    ``[K (+1), d]`` weights. ``tile`` is ``(BLOCK_C, BLOCK_D, num_warps)``, powers of two with
    ``BLOCK_C, BLOCK_D >= 16``. ``precision``: ``"ieee"`` (float32 FMA), ``"bf16x3"`` (split
    bfloat16 tensor-core products; ``split`` is ``split_bf16`` of the stacked weights' first
    ``K`` rows, computed here when not given) or ``"tf32x3"`` (Triton's three TF32 products).
    """
    d = stacked.shape[1]
    product = Precision.of(precision)
    #: (output dtype, theta0 kind, aligned, base dtype, vector width) -> its jobs
    groups: dict[tuple[torch.dtype, int, bool, torch.dtype | None, int], list[MemberJob]] = {}
    for job in jobs:
        if job.dest.numel() and job.row1 > job.row0:
            aligned = _aligned(job.theta0, [job.first_local + job.theta_first], d)
            base = job.theta0.base.dtype if job.theta0.base is not None else None
            key = (job.dest.dtype, job.theta0.kind, aligned, base, _vector_width(job, d))
            groups.setdefault(key, []).append(job)
    for (_, _, aligned, _, vec), group in groups.items():
        _launch(left, stacked, has_bias, group, aligned, vec, product, tile, split, None)


def fused_regenerate(
    left: torch.Tensor,
    stacked: torch.Tensor,
    has_bias: bool,
    dest: torch.Tensor,
    first_local: int,
    theta0: KernelTheta0,
    precision: Precision | str = Precision.IEEE,
    tile: tuple[int, int, int] = DEFAULT_TILE,
    theta_first: int = 0,
    row_elements: torch.Tensor | None = None,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``regenerate_members`` of one member written by all of ``left``'s rows
    (``MemberJob(dest, 0, rows, first_local, theta0, theta_first)``), or, with
    ``row_elements`` (int64 on the CPU, one per row; a Philox theta0 only), rows of chunks
    that are not consecutive (a column box): each row's first value is then the tensor's
    element ``row_elements[r]``, and ``theta_first`` is unused."""
    rows = left.shape[0]
    if rows == 0 or dest.numel() == 0:
        return
    job = MemberJob(dest, 0, rows, first_local, theta0, theta_first)
    if row_elements is None:
        regenerate_members(left, stacked, has_bias, [job], precision, tile, split)
        return
    if theta0.base is not None:
        raise ValueError("row_elements keys Philox draws; a dense base is indexed like dest")
    aligned = _aligned(theta0, row_elements.tolist(), stacked.shape[1])
    _launch(left, stacked, has_bias, [job], aligned, _vector_width(job, stacked.shape[1]),
            Precision.of(precision), tile, split, row_elements)


def _aligned(theta0: KernelTheta0, starts: list[int], d: int) -> bool:
    """Whether every row starts on a Philox block of ``theta0``'s draw (4 uniforms, 2
    normals), so a block's words fill consecutive values."""
    per_block = {THETA0_UNIFORM: 4, THETA0_NORMAL: 2}.get(theta0.kind)
    return per_block is not None and d % per_block == 0 and all(
        x % per_block == 0 for x in starts)


def _vector_width(job: MemberJob, d: int) -> int:
    """The most consecutive values (a power of two, at most 16 bytes of output) that the
    kernel may store as one vector for ``job``: its rows of ``d`` values, its start, its size
    and its storage's (and base's) address must all be multiples of it."""
    size = job.dest.element_size()
    base = job.theta0.base
    vec = 16 // size
    while vec > 1 and not (
            d % vec == 0 and job.first_local % vec == 0 and job.dest.numel() % vec == 0
            and job.dest.data_ptr() % (vec * size) == 0
            and (base is None or base.data_ptr() % (vec * base.element_size()) == 0)):
        vec //= 2
    return vec


def _launch(left: torch.Tensor, stacked: torch.Tensor, has_bias: bool,
            jobs: list[MemberJob], aligned: bool, vec: int, precision: Precision,
            tile: tuple[int, int, int],
            split: tuple[torch.Tensor, torch.Tensor] | None,
            row_elements: torch.Tensor | None) -> None:
    """One launch over ``jobs`` (one output dtype, theta0 evaluation and vector width
    ``vec``). The member table,
    the tile table and any per-row elements go to the device in one copy from pinned memory
    (asynchronous: no host synchronisation)."""
    d = stacked.shape[1]
    k_main = stacked.shape[0] - (1 if has_bias else 0)
    weights = low = stacked
    if precision is Precision.BF16X3:
        weights, low = split if split is not None else split_bf16(stacked[:k_main])
    if left.stride(1) != 1:
        left = left.contiguous()
    bias = stacked[k_main] if has_bias else stacked
    block_c, block_d, num_warps = tile
    tiles = np.concatenate([
        np.stack([np.full(-(-(job.row1 - job.row0) // block_c), i),
                  np.arange(job.row0, job.row1, block_c)], axis=1)
        for i, job in enumerate(jobs)]).astype(np.int64)
    ints = np.array([job.table_row() for job in jobs], dtype=np.int64)
    floats = np.array([[job.theta0.bound, job.theta0.mean, job.theta0.std] for job in jobs],
                      dtype=np.float32)
    parts: list[np.ndarray] = [ints, tiles, np.zeros(0, np.int64) if row_elements is None
             else row_elements.numpy().astype(np.int64), floats]
    table = to_device_async(torch.from_numpy(np.concatenate(
        [p.reshape(-1).view(np.uint8) for p in parts])), left.device)
    views, at = [], 0
    for part in parts:
        views.append(table[at : at + part.nbytes].view(torch.from_numpy(part).dtype))
        at += part.nbytes
    ints_d, tiles_d, rows_d, floats_d = views
    first = jobs[0]
    base = first.theta0.base if first.theta0.base is not None else first.dest
    grid = (len(tiles) * triton.cdiv(d, block_d),)
    _regen_kernel[grid](
        left, weights, low, bias, first.dest, base, rows_d if row_elements is not None
        else tiles_d, tiles_d, ints_d, floats_d, k_main, left.stride(0), d,
        HAS_BIAS=has_bias, THETA=first.theta0.kind, ALIGNED=aligned,
        GATHER=row_elements is not None, BLOCK_C=block_c, BLOCK_D=block_d,
        BLOCK_K=min(64, max(16, triton.next_power_of_2(k_main))), PRECISION=precision.value,
        COMPILED=compiled(), VEC=vec, num_warps=num_warps,
        # FMA contraction as measured (§10.1 allows it in the output layer), named so the
        # kernel's bits do not change with Triton's default (off from Triton 3.10).
        enable_fp_fusion=True,
    )
