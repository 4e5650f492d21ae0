"""Reading ``.mcnc`` files: header first, tensors on demand, on any torch device.

``open`` reads and validates the preamble and header only (R1-R75 but the blob bytes); blobs
are read through a private copy-on-write memory map when a tensor needs them, and each blob's
checksum is checked on first use. Regeneration runs in bounded batches (``regenerate.py``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import mmap
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import constants as C
from .container import decode_blob, decode_header, read_preamble
from .dtypes import to_torch
from .errors import (
    DeviceMemoryError,
    ExternalReferenceDamaged,
    ExternalReferenceError,
    FormatError,
    MCNCError,
    UnsupportedFeatureError,
)
from .generator import GeneratorSpec, ieee_fp32
from .header import (
    BlobTheta0,
    DenseTensor,
    GeneratorEntry,
    Header,
    LoRATensor,
    MCNCTensor,
    MemberEntry,
    PackedTensor,
    TensorEntry,
    Theta0Entry,
)
from .hostmem import zeros_float32
from .regenerate import (
    DEFAULT_CPU_WORKSPACE,
    DEFAULT_DEVICE_WORKSPACE,
    FusedGenerator,
    MemberRequest,
    regenerate_segment,
)
from .theta0 import Theta0Resolver
from .validate import data_start, validate_header

__all__ = ["MCNCFile", "TensorInfo", "load", "open_file", "tensor_sha256"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TensorInfo:
    """What the header says of one tensor, without reading any blob."""

    name: str
    encoding: str
    shape: tuple[int, ...]
    dtype: str
    stored_values: int
    stored_bytes: int
    theta0: str | None
    segment: int | None
    generator: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class MCNCFile:
    """An open ``.mcnc`` file. Use as a context manager, or call ``close()``."""

    def __init__(self, path: PathLike, *, verify: bool = True,
                 workspace_bytes: int | None = None) -> None:
        self.source = str(path)
        if self.source.startswith("hf://"):
            from .hub import resolve_path

            path = resolve_path(self.source)
        self.path = Path(path)
        self.verify = verify
        self.workspace_bytes = workspace_bytes
        self._map: mmap.mmap | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise MCNCError(f"{self.source}: cannot open: {exc.strerror}") from exc
        try:
            try:  # the map holds its own reference to the file: no descriptor outlives this
                status = os.fstat(fd)
                if not stat.S_ISREG(status.st_mode):
                    raise MCNCError(f"{self.source}: not a regular file; give the path of an "
                                    ".mcnc file")
                self.file_size = status.st_size
                self._map = _map_file(fd, self.file_size, self.source)
            finally:
                os.close(fd)
            view = memoryview(self._map) if self._map is not None else memoryview(b"")
            preamble = read_preamble(view, self.file_size, self.source)
            raw_header = view[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + preamble.header_length]
            self.header: Header = decode_header(raw_header, preamble, self.source)
            self.minor = preamble.minor
            self.header_length = preamble.header_length
            validate_header(self.header, preamble.header_length, self.file_size, self.source)
        except BaseException:
            self.close()
            raise
        self._by_name = {t.name: t for t in self.header.tensors}
        self._verified: set[int] = set()
        self._generators: dict[tuple[int, int, str], FusedGenerator] = {}
        self._dense_theta0: dict[tuple[Any, ...], torch.Tensor] = {}
        self._packs: dict[int, memoryview] = {}
        self._theta0 = Theta0Resolver(self._dense_theta0_tensor, self.source)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        for cache in ("_generators", "_dense_theta0", "_packs"):  # views of the map, copies
            getattr(self, cache, {}).clear()
        if getattr(self, "_map", None) is not None:
            # Tensors from blob_tensor may still view the map: it is unmapped when they go.
            with contextlib.suppress(BufferError):
                self._map.close()  # type: ignore[union-attr]
            self._map = None

    def __enter__(self) -> MCNCFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- header facts ----------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata)

    @property
    def info(self) -> dict[str, str]:
        return dict(self.header.info)

    def keys(self) -> list[str]:
        return [t.name for t in self.header.tensors]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.header.tensors)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise MCNCError(
                f"{self.source}: no tensor named {name!r}; `mcnc inspect {self.source}` lists "
                f"the {len(self._by_name)} tensors"
            ) from None

    def generator_spec(self, index: int, device: torch.device | str = "cpu") -> GeneratorSpec:
        """The generator ``index`` as a ``GeneratorSpec`` (inline weights read from blobs)."""
        g = self.header.generators[index]
        inline = None
        if g.blobs is not None:
            inline = tuple(self.blob_tensor(b, f"generators[{index}].weights.blobs[{j}]")
                           for j, b in enumerate(g.blobs))
        return _spec_of(g, inline)

    def tensor_info(self, name: str) -> TensorInfo:
        t = self.entry(name)
        stored_values, stored_bytes = self._stored(t)
        members = t.members()
        segment = members[0].segment if members else None
        generator = self.header.segments[segment].generator if segment is not None else None
        theta0 = str(t.theta0.kind) if isinstance(t, MCNCTensor | LoRATensor) else None
        return TensorInfo(t.name, str(t.encoding), t.shape, t.dtype, stored_values,
                          stored_bytes, theta0, segment, generator)

    def _stored(self, t: TensorEntry) -> tuple[int, int]:
        """Values and bytes this tensor's own storage takes (its share of segment blobs)."""
        if isinstance(t, DenseTensor):
            blob = self.header.blobs[t.blob]
            return blob.numel, blob.length
        if isinstance(t, PackedTensor):  # its share of the (possibly zstd) pack blob
            blob = self.header.blobs[t.blob]
            return t.numel, round(t.nbytes * blob.length / max(blob.decoded_length, 1))
        members = t.members()
        values = 0.0
        nbytes = 0.0
        for member in members:
            seg = self.header.segments[member.segment]
            d = self.header.generators[seg.generator].d
            share = member.numel / max(seg.chunks * d, 1)
            for blob_index in (seg.alpha, seg.beta):
                blob = self.header.blobs[blob_index]
                values += share * blob.numel
                nbytes += share * blob.length
        return round(values), round(nbytes)

    def summary(self) -> dict[str, Any]:
        """Sizes and ratios for ``mcnc inspect`` and for users deciding what to ship."""
        dense_bytes = sum(t.numel * C.DTYPE_SIZES.get(t.dtype, 4) for t in self.header.tensors)
        compressed = [t for t in self.header.tensors if not t.stores_values]
        compressed_params = sum(t.numel for t in compressed)
        trainable = sum(
            self.header.blobs[s.alpha].numel + self.header.blobs[s.beta].numel
            for s in self.header.segments
        )
        return {
            "file_bytes": self.file_size,
            "header_bytes": self.header_length,
            "dense_bytes": dense_bytes,
            "parameters": sum(t.numel for t in self.header.tensors),
            "compressed_parameters": compressed_params,
            "stored_alpha_beta_values": trainable,
            "compression_ratio": dense_bytes / self.file_size if self.file_size else 0.0,
            "compressed_part_ratio": compressed_params / trainable if trainable else 0.0,
            "tensors": len(self.header.tensors),
            "segments": len(self.header.segments),
            "generators": len(self.header.generators),
            "format_version": f"{C.FORMAT_MAJOR}.{self.minor}",
        }

    # -- blobs -----------------------------------------------------------------------------
    def blob_bytes(self, index: int, path: str | None = None) -> memoryview | bytes:
        """Decoded bytes of blob ``index``, checksum-checked on first use."""
        blob = self.header.blobs[index]
        assert self._map is not None, "blob access on a closed file"
        stored = memoryview(self._map)[blob.offset : blob.offset + blob.length]
        verify = self.verify and index not in self._verified
        decoded = decode_blob(stored, blob, path or f"blobs[{index}]", self.source, verify)
        if verify:
            self._verified.add(index)
        return decoded

    def blob_tensor(self, index: int, path: str | None = None) -> torch.Tensor:
        """Blob ``index`` as a CPU tensor of its dtype and shape (zero-copy for raw blobs)."""
        blob = self.header.blobs[index]
        data = self.blob_bytes(index, path)
        return self._as_tensor(data, blob.dtype, blob.shape, path or f"blobs[{index}]")

    def stored_tensor(self, t: TensorEntry) -> torch.Tensor:
        """A dense or packed tensor's stored values as a CPU tensor (§6.2, §6.4). A packed
        tensor is copied out of its blob: its bytes need not be aligned for its dtype."""
        assert isinstance(t, DenseTensor | PackedTensor)
        path = f"tensors[{t.name!r}].blob"
        if isinstance(t, DenseTensor):
            return self.blob_tensor(t.blob, path)
        return self._as_tensor(bytearray(self.packed_bytes(t)), t.dtype, t.shape, path)

    def packed_bytes(self, t: PackedTensor) -> memoryview:
        """A packed tensor's bytes in its pack blob (§6.4). Decoded zstd packs are kept until
        the file is closed: decoding one for each of its tensors would make a load quadratic
        (raw packs are zero-copy views of the map and need no keeping)."""
        data = self._packs.get(t.blob)
        if data is None:
            data = memoryview(self.blob_bytes(t.blob, f"tensors[{t.name!r}].blob"))
            if self.header.blobs[t.blob].codec != C.Codec.RAW:
                self._packs[t.blob] = data
        return data[t.start : t.start + t.nbytes]

    def _as_tensor(self, data: memoryview | bytes | bytearray, dtype: str,
                   shape: tuple[int, ...], path: str) -> torch.Tensor:
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=to_torch(dtype))
        if isinstance(data, bytes):
            data = bytearray(data)
        tensor = torch.frombuffer(data, dtype=to_torch(dtype), count=numel)
        if dtype == "bool" and bool((tensor.view(torch.uint8) > 1).any()):
            raise FormatError(f"{self.source}: {path}: bool bytes must be 0 or 1 (§1)")
        return tensor.reshape(shape)

    # -- tensors ---------------------------------------------------------------------------
    def get_tensor(self, name: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, regenerated (or decoded) on ``device``; ``dtype`` overrides floats."""
        return self.tensors([name], device=device, dtype=dtype)[name]

    def get_lora_factors(self, name: str, device: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, scale)`` of a lora tensor, without merging them into theta0."""
        t = self.entry(name)
        if not isinstance(t, LoRATensor):
            raise MCNCError(f"{self.source}: {name!r} is a {t.encoding} tensor, not lora")
        dev = torch.device(device)
        factors = self._members([(m, label) for label, m in t.labelled_members()], dev)
        out = [factors[f"{name}:A"], factors[f"{name}:B"]]
        # Rounded to the factor's own dtype first (§6.3), whatever dtype is asked for.
        out = [x.to(to_torch(f.dtype)).to(dtype or to_torch(f.dtype))
               for x, f in zip(out, (t.A, t.B), strict=True)]
        return out[0], out[1], float(t.scale or 0.0)

    def tensors(self, names: Iterable[str] | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Many tensors at once; each segment is regenerated once for all requested members."""
        return dict(self.iter_tensors(names, device, dtype))

    def iter_tensors(self, names: Iterable[str] | None = None,
                     device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in file order; segments are regenerated as needed."""
        dev = torch.device(device)
        # A name asked for twice is produced once (its segment values are consumed).
        wanted = [self.entry(n) for n in dict.fromkeys(self.keys() if names is None else names)]
        members: list[tuple[MemberEntry, str]] = []
        for t in wanted:
            self._check_supported(t)
            members += [(member, label) for label, member in t.labelled_members()]
        generated = self._members(members, dev)
        for t in wanted:
            yield t.name, self._finish(t, generated, dev, dtype)

    def _check_supported(self, t: TensorEntry) -> None:
        if not t.known:
            raise UnsupportedFeatureError(
                f"tensor {t.name!r} uses encoding {t.encoding!r}, unknown to this reader. Upgrade "
                "mcnc-format; the other tensors can be read by name", rule="R46",
                path=self.source, tensor=t.name)

    def _finish(self, t: TensorEntry, generated: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype | None) -> torch.Tensor:
        out_dtype = to_torch(t.dtype)
        if dtype is not None and out_dtype.is_floating_point:
            out_dtype = dtype
        if t.stores_values:
            return _to_device(self.stored_tensor(t), device, out_dtype, self.source)
        if isinstance(t, MCNCTensor):
            return generated.pop(t.name).to(out_dtype)
        assert isinstance(t, LoRATensor)
        # Each factor is an mcnc member: rounded to its own dtype before the product (§6.3),
        # so the merge equals B @ A of what get_lora_factors returns.
        a = generated.pop(f"{t.name}:A").to(to_torch(t.A.dtype)).to(torch.float32)
        b = generated.pop(f"{t.name}:B").to(to_torch(t.B.dtype)).to(torch.float32)
        with ieee_fp32(device):
            base = self._theta0.values(t.theta0, t.shape, 0, t.numel, device, f"{t.name}.theta0")
            merged = torch.mm(b, a) * float(t.scale or 0.0)
            if base is not None:
                merged = merged + base.reshape(t.shape)
        self._release_theta0(t.theta0, device)
        return merged.to(out_dtype)

    def _members(self, members: list[tuple[MemberEntry, str]], device: torch.device
                 ) -> dict[str, torch.Tensor]:
        """Float32 values of segment members on ``device``, one pass per segment."""
        by_segment: dict[int, list[tuple[MemberEntry, str]]] = {}
        for member, label in members:
            by_segment.setdefault(member.segment, []).append((member, label))
        out: dict[str, torch.Tensor] = {}
        for seg_index, group in by_segment.items():
            seg = self.header.segments[seg_index]
            fused = self._fused(seg.generator, seg.m, device)
            alpha = self.blob_tensor(seg.alpha, f"segments[{seg_index}].alpha")
            beta = self.blob_tensor(seg.beta, f"segments[{seg_index}].beta")
            requests = []
            for member, label in group:
                dest = _zeros(member.numel, device, self.source, label)
                out[label] = dest
                requests.append(MemberRequest(member, dest, self._theta0_fn(member, label,
                                                                            device)))
            try:
                regenerate_segment(fused, alpha, beta, requests, self._workspace(device))
            except (RuntimeError, MemoryError) as exc:
                if not _out_of_memory(exc):
                    raise
                raise DeviceMemoryError(
                    f"{self.source}: out of memory on {device} regenerating segment {seg_index} "
                    f"({seg.chunks} chunks) with a {self._workspace(device)}-byte workspace"
                ) from exc
            for member, label in group:
                out[label] = out[label].reshape(member.shape)
                self._release_theta0(member.theta0, device)
        return out

    def _release_theta0(self, entry: Theta0Entry, device: torch.device) -> None:
        """Forget a blob or external theta0 once its tensor is built, so a load holds one
        base tensor at a time, not all of them."""
        self._dense_theta0.pop((entry, str(device)), None)

    def _theta0_fn(self, member: MemberEntry, label: str, device: torch.device):
        def values(start: int, count: int) -> torch.Tensor | None:
            return self._theta0.values(member.theta0, member.shape, start, count, device,
                                       f"{label}.theta0")
        return values

    def _workspace(self, device: torch.device) -> int:
        if self.workspace_bytes is not None:
            return self.workspace_bytes
        return DEFAULT_CPU_WORKSPACE if device.type == "cpu" else DEFAULT_DEVICE_WORKSPACE

    def _fused(self, index: int, m: int, device: torch.device) -> FusedGenerator:
        key = (index, m, str(device))
        if key not in self._generators:
            try:
                weights = self.generator_spec(index).weights(device)
                self._generators[key] = FusedGenerator(weights, m)
            except (RuntimeError, MemoryError) as exc:
                if not _out_of_memory(exc):
                    raise
                g = self.header.generators[index]
                params = sum(math.prod(s) for s in g.parameter_shapes())
                raise DeviceMemoryError(
                    f"{self.source}: generators[{index}]: out of memory on {device} drawing "
                    f"{params} weights ({4 * params} bytes) for widths {list(g.widths)}"
                ) from exc
        return self._generators[key]

    def _dense_theta0_tensor(self, entry: Theta0Entry, shape: tuple[int, ...],
                             device: torch.device) -> torch.Tensor:
        key = (entry, str(device))
        if key not in self._dense_theta0:
            if isinstance(entry, BlobTheta0):
                assert entry.blob is not None
                value = self.blob_tensor(entry.blob, "theta0 blob")
            else:
                value = self._external(entry, shape)
            self._dense_theta0[key] = value.to(device=device, dtype=torch.float32)
        return self._dense_theta0[key]

    def _external(self, entry: Theta0Entry, shape: tuple[int, ...]) -> torch.Tensor:
        """An external theta0 tensor, shape- and sha256-checked (R75); references on the Hub
        (or relative to a file from the Hub) are downloaded and re-downloaded if damaged."""
        assert entry.uri is not None
        if entry.uri.startswith("hf://") or self.source.startswith("hf://"):
            from .hub import read_reference

            return read_reference(entry.uri, self.source,
                                  lambda path: self._read_external(entry, shape, path))
        return self._read_external(entry, shape, self.path.parent / entry.uri)

    def _read_external(self, entry: Theta0Entry, shape: tuple[int, ...], path: Path
                       ) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        assert entry.uri is not None and entry.tensor is not None
        try:
            with safe_open(str(path), framework="pt") as f:
                if entry.tensor not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    raise ExternalReferenceError(
                        f"theta0 reference {entry.uri}: no tensor named {entry.tensor!r} there",
                        rule="R75", path=self.source)
                value = f.get_tensor(entry.tensor)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            if isinstance(exc, MCNCError):
                raise
            remedy = ("It is fetched from the Hub; try again, or check the base repository"
                      if entry.uri.startswith("hf://") or self.source.startswith("hf://")
                      else "Put the base checkpoint next to the .mcnc file")
            raise ExternalReferenceDamaged(
                f"theta0 reference {entry.uri} ({path}) cannot be read: {exc}. {remedy}",
                rule="R75", path=self.source) from exc
        if tuple(value.shape) != shape:
            raise ExternalReferenceError(
                f"theta0 reference {entry.uri}:{entry.tensor} has shape {list(value.shape)}, "
                f"the tensor needs {list(shape)}", rule="R75", path=self.source)
        digest = tensor_sha256(value)
        if digest != entry.sha256:
            raise ExternalReferenceDamaged(
                f"theta0 reference {entry.uri}:{entry.tensor} has sha256 {digest}, the file "
                f"pins {entry.sha256}: the base checkpoint differs from the one this file was "
                "made against", rule="R75", path=self.source)
        return value

    # -- verification ----------------------------------------------------------------------
    def check_padding(self) -> None:
        """R22: the bytes between header and blobs, and between blobs, are zero."""
        assert self._map is not None
        view = memoryview(self._map)
        position = C.PREAMBLE_SIZE + self.header_length
        gaps = []
        for blob in self.header.blobs:
            gaps.append((position, blob.offset))
            position = blob.offset + blob.length
        gaps.append((position, data_start(self.header_length, self.header.alignment)
                     if not self.header.blobs else position))
        for start, stop in gaps:
            if any(view[start:stop]):
                raise FormatError(f"non-zero padding bytes in [{start}, {stop})", rule="R22",
                                  path=self.source)


def _map_file(fd: int, size: int, source: str) -> mmap.mmap | None:
    """A private copy-on-write map: blobs become writable tensors without a copy."""
    if not size:
        return None
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise MCNCError(f"{source}: cannot map the file into memory: {exc.strerror}") from exc


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw little-endian C-order bytes, as pinned by §7.4."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _spec_of(g: GeneratorEntry, inline: tuple[torch.Tensor, ...] | None) -> GeneratorSpec:
    return GeneratorSpec(k=g.k, d=g.d, hidden=g.hidden, L=g.L, omega0=g.omega0, bias=g.bias,
                         normalize=g.normalize, seed=g.seed, inline=inline)


def _out_of_memory(exc: BaseException) -> bool:
    """torch reports a failed CPU allocation as a plain RuntimeError, CUDA's as its own."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOMEM)


def _zeros(numel: int, device: torch.device, source: str, label: str) -> torch.Tensor:
    """A zero-filled float32 output (``regenerate_segment`` accumulates into it)."""
    try:
        if device.type == "cpu":
            return zeros_float32(numel)
        return torch.zeros(numel, dtype=torch.float32, device=device)
    except (RuntimeError, MemoryError, OSError) as exc:
        if not _out_of_memory(exc):
            raise
        raise DeviceMemoryError(
            f"{source}: out of memory on {device} allocating {numel * 4} bytes for {label}"
        ) from exc


def _to_device(value: torch.Tensor, device: torch.device, dtype: torch.dtype, source: str
               ) -> torch.Tensor:
    try:
        if device.type == "cpu":
            return value.to(dtype=dtype, copy=True)
        return value.to(device=device, dtype=dtype)
    except torch.OutOfMemoryError as exc:
        raise DeviceMemoryError(
            f"{source}: out of memory on {device} for a {value.numel() * value.element_size()}"
            "-byte tensor"
        ) from exc


def open_file(path: PathLike, *, verify: bool = True) -> MCNCFile:
    """Open an ``.mcnc`` file (header only). ``verify`` checks each blob's checksum on first
    use; turn it off only for files you produced yourself in this process."""
    return MCNCFile(path, verify=verify)


def load(path: PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
         ) -> dict[str, torch.Tensor]:
    """Every tensor of a file, regenerated on ``device``; ``dtype`` overrides float dtypes.

    On CUDA this goes through the pipelined loader (``mcnc_format.streaming``: pinned staging,
    overlapped copies, the fused kernel when Triton is installed); elsewhere through the
    reader's batched path, which needs no staging buffers."""
    if torch.device(device).type == "cuda":
        from .streaming import load as load_pipelined

        return load_pipelined(path, device, dtype)
    with open_file(path) as f:
        return f.tensors(device=device, dtype=dtype)
