"""Members rebuilt from alpha and beta already on the device: one call for many segments.

The executor (``execute.py``) reads alpha and beta from the file at each load. A caller that
keeps them resident on the device (``mcnc_format.serving.AdapterBank``: an adapter is its
alpha, beta and generator seed) rebuilds members from them here, with the executor's torch
path arithmetic: theta0 written into a zeroed float32 ``[chunks, d]`` workspace at each
member's values, the left factor of ``FusedGenerator.coefficients`` and one
``FusedGenerator.accumulate`` (``addmm`` into the workspace), each member then cast to its
dtype. Each chunk's row depends on that chunk's alpha and beta alone, so the chunks of
several segments that share a generator and ``m`` are concatenated into one batch: one call
rebuilds every member of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .fused import FusedGenerator

__all__ = ["MemberRun", "rebuild_members"]


@dataclass(frozen=True)
class MemberRun:
    """A member to rebuild: ``numel(shape)`` values from value ``start`` of the batch's chunks
    (``chunk * d + position``), plus ``theta0`` (float32, flat, on the batch's device; ``None``
    for zeros), rounded to ``dtype``."""

    start: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    theta0: torch.Tensor | None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def rebuild_members(fused: FusedGenerator, alpha: torch.Tensor, beta: torch.Tensor,
                    members: Sequence[MemberRun]) -> list[torch.Tensor]:
    """The members' values ``theta0 + sum_j beta_j phi(alpha_j)`` from alpha ``[chunks, m,
    k]`` and beta ``[chunks, m]`` on the device (their stored dtypes), one tensor per member
    of its ``shape`` and ``dtype``, each its own storage."""
    d = fused.weights.spec.d
    rows = alpha.shape[0]
    for member in members:
        if member.start < 0 or member.start + member.numel > rows * d:
            raise UsageError(f"member values [{member.start}, {member.start + member.numel})"
                             f" lie outside the batch's {rows} chunks of {d} values")
    left = fused.coefficients(alpha, beta)  # whole row tiles: the workspace has their rows
    work = torch.empty(left.shape[0], d, dtype=torch.float32, device=alpha.device)
    fused.accumulate_over(left, work, [(slice(m.start, m.start + m.numel), m.theta0)
                                       for m in members])
    flat = work.view(-1)
    return [flat[m.start : m.start + m.numel].view(m.shape).to(m.dtype, copy=True)
            for m in members]
