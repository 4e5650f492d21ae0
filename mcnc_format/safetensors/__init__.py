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
existing checkpoints keep loading after the switch. ``mcnc_format.safetensors.numpy`` is
``safetensors.numpy`` (``framework="np"`` in ``safe_open``) over the same reader and writer.
docs/safetensors.md lists what differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import sharing
from ..errors import InvalidTensorError, MCNCError, StateDictMismatchError
from ..sharing import storage_ptr, storage_size
from ..torch.export import export_state_dict
from ..torch.manifest import CONFIG_KEY
from ..writer import TensorSource
from ..writer import save as _save_mcnc
from . import files
from .files import SafeFile, SafeSlice
from .frameworks import TORCH, Device, PathLike

__all__ = ["SafeFile", "SafeSlice", "SafetensorError", "load", "load_file", "load_model",
           "safe_open", "save", "save_file", "save_model", "storage_ptr", "storage_size"]

#: safetensors' own error class is ours here: ``except SafetensorError`` keeps working.
SafetensorError = MCNCError

# safetensors.torch's sharing helpers, under the names other libraries import them by.
_end_ptr = sharing.end_ptr
_find_shared_tensors = sharing.find_shared_tensors
_is_complete = sharing.is_complete
_remove_duplicate_names = sharing.remove_duplicate_names


def safe_open(filename: PathLike, framework: str = "pt", device: Device = "cpu", *,
              backend: str = "mmap") -> Any:
    """Open ``filename`` for reading as ``safetensors.safe_open`` does: use it as a context
    manager. An ``.mcnc`` file gives a ``SafeFile`` of torch tensors (``framework`` ``"pt"``,
    ``"torch"``, ``"pytorch"``) or numpy arrays (``"np"``, ``"numpy"``; CPU only); a
    safetensors file is opened by safetensors (``backend`` is passed on to it)."""
    return files.open_file(filename, framework, device, backend)


def load_file(filename: PathLike, device: Device = "cpu", *, backend: str = "mmap"
              ) -> dict[str, torch.Tensor]:
    """Every tensor of a file on ``device``."""
    return files.load_file(TORCH, filename, device, backend)


def load(data: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a file given as bytes (``save``'s output), on the CPU."""
    return files.load_bytes(TORCH, data)


def save_file(tensors: dict[str, torch.Tensor], filename: PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write plain tensors as dense ``.mcnc`` tensors, in sorted name order (the same tensors
    give the same bytes whatever the dict's order). Refuses what safetensors refuses: a
    non-dict, non-tensors, sparse and non-contiguous tensors (``ValueError``), tensors sharing
    memory and meta tensors (``RuntimeError``)."""
    files.save_file(TORCH, tensors, filename, metadata)


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes ``save_file`` would write."""
    return files.save_bytes(TORCH, tensors, metadata)


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
    TORCH.tensors_to_write({k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)})
    _save_mcnc(filename, tensors, metadata=metadata)
