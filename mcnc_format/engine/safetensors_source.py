"""Byte ranges of tensors in a safetensors file, so base weights stream like our own blobs.

The executor needs a base tensor's raw bytes, or just the range a box covers, to push through
its staging buffers. The layout is simple (an 8-byte little-endian header length, a JSON
header, the data), so it is read here directly, with ``pread`` as our own files are (a base
truncated while open is an error, not SIGBUS); the sha256 pin of §7.4 is taken over exactly a
tensor's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import constants as C
from ..dtypes import to_torch
from ..errors import (
    ExternalReferenceDamaged,
    ExternalReferenceError,
    ExternalReferenceMissing,
    FormatError,
    MCNCError,
)
from .digests import FileIdentity
from .source import FileSource

__all__ = ["SafetensorsFile", "StoredTensor"]

#: Base weights are floating point; safetensors spells the spec's names in capitals.
_DTYPES = {name.upper(): to_torch(name) for name in C.FLOAT_DTYPES}
_MAX_HEADER = 100_000_000  # safetensors' own cap
_HASH_PIECE = 16 << 20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """A safetensors file with its header parsed; ``close()`` when done."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label
        try:
            self._file = FileSource(path, f"{label}: {path}")
        except ExternalReferenceError:
            raise
        except FormatError as exc:
            raise self._error(str(exc)) from exc
        except Exception as exc:  # cannot open: missing, a directory, a FIFO
            reason = ("no such file" if isinstance(exc, FileNotFoundError) else
                      exc.message if isinstance(exc, MCNCError) else str(exc))
            raise ExternalReferenceMissing(
                f"{label} ({path}) cannot be read: {reason}. Put the base checkpoint there, "
                "next to the .mcnc file", rule="R75") from exc
        try:
            self._entries, self._data_start = self._parse(self._file.size)
        except BaseException:
            self._file.close()
            raise

    def read(self, offset: int, length: int, into: memoryview | None = None) -> memoryview:
        """File bytes ``[offset, offset + length)`` (damage raises ``ExternalReferenceDamaged``)."""
        try:
            return self._file.read(offset, length, into)
        except FormatError as exc:
            raise ExternalReferenceDamaged(str(exc), rule="R75") from exc

    def identity(self) -> FileIdentity:
        """What identifies the file's contents (``engine/digests.py``)."""
        return self._file.identity()

    def sha256(self, entry: StoredTensor) -> str:
        """SHA-256 of a tensor's bytes, read piece by piece."""
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(min(_HASH_PIECE, entry.nbytes)))
        for start in range(0, entry.nbytes, _HASH_PIECE):
            n = min(_HASH_PIECE, entry.nbytes - start)
            digest.update(self.read(entry.offset + start, n, buffer))
        return digest.hexdigest()

    def _parse(self, size: int) -> tuple[dict[str, dict[str, Any]], int]:
        if size < 8:
            raise self._error("is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", self.read(0, 8))
        if length > _MAX_HEADER or 8 + length > size:
            raise self._error(f"declares a {length}-byte header, which does not fit the file")
        try:
            header = json.loads(bytes(self.read(8, length)))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting
            raise self._error(f"has an unreadable header: {exc}") from exc
        if not isinstance(header, dict):
            raise self._error("has a header that is not a JSON object")
        header.pop("__metadata__", None)
        return header, 8 + length

    def _error(self, what: str, damaged: bool = True) -> ExternalReferenceError:
        """A malformed file is damage (a fresh copy may help); a missing tensor or a wrong
        dtype is a wrong reference."""
        kind = ExternalReferenceDamaged if damaged else ExternalReferenceError
        return kind(f"{self.label}: {self.path} {what}", rule="R75")

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def tensor(self, name: str) -> StoredTensor:
        """The dtype, shape and bytes of tensor ``name``; a malformed header entry raises
        ``ExternalReferenceError`` like any other damage."""
        if name not in self._entries:
            raise self._error(f"has no tensor named {name!r}", damaged=False)
        entry = self._entries[name]
        if not isinstance(entry, dict):
            raise self._error(f"describes {name!r} with {entry!r}, not an object")
        dtype_name = entry.get("dtype")
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise self._error(f"stores {name!r} as {dtype_name!r}; base weights must be "
                              f"one of {', '.join(_DTYPES)} (SPEC.md §7.4)", damaged=False)
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_size(n) for n in shape):
            raise self._error(f"gives {name!r} the shape {shape!r}, not a list of sizes")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_size(n) for n in offsets) or offsets[0] > offsets[1]):
            raise self._error(f"gives {name!r} the data offsets {offsets!r}, not two "
                              "increasing byte offsets")
        begin, end = offsets
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize:
            raise self._error(f"gives {name!r} data offsets that do not match its shape")
        start = self._data_start + begin
        if start + (end - begin) > self._file.size:
            raise self._error(f"is truncated inside tensor {name!r}")
        return StoredTensor(dtype, tuple(shape), start, end - begin)

    def close(self) -> None:
        self._file.close()


def _is_size(value: object) -> bool:
    """A non-negative JSON integer (``true``/``false`` are not sizes)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
