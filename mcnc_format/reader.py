"""Reading ``.mcnc`` files: header first, tensors (or boxes of them) on demand, on any device.

``open_file`` reads and validates the preamble and header only (R1-R75 but the blob bytes).
Every tensor is then produced by the one engine (``mcnc_format.engine``): a request (names,
boxes, device, dtype) becomes a plan, and the executor reads the byte ranges the plan needs
(``pread``, each blob's checksum checked on first use) and regenerates into the outputs.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch

from . import constants as C
from .container import decode_header, read_preamble
from .devices import check_device, check_dtype
from .dtypes import to_torch
from .engine.box import Box
from .engine.digests import FileIdentity
from .engine.execute import Executor
from .engine.fused import FusedGenerator
from .engine.options import LoadOptions, Verify
from .engine.plan import Plan, TensorRequest, plan_load
from .engine.resolve import LocalResolver, Resolver
from .engine.source import BlobStore, FileSource
from .engine.theta0 import Theta0Source
from .errors import DeviceMemoryError, FormatError, MCNCError, UnsupportedFeatureError
from .generator import GeneratorSpec
from .header import (
    DenseTensor,
    ExternalTheta0,
    GeneratorEntry,
    Header,
    LoRATensor,
    MCNCTensor,
    PackedTensor,
    TensorEntry,
)
from .validate import data_start, validate_header

__all__ = ["Boxes", "MCNCFile", "TensorInfo", "TensorSlice", "open_file", "tensor_sha256"]

PathLike = str | os.PathLike[str]
#: A box per tensor name: a tuple of slices (``(slice(0, 128), slice(None))``), or a ``Box``.
Boxes = Mapping[str, Any]


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
    """An open ``.mcnc`` file. Use as a context manager, or call ``close()``.

    ``resolver`` turns the name into a local file and resolves theta0 references; the default
    reads local files only (``mcnc_format.open`` passes one that also reads ``hf://`` names).
    ``options`` are the load options of ``get_tensor``, ``tensors``, ``get_slice`` and
    ``stream`` without options of their own (``verify`` overrides theirs).
    """

    def __init__(self, path: PathLike, *, verify: bool | str | Verify = Verify.CACHED,
                 resolver: Resolver | None = None, options: LoadOptions | None = None) -> None:
        self.label = os.fspath(path)
        verify = Verify.of(verify)
        self.options = replace(options or LoadOptions(), verify=verify)
        self.resolver: Resolver = resolver or LocalResolver()
        self.path = self.resolver.local_path(path)
        self.verify = verify
        source = FileSource(self.path, self.label)
        try:
            self.file_size = source.size
            head = source.read(0, min(C.PREAMBLE_SIZE, source.size))
            preamble = read_preamble(head, source.size, self.label)
            raw_header = source.read(C.PREAMBLE_SIZE, preamble.header_length)
            self.header: Header = decode_header(raw_header, preamble, self.label)
            self.minor = preamble.minor
            self.header_length = preamble.header_length
            validate_header(self.header, preamble.header_length, source.size, self.label)
        except BaseException:
            source.close()
            raise
        self.blobs = BlobStore(source, self.header, verify is not Verify.NONE)
        self.theta0 = Theta0Source(self.blobs, self.resolver, self.label, verify)
        self._by_name = {t.name: t for t in self.header.tensors}
        self._generators: dict[tuple[int, int, str, bool], FusedGenerator] = {}

    def identity(self) -> FileIdentity:
        """What identifies the open file's contents (``engine/digests.py``)."""
        return self.blobs.source.identity()

    @property
    def source(self) -> str:
        """The name the file was opened by (a path or an ``hf://`` URI)."""
        return self.label

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._generators.clear()
        self.theta0.close()
        self.blobs.close()

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
                f"{self.label}: no tensor named {name!r}; `mcnc inspect {self.label}` lists "
                f"the {len(self._by_name)} tensors"
            ) from None

    def generator_spec(self, index: int) -> GeneratorSpec:
        """The generator ``index`` as a ``GeneratorSpec`` (inline weights read from blobs)."""
        g = self.header.generators[index]
        inline = None
        if g.blobs is not None:
            inline = tuple(self.blob_tensor(b, f"generators[{index}].weights.blobs[{j}]")
                           for j, b in enumerate(g.blobs))
        return _spec_of(g, inline)

    def fused_generator(self, index: int, m: int, device: torch.device,
                        kernels: ModuleType | None = None) -> FusedGenerator:
        """Generator ``index`` prepared for ``m`` components on ``device``, kept while the file
        is open. ``kernels``: draw Philox weights with the Triton kernel (the same bits)."""
        key = (index, m, str(device), kernels is not None)
        if key not in self._generators:
            spec = self.generator_spec(index)
            try:
                weights = (kernels.draw_generator_weights(spec, device)
                           if kernels is not None and spec.seed is not None
                           else spec.weights(device))
                self._generators[key] = FusedGenerator(weights, m)
            except (RuntimeError, MemoryError) as exc:
                if not isinstance(exc, torch.OutOfMemoryError | MemoryError):
                    raise
                g = self.header.generators[index]
                params = sum(math.prod(s) for s in g.parameter_shapes())
                raise DeviceMemoryError(
                    f"{self.label}: generators[{index}]: out of memory on {device} drawing "
                    f"{params} weights ({4 * params} bytes) for widths {list(g.widths)}"
                ) from exc
        return self._generators[key]

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
        values = 0.0
        nbytes = 0.0
        for member in t.members():
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
            "file_ratio": dense_bytes / self.file_size if self.file_size else 0.0,
            "weights_ratio": compressed_params / trainable if trainable else 0.0,
            "tensors": len(self.header.tensors),
            "segments": len(self.header.segments),
            "generators": len(self.header.generators),
            "format_version": f"{C.FORMAT_MAJOR}.{self.minor}",
        }

    # -- blobs -----------------------------------------------------------------------------
    def blob_bytes(self, index: int, path: str | None = None) -> memoryview:
        """Decoded bytes of blob ``index``, checksum-checked on first use."""
        return self.blobs.blob(index, path or f"blobs[{index}]")

    def blob_tensor(self, index: int, path: str | None = None) -> torch.Tensor:
        """Blob ``index`` as a CPU tensor of its dtype and shape."""
        blob = self.header.blobs[index]
        data = self.blob_bytes(index, path)
        dtype = to_torch(blob.dtype)
        if blob.numel == 0:
            return torch.empty(blob.shape, dtype=dtype)
        tensor = torch.frombuffer(bytearray(data), dtype=dtype, count=blob.numel)
        if blob.dtype == "bool" and bool((tensor.view(torch.uint8) > 1).any()):
            raise FormatError(f"{self.label}: {path or f'blobs[{index}]'}: bool bytes must be "
                              "0 or 1 (§1)")
        return tensor.reshape(blob.shape)

    # -- tensors ---------------------------------------------------------------------------
    def get_tensor(self, name: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """One tensor, regenerated (or decoded) on ``device``; ``dtype`` overrides floats."""
        return self.tensors([name], device=device, dtype=dtype)[name]

    def get_slice(self, name: str) -> TensorSlice:
        """A handle on one tensor whose ``[...]`` rebuilds only the indexed box, as
        ``safe_open(...).get_slice(name)`` does for safetensors."""
        return TensorSlice(self, self.entry(name))

    def get_lora_factors(self, name: str, device: torch.device | str = "cpu",
                         dtype: torch.dtype | str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, scale)`` of a lora tensor, without merging them into theta0; each factor
        is rounded to its own dtype (§6.3), then given ``dtype`` if asked."""
        t = self.entry(name)
        if not isinstance(t, LoRATensor):
            raise MCNCError(f"{name!r} is a {t.encoding} tensor, not lora", path=self.label,
                            tensor=name)
        want = check_dtype(dtype)
        factors = []
        for label, member in t.labelled_members():
            as_tensor = MCNCTensor(label, member.shape, member.dtype, member.segment,
                                   member.offset, member.theta0)
            request = TensorRequest(as_tensor, Box.full(member.shape), to_torch(member.dtype))
            (_, value), = self._run([request], check_device(device), self.options)
            factors.append(value if want is None else value.to(want))
        return factors[0], factors[1], float(t.scale or 0.0)

    def tensors(self, names: Iterable[str] | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
        """Many tensors at once, in request order; each chunk is regenerated once."""
        names = list(dict.fromkeys(self.keys() if names is None else names))
        found = dict(self.iter_tensors(names, device, dtype))
        return {name: found[name] for name in names}

    def iter_tensors(self, names: Iterable[str] | None = None,
                     device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` as each is complete (a segment's tensors complete in the
        order of their values in the segment)."""
        return self.stream(names, device, dtype)

    def stream(self, names: Iterable[str] | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype | str | None = None, *, boxes: Boxes | None = None,
               options: LoadOptions | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names`` (all when ``None``; a name asked for twice
        is produced once), each the box ``boxes[name]`` when given, as each is complete."""
        dev = check_device(device)
        requests = self.requests(names, dtype, boxes)
        if dev.type == "meta":  # shapes and dtypes only, for planning
            for request in requests:
                yield request.entry.name, torch.empty(request.box.result_shape,
                                                      dtype=request.dtype, device=dev)
            return
        for target, value in self._run(requests, dev, options or self.options):
            yield target.name, value

    def requests(self, names: Iterable[str] | None = None, dtype: torch.dtype | str | None = None,
                 boxes: Boxes | None = None) -> list[TensorRequest]:
        """The typed request for ``names`` (R46 checked up front)."""
        want = check_dtype(dtype)
        boxes = dict(boxes or {})
        unknown = sorted(set(boxes) - set(self._by_name))
        if unknown:
            raise MCNCError(f"{self.label}: boxes name tensors the file does not hold: "
                            f"{unknown[:5]}")
        out = []
        for name in dict.fromkeys(self.keys() if names is None else names):
            t = self.entry(name)
            if not t.known:
                raise UnsupportedFeatureError(
                    f"tensor {t.name!r} uses encoding {t.encoding!r}, unknown to this reader. "
                    "Upgrade mcnc-format; the other tensors can be read by name", rule="R46",
                    path=self.label, tensor=t.name)
            out_dtype = to_torch(t.dtype)
            if want is not None and out_dtype.is_floating_point:
                out_dtype = want
            box = boxes.get(name)
            if isinstance(box, Box):
                box.check(t.shape, f"{self.label}: {name}")
            else:
                box = (Box.full(t.shape) if box is None
                       else Box.from_index(t.shape, box, f"{self.label}: {name}"))
            out.append(TensorRequest(t, box, out_dtype))
        return out

    def plan(self, requests: list[TensorRequest], device: torch.device | str = "cpu",
             options: LoadOptions | None = None) -> Plan:
        """The plan the engine would run for ``requests`` (no I/O): its steps and the number
        of chunks it regenerates."""
        executor = Executor(self, check_device(device), options or self.options)
        return self._plan(executor, requests)

    def _plan(self, executor: Executor, requests: list[TensorRequest]) -> Plan:
        output_bytes = sum(r.box.numel * r.dtype.itemsize for r in requests)
        workspace = executor.options.workspace_for(output_bytes,
                                                   executor.device.type == "cpu")
        return plan_load(self.header, requests, workspace,
                         eager=lambda target: not executor.kernel_takes(target))

    def _run(self, requests: list[TensorRequest], device: torch.device,
             options: LoadOptions):  # -> Iterator[tuple[Target, torch.Tensor]]
        executor = Executor(self, device, options)
        yield from executor.run(self._plan(executor, requests))

    # -- verification ----------------------------------------------------------------------
    def check_references(self, names: Iterable[str] | None = None) -> None:
        """Open every external base of ``names`` (all tensors by default) and check its
        SHA-256 pin now, as ``verify`` says (R75), recording it in the digest cache: one
        process can check for many that then find the record (``MCNCStorageReader`` does so
        on the coordinator)."""
        for name in dict.fromkeys(self.keys() if names is None else names):
            t = self.entry(name)
            members = t.members()
            for entry, shape in [*((m.theta0, m.shape) for m in members),
                                 *(((t.theta0, t.shape),) if isinstance(t, LoRATensor) else ())]:
                if isinstance(entry, ExternalTheta0):
                    self.theta0.reference(entry, shape)
                    check = self.theta0.pending_check(entry)
                    if check is not None:
                        check.result()

    def check_padding(self) -> None:
        """R22: the bytes between header and blobs, and between blobs, are zero."""
        position = C.PREAMBLE_SIZE + self.header_length
        gaps = []
        for blob in self.header.blobs:
            gaps.append((position, blob.offset))
            position = blob.offset + blob.length
        gaps.append((position, data_start(self.header_length, self.header.alignment)
                     if not self.header.blobs else position))
        for start, stop in gaps:
            if stop > start and any(self.blobs.source.read(start, stop - start)):
                raise FormatError(f"non-zero padding bytes in [{start}, {stop})", rule="R22",
                                  path=self.label)


class TensorSlice:
    """One tensor of an open file, indexed to rebuild a box of it:
    ``f.get_slice("w")[0:128, :]`` (steps of one, negative bounds, integers, ``...``)."""

    def __init__(self, file: MCNCFile, entry: TensorEntry, device: torch.device | str = "cpu",
                 dtype: torch.dtype | str | None = None) -> None:
        self.file = file
        self.entry = entry
        self.device = device
        self.dtype = dtype

    def get_shape(self) -> list[int]:
        return list(self.entry.shape)

    def get_dtype(self) -> str:
        """The stored dtype's name in the spec's spelling (``"f32"``, ``"bf16"``, ...)."""
        return self.entry.dtype

    def to(self, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
           ) -> TensorSlice:
        """The same handle producing its boxes on ``device`` (and as ``dtype``)."""
        return TensorSlice(self.file, self.entry, device, dtype)

    def __getitem__(self, index: Any) -> torch.Tensor:
        box = Box.from_index(self.entry.shape, index, f"{self.file.label}: {self.entry.name}")
        (_, value), = self.file.stream([self.entry.name], self.device, self.dtype,
                                       boxes={self.entry.name: box})
        return value


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw little-endian C-order bytes, as pinned by §7.4."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _spec_of(g: GeneratorEntry, inline: tuple[torch.Tensor, ...] | None) -> GeneratorSpec:
    return GeneratorSpec(k=g.k, d=g.d, hidden=g.hidden, L=g.L, omega0=g.omega0, bias=g.bias,
                         normalize=g.normalize, seed=g.seed, inline=inline)


def open_file(path: PathLike, *, verify: bool | str | Verify = Verify.CACHED,
              resolver: Resolver | None = None) -> MCNCFile:
    """Open an ``.mcnc`` file (header only). ``verify`` (``Verify``): what is checked of the
    bytes read; ``False`` (nothing) only for files you produced yourself in this process."""
    return MCNCFile(path, verify=verify, resolver=resolver)
