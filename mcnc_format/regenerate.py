"""Rebuilding the values of a segment's members on a device (SPEC.md §6.1, §10).

For a batch of chunks the whole computation is one matrix product: with ``h`` the last hidden
activation of ``alpha`` and ``c = beta / ||W h + b||`` (the norm from the Gram identity of
§10.2), ``sum_j beta_j phi(alpha_j) = [h_1 c_1, ..., h_m c_m, sum_j c_j] @ [W'; ...; W'; b']``.
So the output layer, the normalisation, the beta scaling and the sum over components are
fused, and every output value is written once. The hidden layers stay in IEEE float32.

Work proceeds in batches of chunks sized by a workspace budget, so memory beyond the output
tensors is bounded whatever the model size; there is no Python loop per chunk or per value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .generator import GeneratorWeights, ieee_fp32
from .header import MemberEntry

__all__ = ["FusedGenerator", "MemberRequest", "regenerate_segment"]

DEFAULT_CPU_WORKSPACE = 32 << 20
DEFAULT_DEVICE_WORKSPACE = 64 << 20


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

    def accumulate(self, alpha: torch.Tensor, beta: torch.Tensor, out: torch.Tensor) -> None:
        """``out += sum_j beta_j phi(alpha_j)`` for float32 ``out`` ``[B, d]`` holding theta0.

        One GEMM with the add folded in (``addmm`` into its own input): on the CPU this is
        also the faster kernel, 12.7 ms against 21 ms for ``mm(out=)`` on a [4000, 33] x
        [33, 5000] product (2-core EPYC, torch 2.13), and theta0 costs no separate pass."""
        left = self.coefficients(alpha, beta)
        with ieee_fp32(left.device):
            torch.addmm(out, left, self.stacked, out=out)


@dataclass
class MemberRequest:
    """One member of a segment to materialise into ``dest`` (flat, on the target device).

    ``theta0(start, count)`` returns the member's float32 theta0 values for an element range,
    or ``None`` for zeros.
    """

    member: MemberEntry
    dest: torch.Tensor
    theta0: Callable[[int, int], torch.Tensor | None]


def regenerate_segment(
    fused: FusedGenerator,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    requests: list[MemberRequest],
    workspace_bytes: int,
) -> None:
    """Fill every request's ``dest`` with its member's values: theta0 + the generated delta.

    Each ``dest`` must be zero-filled: a batch inside one member is written as theta0 (or
    left at zero) and the delta accumulated onto it by one ``addmm``.

    ``alpha`` ``[chunks, m, k]`` and ``beta`` ``[chunks, m]`` may live on the CPU; each batch is
    moved to the destination device as it is used.
    """
    if not requests:
        return
    device = requests[0].dest.device
    d = fused.weights.spec.d
    first = min(r.member.offset for r in requests) // d
    last = -(-max(r.member.offset + r.member.numel for r in requests) // d)
    batch = max(1, workspace_bytes // fused.bytes_per_chunk())
    workspace: torch.Tensor | None = None
    for c0 in range(first, last, batch):
        c1 = min(c0 + batch, last)
        a = alpha[c0:c1].to(device, non_blocking=True)
        b = beta[c0:c1].to(device, non_blocking=True)
        lo, hi = c0 * d, c1 * d
        owner = _sole_owner(requests, lo, hi)
        if owner is not None:
            # The batch lies inside one member: write straight into its storage.
            local = lo - owner.member.offset
            rows = owner.dest[local : local + hi - lo].view(c1 - c0, d)
            base = owner.theta0(local, hi - lo)
            if base is not None:
                rows.copy_(base.view(c1 - c0, d))
            fused.accumulate(a, b, rows)
            continue
        if workspace is None:
            workspace = torch.empty((min(batch, last - first), d), dtype=torch.float32,
                                    device=device)
        values = fused.delta(a, b, out=workspace[: c1 - c0]).reshape(-1)
        for req in requests:
            start = max(lo, req.member.offset)
            stop = min(hi, req.member.offset + req.member.numel)
            if start >= stop:
                continue
            piece = values[start - lo : stop - lo]
            local = start - req.member.offset
            base = req.theta0(local, stop - start)
            if base is not None:
                piece = piece + base
            req.dest[local : local + stop - start].copy_(piece)


def _sole_owner(requests: list[MemberRequest], lo: int, hi: int) -> MemberRequest | None:
    """The request whose member covers elements ``[lo, hi)`` entirely, if any."""
    for req in requests:
        if req.member.offset <= lo and hi <= req.member.offset + req.member.numel:
            return req
    return None
