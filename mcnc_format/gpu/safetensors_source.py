"""Byte ranges of tensors in a safetensors file, so base weights stream like our own blobs.

safetensors' ``load_file(device="cuda")`` copies from its memory map through pageable memory;
the loader instead needs each tensor's raw bytes to push through its pinned staging ring. The
layout is simple (an 8-byte little-endian header length, a JSON header, the data), so it is
read here directly; the sha256 pin of §7.4 is taken over exactly these bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExternalReferenceDamaged, ExternalReferenceError

__all__ = ["SafetensorsFile", "TensorSlice"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_MAX_HEADER = 100_000_000  # safetensors' own cap


@dataclass(frozen=True)
class TensorSlice:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    view: memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """A memory-mapped safetensors file with its header parsed; ``close()`` when done."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label
        self._map: mmap.mmap | None = None
        try:
            # Non-blocking, so that opening a FIFO does not wait for a writer; only regular
            # files are mapped.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise self._unreadable(exc) from exc
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise self._error("is not a regular file")
            if status.st_size:
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise self._unreadable(exc) from exc
        finally:
            os.close(fd)
        self._entries, self._data_start = self._parse(status.st_size)

    def _parse(self, size: int) -> tuple[dict[str, dict], int]:
        if self._map is None or size < 8:
            raise self._error("is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", self._map[:8])
        if length > _MAX_HEADER or 8 + length > size:
            raise self._error(f"declares a {length}-byte header, which does not fit the file")
        try:
            header = json.loads(bytes(self._map[8 : 8 + length]))
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

    def _unreadable(self, exc: OSError) -> ExternalReferenceError:
        return ExternalReferenceDamaged(
            f"{self.label} ({self.path}) cannot be read: {exc.strerror or exc}. Put the base "
            "checkpoint next to the .mcnc file", rule="R75")

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def tensor(self, name: str) -> TensorSlice:
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
                              f"one of {', '.join(_DTYPES)}")
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
        if self._map is None or start + (end - begin) > len(self._map):
            raise self._error(f"is truncated inside tensor {name!r}")
        return TensorSlice(dtype, tuple(shape),
                           memoryview(self._map)[start : start + end - begin])

    def close(self) -> None:
        """Unmap the file (left to the garbage collector while a slice is still in use)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A slice is still referenced by pending work; the map closes with it.
                return
            self._map = None


def _is_size(value: object) -> bool:
    """A non-negative JSON integer (``true``/``false`` are not sizes)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
