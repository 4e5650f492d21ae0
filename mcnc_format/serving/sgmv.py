"""Punica's segmented gather matrix-vector product (SGMV) as two Triton kernels.

For one adapted ``nn.Linear`` and one call, every row of the flattened input ``x [tokens,
in]`` that has an adapter belongs to one *segment* (the rows of one adapter), and the bank
keeps the factors of every cached adapter of the module in one *slab* (``slab.py``):
``A [slots, r_max, in]``, ``B [slots, out, r_max]`` (ranks below ``r_max`` padded with
zeros) and ``scale [slots]``. A *tile table* cuts the segments into tiles of at most
``BLOCK_M`` rows: per tile, its first position in the row list, its row count and its slot.
Two launches add every segment's low-rank path to the base output, whatever the number of
adapters:

- ``shrink`` (grid: tiles x blocks of ranks): ``y[p] = cast_f(cast_f(x[rows[p]]) @
  A[slot].T)``, the input cast to the factor dtype ``f``, products accumulated in float32,
  ``y [positions, r_max]`` rounded to ``f`` as ``F.linear`` rounds its output;
- ``expand`` (grid: tiles x output tiles): ``out[rows[p]] = cast_o(out + cast_o(cast_f(
  cast_f(y[p] @ B[slot].T) * scale)))``, the rounding steps of the torch route
  (``F.linear``, ``* scale``, ``.to(out.dtype)``, ``+=``) with ``o`` the output dtype.

Rows are gathered through the row list, so segments need not be consecutive (generation
repeats rows) and rows without an adapter are in no tile. A row is in one segment only, so
each output element has one writer: no atomics. float32 products run as IEEE float32 FMA
(``input_precision="ieee"``: the torch route does not use TF32); float16 and bfloat16 ones
on tensor cores with a float32 accumulator. The two routes then differ only in the order
of each product's sums. Which tile sizes pay on a GPU awaits a measurement
(``benchmarks/bench_adapters.py`` runs both routes); ``BLOCK_M = 16`` is ``tl.dot``'s
smallest tile.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..engine.triton_kernels import compiled, dot_f32

__all__ = ["BLOCK_M", "sgmv"]

#: Rows per tile (``tl.dot`` needs at least 16).
BLOCK_M = 16
_BLOCK_K = 64  # input features per step of shrink
_BLOCK_N = 64  # output features per program of expand
#: Ranks per block: shrink programs take one block of ranks each, expand loops over them,
#: so shared memory stays bounded whatever the rank (a 512-rank float32 tile of a whole
#: rank would not fit an H200's 227 KB).
_BLOCK_R = 64


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, rows_ptr, tiles_ptr,
    features, r_max, stride_x,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPILED: tl.constexpr,
):
    tile = tl.program_id(0)
    start = tl.load(tiles_ptr + tile * 3)
    count = tl.load(tiles_ptr + tile * 3 + 1)
    slot = tl.load(tiles_ptr + tile * 3 + 2).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    rows = tl.load(rows_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    rank = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's ranks
    r_ok = rank < r_max
    a_base = a_ptr + slot * r_max * features
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < features
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + rank[None, :] * features + k[:, None],
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]: A.T
        acc = dot_f32(x.to(a.dtype), a, acc, PRECISION, COMPILED)
    position = (start + m).to(tl.int64)
    tl.store(y_ptr + position[:, None] * r_max + rank[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, scale_ptr, out_ptr, rows_ptr, tiles_ptr,
    out_features, r_max, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, COMPILED: tl.constexpr,
):
    tile = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(tiles_ptr + tile * 3)
    count = tl.load(tiles_ptr + tile * 3 + 1)
    slot = tl.load(tiles_ptr + tile * 3 + 2).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    n_ok = n < out_features
    position = (start + m).to(tl.int64)
    b_base = b_ptr + slot * out_features * r_max + n[None, :].to(tl.int64) * r_max
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, r_max, BLOCK_R):  # ranks in blocks: shared memory stays bounded
        rank = r0 + tl.arange(0, BLOCK_R)
        r_ok = rank < r_max
        y = tl.load(y_ptr + position[:, None] * r_max + rank[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_base + rank[:, None], mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0)  # B.T
        acc = dot_f32(y, b, acc, PRECISION, COMPILED)
    product = acc.to(b_ptr.dtype.element_ty)
    scale = tl.load(scale_ptr + slot)
    delta = (product.to(tl.float32) * scale).to(b_ptr.dtype.element_ty).to(
        out_ptr.dtype.element_ty)
    rows = tl.load(rows_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    where = out_ptr + rows[:, None] * stride_out + n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    base = tl.load(where, mask=mask, other=0.0)
    tl.store(where, (base.to(tl.float32) + delta.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is unused by 16-bit dots


def sgmv(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         scale: torch.Tensor, rows: torch.Tensor, tiles: torch.Tensor) -> None:
    """``out[rows[p]] += scale[s] * (x[rows[p]] @ a[s].T) @ b[s].T`` for every position
    ``p`` of every tile, ``s`` the tile's slot: one shrink and one expand launch.

    ``x [tokens, in]`` and ``out [tokens, out]`` have unit column stride; ``a [slots, r_max,
    in]``, ``b [slots, out, r_max]`` are contiguous in one of ``slab.SLAB_DTYPES``, ``scale``
    float32 ``[slots]``; ``rows`` int32 ``[positions]`` (token indices); ``tiles`` int32
    ``[tiles, 3]`` (first position, row count at most ``BLOCK_M``, slot), all on ``out``'s
    device; ``out`` (also of ``SLAB_DTYPES``) is updated in place."""
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return
    _, r_max, features = a.shape
    out_features = b.shape[1]
    block_r = min(_BLOCK_R, max(16, triton.next_power_of_2(r_max)))
    precision = _precision(a.dtype)
    y = torch.empty(rows.shape[0], r_max, dtype=a.dtype, device=out.device)
    # Triton launches on the current device and stream: make them the tensors' device's.
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _shrink_kernel[(n_tiles, triton.cdiv(r_max, block_r))](
            x, a, y, rows, tiles, features, r_max, x.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=_BLOCK_K, PRECISION=precision,
            COMPILED=compiled())
        _expand_kernel[(n_tiles, triton.cdiv(out_features, _BLOCK_N))](
            y, b, scale, out, rows, tiles, out_features, r_max, out.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=_BLOCK_N, PRECISION=precision,
            COMPILED=compiled())
