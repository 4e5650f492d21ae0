"""The executor: runs a plan on one device, inputs staged while the previous step computes.

Each step has a *stage* (bytes read from the file, through the pinned staging ring onto the
device on a copy stream; on the CPU they are used where they were read, and a dense theta0 is
read straight into the output it is the base of) and a *compute*
(regeneration on the compute stream, straight into the output storage). Step ``i + 1`` is
staged before step ``i`` is computed, so reads and copies overlap regeneration, and a target
is handed out as soon as the step that completes it has been queued (stream order makes it
safe on the caller's stream).

Regeneration of a batch: the left factor of ``FusedGenerator`` for the batch's chunks, then

- the fused Triton kernel for contiguous targets on CUDA (theta0 drawn or read in registers,
  each value written once in its final dtype);
- otherwise the torch path: theta0 written first (into the output itself when the batch lies
  inside one float32 target, else into a workspace) and the product accumulated onto it by one
  ``addmm``, then each piece copied (and cast) into its target.

Every element is computed by the same operations whichever box or batch it lands in (batches
of whole row tiles, ``ordered_matmul`` for the generator's small products), so a box equals the
same elements of the whole tensor bit for bit, on one device and path.

Memory: device = the outputs + a workspace (``LoadOptions.workspace_for``) + the dense theta0
of the target being rebuilt when its dtype differs from the output's (or, for a lora box that
is not one range, the rows it spans) + a lora merge's two float32 blocks; host = the staging
ring + the largest decoded (zstd) blob.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..constants import DType
from ..dtypes import to_torch
from ..errors import DeviceMemoryError, FormatError
from ..header import BlobTheta0, ExternalTheta0, MemberEntry, Theta0Entry
from .backend import Backend
from .context import FileContext, out_of_memory
from .fused import FusedGenerator
from .options import Precision, Progress
from .plan import (
    BatchStep,
    DenseStep,
    EmptyStep,
    MemberTarget,
    MergeStep,
    Piece,
    Plan,
    Step,
    Target,
    TensorRequest,
    plan_load,
)
from .staging import CopyEngine, StagingRing, to_device_async
from .theta0 import is_stored

if TYPE_CHECKING:
    from .triton_kernels import MemberJob

__all__ = ["Executor"]


@dataclass(eq=False)
class _Output:
    """A target's storage while it is being rebuilt."""

    tensor: torch.Tensor
    zero: bool  # known to hold zeros (a fresh zero-filled allocation)
    base: torch.Tensor | None = None  # a staged dense theta0 (may be ``tensor`` itself)
    base_marker: object = None


class Executor:
    """Plans and runs loads of one open file (its engine ``FileContext``) on one backend."""

    def __init__(self, context: FileContext, backend: Backend) -> None:
        self.context = context
        self.header = context.header
        self.label = context.label
        self.backend = backend
        self.device = backend.device
        self.options = backend.options
        self.chunks_regenerated = 0
        self.allocated_bytes = 0

    def plan(self, requests: list[TensorRequest]) -> Plan:
        """The plan for ``requests`` (no I/O): batches sized for this backend's workspace
        and for what its kernels rebuild."""
        output_bytes = sum(r.box.numel * r.dtype.itemsize for r in requests)
        return plan_load(self.header, requests, self.backend.workspace_bytes(output_bytes),
                         self.backend.capabilities)

    def kernel_takes(self, target: MemberTarget) -> bool:
        """Whether the fused kernel rebuilds ``target``."""
        capabilities = self.backend.capabilities
        return capabilities is not None and capabilities.takes(target.member, target.dtype)

    # -- running ---------------------------------------------------------------------------
    def run(self, plan: Plan) -> Iterator[tuple[Target, torch.Tensor]]:
        """Yield ``(target, tensor)`` for the plan's outputs as each is complete."""
        self._check_fits(plan)
        engine = self.backend.copy_engine()
        ring = StagingRing(engine, max(1, self.options.staging_bytes // 2), 2)
        outputs: dict[int, _Output] = {}
        workspace: list[torch.Tensor] = []
        total = len(plan.outputs)
        total_bytes = plan.output_bytes
        done = done_bytes = 0
        try:
            staged = self._stage(plan.steps[0], engine, ring, outputs) if plan.steps else None
            for i, step in enumerate(plan.steps):
                current = staged
                with self.backend.on_device():
                    if i + 1 < len(plan.steps):
                        staged = self._stage(plan.steps[i + 1], engine, ring, outputs)
                    self._compute(step, current, engine, outputs, workspace)
                current = None
                for target in step.completes:
                    if not target.output:
                        continue
                    state = outputs.pop(id(target))
                    self._await_pins(target)
                    value = state.tensor.view(target.box.result_shape)
                    done += 1
                    done_bytes += target.nbytes
                    if self.options.progress is not None:
                        self.options.progress(Progress(target.name, done, total, done_bytes,
                                                       total_bytes, self.chunks_regenerated))
                    yield target, value
        except (RuntimeError, MemoryError, OSError) as exc:
            if not out_of_memory(exc):
                raise
            outputs.clear()
            raise self._oom(plan) from exc
        finally:
            ring.drain()

    def _await_pins(self, target: Target) -> None:
        """R75: the SHA-256 pin of every external base ``target`` was built from (its own
        theta0 and, for a lora tensor, its factors') held, before it is handed out."""
        for entry in target.theta0s():
            check = self.context.theta0.pending_check(entry)
            if check is not None:
                check.result()

    def _check_fits(self, plan: Plan) -> None:
        """Refuse up front a load that cannot fit the device's free memory, before anything
        is read or allocated."""
        free = self.backend.free_bytes()
        if free is not None and plan.output_bytes + self._workspace_bytes(plan) > free:
            raise self._oom(plan)

    def _workspace_bytes(self, plan: Plan) -> int:
        return self.backend.workspace_bytes(plan.output_bytes)

    def _oom(self, plan: Plan) -> DeviceMemoryError:
        where = self.backend.describe_memory()
        return DeviceMemoryError(
            f"{self.label}: out of memory on {self.device} after allocating "
            f"{self.allocated_bytes} bytes: the load needs {plan.output_bytes} bytes of "
            f"outputs plus a workspace of up to {self._workspace_bytes(plan)} bytes ({where}). "
            "Load fewer tensors (names=), a box of them, a narrower dtype, or a smaller "
            "workspace_bytes.")

    # -- allocation ------------------------------------------------------------------------
    def _output(self, target: Target, engine: CopyEngine, outputs: dict[int, _Output]
                ) -> _Output:
        """The target's storage, allocated at its first use."""
        state = outputs.get(id(target))
        if state is None:
            tensor, zero = self.backend.output(target.numel, target.dtype, engine)
            self.allocated_bytes += target.nbytes
            state = outputs[id(target)] = _Output(tensor, zero)
        return state

    def _upload(self, data: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                engine: CopyEngine, ring: StagingRing, into: torch.Tensor | None = None,
                copy: bool = False) -> tuple[torch.Tensor, object]:
        """Host bytes as a device tensor of ``dtype`` and ``shape`` (``into`` when given) and
        the marker of the copy. On the CPU the bytes are used where they were read, unless
        ``copy`` (the result is handed out, and the bytes may be a kept blob)."""
        if into is None and self.backend.host_memory:
            if not len(data):
                return torch.empty(shape, dtype=dtype), None
            buffer = bytearray(data) if data.readonly or copy else data
            return torch.frombuffer(buffer, dtype=dtype).reshape(shape), None
        tensor = into if into is not None else engine.device_empty(shape, dtype)
        marker = ring.upload(data, tensor.view(torch.uint8).reshape(-1)) if len(data) else None
        return tensor, marker

    # -- staging ---------------------------------------------------------------------------
    def _stage(self, step: Step, engine: CopyEngine, ring: StagingRing,
               outputs: dict[int, _Output]) -> object:
        if isinstance(step, DenseStep):
            return self._stage_dense(step, engine, ring)
        if isinstance(step, BatchStep):
            return self._stage_batch(step, engine, ring, outputs)
        if isinstance(step, MergeStep):
            self._stage_merge(step, engine, ring, outputs)
        return None

    def _stage_dense(self, step: DenseStep, engine: CopyEngine, ring: StagingRing
                     ) -> tuple[torch.Tensor, object]:
        """The stored bytes covering the box: its element range when contiguous, else the
        rows of its first dimension."""
        t, box = step.tensor, step.target.box
        dtype = to_torch(t.dtype)
        if box.contiguous:
            first, count = box.first_element, box.numel
            shape: tuple[int, ...] = (count,)
        else:
            row = math.prod(t.shape[1:])
            first, count = box.starts[0] * row, box.lengths[0] * row
            shape = (box.lengths[0], *t.shape[1:])
        data = self.context.blobs.tensor_bytes(t, first * dtype.itemsize,
                                            (first + count) * dtype.itemsize)
        if t.dtype == DType.BOOL and count and int(np.frombuffer(data, np.uint8).max()) > 1:
            # Checked on the host bytes: on a GPU, a check of the device copy waits for it.
            raise FormatError("bool bytes must be 0 or 1 (§1): the file is damaged or was "
                              "written by a non-conforming writer", rule="R27", path=self.label,
                              field=f"tensors[{t.name!r}].blob")
        into = None if self.backend.host_memory else engine.output_empty(shape, dtype)
        tensor, marker = self._upload(data, shape, dtype, engine, ring, into, copy=True)
        self.allocated_bytes += count * dtype.itemsize
        return tensor, marker

    def _stage_batch(self, step: BatchStep, engine: CopyEngine, ring: StagingRing,
                     outputs: dict[int, _Output]) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Alpha and beta rows of the batch on the device, the marker of their copy (waited
        on when the batch is computed, so staging the next step never delays this one), and
        the bases of the targets the batch starts."""
        seg = self.header.segments[step.segment]
        inputs = []
        marker: object = None
        for blob_index, what in ((seg.alpha, "alpha"), (seg.beta, "beta")):
            blob = self.header.blobs[blob_index]
            data = self.context.blobs.blob(blob_index, f"segments[{step.segment}].{what}")
            row = blob.decoded_length // max(seg.chunks, 1)
            if step.ids is None:
                window = data[step.first * row : step.stop * row]
            else:
                rows = np.frombuffer(data, dtype=np.uint8).reshape(seg.chunks, row)
                window = memoryview(rows[step.ids.numpy()].reshape(-1))
            tensor, marker = self._upload(window, (step.chunks, *blob.shape[1:]),
                                          to_torch(blob.dtype), engine, ring)
            inputs.append(tensor)
        for piece in step.pieces:
            if id(piece.target) not in outputs:
                self._stage_base(piece.target, engine, ring, outputs)
        return inputs[0], inputs[1], marker

    def _stage_base(self, target: MemberTarget, engine: CopyEngine, ring: StagingRing,
                    outputs: dict[int, _Output]) -> None:
        """Allocate a target; a contiguous target's blob or external theta0 is read for its
        box and staged into its storage when the dtypes agree (updated in place), else into
        a buffer of its own dtype."""
        state = self._output(target, engine, outputs)
        entry = target.member.theta0
        if not is_stored(entry) or not target.box.contiguous:
            return
        first = target.box.first_element
        self._stage_theta0(entry, target.member.shape, first, first + target.numel, target,
                           state, engine, ring)

    def _stage_merge(self, step: MergeStep, engine: CopyEngine, ring: StagingRing,
                     outputs: dict[int, _Output]) -> None:
        """Allocate a lora box; its blob or external theta0 (the base weight) is read into
        its storage when the dtypes agree and the box is contiguous, else (the rows the box
        spans) into a buffer of its own dtype: the merge then adds ``scale * B @ A`` to it
        in place."""
        t, target = step.tensor, step.target
        state = self._output(target, engine, outputs)
        if not is_stored(t.theta0):
            return
        box = target.box
        if box.contiguous:
            first, stop = box.first_element, box.first_element + box.numel
        else:
            row = math.prod(t.shape[1:])
            first, stop = box.starts[0] * row, box.stops[0] * row
        self._stage_theta0(t.theta0, t.shape, first, stop, target, state, engine, ring)

    def _stage_theta0(self, entry: BlobTheta0 | ExternalTheta0, shape: tuple[int, ...],
                      first: int, stop: int, target: Target, state: _Output,
                      engine: CopyEngine, ring: StagingRing) -> None:
        """Read elements ``[first, stop)`` of a dense theta0 as ``state.base``: into the
        target's storage when they are its elements in its dtype, else into a buffer of the
        stored dtype. On the CPU the bytes are read straight into it, elsewhere into the
        pinned ring's slots (by several reader threads) and copied on; a whole external
        tensor is hashed from those bytes on the way (R75)."""
        read = self.context.theta0.dense_read(entry, shape, first, stop, f"{target.name}.theta0")
        try:  # whatever fails (the buffer's allocation too) ends the streamed pin check
            into = (state.tensor if read.dtype == target.dtype and stop - first == target.numel
                    and target.box.contiguous else None)
            tensor = into if into is not None else engine.device_empty((stop - first,),
                                                                       read.dtype)
            marker = ring.stream(read.nbytes, tensor.view(torch.uint8), read.read,
                                 read.hash.feed if read.hash is not None else None)
        except BaseException:
            read.abort()
            raise
        state.base, state.base_marker, state.zero = tensor, marker, False
        if into is None:
            self.allocated_bytes += read.nbytes

    # -- compute ---------------------------------------------------------------------------
    def _compute(self, step: Step, staged: object, engine: CopyEngine,
                 outputs: dict[int, _Output], workspace: list[torch.Tensor]) -> None:
        if isinstance(step, EmptyStep):
            outputs[id(step.target)] = _Output(
                engine.output_empty((0,), step.target.dtype), False)
        elif isinstance(step, DenseStep):
            assert isinstance(staged, tuple)
            self._finish_dense(step, staged, engine, outputs)
        elif isinstance(step, BatchStep):
            assert isinstance(staged, tuple)
            self._compute_batch(step, staged, engine, outputs, workspace)
        else:
            self._merge(step, engine, outputs)

    def _finish_dense(self, step: DenseStep, staged: tuple[torch.Tensor, object],
                      engine: CopyEngine, outputs: dict[int, _Output]) -> None:
        target = step.target
        value, marker = staged
        engine.wait_compute(marker)
        box = target.box
        if not box.contiguous:
            index = (slice(None), *(slice(a, b) for a, b in zip(box.starts[1:], box.stops[1:],
                                                                 strict=True)))
            value = value[index]
        value = value.to(target.dtype).contiguous()
        outputs[id(target)] = _Output(value.reshape(-1), False)

    def _compute_batch(self, step: BatchStep, staged: tuple[torch.Tensor, torch.Tensor, object],
                       engine: CopyEngine, outputs: dict[int, _Output],
                       workspace: list[torch.Tensor]) -> None:
        alpha, beta, marker = staged
        engine.wait_compute(marker)
        seg = self.header.segments[step.segment]
        fused = self.context.generators.fused(seg.generator, seg.m, self.device,
                                              self.backend.draw_weights())
        d = fused.weights.spec.d
        self.chunks_regenerated += step.chunks
        for piece in step.pieces:
            state = outputs[id(piece.target)]
            if state.base_marker is not None:
                engine.wait_compute(state.base_marker)
                state.base_marker = None
        left = fused.coefficients(alpha, beta)
        eager = []
        jobs: dict[Precision, list[MemberJob]] = {}  # one launch per product and dtype
        for piece in step.pieces:
            if not self.kernel_takes(piece.target):
                eager.append(piece)
            elif piece.target.box.contiguous:
                jobs.setdefault(self._product(piece.target, fused), []).append(
                    self._kernel_job(piece, step, outputs[id(piece.target)], d))
            else:
                self._kernel_gather(piece, step, fused, left, outputs[id(piece.target)], d)
        for precision, group in jobs.items():
            self.backend.regenerate_members(
                left, fused.stacked, fused.weights.out_bias is not None, group, precision,
                fused.split if precision is Precision.BF16X3 else None)
        if not eager:
            return
        if len(eager) == 1 and self._in_place(eager[0], step, fused, left, outputs[
                id(eager[0].target)], d):
            return
        rows = left.shape[0]  # the chunks, padded to whole row tiles
        work = self._workspace(workspace, rows, d)
        parts = [self._theta0_part(piece, step, outputs, d) for piece in eager]
        fused.accumulate_over(left, work, parts)
        flat = work.view(-1)
        for piece, (where, _) in zip(eager, parts, strict=True):
            outputs[id(piece.target)].tensor[piece.lo : piece.hi].copy_(flat[where])

    def _in_place(self, piece: Piece, step: BatchStep, fused: FusedGenerator,
                  left: torch.Tensor, state: _Output, d: int) -> bool:
        """Accumulate straight into the output when the batch lies inside one float32 target
        (theta0 written into it first): no workspace, no copy."""
        target = piece.target
        rows = step.chunks
        if (step.ids is not None or left.shape[0] != rows or target.dtype != torch.float32
                or piece.hi - piece.lo != rows * d or target.element_range(piece.lo, piece.hi)
                is None):
            return False
        view = state.tensor[piece.lo : piece.hi].view(rows, d)
        if state.base is not state.tensor:  # else the staged theta0 is there already
            # A drawn theta0 is drawn straight into the output (no temporary, no copy).
            base = self._theta0(target.member.theta0, target.member.shape, target, piece.lo,
                                piece.hi, state.base, out=view.view(-1))
            if base is None:
                if not state.zero:
                    view.zero_()
            elif base.data_ptr() != view.data_ptr():
                view.copy_(base.view(rows, d))
        fused.accumulate(left, view)
        return True

    def _theta0(self, entry: Theta0Entry, shape: tuple[int, ...], target: Target, lo: int,
                hi: int, staged: torch.Tensor | None, out: torch.Tensor | None = None
                ) -> torch.Tensor | None:
        """Float32 theta0 (``entry`` of a tensor of ``shape``) of ``target``'s output elements
        ``[lo, hi)``, from ``staged`` (the box's staged dense theta0) when given; ``None`` for
        zeros. ``out``: where a drawn theta0 of a contiguous range may be written."""
        if staged is not None:
            return staged[lo:hi].to(torch.float32)
        label = f"{target.name}.theta0"
        span = target.element_range(lo, hi)
        if span is not None:
            return self.context.theta0.values(entry, shape, span[0], span[1] - span[0],
                                              self.device, label, out,
                                              self.backend.draw_uniform())
        elements = target.elements(lo, hi, self.device)
        return self.context.theta0.values_at(entry, shape, elements, label)

    def _theta0_part(self, piece: Piece, step: BatchStep, outputs: dict[int, _Output], d: int
                     ) -> tuple[slice | torch.Tensor, torch.Tensor | None]:
        """Where a piece's values lie in the batch's rows (a range of them flat or, for a
        gathered piece, its positions) and its theta0 (``None`` for zeros)."""
        target = piece.target
        base = self._theta0(target.member.theta0, target.member.shape, target, piece.lo,
                            piece.hi, outputs[id(target)].base)
        span = target.element_range(piece.lo, piece.hi)
        if span is not None and step.ids is None:
            lo = target.member.offset + span[0] - step.first * d
            return slice(lo, lo + piece.hi - piece.lo), base
        return self._positions(piece, step, d), base

    def _positions(self, piece: Piece, step: BatchStep, d: int) -> torch.Tensor:
        """Where a piece's values lie in the ``[chunks, d]`` rows of its batch, flat. In
        place: at most three int64 per value live at once (what ``plan.batch_rows`` counts
        for a gathered batch), not the six of the same arithmetic out of place."""
        target = piece.target
        values = target.elements(piece.lo, piece.hi, self.device)  # a fresh tensor
        values += target.member.offset
        rank = values // d
        if step.ids is None:
            rank -= step.first
        else:
            rank = torch.searchsorted(to_device_async(step.ids, self.device), rank)
        return rank.mul_(d).add_(values.remainder_(d))

    def _workspace(self, workspace: list[torch.Tensor], rows: int, d: int) -> torch.Tensor:
        """A float32 ``[rows, d]`` scratch tensor, reused across batches."""
        if not workspace or workspace[0].numel() < rows * d:
            workspace[:] = [torch.empty(rows * d, dtype=torch.float32, device=self.device)]
        return workspace[0][: rows * d].view(rows, d)

    def _kernel_job(self, piece: Piece, step: BatchStep, state: _Output, d: int) -> MemberJob:
        """The kernel's ``MemberJob`` for a piece of a contiguous target: the batch's rows
        that cover it, and where its first row lands in the target's storage."""
        target = piece.target
        member = target.member
        start = member.offset + target.box.first_element  # segment value of output 0
        m0 = (start + piece.lo) // d
        m1 = -(-(start + piece.hi) // d)
        theta0 = self.backend.kernel_theta0(member.theta0, member.shape, state.base)
        return self.backend.member_job(state.tensor, m0 - step.first, m1 - step.first,
                                       m0 * d - start, theta0, target.box.first_element)

    def _product(self, target: MemberTarget, fused: FusedGenerator) -> Precision:
        """The kernel's output-layer product for ``target`` (the backend's choice)."""
        return self.backend.product(to_torch(target.member.dtype), target.dtype,
                                    fused.weights.spec.seed is not None)

    def _kernel_gather(self, piece: Piece, step: BatchStep, fused: FusedGenerator,
                       left: torch.Tensor, state: _Output, d: int) -> None:
        """A box that is not one range: the kernel writes the batch's whole chunk rows (cast to
        the output dtype, theta0 keyed by each row's own elements, or a dense theta0 laid out
        like the rows) and the piece is gathered from them, so its values are the whole
        tensor's bit for bit."""
        target = piece.target
        member = target.member
        ids = (step.ids if step.ids is not None
               else torch.arange(step.first, step.stop, dtype=torch.int64))
        first_elements = ids * d - member.offset  # the member element of each row's first value
        rows = torch.empty(step.chunks * d, dtype=target.dtype, device=self.device)
        row_elements: torch.Tensor | None = None  # keys Philox draws; a dense base is laid out
        if is_stored(member.theta0):
            theta0 = self.backend.kernel_theta0(member.theta0, member.shape, self._dense_rows(
                member.theta0, member, first_elements, d, f"{target.name}.theta0"))
        else:
            theta0 = self.backend.kernel_theta0(member.theta0, member.shape, None)
            row_elements = first_elements
        precision = self._product(target, fused)
        self.backend.regenerate_rows(
            left[: step.chunks], fused.stacked, fused.weights.out_bias is not None, rows,
            theta0, precision, row_elements,
            fused.split if precision is Precision.BF16X3 else None)
        state.tensor[piece.lo : piece.hi] = rows[self._positions(piece, step, d)]

    def _dense_rows(self, entry: BlobTheta0 | ExternalTheta0, member: MemberEntry,
                    row_elements: torch.Tensor, d: int, label: str) -> torch.Tensor:
        """A dense theta0 (``entry``, of ``member``) laid out like a batch's chunk rows (zero
        outside the member), in its stored dtype on the device: the kernel reads it as it
        reads a staged base."""
        elements = (row_elements[:, None] + torch.arange(d)[None, :]).reshape(-1)
        inside = (elements >= 0) & (elements < member.numel)
        first = int(elements[inside].min())
        stop = int(elements[inside].max()) + 1
        stored = self.context.theta0.dense(entry, member.shape, first, stop, label)
        rows = torch.zeros(elements.numel(), dtype=stored.dtype)
        rows[inside] = stored[elements[inside] - first]
        return to_device_async(rows, self.device)

    def _merge(self, step: MergeStep, engine: CopyEngine, outputs: dict[int, _Output]) -> None:
        """``theta0 + scale * (B @ A)`` of a lora box (§6.3), in place into its storage where
        the staged base already lies: ``fused.lora_merge`` (row blocks, each element's
        arithmetic the same in any box) or, with the kernels, the same arithmetic in one
        launch (``triton_kernels.lora_merge``)."""
        t, target = step.tensor, step.target
        a_state, b_state = outputs.pop(id(step.a)), outputs.pop(id(step.b))
        state = outputs[id(target)]
        engine.wait_compute(state.base_marker)
        state.base_marker = None
        rows, cols = target.box.lengths
        out = state.tensor.view(rows, cols)
        base: torch.Tensor | None
        if state.base is not None:
            base = state.base.view(rows, -1)
            if not target.box.contiguous:  # the whole rows the box spans
                base = base[:, target.box.starts[1] : target.box.stops[1]]
        else:  # zeros or drawn
            base = self._theta0(t.theta0, t.shape, target, 0, target.numel, None)
            base = base.view(rows, cols) if base is not None else None
        b = b_state.tensor.view(step.b.box.lengths)
        a = a_state.tensor.view(step.a.box.lengths)
        self.backend.lora_merge(out, b, a, float(t.scale or 0.0), base)
        state.base = None


