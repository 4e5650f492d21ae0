"""The pipelined loader: inputs staged while the previous step regenerates, outputs written once.

A load is a list of steps in file order: one per dense tensor, one per batch of a segment's
chunks, one per lora tensor. Each step has a *stage* (bytes from the memory map through the
pinned staging ring onto the device, on the copy stream) and a *compute* (regeneration on the
compute stream, straight into the final tensor storage). Step ``i + 1`` is staged before step
``i`` is computed, so copies overlap regeneration, and a tensor is handed out as soon as the
batch that completes it has been queued (stream order makes it safe to use on the caller's
stream).

Memory: device = the final tensors + a workspace of ``max(64 MiB, 2 % of the outputs)`` that
sizes the batches (plus, for a dense theta0 whose dtype differs from its tensor's, that base on
the device while its tensor is regenerated); host = the staging ring + the largest decoded
(zstd) blob. theta0 drawn from the PRNG never leaves the GPU's registers on the fused path;
a dense theta0 of the tensor's own dtype is streamed into the tensor's storage and updated in
place.

Where Triton is missing, on the CPU, or for what the kernel does not take (float64 outputs),
the same steps run the eager torch path: the output layer's product into the workspace, then
theta0 added and cast while copying into the tensor.

Work for a CUDA device runs with that device current (``torch.cuda.device``), so Triton
launches on it and on its current stream even when another device is the caller's current
one; the device is switched per step, never while the caller holds a yielded tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .. import constants as C
from ..dtypes import to_torch
from ..errors import (
    DeviceMemoryError,
    ExternalReferenceDamaged,
    ExternalReferenceError,
    FormatError,
    MCNCError,
)
from ..generator import GeneratorSpec, GeneratorWeights, ieee_fp32
from ..header import TensorEntry
from ..reader import MCNCFile
from ..regenerate import FusedGenerator
from .plan import Member, SegmentWork, Step, largest_upload, plan_steps, release
from .safetensors_source import SafetensorsFile
from .staging import CopyEngine, CudaCopyEngine, StagingRing, SyncCopyEngine

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "MIN_WORKSPACE_BYTES",
    "LoadOptions",
    "PipelinedLoader",
    "Progress",
    "triton_available",
]

DEFAULT_STAGING_BYTES = 64 << 20
MIN_WORKSPACE_BYTES = 64 << 20
WORKSPACE_FRACTION = 0.02
DENSE_THETA0 = (C.Theta0Kind.BLOB, C.Theta0Kind.EXTERNAL)

#: A tensor ready on the device, with the sha256 check of its external base (R75) that must
#: pass before it is handed out.
Ready = tuple[str, torch.Tensor, Future[None] | None]


def triton_available() -> bool:
    """Whether the optional ``mcnc-format[gpu]`` extra (Triton) is importable."""
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Progress:
    """Reported after each tensor is handed out."""

    name: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class LoadOptions:
    """Knobs of the pipelined loader; the defaults suit a GPU with a few GB to spare.

    ``staging_bytes``: pinned host memory for the two staging buffers together.
    ``workspace_bytes``: device memory beyond the outputs (default ``max(64 MiB, 2 %)``).
    ``use_triton``: ``None`` picks the fused kernel on CUDA when Triton is installed; ``True``
    forces it (on the CPU only under ``TRITON_INTERPRET=1``); ``False`` keeps the eager path.
    ``precision``: the kernel's output-layer product: ``"ieee"`` (float32 FMA, fastest on an
    H200), ``"tf32x3"`` or ``"split"`` (TF32 tensor-core products carrying float32 precision).
    ``progress``: called with a ``Progress`` after each tensor.
    """

    staging_bytes: int = DEFAULT_STAGING_BYTES
    workspace_bytes: int | None = None
    use_triton: bool | None = None
    precision: str = "ieee"
    progress: Callable[[Progress], None] | None = None


class PipelinedLoader:
    """Iterate to get ``(name, tensor)`` pairs as they are ready on ``device``."""

    def __init__(self, file: MCNCFile, device: torch.device | str,
                 dtype: torch.dtype | None = None, names: Iterable[str] | None = None,
                 options: LoadOptions | None = None) -> None:
        self.file = file
        self.header = file.header
        self.source = file.source
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.options = options or LoadOptions()
        wanted = file.keys() if names is None else list(dict.fromkeys(names))  # as the reader
        self.wanted = [file.entry(n) for n in wanted]
        for t in self.wanted:
            file._check_supported(t)  # R46: the reader's own error
        self.total_bytes = sum(t.numel * self._out_dtype(t).itemsize for t in self.wanted)
        self.workspace_bytes = self.options.workspace_bytes or max(
            MIN_WORKSPACE_BYTES, int(self.total_bytes * WORKSPACE_FRACTION))
        self.kernels = self._kernels()
        self._generators: dict[tuple[int, int], FusedGenerator] = {}
        self._externals: dict[str, SafetensorsFile] = {}
        self.allocated_bytes = 0

    # -- set-up ----------------------------------------------------------------------------
    def _kernels(self) -> ModuleType | None:
        use = self.options.use_triton
        if use is None:
            use = self.device.type == "cuda" and triton_available()
        if not use:
            return None
        if not triton_available():
            raise MCNCError("the fused kernel needs Triton: pip install 'mcnc-format[gpu]', or "
                            "pass use_triton=False for the eager path")
        from . import triton_kernels

        return triton_kernels

    def _engine(self) -> CopyEngine:
        if self.device.type == "cuda":
            return CudaCopyEngine(self.device)
        return SyncCopyEngine(self.device)

    def _out_dtype(self, t: TensorEntry) -> torch.dtype:
        out = to_torch(t.dtype)
        return self.dtype if self.dtype is not None and out.is_floating_point else out

    def _on_device(self) -> contextlib.AbstractContextManager[object]:
        """Make the target CUDA device current for one step's work (never across a yield)."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    # -- planning --------------------------------------------------------------------------
    def plan(self) -> list[Step]:
        """The steps of this load in file order (segments at their first member)."""
        return plan_steps(self.header, self.wanted, self._out_dtype, self.workspace_bytes,
                          eager=lambda member: not self._kernel_takes(member))

    # -- running ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._check_fits()
        steps = self.plan()
        engine = self._engine()
        slot = max(1, min(self.options.staging_bytes // 2, largest_upload(self.header, steps)))
        ring = StagingRing(engine, slot, 2)
        pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))  # sha256
        done = 0
        done_bytes = 0
        staged: object = None
        current: object = None
        ready: list[Ready] = []
        try:
            with self._on_device():
                staged = self._stage(steps[0], engine, ring, pool) if steps else None
            for i, step in enumerate(steps):
                current = staged
                with self._on_device():
                    if i + 1 < len(steps):
                        staged = self._stage(steps[i + 1], engine, ring, pool)
                    ready = self._compute(step, current, engine)
                current = None
                while ready:
                    name, tensor, check = ready.pop(0)
                    if check is not None:
                        check.result()  # raises ExternalReferenceError on a sha256 mismatch
                    done += 1
                    done_bytes += tensor.numel() * tensor.element_size()
                    if self.options.progress is not None:
                        self.options.progress(Progress(name, done, len(self.wanted),
                                                       done_bytes, self.total_bytes))
                    yield name, tensor
                    del tensor
        except torch.OutOfMemoryError as exc:
            staged = current = ready = None  # type: ignore[assignment]
            release(steps)
            raise self._oom() from exc
        finally:
            ring.drain()
            pool.shutdown(wait=True, cancel_futures=True)
            for ext in self._externals.values():
                ext.close()
            self._externals.clear()

    def _check_fits(self) -> None:
        """Refuse up front a load that cannot fit the device's free memory (counting what
        torch's allocator holds in reserve), before anything is read or allocated."""
        if self.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
            self.device)
        if self.total_bytes + self.workspace_bytes > free:
            raise self._oom()

    def _oom(self) -> DeviceMemoryError:
        free = total = None
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        where = f"{free} of {total} bytes free" if free is not None else "device memory exhausted"
        return DeviceMemoryError(
            f"{self.source}: out of memory on {self.device} after allocating "
            f"{self.allocated_bytes} bytes: the load needs {self.total_bytes} bytes of weights "
            f"plus a workspace of up to {self.workspace_bytes} bytes ({where}). Load fewer "
            "tensors (names=), a narrower dtype, or a smaller workspace_bytes."
        )

    def _alloc(self, engine: CopyEngine, numel: int, dtype: torch.dtype, output: bool = True
               ) -> torch.Tensor:
        """An output tensor (``output``), or a staging buffer the loader frees itself."""
        tensor = (engine.output_empty if output else engine.device_empty)((numel,), dtype)
        self.allocated_bytes += numel * tensor.element_size()
        return tensor

    def _stage(self, step: Step, engine: CopyEngine, ring: StagingRing,
               pool: ThreadPoolExecutor) -> object:
        if step.kind == "dense":
            return self._stage_dense(step, engine, ring)
        if step.kind == "batch":
            return self._stage_batch(step, engine, ring, pool)
        return None

    def _compute(self, step: Step, staged: object, engine: CopyEngine) -> list[Ready]:
        """Queue a step's device work; the tensors it completes, in hand-out order."""
        if step.kind == "dense":
            return [(*self._finish_dense(step, staged, engine), None)]
        if step.kind == "batch":
            return self._compute_batch(step, staged, engine)
        assert step.tensor is not None
        # Adapters are small: their factors and the merge (IEEE float32) go through the reader.
        return [(name, tensor, None) for name, tensor in
                self.file.iter_tensors([step.tensor.name], self.device, self.dtype)]

    # -- dense tensors ---------------------------------------------------------------------
    def _stage_dense(self, step: Step, engine: CopyEngine, ring: StagingRing
                     ) -> tuple[torch.Tensor, object]:
        t = step.tensor
        assert t is not None and t.blob is not None
        data = (self.file.packed_bytes(t) if t.encoding == C.Encoding.PACKED
                else self.file.blob_bytes(t.blob, f"tensors[{t.name!r}].blob"))
        dest = self._alloc(engine, t.numel, to_torch(t.dtype))
        marker = ring.upload(data, dest.view(torch.uint8)) if t.numel else None
        return dest, marker

    def _finish_dense(self, step: Step, staged: object, engine: CopyEngine
                      ) -> tuple[str, torch.Tensor]:
        t = step.tensor
        assert t is not None and isinstance(staged, tuple)
        dest, marker = staged
        engine.wait_compute(marker)
        if t.dtype == "bool" and bool((dest.view(torch.uint8) > 1).any()):
            raise FormatError(f"{self.source}: tensors[{t.name!r}].blob: bool bytes must be 0 "
                            "or 1 (§1)")
        out_dtype = self._out_dtype(t)
        value = dest.view(t.shape)
        return t.name, value if value.dtype == out_dtype else value.to(out_dtype)

    # -- segments --------------------------------------------------------------------------
    def _segment_inputs(self, seg: SegmentWork) -> None:
        """Checksum-checked (and decoded) alpha and beta bytes, once per segment."""
        entry = self.header.segments[seg.index]
        if seg.alpha is None:
            seg.alpha = self.file.blob_bytes(entry.alpha, f"segments[{seg.index}].alpha")
            seg.beta = self.file.blob_bytes(entry.beta, f"segments[{seg.index}].beta")
        if seg.fused is None:
            key = (entry.generator, entry.m)
            if key not in self._generators:
                spec = self.file.generator_spec(entry.generator)
                self._generators[key] = FusedGenerator(self._generator_weights(spec), entry.m)
            seg.fused = self._generators[key]

    def _stage_batch(self, step: Step, engine: CopyEngine, ring: StagingRing,
                     pool: ThreadPoolExecutor) -> tuple[torch.Tensor, torch.Tensor, object]:
        seg = step.segment
        assert seg is not None
        self._segment_inputs(seg)
        entry = self.header.segments[seg.index]
        d = self.header.generators[entry.generator].d
        inputs = []
        marker: object = None
        for blob_index, data in ((entry.alpha, seg.alpha), (entry.beta, seg.beta)):
            blob = self.header.blobs[blob_index]
            assert data is not None
            row = blob.decoded_length // max(entry.chunks, 1)
            window = memoryview(data)[step.c0 * row : step.c1 * row]
            buf = engine.device_empty((step.c1 - step.c0, *blob.shape[1:]),
                                      to_torch(blob.dtype))
            if len(window):
                marker = ring.upload(window, buf.view(torch.uint8).reshape(-1))
            inputs.append(buf)
        lo = step.c0 * d
        for member in seg.members:
            if member.dest is None and member.overlaps(lo, step.c1 * d):
                member.dest = self._alloc(engine, member.entry.numel, member.dtype)
                self._stage_base(member, engine, ring, pool)
        return inputs[0], inputs[1], marker

    def _stage_base(self, member: Member, engine: CopyEngine, ring: StagingRing,
                    pool: ThreadPoolExecutor) -> None:
        """Stream a blob or external theta0 onto the device: into the tensor's own storage
        when the dtypes agree (updated in place), else into a buffer of its own dtype."""
        entry = member.entry.theta0
        if entry.kind not in (C.Theta0Kind.BLOB, C.Theta0Kind.EXTERNAL) or member.entry.numel == 0:
            return
        label = f"{member.name}.theta0"
        if entry.kind == C.Theta0Kind.BLOB:
            assert entry.blob is not None
            blob = self.header.blobs[entry.blob]
            data: memoryview | bytes = self.file.blob_bytes(entry.blob, label)
            dtype = to_torch(blob.dtype)
        else:
            data, dtype = self._external_base(member, pool)
        assert member.dest is not None
        base = member.dest if dtype == member.dtype else self._alloc(
            engine, member.entry.numel, dtype, output=False)
        member.base = base
        member.base_marker = ring.upload(data, base.view(torch.uint8))

    def _external_base(self, member: Member, pool: ThreadPoolExecutor
                       ) -> tuple[memoryview, torch.dtype]:
        """The referenced tensor's bytes, shape-checked; the sha256 check (R75) runs on a
        worker while the bytes are copied and is awaited before the tensor is handed out."""
        entry = member.entry.theta0
        assert entry.uri is not None and entry.tensor is not None and entry.sha256 is not None
        label = f"{self.source}: theta0 reference {entry.uri}:{entry.tensor}"
        if entry.uri.startswith("hf://") or self.source.startswith("hf://"):
            from ..hub import read_reference

            # The Hub path re-downloads a damaged copy, so it needs the check's verdict now.
            # The fresh copy lands at the same path: the file is opened again on every call,
            # or a map kept from the damaged copy would still show its bytes.
            def read(path: Path) -> memoryview:
                self._close_external(entry.uri)
                view = self._external_slice(entry.uri, path, entry.tensor, member)
                _check_sha256(view, entry.sha256, label)
                return view

            view = read_reference(entry.uri, self.source, read)
        else:
            view = self._external_slice(entry.uri, self.file.path.parent / entry.uri,
                                        entry.tensor, member)
            member.base_check = pool.submit(_check_sha256, view, entry.sha256, label)
        dtype = self._externals[entry.uri].tensor(entry.tensor).dtype
        return view, dtype

    def _close_external(self, uri: str) -> None:
        external = self._externals.pop(uri, None)
        if external is not None:
            external.close()

    def _external_slice(self, uri: str, path: Path, tensor: str, member: Member
                        ) -> memoryview:
        if uri not in self._externals or self._externals[uri].path != path:
            self._externals[uri] = SafetensorsFile(path, f"{self.source}: theta0 reference "
                                                         f"{uri}")
        source = self._externals[uri].tensor(tensor)
        if source.shape != member.entry.shape:
            raise ExternalReferenceError(
                f"theta0 reference {uri}:{tensor} has shape {list(source.shape)}, the tensor "
                f"needs {list(member.entry.shape)}", rule="R75", path=self.source)
        return source.view

    def _compute_batch(self, step: Step, staged: object, engine: CopyEngine) -> list[Ready]:
        seg = step.segment
        assert seg is not None and seg.fused is not None and isinstance(staged, tuple)
        alpha, beta, marker = staged
        engine.wait_compute(marker)
        d = seg.fused.weights.spec.d
        lo, hi = step.c0 * d, step.c1 * d
        members = [m for m in seg.members if m.overlaps(lo, hi)]
        for member in members:
            if member.base_marker is not None:
                engine.wait_compute(member.base_marker)
                member.base_marker = None
        if members:
            left = seg.fused.coefficients(alpha, beta)
            eager = [m for m in members if not self._kernel_takes(m)]
            values = None
            if eager:  # the plan sized this segment's batches for these float32 rows
                with ieee_fp32(left.device):
                    values = torch.mm(left, seg.fused.stacked).reshape(-1)
            for member in members:
                if member in eager:
                    assert values is not None
                    self._eager_member(member, values, lo, hi)
                else:
                    self._kernel_member(member, seg.fused, left, step.c0, step.c1, d)
        ready = []
        for member in seg.members:
            if not member.done and member.stop <= hi:
                if member.dest is None:  # an empty member: no chunk covers it
                    member.dest = self._alloc(engine, 0, member.dtype)
                ready.append(self._finish_member(member))
        if step.c1 * d >= max(m.stop for m in seg.members):
            seg.alpha = seg.beta = None  # the segment is done: drop decoded inputs
        return ready

    def _kernel_takes(self, member: Member) -> bool:
        """Whether the fused kernel regenerates ``member``: an output dtype it stores and a
        theta0 it evaluates (a dense one of any dtype, read as a staged base). Known before
        anything is staged, so the plan can size batches by it."""
        kernels = self.kernels
        if kernels is None or member.dtype not in kernels.KERNEL_DTYPES:
            return False
        theta0 = member.entry.theta0
        return theta0.kind in DENSE_THETA0 or kernels.kernel_theta0(
            theta0, member.entry.shape, None) is not None

    def _kernel_member(self, member: Member, fused: FusedGenerator, left: torch.Tensor,
                       c0: int, c1: int, d: int) -> None:
        kernels = self.kernels
        assert kernels is not None and member.dest is not None
        m0 = max(c0, member.start // d)
        m1 = min(c1, -(-member.stop // d))
        kernels.fused_regenerate(
            left[m0 - c0 : m1 - c0], fused.stacked, fused.weights.out_bias is not None,
            member.dest, m0 * d - member.start, self._kernel_theta0(member),
            self.options.precision)

    def _kernel_theta0(self, member: Member):  # -> triton_kernels.KernelTheta0
        assert self.kernels is not None
        theta0 = self.kernels.kernel_theta0(member.entry.theta0, member.entry.shape,
                                            member.base)
        assert theta0 is not None, "_kernel_takes admits only theta0 the kernel evaluates"
        return theta0

    def _generator_weights(self, spec: GeneratorSpec) -> GeneratorWeights:
        """Philox generators are drawn by a Triton kernel when the kernel path is in use (a
        few launches instead of hundreds; the same exact bits, §5.2)."""
        if self.kernels is None or spec.seed is None:
            return spec.weights(self.device)
        return self.kernels.draw_generator_weights(spec, self.device)

    def _eager_member(self, member: Member, values: torch.Tensor, lo: int, hi: int) -> None:
        assert member.dest is not None
        start, stop = max(lo, member.start), min(hi, member.stop)
        local = start - member.start
        piece = values[start - lo : stop - lo]
        if member.base is not None:
            piece = piece + member.base[local : local + stop - start]
        else:  # zeros, Philox, or a kind this reader does not know: the reader's own error
            base = self.file._theta0.values(member.entry.theta0, member.entry.shape, local,
                                            stop - start, self.device, f"{member.name}.theta0")
            if base is not None:
                piece = piece + base
        member.dest[local : local + stop - start].copy_(piece)

    def _finish_member(self, member: Member) -> Ready:
        assert member.dest is not None
        value = member.dest.view(member.entry.shape)
        member.dest = member.base = None
        member.done = True
        return member.name, value, member.base_check


def _check_sha256(view: memoryview, expected: str, label: str) -> None:
    """R75: the referenced tensor's bytes hash to the pinned sha256 (runs on a worker)."""
    digest = hashlib.sha256(view).hexdigest()
    if digest != expected:
        raise ExternalReferenceDamaged(
            f"{label} has sha256 {digest}, the file pins {expected}: the base checkpoint "
            "differs from the one this file was made against", rule="R75")


