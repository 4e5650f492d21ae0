"""A generator prepared for batched regeneration (SPEC.md §6.1, §10).

For a batch of chunks the whole computation is one matrix product: with ``h`` the last hidden
activation of ``alpha`` and ``c = beta / ||W h + b||`` (the norm from the Gram identity of
§10.2), ``sum_j beta_j phi(alpha_j) = [h_1 c_1, ..., h_m c_m, sum_j c_j] @ [W'; ...; W'; b']``.
So the output layer, the normalisation, the beta scaling and the sum over components are
fused, and every output value is written once. The hidden layers stay in IEEE float32.

The executor runs it on batches of chunks sized by a workspace budget (``plan.py``), and
training (``mcnc_format.torch``) on the chunks of a forward pass: one source of truth.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..generator import GeneratorWeights, ieee_fp32, ordered_matmul, row_stable_matmul

__all__ = ["DEVICE_MERGE_BLOCK_ELEMENTS", "MERGE_BLOCK_ELEMENTS", "NARROW_D", "ROW_TILE",
           "FusedGenerator", "lora_merge", "lora_product", "split_bf16"]

#: ``coefficients`` computes batches padded to a multiple of this many rows. BLAS kernels work
#: on tiles of rows, and a row in a partial tile takes another code path whose last bits
#: differ (seen with MKL on a 2-core EPYC for fewer than 8 rows, and in the last partial tile):
#: with whole tiles, a chunk's values do not depend on the batch that rebuilt it, so a box of
#: a tensor equals the same elements of the whole tensor bit for bit.
ROW_TILE = 8
#: Below this many values per chunk BLAS splits the output product across threads by rows, so
#: a row's bits depend on where the batch starts: the product is then ``ordered_matmul``
#: (cheap at this width, and the same for every batch).
NARROW_D = 32


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (float32) as bfloat16 ``(hi, lo)`` with ``x = hi + lo`` up to ``lo``'s rounding,
    about ``2**-16`` of ``|x|``: the operands of split-precision tensor-core products."""
    hi = x.to(torch.bfloat16)
    return hi.contiguous(), (x - hi.to(torch.float32)).to(torch.bfloat16).contiguous()


class FusedGenerator:
    """A generator prepared for batched regeneration on one device with ``m`` components."""

    def __init__(self, weights: GeneratorWeights, m: int) -> None:
        self.weights = weights
        self.m = m
        self.normalize = weights.spec.normalize
        # The quadratic form subtracts large terms when ||W h + b|| << ||W h|| + ||b||; float64
        # keeps that cancellation harmless at a cost of width^2 per row (d * width for the
        # output). Devices without float64 use float32.
        self.norm_dtype = torch.float64 if weights.device.type in ("cpu", "cuda") else (
            torch.float32)
        self.gram, self.gram_bias, self.bias_sq = weights.gram(self.norm_dtype)
        w_t = weights.out_weight.T  # [width, d]
        rows = [w_t] * m
        if weights.out_bias is not None:
            rows.append(weights.out_bias[None, :])
        self.stacked = torch.cat(rows, dim=0).contiguous()  # [m * width (+1), d]
        self._split: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``split_bf16`` of the stacked output weights (the bias row excluded), made once:
        the split-precision kernel reads it for every batch."""
        if self._split is None:
            k = self.stacked.shape[0] - (1 if self.weights.out_bias is not None else 0)
            self._split = split_bf16(self.stacked[:k])
        return self._split

    def coefficients(self, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The left factor ``[R, m * width (+1)]`` for alpha ``[B, m, k]``, beta ``[B, m]``:
        ``R`` is ``B`` padded to a multiple of ``ROW_TILE`` (the padding rows repeat the last
        chunk; callers keep the first ``B`` rows of the product)."""
        pad = -alpha.shape[0] % ROW_TILE
        if pad and alpha.shape[0]:
            alpha = torch.cat([alpha, alpha[-1:].expand(pad, *alpha.shape[1:])])
            beta = torch.cat([beta, beta[-1:].expand(pad, *beta.shape[1:])])
        h = self.weights.hidden(alpha)  # [R, m, width] float32
        beta = beta.to(torch.float32)
        with ieee_fp32(h.device):
            if self.normalize:
                h_wide = h.to(self.norm_dtype)
                # Products, then sums within each row: nothing depends on the other rows.
                sq = (row_stable_matmul(h_wide, self.gram) * h_wide).sum(-1)
                if self.gram_bias is not None and self.bias_sq is not None:
                    sq = sq + 2.0 * (h_wide * self.gram_bias).sum(-1) + self.bias_sq
                coef = (beta.to(self.norm_dtype) * torch.rsqrt(sq)).to(torch.float32)
            else:
                coef = beta
        scaled = (h * coef[..., None]).reshape(h.shape[0], -1)
        if self.weights.out_bias is None:
            return scaled
        return torch.cat([scaled, coef.sum(-1, keepdim=True)], dim=1)

    def product(self, left: torch.Tensor) -> torch.Tensor:
        """``left @ stacked``: ``sum_j beta_j phi(alpha_j)`` of each row as float32 ``[R, d]``
        (differentiable; what training uses)."""
        if self.weights.spec.d < NARROW_D:
            return ordered_matmul(left, self.stacked)
        with ieee_fp32(left.device):
            return torch.mm(left, self.stacked)

    def accumulate_over(self, left: torch.Tensor, work: torch.Tensor,
                        parts: Iterable[tuple[slice | torch.Tensor, torch.Tensor | None]]
                        ) -> None:
        """``work = theta0 + left @ stacked`` for a float32 ``[R, d]`` scratch ``work``:
        each ``(where, theta0)`` of ``parts`` lays a member's theta0 at ``where`` (a slice or
        the positions of ``work`` flat; ``None`` for zeros), zeros elsewhere, then one
        ``accumulate``. The torch path's batch, for the executor and for members rebuilt from
        resident alpha and beta (``members.py``) alike."""
        work.zero_()
        flat = work.view(-1)
        for where, theta0 in parts:
            if theta0 is not None:
                flat[where] = theta0
        self.accumulate(left, work)

    def value(self, left: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base + left @ stacked`` for float32 ``base`` ``[R, d]`` (theta0 where members
        lie, zeros elsewhere), out of place and differentiable: the very operation
        ``accumulate`` runs in place for a load (one ``addmm`` with the add folded in, or the
        ordered product for narrow generators), so a trained weight equals the loaded one bit
        for bit."""
        if self.weights.spec.d < NARROW_D:
            return base + self.product(left)
        with ieee_fp32(left.device):
            return torch.addmm(base, left, self.stacked)

    def delta(self, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``sum_j beta_j phi(alpha_j)`` as float32 ``[B, d]``."""
        return self.product(self.coefficients(alpha, beta))[: alpha.shape[0]]

    def accumulate(self, left: torch.Tensor, out: torch.Tensor) -> None:
        """``out += left @ stacked`` for float32 ``out`` ``[R, d]`` holding theta0 and ``left``
        from ``coefficients``: the same values as ``out + product(left)``.

        One GEMM with the add folded in (``addmm`` into its own input): on the CPU this is
        also the faster kernel than ``mm(out=)`` (docs/benchmarks.md, "Design
        measurements"), and theta0 costs no separate pass."""
        if self.weights.spec.d < NARROW_D:
            out += self.product(left)
            return
        with ieee_fp32(left.device):
            torch.addmm(out, left, self.stacked, out=out)


def lora_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``B @ A`` in float32 (§6.3), each element computed alike in any box of the merged
    tensor (``ordered_matmul``)."""
    return ordered_matmul(b.to(torch.float32), a.to(torch.float32))


#: Elements of the merged tensor per block of ``lora_merge`` on the CPU: its two float32
#: temporaries (4 MiB each) stay in the last-level cache through the ``2 r + 3`` passes, where
#: ``lora_product`` over the whole tensor sends them to memory on every pass; much smaller
#: blocks pay torch's per-call cost (docs/benchmarks.md, "Design measurements").
MERGE_BLOCK_ELEMENTS = 1 << 20
#: The same on a GPU, where each pass is a kernel launch: blocks that fill the device, with
#: temporaries bounded to 64 MiB each.
DEVICE_MERGE_BLOCK_ELEMENTS = 1 << 24


def lora_merge(out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float,
               base: torch.Tensor | None, block_elements: int) -> None:
    """``out = base + scale * (B @ A)`` (§6.3) for ``out [rows, cols]``, ``b [rows, r]``,
    ``a [r, cols]`` and ``base`` (``None`` for zeros; any float dtype, may be ``out``
    itself), block of rows by block of rows.

    Each element gets exactly the arithmetic of ``(lora_product(b, a) * scale + base.to(
    float32)).to(out.dtype)``: the rank-1 products and their sums in index order, each
    rounded to float32 (separate multiply and add calls: never a fused multiply-add), then
    the scale, the base and the cast. So an element's bits do not depend on the box or the
    block it is computed in. The blocks reuse two float32 temporaries (``out=``), so the
    passes run in cache rather than over the whole tensor."""
    rows, cols = out.shape
    rank = a.shape[0]
    b, a = b.to(torch.float32), a.to(torch.float32)
    step = max(1, min(rows, block_elements // max(cols, 1)))
    acc = torch.empty(step, cols, dtype=torch.float32, device=out.device)
    tmp = torch.empty_like(acc)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        total, term = acc[: r1 - r0], tmp[: r1 - r0]
        if rank:
            torch.mul(b[r0:r1, 0:1], a[0], out=total)
        else:
            total.zero_()
        for j in range(1, rank):
            torch.mul(b[r0:r1, j : j + 1], a[j], out=term)
            total.add_(term)
        total.mul_(scale)
        if base is not None:
            part = base[r0:r1]
            if part.dtype != torch.float32:
                part = term.copy_(part)  # rounded to float32 first, as ``.to`` does
            total.add_(part)
        out[r0:r1].copy_(total)
