"""The plan of a load: which steps, in which order, over which chunks (no I/O).

Every read of a file, whole tensors or boxes of them, is planned here and run by the one
executor (``execute.py``). A request names tensors, a box of each and an output dtype; the
plan turns it into *targets* (the outputs, plus a lora tensor's two factors) and *steps*:

- ``DenseStep``: a dense or packed tensor's box, read from its blob;
- ``BatchStep``: a batch of one segment's chunks, regenerated once and written into the
  *pieces* (output ranges of targets) that they cover;
- ``MergeStep``: a lora tensor's box, ``theta0 + scale * B @ A`` from its factors' boxes;
- ``EmptyStep``: a target with no elements.

A box is covered by the chunks it touches: a contiguous box (a row block) by one chunk range,
shared with its neighbours in the segment; other boxes run by run (a column block touches, per
row, the chunks spanning that row's columns), in batches of the chunks their runs touch.
Batches are sized so their temporaries fit the workspace. Steps are in request order, a
segment's batches where its first target appears; each step lists the targets it completes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..dtypes import to_torch
from ..header import DenseTensor, Header, LoRATensor, MemberEntry, PackedTensor, TensorEntry
from .box import Box
from .fused import ROW_TILE

if TYPE_CHECKING:
    from .backend import KernelCapabilities

__all__ = [
    "BatchStep",
    "DenseStep",
    "EmptyStep",
    "MergeStep",
    "Piece",
    "Plan",
    "Step",
    "Target",
    "TensorRequest",
    "batch_rows",
    "plan_load",
]

#: Runs whose chunks are worked out at once while planning a non-contiguous box: bounds the
#: planner's memory whatever the box.
RUN_WINDOW = 1 << 16


@dataclass(frozen=True)
class TensorRequest:
    """One tensor to produce: the box of it and the dtype of the result."""

    entry: TensorEntry
    box: Box
    dtype: torch.dtype


@dataclass(eq=False)
class Target:
    """One output of a load: a box of a tensor, or of a lora tensor's factor (``output`` is
    false for those: the merge consumes them)."""

    name: str
    box: Box
    dtype: torch.dtype
    member: MemberEntry | None = None
    output: bool = True
    tensor: TensorEntry | None = None  # the requested tensor an output target is a box of

    @property
    def numel(self) -> int:
        return self.box.numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def elements(self, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor element indices of output elements ``lo .. hi - 1`` (int64)."""
        box = self.box
        if box.contiguous:
            first = box.first_element
            return torch.arange(first + lo, first + hi, dtype=torch.int64, device=device)
        length = box.run_length
        first_run, stop_run = lo // length, -(-hi // length)
        elements = box.elements(first_run, stop_run, device)
        return elements[lo - first_run * length : hi - first_run * length]

    def element_range(self, lo: int, hi: int) -> tuple[int, int] | None:
        """``(first, stop)`` tensor elements of output elements ``lo .. hi - 1`` when they
        are contiguous in the tensor, else ``None``."""
        box = self.box
        if box.contiguous:
            return box.first_element + lo, box.first_element + hi
        length = box.run_length
        if lo // length != (hi - 1) // length:
            return None
        start = int(box.run_starts(lo // length, lo // length + 1)[0]) + lo % length
        return start, start + hi - lo


@dataclass(frozen=True)
class Piece:
    """Output elements ``[lo, hi)`` of ``target``, covered by one batch."""

    target: Target
    lo: int
    hi: int


@dataclass(eq=False)
class DenseStep:
    tensor: DenseTensor | PackedTensor
    target: Target
    completes: list[Target] = field(default_factory=list)


@dataclass(eq=False)
class BatchStep:
    """Chunks ``[first, stop)`` of ``segment``, or the sorted chunk indices ``ids`` of a
    gathered batch, written into ``pieces``."""

    segment: int
    first: int
    stop: int
    pieces: list[Piece]
    ids: torch.Tensor | None = None
    completes: list[Target] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return int(self.ids.numel()) if self.ids is not None else self.stop - self.first


@dataclass(eq=False)
class MergeStep:
    tensor: LoRATensor
    target: Target
    a: Target
    b: Target
    completes: list[Target] = field(default_factory=list)


@dataclass(eq=False)
class EmptyStep:
    target: Target
    completes: list[Target] = field(default_factory=list)


Step = DenseStep | BatchStep | MergeStep | EmptyStep


@dataclass
class Plan:
    steps: list[Step]
    outputs: list[Target]

    @property
    def chunks(self) -> int:
        """Chunks the load regenerates."""
        return sum(s.chunks for s in self.steps if isinstance(s, BatchStep))

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


def plan_load(header: Header, requests: list[TensorRequest], workspace_bytes: int,
              kernels: KernelCapabilities | None = None) -> Plan:
    """The steps that produce ``requests`` (in their order). ``kernels``: what the backend's
    fused kernel rebuilds (``None``: nothing); other targets take the torch path, whose
    batches hold a float32 ``[rows, d]`` product (the kernel writes outputs directly), so
    their segment's batches are sized for it. Pure: a header in memory is enough."""

    def eager(target: Target) -> bool:
        return kernels is None or not kernels.takes(target.member, target.dtype)

    order: list[Step | int] = []  # steps, and segment indices where their batches go
    by_segment: dict[int, list[Target]] = {}
    outputs: list[Target] = []

    def regenerated(target: Target) -> None:
        assert target.member is not None
        segment = target.member.segment
        if segment not in by_segment:
            by_segment[segment] = []
            order.append(segment)
        by_segment[segment].append(target)

    for request in requests:
        t = request.entry
        target = Target(t.name, request.box, request.dtype, tensor=t)
        outputs.append(target)
        if target.numel == 0 and not (t.stores_values and t.numel == 0):
            order.append(EmptyStep(target))
        elif isinstance(t, DenseTensor | PackedTensor):  # an empty one's blob is checked (R25)
            order.append(DenseStep(t, target))
        elif isinstance(t, LoRATensor):
            a, b = _factor_targets(t, request.box)
            regenerated(a)
            regenerated(b)
            order.append(MergeStep(t, target, a, b))
        else:
            (target.member,) = t.members()
            regenerated(target)
    steps: list[Step] = []
    for item in order:
        if isinstance(item, int):
            steps += _segment_steps(header, item, by_segment[item], workspace_bytes, eager)
        else:
            steps.append(item)
    _mark_completion(steps)
    return Plan(steps, outputs)


def _factor_targets(t: LoRATensor, box: Box) -> tuple[Target, Target]:
    """The factor boxes a lora tensor's box needs: the columns of ``A [r, in]`` and the rows
    of ``B [out, r]``."""
    rank = t.A.shape[0]
    a_box = Box(t.A.shape, (0, box.starts[1]), (rank, box.stops[1]))
    b_box = Box(t.B.shape, (box.starts[0], 0), (box.stops[0], rank))
    return (Target(f"{t.name}:A", a_box, to_torch(t.A.dtype), t.A, output=False),
            Target(f"{t.name}:B", b_box, to_torch(t.B.dtype), t.B, output=False))


def _segment_steps(header: Header, index: int, targets: list[Target], workspace_bytes: int,
                   eager: Callable[[Target], bool]) -> list[Step]:
    seg = header.segments[index]
    d = header.generators[seg.generator].d
    steps: list[Step] = []
    contiguous = sorted((t for t in targets if t.box.contiguous),
                        key=lambda t: _first(t))
    if contiguous:
        rows = batch_rows(header, index, workspace_bytes, any(eager(t) for t in contiguous))
        steps += _range_batches(index, contiguous, d, rows)
    for target in targets:
        if not target.box.contiguous:
            rows = batch_rows(header, index, workspace_bytes, True, gathered=True)
            steps += _gathered_batches(index, target, d, rows)
    return steps


def _first(target: Target) -> int:
    """The segment value where a contiguous target starts."""
    assert target.member is not None
    return target.member.offset + target.box.first_element


def _range_batches(segment: int, targets: list[Target], d: int, rows: int) -> list[Step]:
    """Batches of consecutive chunks covering contiguous targets (sorted by position): a
    chunk two targets share is regenerated once."""
    groups: list[tuple[int, int, list[Target]]] = []
    for target in targets:
        lo, hi = _first(target) // d, -(-(_first(target) + target.numel) // d)
        if groups and lo <= groups[-1][1]:
            first, stop, members = groups[-1]
            groups[-1] = (first, max(stop, hi), [*members, target])
        else:
            groups.append((lo, hi, [target]))
    steps: list[Step] = []
    for first, stop, members in groups:
        spans = [(_first(t), _first(t) + t.numel, t) for t in members]  # sorted by start
        begin = 0  # the first member not yet finished by earlier batches
        for c0, c1 in _tiled_ranges(first, stop, rows):
            pieces = []
            while begin < len(spans) and spans[begin][1] <= c0 * d:
                begin += 1
            for start, end, target in spans[begin:]:
                if start >= c1 * d:
                    break
                lo, hi = max(c0 * d, start), min(c1 * d, end)
                if lo < hi:
                    pieces.append(Piece(target, lo - start, hi - start))
            steps.append(BatchStep(segment, c0, c1, pieces))
    return steps


def _tiled_ranges(first: int, stop: int, rows: int) -> Iterator[tuple[int, int]]:
    """Chunk ranges of at most ``rows`` (a multiple of ``ROW_TILE``) covering ``[first,
    stop)``, all whole row tiles but a last one of fewer than ``ROW_TILE`` chunks: a whole
    tile can be accumulated straight into a float32 output, a partial one is padded in the
    workspace."""
    tail = (stop - first) % ROW_TILE
    for c0 in range(first, stop - tail, rows):
        yield c0, min(c0 + rows, stop - tail)
    if tail:
        yield stop - tail, stop


def _gathered_batches(segment: int, target: Target, d: int, rows: int) -> Iterator[Step]:
    """Batches for a box of several runs: each batch regenerates only the chunks its runs
    touch. A run longer than a batch is split into chunk ranges of its own."""
    assert target.member is not None
    box = target.box
    length = box.run_length
    if -(-length // d) + 1 > rows:
        for run in range(box.runs):
            start = target.member.offset + int(box.run_starts(run, run + 1)[0])
            for c0 in range(start // d, -(-(start + length) // d), rows):
                c1 = min(c0 + rows, -(-(start + length) // d))
                lo, hi = max(c0 * d, start), min(c1 * d, start + length)
                yield BatchStep(segment, c0, c1,
                                [Piece(target, run * length + lo - start,
                                       run * length + hi - start)])
        return
    span = torch.arange(-(-length // d) + 1, dtype=torch.int64)
    for w0 in range(0, box.runs, RUN_WINDOW):
        w1 = min(w0 + RUN_WINDOW, box.runs)
        starts = target.member.offset + box.run_starts(w0, w1)
        first = starts // d
        last = (starts + length - 1) // d
        i = 0
        while i < w1 - w0:
            j = int(torch.searchsorted(last, first[i] + rows - 1, right=True))
            j = max(j, i + 1)
            ids = first[i:j, None] + span[None, :]
            ids = torch.unique(ids[ids <= last[i:j, None]])
            piece = Piece(target, (w0 + i) * length, (w0 + j) * length)
            c0, c1 = int(ids[0]), int(ids[-1]) + 1
            yield BatchStep(segment, c0, c1, [piece],
                            ids=None if c1 - c0 == ids.numel() else ids)
            i = j


def _mark_completion(steps: list[Step]) -> None:
    """Record on each step the targets whose last piece it writes."""
    last: dict[int, tuple[Step, Target]] = {}
    for step in steps:
        if isinstance(step, BatchStep):
            for piece in step.pieces:
                last[id(piece.target)] = (step, piece.target)
        elif isinstance(step, DenseStep | MergeStep | EmptyStep):
            last[id(step.target)] = (step, step.target)
    for step, target in last.values():
        step.completes.append(target)


def batch_rows(header: Header, seg_index: int, workspace_bytes: int, eager: bool,
               gathered: bool = False) -> int:
    """Chunks per batch so that the batch's temporaries fit the workspace: the widened alpha,
    hidden activations (two float32 and three float64 copies live at once in
    ``FusedGenerator.coefficients``, whose row norm runs in float64), the left factor, the
    alpha/beta rows, and on the torch path the float32 product with theta0 and its cast copy;
    a gathered batch also holds the int64 positions of its values. Whole row tiles (the
    product is computed in them anyway), at least one whatever the workspace."""
    seg = header.segments[seg_index]
    g = header.generators[seg.generator]
    width = max(g.hidden)
    row = seg.m * (4 * g.k + (4 * 2 + 8 * 3) * width) + 4 * (seg.m * g.hidden[-1] + 1)
    row += header.blobs[seg.alpha].decoded_length // max(seg.chunks, 1)
    row += header.blobs[seg.beta].decoded_length // max(seg.chunks, 1)
    if eager:
        row += 8 * g.d
    if gathered:
        row += 24 * g.d
    return max(ROW_TILE, workspace_bytes // row // ROW_TILE * ROW_TILE)
