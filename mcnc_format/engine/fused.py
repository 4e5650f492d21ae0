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

import torch

from ..generator import GeneratorWeights, ieee_fp32

__all__ = ["FusedGenerator", "lora_product"]



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

    def bytes_per_chunk(self) -> int:
        """Working memory one chunk of a batch needs: its float32 output row when it goes to
        the workspace, plus the hidden activations in float32 and their float64 copies for
        the row norm (``m * width`` values each, a few times over)."""
        spec = self.weights.spec
        return 4 * spec.d + self.m * (max(spec.hidden) * (4 * 2 + 8 * 3) + spec.k * 4)

    def coefficients(self, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The left factor ``[B, m * width (+1)]`` for alpha ``[B, m, k]``, beta ``[B, m]``."""
        h = self.weights.hidden(alpha)  # [B, m, width] float32
        beta = beta.to(torch.float32)
        with ieee_fp32(h.device):
            if self.normalize:
                h_wide = h.to(self.norm_dtype)
                sq = ((h_wide @ self.gram) * h_wide).sum(-1)
                if self.gram_bias is not None:
                    sq = sq + 2.0 * (h_wide @ self.gram_bias) + self.bias_sq
                coef = (beta.to(self.norm_dtype) * torch.rsqrt(sq)).to(torch.float32)
            else:
                coef = beta
        scaled = (h * coef[..., None]).reshape(h.shape[0], -1)
        if self.weights.out_bias is None:
            return scaled
        return torch.cat([scaled, coef.sum(-1, keepdim=True)], dim=1)

    def delta(self, alpha: torch.Tensor, beta: torch.Tensor, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        """``sum_j beta_j phi(alpha_j)`` as float32 ``[B, d]``, written into ``out`` if given."""
        left = self.coefficients(alpha, beta)
        with ieee_fp32(left.device):
            return torch.mm(left, self.stacked, out=out)

    def accumulate(self, left: torch.Tensor, out: torch.Tensor) -> None:
        """``out += left @ stacked`` for float32 ``out`` ``[B, d]`` holding theta0 and ``left``
        from ``coefficients``.

        One GEMM with the add folded in (``addmm`` into its own input): on the CPU this is
        also the faster kernel, 12.7 ms against 21 ms for ``mm(out=)`` on a [4000, 33] x
        [33, 5000] product (2-core EPYC, torch 2.13), and theta0 costs no separate pass."""
        with ieee_fp32(left.device):
            torch.addmm(out, left, self.stacked, out=out)


def lora_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``B @ A`` in float32 (§6.3) as a sum of rank-one terms, each product and sum rounded:
    every element is computed by the same operations whatever rows of ``B`` and columns of
    ``A`` are given, so a box of a merged lora tensor equals the same elements of the whole
    one bit for bit (a BLAS product may change its kernel with the shape)."""
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    out = b[:, 0:1] * a[0:1, :]
    for j in range(1, a.shape[0]):
        out += b[:, j : j + 1] * a[j : j + 1, :]
    return out
