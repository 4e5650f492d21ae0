"""theta0 of a tensor's elements (SPEC.md §7), for element ranges or scattered elements.

PRNG values are drawn at the elements' own indices (§8), so a box costs its own elements'
draws. Stored theta0 (a blob, §7.3) and external base tensors (§7.4) are read by byte range:
only the bytes a box covers, once their checksum or pin has been checked, piece by piece into
the buffers that need them (``dense_read``: a staging slot, or the output itself on the CPU).
An external base is opened once per file; its SHA-256 (R75) is checked as ``verify`` says,
from the bytes as they are read when a load reads the whole tensor (``engine/sha256.py``),
else by reading it on a worker thread, and awaited before any tensor built on it is handed
out.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard, TypeVar

import torch

from .. import philox
from ..dtypes import to_torch
from ..errors import (
    ExternalReferenceDamaged,
    ExternalReferenceError,
    UnsupportedFeatureError,
    UsageError,
)
from ..header import (
    BlobTheta0,
    ExternalTheta0,
    FanInUniformTheta0,
    NormalTheta0,
    PRNGTheta0,
    Theta0Entry,
    UniformTheta0,
    ZerosTheta0,
)
from .digests import DigestCache
from .options import Verify
from .resolve import HUB_SCHEME, Resolver
from .safetensors_source import SafetensorsFile, StoredTensor
from .sha256 import StreamHash
from .source import BlobStore

if TYPE_CHECKING:
    from .backend import DrawUniform

T = TypeVar("T")

__all__ = [
    "BEHAVIOURS",
    "THETA0_DENSE",
    "THETA0_NORMAL",
    "THETA0_UNIFORM",
    "THETA0_ZEROS",
    "DenseRead",
    "KernelTheta0",
    "Theta0Behaviour",
    "Theta0Source",
    "behaviour",
    "fan_in_bound",
    "is_stored",
    "prng_values",
    "prng_values_at",
]

#: The kernel's theta0 evaluations (``KernelTheta0.kind``, a ``tl.constexpr`` in the kernel).
THETA0_ZEROS = 0
THETA0_UNIFORM = 1
THETA0_NORMAL = 2
THETA0_DENSE = 3


@dataclass(frozen=True)
class KernelTheta0:
    """theta0 as the fused kernel evaluates it: a Philox scheme by its key and constants, or
    a dense tensor (flat, any float dtype, indexed by the member's element index; read as
    float32, as the reader reads a dense theta0)."""

    kind: int = THETA0_ZEROS
    seed: int = 0
    stream: int = 0
    bound: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    base: torch.Tensor | None = None

    @property
    def key(self) -> int:
        """``tl.randint4x``'s 64-bit key: ``seed | stream << 32`` (§8.1)."""
        return self.seed | (self.stream << 32)

    @classmethod
    def dense(cls, base: torch.Tensor) -> KernelTheta0:
        """A dense theta0 already on the device, indexed like the member."""
        return cls(THETA0_DENSE, base=base)


def fan_in_bound(shape: tuple[int, ...]) -> float:
    """``1 / sqrt(fan_in)`` as float32, ``fan_in = prod(shape[1:])``: PyTorch's default bound
    for Linear and Conv weights (``kaiming_uniform_(a=sqrt(5))``) and their biases."""
    return philox.round_to_f32(1.0 / math.sqrt(math.prod(shape[1:])))


class _Reference:
    """An opened external base tensor and the verdict of its SHA-256 pin: ``check`` is the
    pending or finished check once one is arranged (``None`` before, and when not needed)."""

    def __init__(self, file: SafetensorsFile, entry: StoredTensor, pinned: str) -> None:
        self.file = file
        self.entry = entry
        self.pinned = pinned
        self.arranged = False
        self.check: Future[None] | None = None


@dataclass(frozen=True)
class DenseRead:
    """The stored bytes of an element range of a blob or external theta0, to be read piece by
    piece: ``read(offset, view)`` writes the range's bytes from ``offset`` into ``view``.
    ``hash``, when set, must be fed every piece in order (the base's pin is checked from
    these bytes); call ``abort`` if the read stops short."""

    dtype: torch.dtype
    nbytes: int
    read: Callable[[int, memoryview], object]
    hash: StreamHash | None = None

    def abort(self) -> None:
        if self.hash is not None:
            self.hash.abort()


#: Every open file's theta0 source, for the fork handler below.
_SOURCES: weakref.WeakSet[Theta0Source] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: each source forgets its workers and
    the checks they were running (``Theta0Source._forked``)."""
    for source in list(_SOURCES):
        source._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Workers(Executor):
    """The SHA-256 threads of one open file, started on first use. One thread per base tensor
    being hashed: SHA-256 is sequential within a tensor. After ``shutdown`` (the file was
    closed) ``submit`` raises ``UsageError``, not the pool's ``RuntimeError``."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._closed:
                raise UsageError("the file is closed; open it again", path=self.label)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                thread_name_prefix="mcnc-sha256")
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def forked(self) -> None:
        """In a forked child: the parent's threads (and whoever held the lock) are gone."""
        self._lock = threading.Lock()
        self._pool = None


class Theta0Source:
    """Evaluates the theta0 entries of one open file. Usable in a forked child of the process
    that opened it (``multiprocessing``, DataLoader workers): the child starts workers of its
    own and checks again what the parent's workers had not finished checking."""

    def __init__(self, blobs: BlobStore, resolver: Resolver, label: str,
                 verify: Verify = Verify.CACHED, digests: DigestCache | None = None) -> None:
        self.blobs = blobs
        self.resolver = resolver
        self.label = label
        self.verify = verify
        self.digests = digests or DigestCache()
        self._references: dict[tuple[str, str], _Reference] = {}
        self._pool = _Workers(label)
        self._hashes: weakref.WeakSet[StreamHash] = weakref.WeakSet()  # fed as bytes pass
        # Guards opening a base (threads touching it first open it once) and arranging its
        # check (once per load), and ``_closed``.
        self._lock = threading.Lock()
        self._claim = threading.Lock()  # a check is arranged by one thread (``_judge``)
        self._closed = False
        _SOURCES.add(self)

    def _forked(self) -> None:
        """In a forked child: the parent's workers do not exist here, so a check they had
        pending would never finish; forget both (the next load arranges the check again)."""
        self._pool.forked()
        self._hashes = weakref.WeakSet()
        self._lock, self._claim = threading.Lock(), threading.Lock()
        for reference in self._references.values():
            if reference.check is not None and not reference.check.done():
                reference.arranged, reference.check = False, None

    # -- dense kinds ---------------------------------------------------------------------
    def dense_dtype(self, entry: BlobTheta0 | ExternalTheta0, shape: tuple[int, ...]
                    ) -> torch.dtype:
        """The stored dtype of a blob or external theta0."""
        if isinstance(entry, BlobTheta0):
            return to_torch(self.blobs.header.blobs[entry.blob].dtype)
        return self.reference(entry, shape).entry.dtype

    def dense_read(self, entry: BlobTheta0 | ExternalTheta0, shape: tuple[int, ...],
                   start: int, stop: int, label: str) -> DenseRead:
        """How to read the stored bytes of elements ``[start, stop)`` of a blob or external
        theta0 into the caller's buffers. A read of a whole external tensor hashes its bytes
        as they pass; a box of one has the tensor read again for its pin, on a worker."""
        dtype = self.dense_dtype(entry, shape)
        first, nbytes = start * dtype.itemsize, (stop - start) * dtype.itemsize
        if isinstance(entry, BlobTheta0):
            return DenseRead(dtype, nbytes, self.blobs.range_reader(
                entry.blob, first, first + nbytes, label))
        reference = self.reference(entry, shape)
        file, offset = reference.file, reference.entry.offset + first
        whole = nbytes == reference.entry.nbytes > 0
        hasher = self._stream_check(reference) if whole else None
        if not whole:
            self._arrange_check(reference)
        return DenseRead(dtype, nbytes, lambda at, view: file.read(offset + at, len(view), view),
                         hasher)

    def dense_bytes(self, entry: BlobTheta0 | ExternalTheta0, shape: tuple[int, ...],
                    start: int, stop: int, label: str) -> memoryview:
        """The stored bytes of elements ``[start, stop)`` of a blob or external theta0, read
        into memory of their own."""
        read = self.dense_read(entry, shape, start, stop, label)
        try:  # whatever fails (the allocation too) ends the streamed pin check
            data = memoryview(bytearray(read.nbytes))
            read.read(0, data)
        except BaseException:
            read.abort()
            raise
        if read.hash is not None:
            read.hash.feed(data)
        return data

    def dense(self, entry: BlobTheta0 | ExternalTheta0, shape: tuple[int, ...], start: int,
              stop: int, label: str) -> torch.Tensor:
        """Elements ``[start, stop)`` of a blob or external theta0 as a CPU tensor of their
        stored dtype."""
        data = self.dense_bytes(entry, shape, start, stop, label)
        dtype = self.dense_dtype(entry, shape)
        if stop == start:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(data) if data.readonly else data, dtype=dtype)

    def begin_load(self) -> None:
        """A load call begins: each base it reads is checked again as ``verify`` says (the
        file may have changed since the last load). ``FULL`` hashes it again; ``CACHED``
        reads its identity again, and hashes it only if that changed (or the cache has no
        record). A check still running for a concurrent load is kept."""
        if self.verify is Verify.NONE:
            return
        with self._lock:
            references = list(self._references.values())
        with self._claim:
            for reference in references:
                if reference.check is None or reference.check.done():
                    reference.arranged, reference.check = False, None

    def pending_check(self, entry: Theta0Entry) -> Future[None] | None:
        """The SHA-256 verdict of an external base (R75) the caller must await before handing
        out what it built from the base; ``None`` when there is nothing to wait for."""
        if not isinstance(entry, ExternalTheta0):
            return None
        reference = self._references.get((entry.uri, entry.tensor))
        if reference is None:
            return None
        self._arrange_check(reference)
        return reference.check

    def reference(self, entry: ExternalTheta0, shape: tuple[int, ...]) -> _Reference:
        """The external base of ``entry``, opened and shape-checked once (R75), however many
        threads ask first; after ``close()`` a ``UsageError``. A base from the Hub is checked
        at once: a damaged download is fetched again."""
        key = (entry.uri, entry.tensor)
        with self._lock:
            if self._closed:
                raise UsageError("the file is closed; open it again", path=self.label)
            if key not in self._references:
                self._references[key] = self._open_reference(entry, shape)
            return self._references[key]

    def _open_reference(self, entry: ExternalTheta0, shape: tuple[int, ...]) -> _Reference:
        label = f"{self.label}: theta0 reference {entry.uri}"
        fetched = entry.uri.startswith(HUB_SCHEME) or self.label.startswith(HUB_SCHEME)

        def read(path: Path) -> _Reference:
            file = SafetensorsFile(path, label)
            try:
                found = file.tensor(entry.tensor)
                if found.shape != shape:
                    raise ExternalReferenceError(
                        f"{label}:{entry.tensor} has shape {list(found.shape)}, the tensor needs "
                        f"{list(shape)}", rule="R75")
                reference = _Reference(file, found, entry.sha256)
                if fetched:  # the resolver fetches again on damage: the verdict is needed now
                    self._arrange_check(reference, wait=True)
            except BaseException:
                file.close()
                raise
            return reference

        return self.resolver.reference(entry.uri, self.label, read)

    def _arrange_check(self, reference: _Reference, wait: bool = False) -> None:
        """Check the pin once per reference, as ``verify`` says, by reading the tensor: on a
        worker unless ``wait`` (bytes read for a load are hashed as they pass instead:
        ``_stream_check``)."""
        claimed = self._judge(reference)
        if claimed is None:
            return
        judge, verdict = claimed
        file, found = reference.file, reference.entry
        if wait:
            try:
                judge(file.sha256(found))
            except BaseException as exc:
                with contextlib.suppress(InvalidStateError):
                    verdict.set_exception(exc)
                raise
            with contextlib.suppress(InvalidStateError):
                verdict.set_result(None)
            return
        # The verdict is a future of its own, not the pool's: close() fails it with a
        # UsageError, where the pool's would be cancelled (a CancelledError for its waiters).

        def check() -> None:
            try:
                judge(file.sha256(found))
            except BaseException as exc:
                outcome: BaseException | None = exc
            else:
                outcome = None
            with contextlib.suppress(InvalidStateError):  # unless close() failed it first
                if outcome is None:
                    verdict.set_result(None)
                else:
                    verdict.set_exception(outcome)

        self._pool.submit(check)

    def _stream_check(self, reference: _Reference) -> StreamHash | None:
        """A hash to feed the tensor's bytes as they are read, when its pin is to be checked
        (once per reference, as ``verify`` says). If the read stops short, the reference is
        left to be checked by the next load."""
        claimed = self._judge(reference)
        if claimed is None:
            return None
        judge, verdict = claimed

        def aborted() -> None:
            reference.arranged, reference.check = False, None

        hasher = StreamHash(self._pool, reference.entry.nbytes, judge, aborted)
        hasher.verdict.add_done_callback(lambda done: _settle(verdict, done))
        self._hashes.add(hasher)
        return hasher

    def _judge(self, reference: _Reference
               ) -> tuple[Callable[[str], None], Future[None]] | None:
        """Mark the reference's check arranged and return what judges its digest with the
        verdict its caller settles, or ``None`` when this thread has nothing to check:
        already arranged, ``verify`` off, or (``CACHED``) the digest cache knows this very
        file holds the pinned digest. The verdict is ``reference.check`` from the moment the
        check is claimed, so a thread that asks meanwhile waits for it (R75) instead of
        finding no check yet."""
        with self._claim:
            if reference.arranged:
                return None
            reference.arranged = True
            verdict: Future[None] = Future()
            reference.check = verdict
        if self.verify is Verify.NONE:
            verdict.set_result(None)
            return None
        file, found, pinned = reference.file, reference.entry, reference.pinned
        hashed_at = time.time_ns()  # before any byte of this check is read
        try:
            identity = file.identity()
            name = f"{found.offset}:{found.nbytes}"  # the tensor's byte range in that file
            known = self.verify is Verify.CACHED and self.digests.known(identity, name, pinned)
        except BaseException as exc:
            with contextlib.suppress(InvalidStateError):
                verdict.set_exception(exc)
            raise
        if known:
            verdict.set_result(None)
            return None
        label = f"{self.label}: theta0 reference {file.path}"

        def judge(digest: str) -> None:
            if digest != pinned:
                raise ExternalReferenceDamaged(
                    f"{label} has sha256 {digest}, the file pins {pinned}: the base checkpoint "
                    "differs from the one this file was made against", rule="R75")
            self.digests.remember(identity, name, pinned, hashed_at)

        return judge, verdict

    # -- values ---------------------------------------------------------------------------
    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device, label: str, out: torch.Tensor | None = None,
               uniform: DrawUniform | None = None) -> torch.Tensor | None:
        """Float32 theta0 of elements ``start .. start + count - 1``; ``None`` for zeros.
        ``out`` and ``uniform`` (the backend's one-launch draw): as
        ``Theta0Behaviour.values``."""
        if is_stored(entry):
            value = self.dense(entry, shape, start, start + count, label)
            return value.to(device=device, dtype=torch.float32)
        return prng_values(entry, shape, start, count, device, f"{self.label}: {label}",
                           uniform, out)

    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        """Float32 theta0 of the element indices ``elements`` (int64, on the target device);
        ``None`` for zeros."""
        if elements.numel() and is_stored(entry):
            first, last = int(elements.min()), int(elements.max())
            value = self.dense(entry, shape, first, last + 1, label)
            value = value.to(device=elements.device, dtype=torch.float32)
            return value[elements - first]
        return prng_values_at(entry, shape, elements, f"{self.label}: {label}")

    def close(self) -> None:
        """Release the bases and the workers. A hash still being fed (a load left unfinished)
        is aborted first: its queued pieces are released and its verdict says the check did
        not finish, so whatever still waits on them (a load's clean-up) does not wait on
        workers that are gone."""
        with self._lock:
            self._closed = True
            references = list(self._references.values())
            self._references.clear()
        for hasher in list(self._hashes):
            hasher.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for reference in references:
            if reference.check is not None:
                with contextlib.suppress(InvalidStateError):  # unless it finished
                    reference.check.set_exception(UsageError(
                        "the file was closed before the SHA-256 check of a base it reads "
                        "finished; open it again", path=self.label))
            reference.file.close()


class Theta0Behaviour(ABC):
    """How the engine evaluates one kind of theta0 entry (§7): its values for an element
    range or scattered elements, and its form in the fused kernel. One subclass per kind,
    found by the entry's class in ``BEHAVIOURS``: a new theta0 kind is a header entry class,
    one behaviour here and its line in ``BEHAVIOURS``."""

    #: Whether the values are stored (a blob, a base checkpoint): read by ``Theta0Source``,
    #: staged as a dense base, never drawn.
    dense: ClassVar[bool] = False

    @abstractmethod
    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device | str, label: str, uniform: DrawUniform | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Float32 values of elements ``start .. start + count - 1``; ``None`` for zeros.
        ``uniform`` (a backend's ``draw_uniform``): a uniform draw from element 0 in one
        launch (the same bits; torch's Philox takes many small launches on a GPU). ``out``
        (contiguous float32, ``count`` elements on ``device``): a drawn kind may write its
        values there (a load's own output, on the CPU) and return it; callers copy only what
        comes back elsewhere."""

    @abstractmethod
    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        """``values`` at the element indices ``elements`` (int64, any order)."""

    def kernel_form(self, entry: Theta0Entry, shape: tuple[int, ...]) -> KernelTheta0 | None:
        """How the fused kernel evaluates the entry in registers; ``None`` where it cannot (a
        dense kind is staged as a base instead)."""
        return None


class _Zeros(Theta0Behaviour):
    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device | str, label: str, uniform: DrawUniform | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        return None

    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        return None

    def kernel_form(self, entry: Theta0Entry, shape: tuple[int, ...]) -> KernelTheta0:
        return KernelTheta0()


class _Uniform(Theta0Behaviour):
    """``prng`` ``uniform`` (§7.2): ``bound`` as stored."""

    def bound(self, entry: Theta0Entry, shape: tuple[int, ...]) -> float:
        assert isinstance(entry, UniformTheta0)  # BEHAVIOURS maps only that class here
        return entry.bound

    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device | str, label: str, uniform: DrawUniform | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        assert isinstance(entry, PRNGTheta0)
        bound = self.bound(entry, shape)
        if uniform is not None and start == 0:
            return uniform(entry.seed, entry.stream, count, philox.round_to_f32(bound),
                           torch.device(device))
        return philox.uniform_signed(entry.seed, entry.stream, start, count, bound, device,
                                     out=out)

    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        assert isinstance(entry, PRNGTheta0)
        if not elements.numel():
            return None
        return philox.uniform_signed_at(entry.seed, entry.stream, elements,
                                        self.bound(entry, shape))

    def kernel_form(self, entry: Theta0Entry, shape: tuple[int, ...]) -> KernelTheta0:
        assert isinstance(entry, PRNGTheta0)
        return KernelTheta0(THETA0_UNIFORM, entry.seed, entry.stream,
                            bound=philox.round_to_f32(self.bound(entry, shape)))


class _FanInUniform(_Uniform):
    """``prng`` ``fan_in_uniform`` (§7.2): the bound of PyTorch's Linear and Conv init."""

    def bound(self, entry: Theta0Entry, shape: tuple[int, ...]) -> float:
        return fan_in_bound(shape)


class _Normal(Theta0Behaviour):
    """``prng`` ``normal`` (§7.2, §8.3)."""

    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device | str, label: str, uniform: DrawUniform | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        assert isinstance(entry, NormalTheta0)
        return _scale_normal(philox.normal(entry.seed, entry.stream, start, count, device,
                                           out=out), entry, in_place=out is not None)

    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        assert isinstance(entry, NormalTheta0)
        if not elements.numel():
            return None
        return _scale_normal(philox.normal_at(entry.seed, entry.stream, elements), entry)

    def kernel_form(self, entry: Theta0Entry, shape: tuple[int, ...]) -> KernelTheta0:
        assert isinstance(entry, NormalTheta0)
        return KernelTheta0(THETA0_NORMAL, entry.seed, entry.stream,
                            mean=philox.round_to_f32(entry.mean),
                            std=philox.round_to_f32(entry.std))


class _Stored(Theta0Behaviour):
    """``blob`` and ``external`` (§7.3, §7.4): read by ``Theta0Source`` (by byte range, pins
    checked), never drawn."""

    dense = True

    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device | str, label: str, uniform: DrawUniform | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        raise UsageError(f"{label}: stored theta0 is read from its file (Theta0Source), "
                         "not drawn")

    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        return self.values(entry, shape, 0, 0, "cpu", label)


class _Unknown(Theta0Behaviour):
    """A kind or PRNG scheme this reader does not know (a newer minor version's): reading a
    tensor built on it raises; the file's other tensors stay readable (R70, R71)."""

    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device | str, label: str, uniform: DrawUniform | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
        what = (f"scheme {entry.scheme!r}" if isinstance(entry, PRNGTheta0)
                else f"kind {entry.kind!r}")
        raise UnsupportedFeatureError(
            f"{label}: unknown theta0 {what}; this reader knows zeros, prng (uniform, "
            "fan_in_uniform, normal), blob and external. Upgrade mcnc-format",
            rule="R71" if isinstance(entry, PRNGTheta0) else "R70")

    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        return self.values(entry, shape, 0, 0, "cpu", label)


#: Each theta0 entry class (header.py) and its behaviour; any other class is unknown here.
BEHAVIOURS: dict[type[Theta0Entry], Theta0Behaviour] = {
    ZerosTheta0: _Zeros(),
    UniformTheta0: _Uniform(),
    FanInUniformTheta0: _FanInUniform(),
    NormalTheta0: _Normal(),
    BlobTheta0: _Stored(),
    ExternalTheta0: _Stored(),
}
_UNKNOWN = _Unknown()


def behaviour(entry: Theta0Entry) -> Theta0Behaviour:
    """The behaviour of ``entry``'s kind."""
    return BEHAVIOURS.get(type(entry), _UNKNOWN)


def is_stored(entry: Theta0Entry) -> TypeGuard[BlobTheta0 | ExternalTheta0]:
    """Whether ``entry``'s values are stored (read, staged as a dense base), not drawn."""
    return behaviour(entry).dense


def prng_values(entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
                device: torch.device | str, label: str, uniform: DrawUniform | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Float32 values of a zeros or PRNG theta0 (§7.1, §7.2, §8) for elements ``start ..
    start + count - 1``; ``None`` for zeros (``Theta0Behaviour.values``)."""
    return behaviour(entry).values(entry, shape, start, count, device, label, uniform, out)


def prng_values_at(entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                   label: str) -> torch.Tensor | None:
    """``prng_values`` at the element indices ``elements`` (int64, any order)."""
    return behaviour(entry).values_at(entry, shape, elements, label)


def _settle(verdict: Future[None], done: Future[None]) -> None:
    """Give ``verdict`` the outcome of ``done`` (unless ``close()`` settled it first)."""
    with contextlib.suppress(InvalidStateError):
        if done.cancelled():
            verdict.set_exception(UsageError("the check was cancelled: the file was closed"))
        elif done.exception() is not None:
            verdict.set_exception(done.exception())
        else:
            verdict.set_result(None)


def _scale_normal(z: torch.Tensor, entry: NormalTheta0, in_place: bool = False
                  ) -> torch.Tensor:
    """``z * std + mean`` (each rounded to float32, as §7.2 says), into ``z`` itself when
    ``in_place`` (the same two roundings)."""
    mean = philox.round_to_f32(entry.mean)
    std = philox.round_to_f32(entry.std)
    if (mean, std) == (0.0, 1.0):
        return z
    return z.mul_(std).add_(mean) if in_place else z * std + mean
