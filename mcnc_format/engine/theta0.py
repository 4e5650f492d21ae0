"""theta0 of a tensor's elements (SPEC.md §7), for element ranges or scattered elements.

PRNG values are drawn at the elements' own indices (§8), so a box costs its own elements'
draws. Stored theta0 (a blob, §7.3) and external base tensors (§7.4) are read by byte range:
only the bytes a box covers, once their checksum or pin has been checked. An external base is
opened once per file; its SHA-256 (R75) is checked once, on a worker thread when the base is
local, and awaited before any tensor built on it is handed out (the pin is checked whatever
the load's ``verify``, which is about blob checksums).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .. import constants as C
from .. import philox
from ..dtypes import to_torch
from ..errors import ExternalReferenceDamaged, ExternalReferenceError, UnsupportedFeatureError
from ..header import Theta0Entry
from .resolve import HUB_SCHEME, Resolver
from .safetensors_source import SafetensorsFile, TensorSlice
from .source import BlobStore

__all__ = ["Theta0Source", "fan_in_bound", "prng_values", "prng_values_at"]

DENSE_KINDS = (C.THETA0_BLOB, C.THETA0_EXTERNAL)


def fan_in_bound(shape: tuple[int, ...]) -> float:
    """``1 / sqrt(fan_in)`` as float32, ``fan_in = prod(shape[1:])``: PyTorch's default bound
    for Linear and Conv weights (``kaiming_uniform_(a=sqrt(5))``) and their biases."""
    return philox.round_to_f32(1.0 / math.sqrt(math.prod(shape[1:])))


class _Reference:
    """An opened external base tensor and the verdict of its SHA-256 pin."""

    def __init__(self, file: SafetensorsFile, entry: TensorSlice, check: Future[None] | None
                 ) -> None:
        self.file = file
        self.entry = entry
        self.check = check


class Theta0Source:
    """Evaluates the theta0 entries of one open file."""

    def __init__(self, blobs: BlobStore, resolver: Resolver, label: str) -> None:
        self.blobs = blobs
        self.resolver = resolver
        self.label = label
        self._references: dict[tuple[str, str], _Reference] = {}
        self._pool: ThreadPoolExecutor | None = None

    # -- dense kinds ---------------------------------------------------------------------
    def dense_dtype(self, entry: Theta0Entry, shape: tuple[int, ...]) -> torch.dtype:
        """The stored dtype of a blob or external theta0."""
        if entry.kind == C.THETA0_BLOB:
            assert entry.blob is not None
            return to_torch(self.blobs.header.blobs[entry.blob].dtype)
        return self.reference(entry, shape).entry.dtype

    def dense_bytes(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, stop: int,
                    label: str) -> memoryview:
        """The stored bytes of elements ``[start, stop)`` of a blob or external theta0."""
        size = self.dense_dtype(entry, shape).itemsize
        if entry.kind == C.THETA0_BLOB:
            assert entry.blob is not None
            return self.blobs.blob_range(entry.blob, start * size, stop * size, label)
        reference = self.reference(entry, shape)
        return reference.file.read(reference.entry.offset + start * size, (stop - start) * size)

    def dense(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, stop: int,
              label: str) -> torch.Tensor:
        """Elements ``[start, stop)`` of a blob or external theta0 as a CPU tensor of their
        stored dtype."""
        data = self.dense_bytes(entry, shape, start, stop, label)
        dtype = self.dense_dtype(entry, shape)
        if stop == start:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(data) if data.readonly else data, dtype=dtype)

    def pending_check(self, entry: Theta0Entry) -> Future[None] | None:
        """The SHA-256 verdict of an external base still being checked, if any."""
        if entry.kind != C.THETA0_EXTERNAL:
            return None
        assert entry.uri is not None and entry.tensor is not None
        reference = self._references.get((entry.uri, entry.tensor))
        return reference.check if reference is not None else None

    def reference(self, entry: Theta0Entry, shape: tuple[int, ...]) -> _Reference:
        """The external base of ``entry``, opened and shape-checked once (R75)."""
        assert entry.uri is not None and entry.tensor is not None and entry.sha256 is not None
        key = (entry.uri, entry.tensor)
        if key in self._references:
            return self._references[key]
        label = f"{self.label}: theta0 reference {entry.uri}"
        fetched = entry.uri.startswith(HUB_SCHEME) or self.label.startswith(HUB_SCHEME)

        def read(path: Path) -> _Reference:
            file = SafetensorsFile(path, label)
            try:
                found = file.tensor(entry.tensor)  # type: ignore[arg-type]
                if found.shape != shape:
                    raise ExternalReferenceError(
                        f"{label}:{entry.tensor} has shape {list(found.shape)}, the tensor needs "
                        f"{list(shape)} (R75)")
                check = None
                if fetched:  # a fetched copy is fetched again if damaged: decide now
                    _check_sha256(file, found, entry.sha256, f"{label}:{entry.tensor}")
                else:
                    check = self._workers().submit(_check_sha256, file, found, entry.sha256,
                                                   f"{label}:{entry.tensor}")
            except BaseException:
                file.close()
                raise
            return _Reference(file, found, check)

        self._references[key] = self.resolver.reference(entry.uri, self.label, read)
        return self._references[key]

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcnc-sha256")
        return self._pool

    # -- values ---------------------------------------------------------------------------
    def values(self, entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
               device: torch.device, label: str) -> torch.Tensor | None:
        """Float32 theta0 of elements ``start .. start + count - 1``; ``None`` for zeros."""
        if entry.kind in DENSE_KINDS:
            value = self.dense(entry, shape, start, start + count, label)
            return value.to(device=device, dtype=torch.float32)
        return prng_values(entry, shape, start, count, device, f"{self.label}: {label}")

    def values_at(self, entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                  label: str) -> torch.Tensor | None:
        """Float32 theta0 of the element indices ``elements`` (int64, on the target device);
        ``None`` for zeros."""
        if elements.numel() and entry.kind in DENSE_KINDS:
            first, last = int(elements.min()), int(elements.max())
            value = self.dense(entry, shape, first, last + 1, label)
            value = value.to(device=elements.device, dtype=torch.float32)
            return value[elements - first]
        return prng_values_at(entry, shape, elements, f"{self.label}: {label}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for reference in self._references.values():
            reference.file.close()
        self._references.clear()


def prng_values(entry: Theta0Entry, shape: tuple[int, ...], start: int, count: int,
                device: torch.device | str, label: str) -> torch.Tensor | None:
    """Float32 values of a zeros or PRNG theta0 (§7.1, §7.2, §8) for elements ``start ..
    start + count - 1``; ``None`` for zeros."""
    if entry.kind == C.THETA0_ZEROS:
        return None
    if entry.kind == C.THETA0_PRNG:
        assert entry.seed is not None and entry.stream is not None
        if entry.scheme == C.SCHEME_NORMAL:
            return _scale_normal(philox.normal(entry.seed, entry.stream, start, count, device),
                                 entry)
        return philox.uniform_signed(entry.seed, entry.stream, start, count,
                                     _bound(entry, shape, label), device)
    raise _unknown(entry, label)


def prng_values_at(entry: Theta0Entry, shape: tuple[int, ...], elements: torch.Tensor,
                   label: str) -> torch.Tensor | None:
    """``prng_values`` at the element indices ``elements`` (int64, any order)."""
    if entry.kind == C.THETA0_ZEROS or elements.numel() == 0:
        return None
    if entry.kind == C.THETA0_PRNG:
        assert entry.seed is not None and entry.stream is not None
        if entry.scheme == C.SCHEME_NORMAL:
            return _scale_normal(philox.normal_at(entry.seed, entry.stream, elements), entry)
        return philox.uniform_signed_at(entry.seed, entry.stream, elements,
                                        _bound(entry, shape, label))
    raise _unknown(entry, label)


def _bound(entry: Theta0Entry, shape: tuple[int, ...], label: str) -> float:
    if entry.scheme == C.SCHEME_UNIFORM:
        assert entry.bound is not None
        return entry.bound
    if entry.scheme == C.SCHEME_FAN_IN_UNIFORM:
        return fan_in_bound(shape)
    raise _unknown(entry, label)


def _unknown(entry: Theta0Entry, label: str) -> UnsupportedFeatureError:
    what = f"scheme {entry.scheme!r}" if entry.kind == C.THETA0_PRNG else f"kind {entry.kind!r}"
    return UnsupportedFeatureError(
        f"{label}: unknown theta0 {what} (R70/R71); this reader knows zeros, prng (uniform, "
        "fan_in_uniform, normal), blob and external. Upgrade mcnc-format.")


def _scale_normal(z: torch.Tensor, entry: Theta0Entry) -> torch.Tensor:
    assert entry.mean is not None and entry.std is not None
    mean = philox.round_to_f32(entry.mean)
    std = philox.round_to_f32(entry.std)
    return z * std + mean if (mean, std) != (0.0, 1.0) else z


def _check_sha256(file: SafetensorsFile, entry: TensorSlice, expected: str, label: str) -> None:
    """R75: the referenced tensor's bytes hash to the pinned SHA-256."""
    digest = file.sha256(entry)
    if digest != expected:
        raise ExternalReferenceDamaged(
            f"{label} has sha256 {digest}, the file pins {expected} (R75): the base checkpoint "
            "differs from the one this file was made against.")
