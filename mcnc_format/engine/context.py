"""The engine's own view of one open file: everything a load reads, owned by the engine.

A ``FileContext`` holds the parts of an open ``.mcnc`` file that rebuilding tensors needs: the
typed header, the checked blob bytes (``BlobStore`` over a reference-counted ``FileSource``),
the theta0 evaluator (stored, drawn and external bases, with their pins) and the generators
prepared for each device. The executor is built from it and talks to nothing else, so data
flows one way (bytes -> header -> plan -> staged blobs -> regeneration -> tensors) and the
reader (``MCNCFile``) is only a front that names tensors and forwards requests.

``open_context`` is the one place a file is opened for the engine: the preamble and header are
read and validated there (R1-R75 but blob bytes), and only then are blobs reachable.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..constants import DType
from ..dtypes import to_torch
from ..errors import DeviceMemoryError, FormatError
from ..generator import GeneratorSpec, GeneratorWeights
from ..header import GeneratorEntry, Header
from ..torch_compat import OUT_OF_MEMORY
from .fused import FusedGenerator
from .options import Verify
from .resolve import Resolver
from .source import BlobStore, FileSource, OpenedHeader, read_header
from .theta0 import Theta0Source

__all__ = [
    "FileContext",
    "GeneratorCache",
    "blob_tensor",
    "open_context",
    "out_of_memory",
    "spec_of",
]

#: Draws a Philox generator's weights on a device (the backend's: torch, or one Triton launch).
WeightDraw = Callable[[GeneratorSpec, torch.device], GeneratorWeights]


class GeneratorCache:
    """Each generator of a file as a ``GeneratorSpec`` (inline weights read from their
    blobs) and, per device and component count, prepared as a ``FusedGenerator``, kept while
    the file is open: a load draws each generator's weights once."""

    def __init__(self, label: str, header: Header, blobs: BlobStore) -> None:
        self.label = label
        self.header = header
        self.blobs = blobs
        self._prepared: dict[tuple[int, int, str, bool], FusedGenerator] = {}

    def spec(self, index: int) -> GeneratorSpec:
        """Generator ``index`` as a ``GeneratorSpec``."""
        g = self.header.generators[index]
        inline = None
        if g.blobs is not None:
            inline = tuple(blob_tensor(self.blobs, b, f"generators[{index}].weights.blobs[{j}]")
                           for j, b in enumerate(g.blobs))
        return spec_of(g, inline)

    def fused(self, index: int, m: int, device: torch.device,
              draw: WeightDraw | None = None) -> FusedGenerator:
        """Generator ``index`` prepared for ``m`` components on ``device``. ``draw``: how a
        seeded generator's weights are drawn there (the same bits whichever draws them)."""
        key = (index, m, str(device), draw is not None)
        if key not in self._prepared:
            spec = self.spec(index)
            try:
                weights = (draw(spec, device) if draw is not None and spec.seed is not None
                           else spec.weights(device))
                self._prepared[key] = FusedGenerator(weights, m)
            except (RuntimeError, MemoryError) as exc:
                if not out_of_memory(exc):
                    raise
                g = self.header.generators[index]
                params = sum(math.prod(s) for s in g.parameter_shapes())
                raise DeviceMemoryError(
                    f"{self.label}: generators[{index}]: out of memory on {device} drawing "
                    f"{params} weights ({4 * params} bytes) for widths {list(g.widths)}"
                ) from exc
        return self._prepared[key]

    def clear(self) -> None:
        self._prepared.clear()


def blob_tensor(blobs: BlobStore, index: int, path: str | None = None) -> torch.Tensor:
    """Blob ``index`` as a CPU tensor of its dtype and shape, checksum-checked on first use
    (R27: a bool blob's bytes are 0 or 1)."""
    blob = blobs.header.blobs[index]
    where = path or f"blobs[{index}]"
    data = blobs.blob(index, where)
    dtype = to_torch(blob.dtype)
    if blob.numel == 0:
        return torch.empty(blob.shape, dtype=dtype)
    tensor = torch.frombuffer(bytearray(data), dtype=dtype, count=blob.numel)
    if blob.dtype == DType.BOOL and bool((tensor.view(torch.uint8) > 1).any()):
        raise FormatError("bool bytes must be 0 or 1 (§1)", rule="R27", path=blobs.source.label,
                          field=where)
    return tensor.reshape(blob.shape)


def spec_of(g: GeneratorEntry, inline: tuple[torch.Tensor, ...] | None) -> GeneratorSpec:
    """A header generator entry as the ``GeneratorSpec`` that computes it."""
    return GeneratorSpec(k=g.k, d=g.d, hidden=g.hidden, L=g.L, omega0=g.omega0, bias=g.bias,
                         normalize=g.normalize, seed=g.seed, inline=inline)


class FileContext:
    """The engine's parts of one open file; ``close()`` releases them (reads in flight
    finish first: the file's descriptor is reference-counted)."""

    def __init__(self, source: FileSource, opened: OpenedHeader, label: str,
                 resolver: Resolver, verify: Verify) -> None:
        self.label = label
        self.header = opened.header
        self.preamble = opened.preamble
        self.file_size = opened.file_size
        self.verify = verify
        self.blobs = BlobStore(source, opened.header, verify is not Verify.NONE)
        self.theta0 = Theta0Source(self.blobs, resolver, label, verify)
        self.generators = GeneratorCache(label, opened.header, self.blobs)

    def close(self) -> None:
        self.generators.clear()
        self.theta0.close()
        self.blobs.close()


def open_context(path: Path | str | os.PathLike[str], label: str, resolver: Resolver,
                 verify: Verify) -> FileContext:
    """Open a local ``.mcnc`` file for the engine: preamble and header read and validated,
    blobs reachable on demand. Nothing is left open if the header is refused."""
    source = FileSource(Path(path), label)
    try:
        return FileContext(source, read_header(source, label), label, resolver, verify)
    except BaseException:
        source.close()
        raise


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports an allocation that failed: torch reports a failed CPU
    allocation as a plain ``RuntimeError`` (or the mapping's ``OSError``), an accelerator's
    as its own type."""
    return isinstance(exc, OUT_OF_MEMORY | MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOMEM)
