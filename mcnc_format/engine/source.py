"""Bytes of an open ``.mcnc`` file, read with ``pread`` into the buffers that need them.

Platforms: Linux and macOS read with ``os.preadv``; elsewhere ``positional_reader`` falls back
to ``os.pread``, or to ``lseek`` and ``read`` under a lock (Windows).

Why not a memory map: a file truncated by another process while mapped kills the reader with
SIGBUS the moment a vanished page is touched. ``pread`` reports the short read instead, which
becomes a ``FormatError``, and it lets the executor read exactly the byte range a box needs.

``BlobStore`` adds the checks of SPEC.md §4: a blob's XXH3-64 is checked the first time any of
its bytes are used (R24), which reads the whole blob once; later reads of a checked raw blob,
or any read with verification off, fetch only the requested range. zstd blobs are decoded whole
(R25). Small blobs (alpha, beta, inline generator weights, packs) are kept decoded for the life
of the file; large ones (dense tensors, stored theta0) are read per use.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import constants as C
from ..container import Preamble, decode_blob, decode_header, read_preamble
from ..errors import FormatError, MCNCError, MCNCFileNotFoundError
from ..header import BlobTheta0, DenseTensor, Header, PackedTensor, TensorEntry
from ..validate import data_start, validate_header
from .digests import FileIdentity, identity_of

__all__ = [
    "BlobStore",
    "FileSource",
    "OpenedHeader",
    "blob_labels",
    "open_regular",
    "read_header",
    "sweep_bytes",
]

#: Decoded blobs up to this size stay in memory once read.
KEEP_BYTES = 16 << 20
#: Reads of at least two such pieces are split across reader threads, in as many equal
#: pieces (of at least this size) as there are threads: a staging slot is read by all of them.
PARALLEL_PIECE_BYTES = 4 << 20
_READER_THREADS = min(8, os.cpu_count() or 1)
_READERS: list[ThreadPoolExecutor] = []


#: Every open source, for the fork handler below.
_SOURCES: weakref.WeakSet[FileSource] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: no reader pool, and no thread that
    holds a source's lock or descriptor."""
    _READERS.clear()
    for source in list(_SOURCES):
        source._forked()

#: Reads up to ``len(view)`` bytes of ``fd`` at ``offset`` into ``view``; returns the count.
PositionalRead = Callable[[int, memoryview, int], int]


def positional_reader() -> PositionalRead:
    """The best positional read this platform has. ``os.preadv`` (Linux, macOS, the BSDs)
    reads straight into the caller's buffer; ``os.pread`` (other Unixes) reads into a new
    bytes object first; where neither exists (Windows) the descriptor is positioned with
    ``lseek`` and read, under one lock, since the position is shared by every thread."""
    if hasattr(os, "preadv"):
        return lambda fd, view, offset: os.preadv(fd, [view], offset)
    if hasattr(os, "pread"):
        return _copy_into(os.pread)
    lock = threading.Lock()

    def seek_and_read(fd: int, length: int, offset: int) -> bytes:
        with lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, length)

    return _copy_into(seek_and_read)


def _copy_into(read: Callable[[int, int, int], bytes]) -> PositionalRead:
    def read_into(fd: int, view: memoryview, offset: int) -> int:
        data = read(fd, len(view), offset)
        view[: len(data)] = data
        return len(data)

    return read_into


_pread_into = positional_reader()


def _readers() -> ThreadPoolExecutor:
    """The process's reader threads (created on first use; pread needs no per-file state)."""
    if not _READERS:
        _READERS.append(ThreadPoolExecutor(max_workers=_READER_THREADS,
                                           thread_name_prefix="mcnc-read"))
    return _READERS[0]


def open_regular(path: Path, label: str, error: type[MCNCError] = MCNCError) -> tuple[int, int]:
    """``(descriptor, size)`` of a regular file opened for reading. Opened non-blocking, so a
    FIFO or a device is refused instead of waiting for a writer."""
    try:
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)  # Windows opens text mode otherwise
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise MCNCFileNotFoundError(f"No such file or directory: {label}") from exc
    except OSError as exc:
        raise error(f"cannot open: {exc.strerror or exc}", path=label) from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise error("not a regular file; give the path of a file", path=label)
    except BaseException:
        os.close(fd)
        raise
    return fd, status.st_size


class FileSource:
    """A file read by byte range, shared by threads. ``close()`` releases the descriptor.

    The descriptor is reference-counted: every read (and ``identity``) holds it for as long as
    it uses it, and ``close()`` only marks the source closed; the last holder closes the
    descriptor. A plain check-then-``pread`` would race ``close()``: the number freed there can
    be reused by another ``open`` before the ``pread`` runs, which then returns *another
    file's* bytes. Reads that begin after ``close()`` raise. A source collected without
    ``close()`` closes its descriptor then.
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label
        self._lock = threading.Lock()
        self._holders = 0
        self._closed = False
        self._fd, self.size = open_regular(path, label)
        # A source never closed (``mf.open(path).get_tensor(...)``) closes its descriptor
        # when collected, as a Python file does; ``_release`` detaches this first.
        self._collected = weakref.finalize(self, os.close, self._fd)
        _SOURCES.add(self)

    def _forked(self) -> None:
        """In a forked child: the parent's threads that held the lock or the descriptor do
        not exist here (the descriptor itself is the child's own copy)."""
        self._lock = threading.Lock()
        self._holders = 0
        if self._closed:
            self._release()

    @contextlib.contextmanager
    def _held(self) -> Iterator[int]:
        """The descriptor, kept open until the block ends (even if ``close()`` runs)."""
        with self._lock:
            if self._closed:
                raise MCNCError(f"{self.label}: read from a closed file; open it again")
            self._holders += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._lock:
                self._holders -= 1
                if self._closed and self._holders == 0:
                    self._release()

    def read(self, offset: int, length: int, into: memoryview | None = None) -> memoryview:
        """Bytes ``[offset, offset + length)``, into ``into`` when given (its first
        ``length`` bytes). A file that ends early (it shrank while open) is damage. A large
        range is read by several threads at once (``pread`` releases the GIL, so several
        threads copy from the page cache faster than one)."""
        with self._held() as fd:
            buffer = into if into is not None else memoryview(bytearray(length))
            count = min(_READER_THREADS, length // PARALLEL_PIECE_BYTES)
            if count < 2:
                self._read_into(fd, buffer, offset, 0, length)
            else:
                piece = -(-length // count)
                jobs = [_readers().submit(self._read_into, fd, buffer, offset, start,
                                          min(start + piece, length))
                        for start in range(0, length, piece)]
                # Every piece ends before the descriptor is let go (a failed one included):
                # a piece still reading after close() could read a reused descriptor number.
                futures.wait(jobs)
                for job in jobs:
                    job.result()
            return buffer[:length]

    def _read_into(self, fd: int, buffer: memoryview, offset: int, start: int, stop: int
                   ) -> None:
        """File bytes ``offset + start .. offset + stop`` into ``buffer[start:stop]``."""
        done = start
        while done < stop:
            try:
                n = _pread_into(fd, buffer[done:stop], offset + done)
            except OSError as exc:
                raise FormatError(f"{self.label}: cannot read bytes {offset + done} .. "
                                  f"{offset + stop}: {exc.strerror or exc}") from exc
            if n == 0:
                raise FormatError(
                    f"{self.label}: the file ended at byte {offset + done}, inside data that "
                    f"runs to byte {offset + stop}: it was truncated or replaced while open. "
                    "Open it again, or re-download it.")
            done += n

    def identity(self) -> FileIdentity:
        """What identifies the open file's contents (``engine/digests.py``)."""
        with self._held() as fd:
            return identity_of(fd)

    def close(self) -> None:
        """Mark the source closed; the descriptor closes when no read holds it any more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._holders == 0:
                self._release()

    def _release(self) -> None:
        """Close the descriptor (the lock held, the source closed, no holder left)."""
        if self._fd >= 0:
            self._collected.detach()
            os.close(self._fd)
            self._fd = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class OpenedHeader:
    """A file's validated header and what the preamble said of it (no blob read)."""

    preamble: Preamble
    header: Header
    file_size: int


def read_header(source: FileSource, label: str) -> OpenedHeader:
    """Read and check the preamble and header of ``source`` (R1-R13 and the cross-entry
    rules of ``validate.py``): everything the header says is trustworthy after this, and
    every size in it is bounded by the file's. Needs no torch."""
    head = source.read(0, min(C.PREAMBLE_SIZE, source.size))
    preamble = read_preamble(head, source.size, label)
    raw_header = source.read(C.PREAMBLE_SIZE, preamble.header_length)
    header = decode_header(raw_header, preamble, label)
    validate_header(header, preamble.header_length, source.size, label)
    return OpenedHeader(preamble, header, source.size)


class BlobStore:
    """Checked, decoded blobs of one file (SPEC.md §4)."""

    def __init__(self, source: FileSource, header: Header, verify: bool) -> None:
        self.source = source
        self.header = header
        self.verify = verify
        self._verified: set[int] = set()
        self._kept: dict[int, memoryview] = {}

    def blob(self, index: int, path: str) -> memoryview:
        """The decoded bytes of blob ``index``, checksum-checked on first use."""
        kept = self._kept.get(index)
        if kept is not None:
            return kept
        entry = self.header.blobs[index]
        stored = self.source.read(entry.offset, entry.length)
        check = self.verify and index not in self._verified
        decoded = memoryview(decode_blob(stored, entry, path, self.source.label, check))
        self._verified.add(index)
        if entry.decoded_length <= KEEP_BYTES:
            self._kept[index] = decoded
        return decoded

    def blob_range(self, index: int, start: int, stop: int, path: str) -> memoryview:
        """Decoded bytes ``[start, stop)`` of blob ``index``: only those bytes are read once the
        blob is checked (or when verification is off) and the blob is raw."""
        if self._by_range(index):
            return self.source.read(self.header.blobs[index].offset + start, stop - start)
        return self.blob(index, path)[start:stop]

    def range_reader(self, index: int, start: int, stop: int, path: str
                     ) -> Callable[[int, memoryview], object]:
        """A reader of decoded bytes ``[start, stop)`` of blob ``index`` piece by piece into
        the caller's buffers (``read(offset, view)``: the range's bytes from ``offset`` into
        ``view``): straight from the file where ``blob_range`` would read only the range,
        else copied from the checked, decoded blob."""
        if self._by_range(index):
            first = self.header.blobs[index].offset + start
            return lambda offset, view: self.source.read(first + offset, len(view), view)
        data = self.blob(index, path)[start:stop]

        def copy(offset: int, view: memoryview) -> None:
            view[:] = data[offset : offset + len(view)]

        return copy

    def _by_range(self, index: int) -> bool:
        entry = self.header.blobs[index]
        return (entry.codec == C.Codec.RAW and index not in self._kept
                and (index in self._verified or not self.verify))

    def tensor_bytes(self, t: TensorEntry, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of a dense or packed tensor's stored values (§6.2, §6.4)."""
        assert isinstance(t, DenseTensor | PackedTensor)
        path = f"tensors[{t.name!r}].blob"
        first = t.start if isinstance(t, PackedTensor) else 0
        return self.blob_range(t.blob, first + start, first + stop, path)

    def check_padding(self, header_length: int) -> None:
        """R22: the bytes between header and blobs, and between blobs, are zero."""
        position = C.PREAMBLE_SIZE + header_length
        gaps = []
        for blob in self.header.blobs:
            gaps.append((position, blob.offset))
            position = blob.offset + blob.length
        if not self.header.blobs:
            gaps.append((position, data_start(header_length, self.header.alignment)))
        for start, stop in gaps:
            if stop > start and any(self.source.read(start, stop - start)):
                raise FormatError(f"non-zero padding bytes in [{start}, {stop})", rule="R22",
                                  path=self.source.label)

    def close(self) -> None:
        self._kept.clear()
        self.source.close()


def sweep_bytes(blobs: BlobStore, header_length: int
                ) -> Iterator[tuple[int | None, FormatError | None]]:
    """Every blob's bytes (decoded, checksum checked: R24, R25) and the zero padding between
    them (R22), in file order: ``(blob index, None)`` for a blob that holds, ``(blob index,
    error)`` for one that does not, and ``(None, error)`` for non-zero padding. What a download
    must pass (``hub/integrity.py``) and the first checks of ``verify``. Needs no torch."""
    labels = blob_labels(blobs.header)
    for index in range(len(blobs.header.blobs)):
        try:
            blobs.blob(index, labels.get(index, f"blobs[{index}]"))
        except FormatError as exc:  # ChecksumError too
            yield index, exc
            continue
        yield index, None
    try:
        blobs.check_padding(header_length)
    except FormatError as exc:
        yield None, exc


def blob_labels(header: Header) -> dict[int, str]:
    """A readable owner for each blob index, for error messages (``segments[2].alpha``)."""
    labels: dict[int, str] = {}
    for i, g in enumerate(header.generators):
        for j, b in enumerate(g.blobs or ()):
            labels[b] = f"generators[{i}].weights.blobs[{j}]"
    for i, s in enumerate(header.segments):
        labels[s.alpha] = f"segments[{i}].alpha"
        labels[s.beta] = f"segments[{i}].beta"
    packed: dict[int, list[str]] = {}
    for t in header.tensors:
        if isinstance(t, PackedTensor):
            packed.setdefault(t.blob, []).append(repr(t.name))
        elif isinstance(t, DenseTensor):
            labels[t.blob] = f"tensor {t.name!r} data"
        for part, theta0 in zip(("", ":A", ":B"), t.theta0s(), strict=False):
            if isinstance(theta0, BlobTheta0):
                labels[theta0.blob] = f"tensor {t.name + part!r} theta0"
    for blob, names in packed.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        labels[blob] = f"the pack blob blobs[{blob}] of tensors {shown}"
    return labels

