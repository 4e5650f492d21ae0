"""Reading and writing for both of the drop-in's modules (``mcnc_format.safetensors`` for
torch, ``mcnc_format.safetensors.numpy``): one path each way, with the framework converting
at the edge. A file that is a safetensors file, not an ``.mcnc`` one, is read by safetensors
itself, so existing checkpoints keep loading after the switch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors as _safetensors

from .. import constants as C
from ..api import open as open_mcnc
from ..errors import MCNCError, UsageError
from ..reader import MCNCFile, TensorSlice
from ..writer import save as save_mcnc
from .frameworks import TORCH, Device, Framework, PathLike, named, safetensors_device

__all__ = ["SafeFile", "SafeSlice", "load_bytes", "load_file", "open_file", "save_bytes",
           "save_file"]

#: safetensors' storage backends; ``.mcnc`` files are always read with ``pread`` by the engine.
_BACKENDS = ("mmap", "pread")


class SafeSlice:
    """``safe_open(...).get_slice(name)``: the shape, the dtype in safetensors' spelling, and
    ``[...]`` indexing by the framework's rules (``Torch.index``, ``Numpy.index``)."""

    def __init__(self, part: TensorSlice, framework: Framework = TORCH) -> None:
        self._part = part
        self._framework = framework

    def get_shape(self) -> list[int]:
        return self._part.get_shape()

    def get_dtype(self) -> str:
        """``"F32"``, ``"BF16"``, ``"BOOL"``, ``"I64"``, ``"U8"``...: the spec's name upper-cased
        is safetensors' name for every dtype the format stores."""
        return self._part.get_dtype().upper()

    def __getitem__(self, index: Any) -> Any:
        return self._framework.index(self._part, index)


class SafeFile:
    """An open ``.mcnc`` file (a path or an ``hf://`` name) with safetensors' handle
    methods, giving the framework's arrays; ``safe_open`` returns it."""

    def __init__(self, filename: PathLike, device: Device = "cpu", *,
                 framework: Framework = TORCH) -> None:
        self._framework = framework
        self._device = framework.check_device(device)
        self._file: MCNCFile | None = open_mcnc(filename)
        self._label = os.fspath(filename)

    def _open(self) -> MCNCFile:
        if self._file is None:
            raise MCNCError(f"{self._label}: the file is closed; open it again with safe_open")
        return self._file

    def __enter__(self) -> SafeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self) -> list[str]:
        """Tensor names, sorted (as safetensors lists them)."""
        return sorted(self._open().keys())

    def offset_keys(self) -> list[str]:
        """Tensor names in the order the file stores them."""
        return self._open().keys()

    def metadata(self) -> dict[str, str] | None:
        """The file's metadata, ``None`` when it has none (as safetensors)."""
        return self._open().metadata or None

    def get_tensor(self, name: str) -> Any:
        return self._framework.from_tensor(self._open().get_tensor(name, self._device))

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, in file order (rebuilt together: a chunk is regenerated once)."""
        tensors = self._open().tensors(device=self._device)
        return {name: self._framework.from_tensor(t) for name, t in tensors.items()}

    def get_slice(self, name: str) -> SafeSlice:
        return SafeSlice(self._open().get_slice(name).to(self._device), self._framework)


def open_file(filename: PathLike, framework: str, device: Device, backend: str) -> Any:
    """``safe_open``: a ``SafeFile`` for an ``.mcnc`` file; safetensors' own handle (given
    ``framework``, ``device`` and ``backend``) for a safetensors file."""
    _check_backend(backend)
    if not _is_mcnc(filename):
        return _safetensors.safe_open(os.fspath(filename), framework=framework,
                                      device=safetensors_device(device),
                                      **_backend_option(backend))
    return SafeFile(filename, device, framework=named(framework))


def load_file(framework: Framework, filename: PathLike, device: Device, backend: str
              ) -> dict[str, Any]:
    """Every tensor of a file, as the framework's arrays on ``device``."""
    _check_backend(backend)
    if not _is_mcnc(filename):
        return framework.load_safetensors_file(filename, device, _backend_option(backend))
    with SafeFile(filename, device, framework=framework) as f:
        return f.get_tensors()


def load_bytes(framework: Framework, data: bytes) -> dict[str, Any]:
    """Every tensor of a file given as bytes (``save_bytes``' output or a safetensors
    file's), as the framework's arrays on the CPU."""
    if bytes(data[: len(C.MAGIC)]) != C.MAGIC:
        return framework.load_safetensors_bytes(data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.mcnc"
        path.write_bytes(data)
        return load_file(framework, path, "cpu", "mmap")


def save_file(framework: Framework, values: Any, filename: PathLike,
              metadata: dict[str, str] | None) -> None:
    """Write the framework's arrays as dense ``.mcnc`` tensors, in sorted name order (the
    same tensors give the same bytes whatever the dict's order)."""
    tensors = framework.tensors_to_write(values)
    save_mcnc(filename, {name: tensors[name] for name in sorted(tensors)}, metadata=metadata)


def save_bytes(framework: Framework, values: Any, metadata: dict[str, str] | None) -> bytes:
    """The bytes ``save_file`` would write."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.mcnc"
        save_file(framework, values, path, metadata)
        return path.read_bytes()


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise UsageError(f"backend={backend!r} is not one of {', '.join(_BACKENDS)}")


def _backend_option(backend: str) -> dict[str, str]:
    """``backend=`` for safetensors itself, left out at its default (releases before 0.8 do
    not take it)."""
    return {} if backend == "mmap" else {"backend": backend}


def _is_mcnc(filename: PathLike) -> bool:
    """Whether to read ``filename`` as ``.mcnc``: all but a file that starts as a safetensors
    file does (a length, then ``{``). A missing or damaged file is reported by our reader."""
    try:
        with open(filename, "rb") as f:
            head = f.read(len(C.MAGIC) + 1)
    except OSError:
        return True
    return head[: len(C.MAGIC)] == C.MAGIC or head[len(C.MAGIC):] != b"{"
