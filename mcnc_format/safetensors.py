"""``safetensors.torch`` (and ``safetensors.safe_open``) names over ``.mcnc`` files.

Code written for safetensors switches by changing one import::

    from mcnc_format.safetensors import safe_open, load_file, save_file, load_model, save_model

The names, signatures, return types and exception types are safetensors' (each exception is an
``MCNCError`` subclass that is also the builtin safetensors raises). ``.mcnc`` files of every
encoding come back as plain tensors (MCNC and LoRA tensors are rebuilt by the engine);
``save_file``/``save`` write plain tensors as dense ``.mcnc`` tensors, in sorted name order as
safetensors does, so the same tensors give the same bytes whatever the dict's order;
``save_model`` of a model reparametrized with ``mcnc_format.torch`` writes it compressed. A
file that is a safetensors file, not an ``.mcnc`` one, is read by safetensors itself, so
existing checkpoints keep loading after the switch. docs/safetensors.md lists what differs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors as _safetensors
import safetensors.torch as _safetensors_torch
import torch

from . import constants as C
from . import sharing
from .api import open as open_mcnc
from .devices import check_device
from .errors import InvalidTensorError, MCNCError, StateDictMismatchError, UsageError
from .reader import MCNCFile, TensorSlice
from .sharing import refuse_shared, storage_ptr, storage_size
from .torch.export import export_state_dict
from .torch.manifest import CONFIG_KEY
from .writer import TensorSource
from .writer import save as _save_mcnc

__all__ = ["SafeFile", "SafeSlice", "SafetensorError", "load", "load_file", "load_model",
           "safe_open", "save", "save_file", "save_model", "storage_ptr", "storage_size"]

#: safetensors' own error class is ours here: ``except SafetensorError`` keeps working.
SafetensorError = MCNCError

PathLike = str | os.PathLike[str]
Device = str | int | torch.device
_TORCH_FRAMEWORKS = ("pt", "torch", "pytorch")
#: safetensors' storage backends; ``.mcnc`` files are always read with ``pread`` by the engine.
_BACKENDS = ("mmap", "pread")

# safetensors.torch's sharing helpers, under the names other libraries import them by.
_end_ptr = sharing.end_ptr
_find_shared_tensors = sharing.find_shared_tensors
_is_complete = sharing.is_complete
_remove_duplicate_names = sharing.remove_duplicate_names


class SafeSlice:
    """``safe_open(...).get_slice(name)``: the shape, the dtype in safetensors' spelling, and
    ``[...]`` indexing as torch indexes a tensor. Basic indices (slices with positive steps,
    integer positions, ``...``, ``[]``) rebuild only the part they span; anything else torch
    accepts (lists or tensors of positions, masks, ``None``) is applied to the whole tensor."""

    def __init__(self, part: TensorSlice) -> None:
        self._part = part

    def get_shape(self) -> list[int]:
        return self._part.get_shape()

    def get_dtype(self) -> str:
        """``"F32"``, ``"BF16"``, ``"BOOL"``, ``"I64"``, ``"U8"``...: the spec's name upper-cased
        is safetensors' name for every dtype the format stores."""
        return self._part.get_dtype().upper()

    def __getitem__(self, index: Any) -> torch.Tensor:
        if _is_basic(index):
            return self._part[index]
        return self._part[...][index]


class SafeFile:
    """An open ``.mcnc`` file (a path or an ``hf://`` name) with safetensors' handle
    methods; ``safe_open`` returns it."""

    def __init__(self, filename: PathLike, device: Device = "cpu") -> None:
        self._device = check_device(device)
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

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._open().get_tensor(name, self._device)

    def get_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order (rebuilt together: a chunk is regenerated once)."""
        return self._open().tensors(device=self._device)

    def get_slice(self, name: str) -> SafeSlice:
        file = self._open()
        return SafeSlice(file.get_slice(name).to(self._device))


def safe_open(filename: PathLike, framework: str = "pt", device: Device = "cpu", *,
              backend: str = "mmap") -> Any:
    """Open ``filename`` for reading as ``safetensors.safe_open`` does: use it as a context
    manager. An ``.mcnc`` file gives a ``SafeFile``; a safetensors file is opened by
    safetensors (``backend`` is passed on to it). Only the torch framework is served for
    ``.mcnc`` files."""
    _check_backend(backend)
    if not _is_mcnc(filename):
        return _safetensors.safe_open(os.fspath(filename), framework=framework,
                                      device=_device_name(device), **_backend_option(backend))
    if framework not in _TORCH_FRAMEWORKS:
        raise UsageError(f"framework {framework!r}: .mcnc files are read as torch tensors; "
                         f"pass framework='pt'")
    return SafeFile(filename, device)


def load_file(filename: PathLike, device: Device = "cpu", *, backend: str = "mmap"
              ) -> dict[str, torch.Tensor]:
    """Every tensor of a file on ``device``."""
    _check_backend(backend)
    if not _is_mcnc(filename):
        loaded: dict[str, torch.Tensor] = _safetensors_torch.load_file(
            filename, device=_device_name(device), **_backend_option(backend))
        return loaded
    with SafeFile(filename, device) as f:
        return f.get_tensors()


def load(data: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a file given as bytes (``save``'s output), on the CPU."""
    if bytes(data[: len(C.MAGIC)]) != C.MAGIC:
        return _safetensors_torch.load(data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.mcnc"
        path.write_bytes(data)
        return load_file(path)


def save_file(tensors: dict[str, torch.Tensor], filename: PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write plain tensors as dense ``.mcnc`` tensors, in sorted name order (the same tensors
    give the same bytes whatever the dict's order). Refuses what safetensors refuses: a
    non-dict, non-tensors, sparse and non-contiguous tensors (``ValueError``), tensors sharing
    memory and meta tensors (``RuntimeError``)."""
    _check_for_save(tensors)
    _save_mcnc(filename, {name: tensors[name] for name in sorted(tensors)}, metadata=metadata)


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes ``save_file`` would write."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.mcnc"
        save_file(tensors, path, metadata)
        return path.read_bytes()


def save_model(model: torch.nn.Module, filename: PathLike,
               metadata: dict[str, str] | None = None, force_contiguous: bool = True) -> None:
    """Save a model's state dict, keeping one name of each group of tensors that share memory
    (the dropped names go into the metadata, ``{dropped: kept}``, as safetensors records
    them). A model reparametrized with ``mcnc_format.torch`` is written compressed (MCNC
    segments, under the plain model's names; ``export_state_dict`` already stores each tie
    once, so no names are recorded); any other model as dense tensors."""
    state_dict: dict[str, Any] = dict(model.state_dict())
    reparametrized = any(k == CONFIG_KEY or k.endswith("." + CONFIG_KEY) for k in state_dict)
    if reparametrized:
        state_dict = dict(export_state_dict(state_dict))
    state_dict, dropped = sharing.without_duplicates(state_dict)
    if dropped:
        metadata = {**dropped, **(metadata or {})}
    if force_contiguous:
        state_dict = {k: v.contiguous() if isinstance(v, torch.Tensor) else v
                      for k, v in state_dict.items()}
    try:
        if reparametrized:  # the export's order: segment members are laid out in it
            _save_compressed(state_dict, filename, metadata)
        else:
            save_file(state_dict, filename, metadata)
    except InvalidTensorError as exc:
        raise InvalidTensorError(f"{exc} Or use save_model(..., force_contiguous=True), read "
                                 "the docs for potential caveats.") from exc


def load_model(model: torch.nn.Module, filename: PathLike, strict: bool = True,
               device: Device = "cpu", *, backend: str = "mmap") -> tuple[set[str], list[str]]:
    """Load a file into ``model``; returns ``(missing, unexpected)``. Names the model ties
    (one tensor under several names) need only one of them in the file. With ``strict``, a
    mismatch raises ``StateDictMismatchError`` (a ``RuntimeError``) and loads nothing."""
    state_dict = load_file(filename, device=device, backend=backend)
    model_state = model.state_dict()
    ties = _remove_duplicate_names(model_state, preferred_names=list(state_dict))
    expected = set(model_state)
    missing = expected - set(state_dict)
    unexpected = [k for k in state_dict if k not in expected]
    for dropped in ties.values():
        for name in dropped:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {type(model).__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(
                f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(
                f'"{k}"' for k in sorted(unexpected))
        raise StateDictMismatchError(error)
    model.load_state_dict(state_dict, strict=False)
    return missing, unexpected


# -- helpers -------------------------------------------------------------------------------
def _save_compressed(tensors: Mapping[str, TensorSource], filename: PathLike,
                     metadata: dict[str, str] | None) -> None:
    plain = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    _check_for_save(plain)
    _save_mcnc(filename, tensors, metadata=metadata)


def _check_for_save(tensors: Any) -> None:
    """safetensors' checks before a save, with its exception types and messages."""
    if not isinstance(tensors, dict):
        raise InvalidTensorError(
            f"Expected a dict of [str, torch.Tensor] but received {type(tensors)}")
    sparse = []
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidTensorError(
                f"Key `{name}` is invalid, expected torch.Tensor but received {type(value)}")
        if value.layout != torch.strided:
            sparse.append(name)
    if sparse:
        raise InvalidTensorError(
            f"You are trying to save a sparse tensors: `{sparse}` which this library does not "
            "support. You can make it a dense tensor before saving with `.to_dense()` but be "
            "aware this might make a much larger file than needed.")
    refuse_shared(tensors)
    for name, value in tensors.items():
        if not value.is_contiguous():
            raise InvalidTensorError(
                f"You are trying to save a non contiguous tensor: `{name}` which is not "
                "allowed. Save only the full tensors and reslice at load time, call "
                "`.contiguous()` on it before saving, or save the model with save_model.")


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise UsageError(f"backend={backend!r} is not one of {', '.join(_BACKENDS)}")


def _device_name(device: Device) -> str | int:
    """``device`` as safetensors takes it (a name or a CUDA index)."""
    return str(device) if isinstance(device, torch.device) else device


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


def _is_basic(index: Any) -> bool:
    """Whether an index holds only what ``Box.strided`` serves (else torch indexes the whole
    tensor)."""
    if isinstance(index, list):
        return not index
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(item, slice) or item is Ellipsis or _is_position(item)
               for item in items)


def _is_position(item: Any) -> bool:
    if isinstance(item, bool) or str(getattr(item, "dtype", "")) in ("bool", "torch.bool"):
        return False
    if getattr(item, "ndim", 0) != 0:
        return False
    return hasattr(item, "__index__")

