"""Host-to-device uploads through a bounded ring of staging buffers.

The ring logic (split a source into pieces, rotate through ``slots`` buffers, never refill a
buffer before the copy out of it, and any host work reading it, has finished) is written
against ``CopyEngine``, so the same code drives CUDA (pinned buffers, a copy stream, events)
and a synchronous CPU engine that the tests exercise. Host memory for staging is
``slots * slot_bytes`` whatever is uploaded.

``StagingRing.stream`` fills a destination from a reader (``pread`` of a base checkpoint)
rather than from bytes in memory: each piece is read straight into a slot, handed to an
observer (the SHA-256 of the base, updated on a worker thread) and copied on, so the bytes
are read once and never held beyond the ring. Where the device's memory is host memory (the
CPU engine) the pieces are read straight into the destination and no slot is used.

Why pinned staging and not ``tensor.to("cuda")`` from the memory map: a copy from pageable
memory is synchronous and goes through the driver's own small bounce buffer (a few GB/s),
while a copy from pinned memory is an asynchronous DMA at the link's speed that overlaps with
the next piece's host-side fill and with regeneration on the compute stream.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import torch

__all__ = ["CopyEngine", "CudaCopyEngine", "StagingRing", "SyncCopyEngine", "to_device_async"]


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (an index or a table) on ``device``, queued on the current stream
    without a host synchronisation: copied through pinned memory, which torch keeps until the
    copy is done. (``.to("cuda")`` from pageable memory waits for the stream.)"""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class CopyEngine(Protocol):
    """What the ring needs from a device: staging buffers, an ordered copy queue, markers."""

    device: torch.device
    #: Whether the device's memory is host memory the reader can write into: bytes are then
    #: read straight into their destination, not through the ring.
    in_place: bool

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer that the engine can copy from asynchronously."""

    def device_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A staging tensor (freed by the loader) that copies may write while the compute
        stream is busy."""

    def output_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor handed to the caller, which copies may also write: it belongs to the
        compute stream's pool, so the caller's stream can reuse its memory once it is freed."""

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> object:
        """Queue ``dst.copy_(src)`` (uint8, same size); return a marker of its completion."""

    def wait_host(self, marker: object) -> None:
        """Block the host until the copy behind ``marker`` is done (its source is free)."""

    def wait_compute(self, marker: object) -> None:
        """Order later work on the compute stream after the copy behind ``marker``."""


class SyncCopyEngine:
    """Copies at once on the calling thread: the CPU (and test) implementation.

    Its markers are ``None`` or host work still reading a destination the bytes were read
    into (a ``Future``: the hash of a base), which compute must not overwrite before it ends.
    Bytes are read in place on the CPU; ``in_place=False`` makes it stream through the ring
    like a device (what the tests use to rotate many slots on the CPU)."""

    def __init__(self, device: torch.device | str = "cpu", in_place: bool | None = None
                 ) -> None:
        self.device = torch.device(device)
        self.in_place = self.device.type == "cpu" if in_place is None else in_place

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def output_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.device_empty(shape, dtype)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> object:
        dst.copy_(src)
        return None

    def wait_host(self, marker: object) -> None:
        return None

    def wait_compute(self, marker: object) -> None:
        if isinstance(marker, Future):
            marker.result()


class CudaCopyEngine:
    """Pinned host buffers and a dedicated copy stream; events order the two streams.

    The compute stream is the caller's current stream, so tensors handed out are ordered for
    the caller's own work once ``wait_compute`` has been called for their last copy.
    """

    in_place = False

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def device_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # Allocated from the copy stream's pool: a block the compute stream freed may still be
        # read by queued kernels, so copies never write into one. ``record_stream`` keeps the
        # block from returning to the copy stream while compute work that uses it is pending.
        with torch.cuda.stream(self.stream):
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        tensor.record_stream(torch.cuda.current_stream(self.device))
        return tensor

    def output_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # From the compute (caller's) stream's pool: outputs allocated on the copy stream
        # would go back to that stream's pool when the caller frees them, out of the caller's
        # reach. The block may have been freed by compute work that is still queued, so the
        # copy stream first waits for the compute stream's queued work; ``record_stream``
        # keeps the block from being reused while a copy into it is pending.
        compute = torch.cuda.current_stream(self.device)
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self.stream.wait_stream(compute)
        tensor.record_stream(self.stream)
        return tensor

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> object:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return event

    def wait_host(self, marker: object) -> None:
        if marker is not None:
            marker.synchronize()  # type: ignore[attr-defined]

    def wait_compute(self, marker: object) -> None:
        if marker is not None:
            torch.cuda.current_stream(self.device).wait_event(marker)  # type: ignore[arg-type]


#: Reads ``len(view)`` bytes of a source, from the given offset in it, into ``view``.
Reader = Callable[[int, memoryview], object]
#: Sees each piece after it is read; returns the host work still reading it, if any.
Observer = Callable[[memoryview], "Future[None] | None"]


class StagingRing:
    """Uploads host bytes to device tensors through ``slots`` staging buffers in turn.

    ``upload`` copies bytes already in memory; ``stream`` reads them into the slots (or, on an
    ``in_place`` engine, into the destination). Both return the marker of the last copy; pass
    it to ``engine.wait_compute`` before the destination is read on the compute stream.
    """

    def __init__(self, engine: CopyEngine, slot_bytes: int, slots: int = 2) -> None:
        if slot_bytes <= 0 or slots < 2:
            raise ValueError("a staging ring needs at least two slots of at least one byte")
        self.engine = engine
        self.slot_bytes = slot_bytes
        self.slots = slots
        self._buffers: list[torch.Tensor | None] = [None] * slots
        # Per slot: the copy out of it and the host work reading it, both to end before reuse.
        self._pending: list[tuple[object, Future[None] | None]] = [(None, None)] * slots
        self._next = 0
        self.bytes_uploaded = 0

    @property
    def host_bytes(self) -> int:
        """Host memory the ring holds now (buffers are allocated on first use)."""
        return sum(b.numel() for b in self._buffers if b is not None)

    def upload(self, src: memoryview | bytes, dst: torch.Tensor,
               observe: Observer | None = None) -> object:
        """Copy ``src`` (bytes) into ``dst`` (a contiguous uint8 device tensor of equal size);
        ``observe`` sees every piece on its way."""
        view = memoryview(src).cast("B")
        if dst.numel() != len(view):
            raise ValueError(f"upload of {len(view)} bytes into a {dst.numel()}-byte tensor")
        with warnings.catch_warnings():
            # Read-only sources (decoded zstd bytes) are only read here.
            warnings.simplefilter("ignore", UserWarning)
            source = torch.frombuffer(view, dtype=torch.uint8) if len(view) else None

        def copy(start: int, piece: memoryview) -> None:
            assert source is not None
            torch.frombuffer(piece, dtype=torch.uint8).copy_(source[start : start + len(piece)])

        return self.stream(len(view), dst, copy, observe)

    def stream(self, nbytes: int, dst: torch.Tensor, read: Reader,
               observe: Observer | None = None) -> object:
        """Fill ``dst`` (a contiguous uint8 device tensor of ``nbytes``) with the bytes
        ``read`` writes, a slot at a time; ``observe`` sees each piece in order. On an
        ``in_place`` engine the pieces are read into ``dst`` itself, and the marker returned
        is the observer's last work (compute waits for it before overwriting ``dst``)."""
        if dst.numel() != nbytes:
            raise ValueError(f"stream of {nbytes} bytes into a {dst.numel()}-byte tensor")
        if self.engine.in_place:
            return self._stream_in_place(nbytes, dst, read, observe)
        marker: object = None
        for start in range(0, nbytes, self.slot_bytes):
            size = min(self.slot_bytes, nbytes - start)
            slot = self._slot()
            buffer = self._buffers[slot]
            assert buffer is not None
            staged = buffer[:size]
            piece = staged.numpy().data
            read(start, piece)
            work = observe(piece) if observe is not None else None
            marker = self.engine.copy(staged, dst[start : start + size])
            self._pending[slot] = (marker, work)
            self.bytes_uploaded += size
        return marker

    def _stream_in_place(self, nbytes: int, dst: torch.Tensor, read: Reader,
                         observe: Observer | None) -> object:
        view = dst.numpy().data if nbytes else memoryview(b"")
        work: Future[None] | None = None
        for start in range(0, nbytes, self.slot_bytes):
            piece = view[start : start + self.slot_bytes]
            read(start, piece)
            if observe is not None:
                work = observe(piece)
        return work

    def _slot(self) -> int:
        """The next slot, once the copy out of it and the host work reading it are done."""
        slot = self._next
        self._next = (slot + 1) % self.slots
        self._wait(slot)
        if self._buffers[slot] is None:
            self._buffers[slot] = self.engine.host_buffer(self.slot_bytes)
        return slot

    def _wait(self, slot: int) -> None:
        marker, work = self._pending[slot]
        self.engine.wait_host(marker)
        if work is not None:
            work.result()
        self._pending[slot] = (None, None)

    def drain(self) -> None:
        """Wait for every queued copy and the host work reading a slot (before the ring's
        buffers are released). A failed piece of host work has been reported by then."""
        for slot in range(self.slots):
            marker, work = self._pending[slot]
            self.engine.wait_host(marker)
            if work is not None:
                work.exception()  # its failure is the load's to report, not the cleanup's
            self._pending[slot] = (None, None)
