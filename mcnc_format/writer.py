"""Writing ``.mcnc`` files: declarative inputs in, one atomic, deterministic file out.

A caller describes what to store with small value types (``Segment``, ``MCNC``, ``LoRA``,
``Dense``, ``Theta0``) and calls ``save``. The writer checks every input, lays the file out
exactly as SPEC.md §2-§4 prescribe, validates its own header with the reader's rules, and
writes through ``atomic.atomic_path``: the file appears under its name only once complete and
fsynced, so an interrupted write (crash, Ctrl-C, SIGKILL) leaves any previous file untouched
and no temporary behind.

The inputs may be a mapping or an iterable of ``(name, source)`` pairs that reads each tensor
only when asked (``mcnc pack`` of a folder checkpoint). Each tensor's blob is encoded and
spooled as soon as its tensor is added (``_BlobSpool``), and the writer keeps no reference to
the tensor: memory holds the tensor being encoded, alpha and beta (the header needs their
shapes), the small tensors of the pack blob and a bounded spool buffer. The header comes first
in the file but depends on every blob's length and checksum, so blobs are spooled in order
and copied behind the header once it is settled; the bytes are those of an in-memory write.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import constants as C
from .atomic import atomic_path, describe_os_error
from .container import (
    HEADER_LEVEL_ATTEMPTS,
    Preamble,
    checksum,
    compress_header,
    decode_header,
    encode_blob,
    encode_header,
    encode_preamble,
    header_level,
)
from .dtypes import from_torch
from .errors import (
    InvalidTensorError,
    MCNCError,
    MetaTensorError,
    UnsupportedFeatureError,
    WriteError,
)
from .generator import GeneratorSpec
from .header import (
    BlobEntry,
    BlobTheta0,
    DenseTensor,
    ExternalTheta0,
    FanInUniformTheta0,
    GeneratorEntry,
    Header,
    InlineWeights,
    LoRATensor,
    MCNCTensor,
    MemberEntry,
    NormalTheta0,
    PackedTensor,
    PhiloxWeights,
    SegmentEntry,
    TensorEntry,
    Theta0Entry,
    UniformTheta0,
    ZerosTheta0,
)
from .sharing import refuse_shared
from .validate import blob_layout, data_start, validate_header

__all__ = [
    "MCNC",
    "DeclaredTheta0",
    "Dense",
    "LoRA",
    "Segment",
    "StoredTheta0",
    "TensorStream",
    "Theta0",
    "save",
]


class Theta0:
    """Where an mcnc tensor's base values come from (SPEC.md §7): the writer's input, one
    class per variant (``DeclaredTheta0``: stated in the header in full; ``StoredTheta0``:
    values the writer stores in a blob of their own), built by these constructors."""

    @staticmethod
    def zeros() -> DeclaredTheta0:
        return DeclaredTheta0(ZerosTheta0())

    @staticmethod
    def uniform(bound: float, seed: int, stream: int) -> DeclaredTheta0:
        return DeclaredTheta0(UniformTheta0(seed, stream, float(bound)))

    @staticmethod
    def fan_in_uniform(seed: int, stream: int) -> DeclaredTheta0:
        """PyTorch's default init of Linear and Conv weights, drawn from the spec's PRNG."""
        return DeclaredTheta0(FanInUniformTheta0(seed, stream))

    @staticmethod
    def normal(seed: int, stream: int, mean: float = 0.0, std: float = 1.0) -> DeclaredTheta0:
        """PyTorch's default init of Embedding weights (mean 0, std 1) from the spec's PRNG."""
        return DeclaredTheta0(NormalTheta0(seed, stream, float(mean), float(std)))

    @staticmethod
    def stored(tensor: torch.Tensor) -> StoredTheta0:
        """theta0 stored inline as a blob (any float dtype)."""
        return StoredTheta0(tensor)

    @staticmethod
    def external(uri: str, tensor: str, sha256: str) -> DeclaredTheta0:
        """A tensor in a safetensors file next to the .mcnc file or on the Hub, sha256-pinned."""
        return DeclaredTheta0(ExternalTheta0(uri, tensor, sha256))


@dataclass(frozen=True)
class DeclaredTheta0(Theta0):
    """A theta0 the header states in full: zeros, a PRNG draw or an external reference."""

    entry: Theta0Entry


@dataclass(frozen=True)
class StoredTheta0(Theta0):
    """theta0 values the writer stores in a blob (§7.3); the header entry gets its index."""

    tensor: torch.Tensor = field(compare=False, repr=False)


@dataclass(eq=False)
class Segment:
    """Chunks sharing one generator: ``alpha [chunks, m, k]``, ``beta [chunks, m]``.

    Their dtypes (float32, float16 or bfloat16) are the stored dtypes. Tensors that name the
    same ``Segment`` object are flattened together in the order they are given.
    """

    generator: GeneratorSpec
    alpha: torch.Tensor
    beta: torch.Tensor
    codec: str = C.Codec.RAW


@dataclass(frozen=True, eq=False)
class MCNC:
    """A tensor stored as a member of an MCNC segment."""

    segment: Segment
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    theta0: Theta0 = field(default_factory=Theta0.zeros)


@dataclass(frozen=True, eq=False)
class LoRA:
    """``theta0 + scale * B @ A`` with mcnc-encoded factors (the paper's LLM setting)."""

    A: MCNC
    B: MCNC
    scale: float
    dtype: torch.dtype = torch.float32
    theta0: Theta0 = field(default_factory=Theta0.zeros)


@dataclass(frozen=True, eq=False)
class Dense:
    """A tensor stored as it is, raw or zstd-compressed."""

    tensor: torch.Tensor
    codec: str = C.Codec.RAW


TensorSource = torch.Tensor | Dense | MCNC | LoRA
# Encoded blobs up to this many bytes in all stay in memory; beyond it they go to a file.
SPOOL_MEMORY_BYTES = 64 << 20
# The buffer that copies spooled blobs behind the header.
SPOOL_COPY_BYTES = 8 << 20


@dataclass(frozen=True)
class TensorStream:
    """``save``'s inputs as ``(name, source)`` pairs in storage order, taken one at a time: a
    generator that reads each tensor from disk when asked keeps one in memory (``mcnc pack``
    of a large checkpoint). A plain list or dict items are not a stream: ``save`` takes a
    mapping, as safetensors' ``save_file`` does."""

    pairs: Iterable[tuple[str, TensorSource]]


def save(
    path: str | os.PathLike[str],
    tensors: Mapping[str, TensorSource] | TensorStream,
    *,
    metadata: Mapping[str, str] | None = None,
    info: Mapping[str, str] | None = None,
    alignment: int = C.DEFAULT_ALIGNMENT,
    overwrite: bool = True,
) -> Path:
    """Write ``tensors`` to ``path`` atomically; with ``overwrite=False`` an existing ``path``
    (also one created by someone else while this file was written) is a ``WriteError``.

    ``tensors`` is a mapping, or a ``TensorStream`` of ``(name, source)`` pairs that reads
    each tensor when the writer asks for it (one tensor in memory at a time); either way each
    blob is encoded and spooled as its tensor is added.

    Plain tensors are stored dense and raw; those under ``PACK_MAX_TENSOR_BYTES`` (64 KiB:
    norms, biases) share one packed blob (SPEC.md §6.4), which saves a blob entry, a checksum
    and alignment padding each. ``Dense(t)`` gives a tensor its own blob.

    The file holds the tensors in the order given (segment members are laid out in it): the
    same tensors in the same order give a byte-identical file. Plain tensors must be
    contiguous and must not share memory (``InvalidTensorError``, ``SharedTensorError``), as
    safetensors requires: a tie would be stored twice and load back untied (a stream's tensor
    is checked against the earlier ones that are still alive)."""
    if sys.byteorder != "little":
        raise WriteError("mcnc-format writes little-endian data and needs a little-endian host")
    target = Path(path)
    header_metadata = _strings(metadata, "metadata", str(target))
    header_info = _strings(info, "info", str(target))
    unknown_info = sorted(set(header_info) - set(C.INFO_KEYS))
    if unknown_info:
        raise WriteError(f"{target}: info accepts {', '.join(C.INFO_KEYS)}; got "
                         f"{', '.join(unknown_info)}. Put free-form facts in metadata.")
    pairs: Iterable[tuple[str, TensorSource]]
    live: _LiveTensors | None
    if isinstance(tensors, TensorStream):
        pairs, live = tensors.pairs, _LiveTensors(str(target))
    else:
        _check_plain_tensors(tensors, str(target))
        pairs, live = tensors.items(), None
    with _BlobSpool(target) as spool:
        layout = _Layout(str(target), alignment, spool)
        for name, source in pairs:
            if live is not None:
                live.add(name, source)
            try:
                layout.add_tensor(name, source)
            except UnsupportedFeatureError as exc:  # a dtype the format cannot store
                raise WriteError(f"{target}: tensor {name!r}: {exc}") from exc
            del source  # an iterable's tensor is freed before the next one is read
        layout.header.metadata = header_metadata
        layout.header.info = header_info
        layout.finish_segments()
        layout.finish_pack()
        header_codec, header_bytes = layout.place_blobs()
        _atomic_write(target, layout, header_codec, header_bytes, overwrite)
    return target


def _check_plain_tensors(tensors: Mapping[str, TensorSource], source: str) -> None:
    """Refuse a non-mapping, plain (or ``Dense``) tensors that share memory with one another
    (SPEC.md §6: every tensor entry has its own storage, there is no alias entry) and ones
    that are not contiguous, in safetensors' order."""
    if not isinstance(tensors, Mapping):
        raise InvalidTensorError(f"expected a dict of str to tensors, got "
                                 f"{type(tensors).__name__}", path=source)
    plain = {name: value.tensor if isinstance(value, Dense) else value
             for name, value in tensors.items() if isinstance(value, torch.Tensor | Dense)}
    refuse_shared(plain, source)  # SPEC.md §6: no alias entry
    for name, tensor in plain.items():
        if tensor.layout == torch.strided and not tensor.is_contiguous():
            raise InvalidTensorError(
                f"tensor {name!r} is not contiguous (a view such as a transpose or a strided "
                "slice). Save .contiguous() of it, or use save_model, which stores a model's "
                "tensors contiguous", path=source)



class _LiveTensors:
    """``_check_plain_tensors`` for a stream, pair by pair: each plain tensor must be
    contiguous and must not share memory with an earlier one that is still alive (one freed
    since shares nothing with it, though its address may be reused)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.earlier: list[tuple[str, weakref.ref[torch.Tensor]]] = []

    def add(self, name: str, value: TensorSource) -> None:
        if not isinstance(value, torch.Tensor | Dense):
            return
        tensor = value.tensor if isinstance(value, Dense) else value
        alive = {n: t for n, ref in self.earlier if (t := ref()) is not None}
        self.earlier = [(n, weakref.ref(t)) for n, t in alive.items()]
        _check_plain_tensors({**alive, name: tensor}, self.source)
        self.earlier.append((name, weakref.ref(tensor)))


def _strings(values: Mapping[str, str] | None, what: str, source: str) -> dict[str, str]:
    out = dict(values or {})
    for k, v in out.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WriteError(f"{source}: {what} must map str to str; got {k!r}: {type(v).__name__}")
        for text in (k, v):
            if not _is_utf8(text):
                raise WriteError(f"{source}: {what} {k!r}: {text!r} is {_NOT_UTF8}")
    return out


# A str can hold what UTF-8 cannot encode: lone surrogates, such as a name that was not
# UTF-8 decoded with ``surrogateescape`` (os.listdir) or read from a pickle. The header is
# msgpack, whose strings are UTF-8.
_NOT_UTF8 = ("not valid UTF-8 text (it holds a lone surrogate, as a name that was not UTF-8 "
             "decodes to); the header stores only UTF-8: rename it")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _BlobSpool:
    """The encoded blobs in blob order, until they are copied behind the header.

    Blobs stay in memory until ``SPOOL_MEMORY_BYTES`` in all, then move to an unnamed temporary
    file in the output's folder (the output's disk, not a possibly RAM-backed /tmp; nothing is
    left behind by a crash). A blob whose bytes are only known at the end (the pack blob) is
    reserved and set later. ``OSError``s of the spool file become ``WriteError``s.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.memory = bytearray()
        self.file: Any = None
        self.size = 0
        # (start, length) in the spool, or the bytes of a blob set by ``set``
        self.entries: list[tuple[int, int] | bytes] = []

    def __enter__(self) -> _BlobSpool:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.file is not None:
            self.file.close()

    @property
    def lengths(self) -> list[int]:
        return [len(e) if isinstance(e, bytes) else e[1] for e in self.entries]

    def append(self, data: bytes | memoryview) -> int:
        length = len(memoryview(data).cast("B"))
        try:
            if self.file is None and len(self.memory) + length > SPOOL_MEMORY_BYTES:
                directory = self.target.parent if str(self.target.parent) else Path(".")
                self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (__exit__)
                self.file.write(self.memory)
                self.memory = bytearray()
            if self.file is None:
                self.memory += data
            else:
                self.file.write(data)
        except OSError as exc:
            raise WriteError(f"{self.target}: cannot spool the encoded tensors beside the "
                             f"output: {describe_os_error(exc)}") from exc
        self.entries.append((self.size, length))
        self.size += length
        return len(self.entries) - 1

    def reserve(self) -> int:
        self.entries.append(b"")
        return len(self.entries) - 1

    def set(self, index: int, data: bytes) -> None:
        self.entries[index] = data

    def copy(self, index: int, out: Any) -> None:
        """Write blob ``index`` to ``out`` through a ``SPOOL_COPY_BYTES`` buffer."""
        entry = self.entries[index]
        if isinstance(entry, bytes):
            out.write(entry)
            return
        start, length = entry
        if self.file is None:
            out.write(memoryview(self.memory)[start:start + length])
            return
        self.file.seek(start)
        buffer = bytearray(min(SPOOL_COPY_BYTES, length))
        while length:
            view = memoryview(buffer)[:min(len(buffer), length)]
            got = self.file.readinto(view)
            if not got:
                raise WriteError(f"{self.target}: the spooled blobs were truncated on disk")
            out.write(view[:got])
            length -= got


class _Layout:
    """Turns the inputs into header entries and encoded blobs, in first-reference order."""

    def __init__(self, source: str, alignment: int, spool: _BlobSpool) -> None:
        power_of_two = alignment & (alignment - 1) == 0
        if not (C.MIN_ALIGNMENT <= alignment <= C.MAX_ALIGNMENT and power_of_two):
            raise WriteError(f"{source}: alignment must be a power of two in "
                             f"[{C.MIN_ALIGNMENT}, {C.MAX_ALIGNMENT}], got {alignment}")
        self.source = source
        self.header = Header(alignment=alignment)
        self.spool = spool
        self.blob_meta: list[tuple[str, str, tuple[int, ...], int]] = []
        self.generators: dict[Any, int] = {}
        self.segments: dict[int, int] = {}
        self.segment_inputs: list[Segment] = []
        self.segment_fill: list[int] = []
        self.pack_blob: int | None = None
        self.pack_bytes = bytearray()

    def fail(self, where: str, message: str) -> WriteError:
        return WriteError(f"{self.source}: {where}: {message}")

    # -- blobs -----------------------------------------------------------------------------
    def add_blob(self, tensor: torch.Tensor, codec: str, where: str) -> int:
        if codec not in C.CODECS:
            raise self.fail(where, f"codec must be one of {C.CODECS}, got {codec!r}")
        tensor = tensor.detach()
        if tensor.is_meta:
            raise MetaTensorError(f"{self.source}: {where}: Cannot copy out of meta tensor: it "
                                  "is on the meta device and has no data; materialise it "
                                  "(e.g. load_state_dict) before saving")
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise InvalidTensorError(f"{self.source}: {where}: sparse tensors cannot be "
                                     "stored; call .to_dense() first")
        dtype = from_torch(tensor.dtype)
        host = tensor.to("cpu").contiguous()
        raw = memoryview(host.reshape(-1).view(torch.uint8).numpy().data if host.numel()
                         else b"")
        # raw blobs are the tensor's own bytes: spooled from its memory, not from a copy
        stored = raw if codec == C.Codec.RAW else encode_blob(raw, codec)
        decoded = host.numel() * C.DTYPE_SIZES[dtype]
        if codec == C.Codec.ZSTD and decoded > max(C.MAX_ZSTD_RATIO * len(stored),
                                                   C.ZSTD_MIN_DECODED_ALLOWANCE):
            codec, stored = C.Codec.RAW, raw
        self.blob_meta.append((codec, dtype, tuple(host.shape), checksum(stored)))
        return self.spool.append(stored)

    # -- generators and segments -----------------------------------------------------------
    def add_generator(self, spec: GeneratorSpec, where: str) -> int:
        key: Any = id(spec) if spec.inline is not None else spec
        if key in self.generators:
            return self.generators[key]
        weights: PhiloxWeights | InlineWeights
        if spec.inline is not None:
            shapes = spec.parameter_shapes()
            if len(spec.inline) != len(shapes):
                raise self.fail(where, f"inline generator needs {len(shapes)} tensors")
            weights = InlineWeights(tuple(
                self.add_blob(t.to(torch.float32), C.Codec.RAW, f"{where}.inline[{i}]")
                for i, t in enumerate(spec.inline)))
        elif spec.seed is None or not 0 <= spec.seed <= 0xFFFFFFFF:
            raise self.fail(where, f"generator seed must be a uint32, got {spec.seed}")
        else:
            weights = PhiloxWeights(spec.seed)
        entry = GeneratorEntry(spec.k, spec.d, spec.hidden, float(spec.L), weights,
                               float(spec.omega0), spec.bias, spec.normalize)
        self.header.generators.append(entry)
        self.generators[key] = len(self.header.generators) - 1
        return self.generators[key]

    def add_segment(self, segment: Segment, where: str) -> int:
        if id(segment) in self.segments:
            return self.segments[id(segment)]
        spec = segment.generator
        alpha, beta = segment.alpha, segment.beta
        if alpha.dim() != 3 or alpha.shape[2] != spec.k:
            raise self.fail(where, f"alpha must have shape [chunks, m, k={spec.k}], got "
                            f"{list(alpha.shape)}")
        if tuple(beta.shape) != tuple(alpha.shape[:2]):
            raise self.fail(where, f"beta must have shape {list(alpha.shape[:2])}, got "
                            f"{list(beta.shape)}")
        for name, t in (("alpha", alpha), ("beta", beta)):
            if from_torch(t.dtype) not in C.ALPHA_BETA_DTYPES:
                raise self.fail(where, f"{name} must be float32, float16 or bfloat16, got "
                                f"{t.dtype}")
        if not 1 <= alpha.shape[1] <= C.MAX_M:
            raise self.fail(where, f"m must be in [1, {C.MAX_M}], got {alpha.shape[1]}")
        generator = self.add_generator(spec, f"{where}.generator")
        a = self.add_blob(alpha, segment.codec, f"{where}.alpha")
        b = self.add_blob(beta, segment.codec, f"{where}.beta")
        self.header.segments.append(SegmentEntry(generator, alpha.shape[1], alpha.shape[0], a, b))
        self.segment_inputs.append(segment)
        self.segment_fill.append(0)
        self.segments[id(segment)] = len(self.header.segments) - 1
        return self.segments[id(segment)]

    def finish_pack(self) -> None:
        if self.pack_blob is not None:
            stored = bytes(self.pack_bytes)
            self.spool.set(self.pack_blob, stored)
            self.blob_meta[self.pack_blob] = (C.Codec.RAW, C.PACK_DTYPE, (len(stored),),
                                              checksum(stored))

    def finish_segments(self) -> None:
        for index, (segment, filled) in enumerate(zip(self.segment_inputs, self.segment_fill,
                                                      strict=True)):
            d = segment.generator.d
            chunks = segment.alpha.shape[0]
            if chunks != -(-filled // d):
                raise self.fail(f"segment {index}", f"its members hold {filled} values, which "
                                f"need ceil({filled} / {d}) = {-(-filled // d)} chunks, but "
                                f"alpha has {chunks}")

    # -- tensors ---------------------------------------------------------------------------
    def theta0(self, theta0: Theta0, shape: tuple[int, ...], where: str) -> Theta0Entry:
        if isinstance(theta0, DeclaredTheta0):
            return theta0.entry
        if not isinstance(theta0, StoredTheta0):
            raise self.fail(where, f"theta0 must be a Theta0 (Theta0.zeros(), .stored(...), "
                            f"...), got {type(theta0).__name__}")
        if tuple(theta0.tensor.shape) != shape or not theta0.tensor.is_floating_point():
            raise self.fail(where, f"a stored theta0 must be a float tensor of shape "
                            f"{list(shape)}, got {theta0.tensor.dtype} {list(theta0.tensor.shape)}")
        return BlobTheta0(self.add_blob(theta0.tensor, C.Codec.RAW, where))

    def member(self, value: MCNC, where: str) -> MemberEntry:
        shape = tuple(int(s) for s in value.shape)
        dtype = from_torch(value.dtype)
        if dtype not in C.FLOAT_DTYPES:
            raise self.fail(where, f"an mcnc tensor's dtype must be floating point, got "
                            f"{value.dtype}")
        segment = self.add_segment(value.segment, f"{where}.segment")
        offset = self.segment_fill[segment]
        self.segment_fill[segment] += math.prod(shape)
        return MemberEntry(shape, dtype, segment, offset,
                           self.theta0(value.theta0, shape, f"{where}.theta0"))

    def add_tensor(self, name: str, source: TensorSource) -> None:
        if not isinstance(name, str) or not name:
            raise self.fail(repr(name), "tensor names must be non-empty strings")
        if not _is_utf8(name):
            raise self.fail(f"tensor {name!r}", f"the name is {_NOT_UTF8}")
        where = f"tensor {name!r}"
        entry: TensorEntry
        if isinstance(source, torch.Tensor) and self.packable(source):
            entry = self.pack(name, source)
        elif isinstance(source, torch.Tensor):
            source = Dense(source)
        if isinstance(source, Dense):
            blob = self.add_blob(source.tensor, source.codec, where)
            meta = self.blob_meta[blob]
            entry = DenseTensor(name, meta[2], meta[1], blob)
        elif isinstance(source, MCNC):
            f = self.member(source, where)
            entry = MCNCTensor(name, f.shape, f.dtype, f.segment, f.offset, f.theta0)
        elif isinstance(source, LoRA):
            entry = self.lora(name, source, where)
        elif not isinstance(source, torch.Tensor):
            raise InvalidTensorError(f"{self.source}: {where}: expected a torch.Tensor, Dense, "
                                     f"MCNC or LoRA, got {type(source).__name__}")
        self.header.tensors.append(entry)

    @staticmethod
    def packable(tensor: torch.Tensor) -> bool:
        """Small strided tensors with data (``add_blob`` reports the others' problems)."""
        return (tensor.layout == torch.strided and not tensor.is_sparse and not tensor.is_meta
                and tensor.numel() * tensor.element_size() < C.PACK_MAX_TENSOR_BYTES)

    def pack(self, name: str, tensor: torch.Tensor) -> PackedTensor:
        """§6.4: the tensor's bytes go at the end of the file's one pack blob, created at the
        first packed tensor (so it sits there in blob order) and filled in by ``finish_pack``."""
        dtype = from_torch(tensor.dtype)
        if self.pack_blob is None:
            self.blob_meta.append((C.Codec.RAW, C.PACK_DTYPE, (0,), 0))
            self.pack_blob = self.spool.reserve()
        host = tensor.detach().to("cpu").contiguous()
        start = len(self.pack_bytes)
        if host.numel():
            self.pack_bytes += host.reshape(-1).view(torch.uint8).numpy().tobytes()
        return PackedTensor(name, tuple(host.shape), dtype, self.pack_blob, start)

    def lora(self, name: str, source: LoRA, where: str) -> LoRATensor:
        if len(source.A.shape) != 2 or len(source.B.shape) != 2 or \
                source.A.shape[0] != source.B.shape[1]:
            raise self.fail(where, f"LoRA factors must be A [r, in] and B [out, r], got "
                            f"{list(source.A.shape)} and {list(source.B.shape)}")
        shape = (int(source.B.shape[0]), int(source.A.shape[1]))
        dtype = from_torch(source.dtype)
        if dtype not in C.FLOAT_DTYPES or not math.isfinite(source.scale):
            raise self.fail(where, "a lora tensor needs a float dtype and a finite scale")
        theta0 = self.theta0(source.theta0, shape, f"{where}.theta0")
        a = self.member(source.A, f"{where}.A")
        b = self.member(source.B, f"{where}.B")
        return LoRATensor(name, shape, dtype, theta0, float(source.scale), a, b)

    # -- layout ----------------------------------------------------------------------------
    def place_blobs(self) -> tuple[int, bytes]:
        """Fix blob offsets and the stored header, ``(header_codec, bytes)``. The header's
        length depends on the offsets, so iterate to a fixpoint. A compressed header's size can
        keep moving the data start back and forth across an alignment boundary: then the next
        zstd level is tried (§11), and plain msgpack, whose size only grows, last."""
        lengths = self.spool.lengths
        self.header.minor = self.header.required_minor()  # §13: the lowest that fits
        for attempt in (*range(HEADER_LEVEL_ATTEMPTS), None):
            stored = self._settle(lengths, attempt)
            if stored is not None:
                break
        else:  # pragma: no cover - plain msgpack grows monotonically and settles fast
            raise WriteError(f"{self.source}: header layout did not converge")
        codec, header_bytes = stored
        end = self.header.blobs[-1].offset + lengths[-1] if lengths else data_start(
            len(header_bytes), self.header.alignment)
        try:
            # Parse the bytes as the reader will (R10-R13, R30-R34, R71-R74), then check
            # what it reads (R20-R75) and that it is what was laid out.
            preamble = Preamble(self.header.minor, len(header_bytes), checksum(header_bytes),
                                codec)
            parsed = decode_header(header_bytes, preamble, self.source)
            validate_header(parsed, len(header_bytes), end, self.source)
            if parsed.tensors != self.header.tensors:
                # Offsets the writer left out (§6.1) and packed tensors' starts (§6.4) must
                # resolve to the ones it laid out.
                raise WriteError("internal error: the header does not read back as written; "
                                 "please report this", path=self.source)
        except MCNCError as exc:
            raise WriteError(f"refusing to write an invalid file: {exc.message}",
                             rule=exc.rule, path=exc.path or self.source, field=exc.field,
                             tensor=exc.tensor) from exc
        return codec, header_bytes

    def _settle(self, lengths: list[int], attempt: int | None) -> tuple[int, bytes] | None:
        """Iterate offsets and header to a fixpoint; ``None`` if it does not settle. The header
        is zstd-compressed at ``header_level(msgpack length, attempt)`` (§2, §11), or stays
        plain msgpack for ``attempt=None`` (or below the compression threshold)."""
        codec, header_bytes = C.HEADER_CODEC_MSGPACK, b""
        for _ in range(16):
            start = data_start(len(header_bytes), self.header.alignment)
            offsets = blob_layout(start, lengths, self.header.alignment)
            self.header.blobs = [
                BlobEntry(off, length, C.Codec(codec), dtype, shape, xxh)
                for off, length, (codec, dtype, shape, xxh) in zip(offsets, lengths,
                                                                   self.blob_meta, strict=True)
            ]
            encoded = encode_header(self.header)
            if len(encoded) > C.MAX_HEADER_BYTES:
                raise WriteError(f"{self.source}: the header is {len(encoded)} bytes, over "
                                 f"MAX_HEADER_BYTES {C.MAX_HEADER_BYTES}; split the model")
            new_codec, new_bytes = (C.HEADER_CODEC_MSGPACK, encoded)
            if attempt is not None and len(encoded) >= C.HEADER_ZSTD_THRESHOLD:
                new_codec, new_bytes = compress_header(encoded, header_level(len(encoded),
                                                                             attempt))
            if (new_codec, new_bytes) == (codec, header_bytes):
                return codec, header_bytes
            codec, header_bytes = new_codec, new_bytes
        return None


def _atomic_write(target: Path, layout: _Layout, header_codec: int, header_bytes: bytes,
                  overwrite: bool) -> None:
    with atomic_path(target, overwrite=overwrite) as tmp, \
            os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as out:
        out.write(encode_preamble(header_bytes, layout.header.minor, header_codec))
        out.write(header_bytes)
        position = C.PREAMBLE_SIZE + len(header_bytes)
        for index, blob in enumerate(layout.header.blobs):
            out.write(bytes(blob.offset - position))
            layout.spool.copy(index, out)
            position = blob.offset + blob.length
        if not layout.header.blobs:
            out.write(bytes(data_start(len(header_bytes), layout.header.alignment) - position))
