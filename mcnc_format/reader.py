"""Reading ``.mcnc`` files: header first, tensors (or boxes of them) on demand, on any device.

``MCNCFile`` is a front: it opens the file for the engine (``engine/context.py``: preamble and
header read and validated, R1-R75 but the blob bytes), names tensors, turns calls into typed
requests (names, boxes, dtype) and hands them to the one engine (``mcnc_format.engine``),
whose executor is built from the file's ``FileContext`` and a backend for the device. What
the header says of the tensors (sizes, ratios) is ``summary.py``'s, which needs no torch.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch

from .devices import check_device, check_dtype, host_defaults
from .dtypes import to_torch
from .engine.backend import choose_backend
from .engine.box import Box
from .engine.context import FileContext, blob_tensor, open_context
from .engine.digests import FileIdentity
from .engine.execute import Executor
from .engine.fused import FusedGenerator
from .engine.options import LoadOptions, Verify
from .engine.plan import Plan, Target, TensorRequest
from .engine.resolve import DefaultResolver, Resolver
from .engine.source import BlobStore
from .engine.theta0 import Theta0Source
from .errors import MCNCError, UsageError
from .generator import GeneratorSpec
from .header import ExternalTheta0, Header, LoRATensor, MCNCTensor, TensorEntry, UnknownTensor
from .summary import TensorInfo, file_summary, tensor_info

__all__ = ["Boxes", "MCNCFile", "TensorInfo", "TensorSlice", "open_file", "tensor_sha256"]

PathLike = str | os.PathLike[str]
#: A box per tensor name: a tuple of slices (``(slice(0, 128), slice(None))``), or a ``Box``.
Boxes = Mapping[str, Any]


class MCNCFile:
    """An open ``.mcnc`` file. Use as a context manager, or call ``close()``.

    ``path``: a local path or ``hf://ORG/REPO[@REV]/FILE`` (the Hub layer is imported only
    when such a name is met). ``resolver`` turns the name into a local file and resolves
    theta0 references (``DefaultResolver`` by default). The other keywords are the load
    options of ``get_tensor``, ``tensors``, ``get_slice`` and ``stream`` (``staging_bytes``,
    ``workspace_bytes``, ``use_triton``, ``precision``, ``progress``: the same keywords as
    ``mcnc_format.load``); an unknown one is refused.
    """

    def __init__(self, path: PathLike, *, verify: bool | str | Verify = Verify.CACHED,
                 resolver: Resolver | None = None, options: LoadOptions | None = None,
                 **keywords: Any) -> None:
        self.label = os.fspath(path)
        verify = Verify.of(verify)
        if options is not None:
            warnings.warn("MCNCFile(options=LoadOptions(...)) is deprecated; pass the options "
                          "as keywords (MCNCFile(path, workspace_bytes=...))",
                          DeprecationWarning, stacklevel=2)
        else:
            options = LoadOptions.from_keywords("MCNCFile", keywords, ("path", "verify",
                                                                       "resolver"))
        self.options = replace(options, verify=verify)
        self.resolver: Resolver = resolver or DefaultResolver()
        self.path = self.resolver.local_path(path)
        self.verify = verify
        self.context: FileContext = open_context(self.path, self.label, self.resolver, verify)
        self.header: Header = self.context.header
        self.file_size = self.context.file_size
        self.minor = self.context.preamble.minor
        self.header_length = self.context.preamble.header_length
        self._by_name = {t.name: t for t in self.header.tensors}

    def identity(self) -> FileIdentity:
        """What identifies the open file's contents (``engine/digests.py``)."""
        return self.context.blobs.source.identity()

    @property
    def source(self) -> str:
        """Deprecated: the name the file was opened by; use ``label``."""
        warnings.warn("MCNCFile.source is deprecated; use MCNCFile.label (the same name)",
                      DeprecationWarning, stacklevel=2)
        return self.label

    @property
    def blobs(self) -> BlobStore:
        """Deprecated: ``context.blobs`` (the engine owns the file's parts)."""
        warnings.warn("MCNCFile.blobs is deprecated; use MCNCFile.context.blobs",
                      DeprecationWarning, stacklevel=2)
        return self.context.blobs

    @property
    def theta0(self) -> Theta0Source:
        """Deprecated: ``context.theta0`` (the engine owns the file's parts)."""
        warnings.warn("MCNCFile.theta0 is deprecated; use MCNCFile.context.theta0",
                      DeprecationWarning, stacklevel=2)
        return self.context.theta0

    def fused_generator(self, index: int, m: int, device: torch.device) -> FusedGenerator:
        """Deprecated: ``context.generators.fused`` (the engine owns the file's parts)."""
        warnings.warn("MCNCFile.fused_generator is deprecated; use "
                      "MCNCFile.context.generators.fused", DeprecationWarning, stacklevel=2)
        return self.context.generators.fused(index, m, device)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.context.close()

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

    def _name_list(self, names: Iterable[str] | None) -> list[str]:
        """``names`` in order, each once (every tensor's for ``None``). A string is refused,
        not taken as the names of its letters."""
        if isinstance(names, str | bytes) or not isinstance(names, Iterable | None):
            shown = f"names=[{names!r}]" if isinstance(names, str) else "a list of names"
            raise UsageError(f"{self.label}: names takes the tensor names as a list, got "
                             f"{type(names).__name__} {names!r}; give {shown}")
        return list(dict.fromkeys(self.keys() if names is None else names))

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
        return self.context.generators.spec(index)

    def tensor_info(self, name: str) -> TensorInfo:
        return tensor_info(self.header, self.entry(name))

    def summary(self) -> dict[str, Any]:
        """Sizes and ratios for ``mcnc inspect`` and for users deciding what to ship."""
        return file_summary(self.header, self.file_size, self.header_length, self.minor)

    # -- blobs -----------------------------------------------------------------------------
    def blob_bytes(self, index: int, path: str | None = None) -> memoryview:
        """Decoded bytes of blob ``index``, checksum-checked on first use."""
        return self.context.blobs.blob(index, path or f"blobs[{index}]")

    def blob_tensor(self, index: int, path: str | None = None) -> torch.Tensor:
        """Blob ``index`` as a CPU tensor of its dtype and shape."""
        return blob_tensor(self.context.blobs, index, path)

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
            (_, value), = self._results([request], check_device(device), self.options)
            factors.append(value if want is None else value.to(want))
        return factors[0], factors[1], float(t.scale or 0.0)

    def tensors(self, names: Iterable[str] | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
        """Many tensors at once, in request order; each chunk is regenerated once."""
        names = self._name_list(names)
        found = dict(self.stream(names, device, dtype))
        return {name: found[name] for name in names}

    def iter_tensors(self, names: Iterable[str] | None = None,
                     device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Deprecated: ``stream`` (the same)."""
        warnings.warn("MCNCFile.iter_tensors is deprecated; use MCNCFile.stream (the same)",
                      DeprecationWarning, stacklevel=2)
        return self.stream(names, device, dtype)

    def stream(self, names: Iterable[str] | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype | str | None = None, *, boxes: Boxes | None = None,
               options: LoadOptions | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names`` (all when ``None``; a name asked for twice
        is produced once), each the box ``boxes[name]`` when given, as each is complete (a
        segment's tensors complete in the order of their values in the segment)."""
        dev = check_device(device)
        yield from self._results(self.requests(names, dtype, boxes), dev,
                                 options or self.options)

    def requests(self, names: Iterable[str] | None = None, dtype: torch.dtype | str | None = None,
                 boxes: Boxes | None = None) -> list[TensorRequest]:
        """The typed request for ``names`` (R46 checked up front)."""
        want = check_dtype(dtype)
        if not isinstance(boxes, Mapping | None):
            raise UsageError(f"{self.label}: boxes takes a dict of a box per tensor name "
                             f"({{'w': (slice(0, 128),)}}), got {type(boxes).__name__}")
        boxes = dict(boxes or {})
        unknown = sorted(set(boxes) - set(self._by_name))
        if unknown:
            raise MCNCError(f"{self.label}: boxes name tensors the file does not hold: "
                            f"{unknown[:5]}")
        out = []
        for name in self._name_list(names):
            t = self.entry(name)
            if isinstance(t, UnknownTensor):
                raise t.unsupported(self.label)
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
        return self._executor(check_device(device), options or self.options).plan(requests)

    def _results(self, requests: list[TensorRequest], device: torch.device,
                 options: LoadOptions) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of each request as it completes; on the meta device, tensors of
        the requested shapes and dtypes without reading anything (for planning)."""
        if device.type == "meta":
            for request in requests:
                yield request.entry.name, torch.empty(request.box.result_shape,
                                                      dtype=request.dtype, device=device)
            return
        for target, value in self._run(requests, device, options):
            yield target.name, value

    def _executor(self, device: torch.device, options: LoadOptions) -> Executor:
        return Executor(self.context, choose_backend(device, options))

    def _run(self, requests: list[TensorRequest], device: torch.device,
             options: LoadOptions) -> Iterator[tuple[Target, torch.Tensor]]:
        def steps() -> Iterator[tuple[Target, torch.Tensor]]:  # with CPU defaults (host_defaults)
            self.context.theta0.begin_load()  # each load checks its bases again (R75)
            executor = self._executor(device, options)
            yield from executor.run(executor.plan(requests))

        return host_defaults(steps())

    # -- verification ----------------------------------------------------------------------
    def check_references(self, names: Iterable[str] | None = None) -> None:
        """Open every external base of ``names`` (all tensors by default) and check its
        SHA-256 pin now, as ``verify`` says (R75), recording it in the digest cache: one
        process can check for many that then find the record (``MCNCStorageReader`` does so
        on the coordinator)."""
        theta0 = self.context.theta0
        theta0.begin_load()
        for name in self._name_list(names):
            t = self.entry(name)
            members = t.members()
            for entry, shape in [*((m.theta0, m.shape) for m in members),
                                 *(((t.theta0, t.shape),) if isinstance(t, LoRATensor) else ())]:
                if isinstance(entry, ExternalTheta0):
                    theta0.reference(entry, shape)
                    check = theta0.pending_check(entry)
                    if check is not None:
                        check.result()

    def check_padding(self) -> None:
        """R22: the bytes between header and blobs, and between blobs, are zero."""
        self.context.blobs.check_padding(self.header_length)


class TensorSlice:
    """One tensor of an open file, indexed to rebuild a part of it:
    ``f.get_slice("w")[0:128, ::2]`` (slices with positive steps, negative bounds, integer
    positions, ``...``, ``[]``; out-of-range positions raise ``MCNCIndexError``)."""

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
        """The indexed part, as torch indexes (``Box.strided`` lists what an index may hold):
        the box spanning it is rebuilt, then thinned to the steps."""
        box, steps = Box.strided(self.entry.shape, index, f"{self.file.label}: {self.entry.name}")
        (_, value), = self.file.stream([self.entry.name], self.device, self.dtype,
                                       boxes={self.entry.name: box})
        if any(step != 1 for step in steps):
            kept = [step for dim, step in enumerate(steps) if dim not in box.drop]
            value = value[tuple(slice(None, None, step) for step in kept)]
            value = value.clone(memory_format=torch.contiguous_format)  # own, plain strides
        return value


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw little-endian C-order bytes, as pinned by §7.4."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


#: Digests already computed, by ``id`` of the tensor: (the tensor, weakly; its version counter
#: and data pointer when hashed; the digest). A tensor changed in place has another version,
#: a parameter replaced is another tensor: neither is taken for the one hashed.
_DIGESTS: dict[int, tuple[weakref.ref[torch.Tensor], int, int, str]] = {}


def cached_tensor_sha256(tensor: torch.Tensor) -> str:
    """``tensor_sha256``, computed once per version of a tensor's data: integrations that
    check a live model's weights against pins on every adapter (PEFT, the adapter bank) hash
    each weight once, and again only after it changed."""
    key, version, pointer = id(tensor), tensor._version, tensor.data_ptr()
    known = _DIGESTS.get(key)
    if known is not None and known[0]() is tensor and known[1:3] == (version, pointer):
        return known[3]
    digest = tensor_sha256(tensor)

    def forget(ref: weakref.ref[torch.Tensor], key: int = key) -> None:
        if key in _DIGESTS and _DIGESTS[key][0] is ref:
            del _DIGESTS[key]

    _DIGESTS[key] = (weakref.ref(tensor, forget), version, pointer, digest)
    return digest


def open_file(path: PathLike, *, verify: bool | str | Verify = Verify.CACHED,
              resolver: Resolver | None = None) -> MCNCFile:
    """Deprecated: ``mcnc_format.open`` (or ``MCNCFile``), which this calls."""
    warnings.warn("mcnc_format.reader.open_file is deprecated; use mcnc_format.open",
                  DeprecationWarning, stacklevel=2)
    return MCNCFile(path, verify=verify, resolver=resolver)
