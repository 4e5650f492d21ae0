"""The plan of a pipelined load: which steps, in which order, with which batches.

A load is a list of steps in file order: one per dense tensor, one per lora tensor, and one
per batch of a segment's chunks, placed where the segment's first member appears. Batches
are sized so that their device temporaries fit the workspace: a segment with any member on the
eager path (float64 outputs, or no fused kernel) is sized for the eager path's float32 rows.
The plan is pure bookkeeping over the header (no I/O), so tests can check it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .. import constants as C
from ..header import Header, MemberEntry, TensorEntry
from ..regenerate import FusedGenerator

__all__ = ["Member", "SegmentWork", "Step", "batch_rows", "largest_upload", "plan_steps",
           "release"]


@dataclass(eq=False)
class Member:
    """One mcnc tensor of a segment on its way to the device."""

    name: str
    entry: MemberEntry
    dtype: torch.dtype
    dest: torch.Tensor | None = None
    base: torch.Tensor | None = None
    base_marker: object = None
    base_check: Future[None] | None = None
    done: bool = False

    @property
    def start(self) -> int:
        return self.entry.offset

    @property
    def stop(self) -> int:
        return self.entry.offset + self.entry.numel

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether segment values ``[lo, hi)`` include any of this member's."""
        return self.entry.numel > 0 and self.start < hi and self.stop > lo


@dataclass(eq=False)
class SegmentWork:
    """A segment's members (sorted by offset) and its inputs while it is being loaded."""

    index: int
    members: list[Member]
    fused: FusedGenerator | None = None
    alpha: memoryview | bytes | None = None
    beta: memoryview | bytes | None = None


@dataclass(eq=False)
class Step:
    """``kind``: ``"dense"`` (a dense or packed tensor) or ``"lora"`` (``tensor``), or
    ``"batch"`` (chunks ``[c0, c1)`` of ``segment``)."""

    kind: str
    tensor: TensorEntry | None = None
    segment: SegmentWork | None = None
    c0: int = 0
    c1: int = 0


def plan_steps(header: Header, wanted: list[TensorEntry],
               out_dtype: Callable[[TensorEntry], torch.dtype], workspace_bytes: int,
               eager: Callable[[Member], bool]) -> list[Step]:
    """The steps that load ``wanted`` (file order; a segment where its first member is).

    ``eager(member)``: whether the member takes the eager path. One such member (empty ones
    compute nothing) makes each batch compute the whole ``[rows, d]`` float32 product, so its
    segment's batches are sized for it."""
    steps: list[Step] = []
    segments: dict[int, SegmentWork] = {}
    for t in wanted:
        if t.stores_values:
            steps.append(Step("dense", tensor=t))
        elif t.encoding == C.Encoding.LORA:
            steps.append(Step("lora", tensor=t))
        else:
            (entry,) = t.members()
            if entry.segment not in segments:
                segments[entry.segment] = SegmentWork(entry.segment, [])
                steps.append(Step("batch", segment=segments[entry.segment]))
            segments[entry.segment].members.append(Member(t.name, entry, out_dtype(t)))
    out: list[Step] = []
    for step in steps:
        seg = step.segment
        if seg is None:
            out.append(step)
            continue
        seg.members.sort(key=lambda m: m.start)
        d = header.generators[header.segments[seg.index].generator].d
        first = seg.members[0].start // d
        last = -(-max(m.stop for m in seg.members) // d)
        rows = batch_rows(header, seg.index, workspace_bytes,
                          any(eager(m) for m in seg.members if m.entry.numel))
        out += [Step("batch", segment=seg, c0=c0, c1=min(c0 + rows, last))
                for c0 in range(first, max(last, first + 1), rows)]
    return out


def batch_rows(header: Header, seg_index: int, workspace_bytes: int, eager: bool) -> int:
    """Chunks per batch so that the batch's temporaries fit the workspace: the widened alpha,
    hidden activations (two float32 and three float64 copies live at once in
    ``FusedGenerator.coefficients``, whose row norm runs in float64), the left factor, the
    alpha/beta rows, and on the eager path the float32 delta and its sum with theta0."""
    seg = header.segments[seg_index]
    g = header.generators[seg.generator]
    width = max(g.hidden)
    row = seg.m * (4 * g.k + (4 * 2 + 8 * 3) * width) + 4 * (seg.m * g.hidden[-1] + 1)
    row += header.blobs[seg.alpha].decoded_length // max(seg.chunks, 1)
    row += header.blobs[seg.beta].decoded_length // max(seg.chunks, 1)
    if eager:
        row += 8 * g.d
    return max(1, workspace_bytes // row)


def largest_upload(header: Header, steps: list[Step]) -> int:
    """An upper bound of the bytes of any one upload: pinned buffers larger than that would
    only cost allocation time (pinning memory is slow)."""
    largest = 1
    for step in steps:
        if step.kind == "dense" and step.tensor is not None:
            largest = max(largest, step.tensor.nbytes)
        elif step.segment is not None:
            seg = header.segments[step.segment.index]
            per_chunk = sum(header.blobs[b].decoded_length // max(seg.chunks, 1)
                            for b in (seg.alpha, seg.beta))
            largest = max(largest, (step.c1 - step.c0) * per_chunk)
            for member in step.segment.members:
                if member.entry.theta0.kind in (C.Theta0Kind.BLOB, C.Theta0Kind.EXTERNAL):
                    largest = max(largest, member.entry.numel * 8)
    return largest


def release(steps: list[Step]) -> None:
    """Drop every device tensor the plan holds, so a failed load leaves nothing allocated."""
    for step in steps:
        if step.segment is not None:
            for member in step.segment.members:
                member.dest = member.base = None
