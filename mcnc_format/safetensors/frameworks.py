"""The array libraries the drop-in serves, one class each: torch tensors and numpy arrays.

Every ``.mcnc`` file is written by the core writer and read by the engine, both in torch
tensors; a framework works only at the edge. It checks what a save is given as safetensors'
module for it checks (with its messages) and hands the writer tensors; it turns the engine's
tensors into its own arrays; it indexes ``get_slice`` handles by the rules safetensors applies
for it; and it reads a file that is a safetensors file with safetensors' own module.
"""

from __future__ import annotations

import operator
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import safetensors.numpy as _safetensors_numpy
import safetensors.torch as _safetensors_torch
import torch

from ..constants import DType
from ..devices import check_device
from ..errors import (
    InvalidTensorError,
    MCNCIndexError,
    NumpyDtypeError,
    UsageError,
    WriteError,
)
from ..reader import TensorSlice
from ..sharing import find_shared_tensors, refuse_shared

__all__ = ["NUMPY", "TORCH", "Device", "Framework", "Numpy", "PathLike", "Torch", "named",
           "safetensors_device"]

PathLike = str | os.PathLike[str]
#: A device as safetensors takes it; ``None`` is the CPU, as there.
Device = str | int | torch.device | None


class Framework(ABC):
    """What differs between safetensors' modules (``safetensors.torch``,
    ``safetensors.numpy``) for the drop-in's shared reading and writing."""

    #: The names ``safe_open(framework=...)`` takes for it, as safetensors spells them.
    names: ClassVar[tuple[str, ...]]
    #: The values its saves take, and their name in safetensors' messages.
    value_class: ClassVar[type]
    value_name: ClassVar[str]

    def tensors_to_write(self, values: Any) -> dict[str, torch.Tensor]:
        """``values`` checked as safetensors checks them before a save (a dict of this
        framework's arrays, ``InvalidTensorError``, a ``ValueError``, otherwise), as tensors
        the core writer takes."""
        if not isinstance(values, dict):
            raise InvalidTensorError(
                f"Expected a dict of [str, {self.value_name}] but received {type(values)}")
        for name, value in values.items():
            if not isinstance(value, self.value_class):
                raise InvalidTensorError(f"Key `{name}` is invalid, expected {self.value_name} "
                                         f"but received {type(value)}")
        return self._as_tensors(values)

    @abstractmethod
    def _as_tensors(self, values: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Checked values (a dict of ``value_class``) as the tensors to write."""

    @abstractmethod
    def check_device(self, device: Device) -> torch.device:
        """The device to rebuild tensors on, refused where the framework cannot hold it."""

    @abstractmethod
    def from_tensor(self, tensor: torch.Tensor) -> Any:
        """A tensor the engine rebuilt, as this framework's array."""

    @abstractmethod
    def index(self, part: TensorSlice, index: Any) -> Any:
        """``get_slice(name)[index]``, by the rules safetensors indexes with for it."""

    @abstractmethod
    def load_safetensors_file(self, filename: PathLike, device: Device,
                              options: dict[str, str]) -> dict[str, Any]:
        """Every tensor of a safetensors file, read by safetensors' module for it."""

    @abstractmethod
    def load_safetensors_bytes(self, data: bytes) -> dict[str, Any]:
        """Every tensor of a safetensors file given as bytes, read by safetensors."""


class Torch(Framework):
    """``framework="pt"``: torch tensors, indexed as torch indexes (safetensors' torch path)."""

    names = ("pt", "torch", "pytorch")
    value_class = torch.Tensor
    value_name = "torch.Tensor"

    def _as_tensors(self, values: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Refuses what safetensors.torch refuses: sparse and non-contiguous tensors
        (``ValueError``), tensors sharing memory and meta tensors (``RuntimeError``, the
        latter from the writer)."""
        sparse = [name for name, value in values.items() if value.layout != torch.strided]
        if sparse:
            raise InvalidTensorError(
                f"You are trying to save a sparse tensors: `{sparse}` which this library does "
                "not support. You can make it a dense tensor before saving with `.to_dense()` "
                "but be aware this might make a much larger file than needed.")
        refuse_shared(values)
        for name, value in values.items():
            if not value.is_contiguous():
                raise InvalidTensorError(
                    f"You are trying to save a non contiguous tensor: `{name}` which is not "
                    "allowed. Save only the full tensors and reslice at load time, call "
                    "`.contiguous()` on it before saving, or save the model with save_model.")
        return values

    def check_device(self, device: Device) -> torch.device:
        return check_device("cpu" if device is None else device)

    def from_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def index(self, part: TensorSlice, index: Any) -> torch.Tensor:
        """Basic indices (slices with positive steps, integer positions, ``...``, ``[]``)
        rebuild only the part they span; anything else torch accepts (lists or tensors of
        positions, masks, ``None``) is applied to the whole tensor."""
        if _is_basic(index):
            return part[index]
        return part[...][index]

    def load_safetensors_file(self, filename: PathLike, device: Device,
                              options: dict[str, str]) -> dict[str, torch.Tensor]:
        loaded: dict[str, torch.Tensor] = _safetensors_torch.load_file(
            filename, device=safetensors_device(device), **options)
        return loaded

    def load_safetensors_bytes(self, data: bytes) -> dict[str, torch.Tensor]:
        return _safetensors_torch.load(data)


class Numpy(Framework):
    """``framework="np"``: numpy arrays on the CPU, indexed by safetensors' own slicer rules
    for numpy (basic indices only; a bound past the dimension is an error, not clipped)."""

    names = ("np", "numpy")
    value_class = np.ndarray
    value_name = "np.ndarray"

    def _as_tensors(self, values: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each array as a tensor on its memory (copied only where the file's layout needs
        it: not C-contiguous, not native byte order). safetensors.numpy stores each array it
        is given, also arrays sharing memory (there are no tied weights in numpy), so each
        of those gets its own copy before the writer, which refuses shared memory."""
        tensors = {name: _tensor_of(name, array) for name, array in values.items()}
        for names in find_shared_tensors(tensors):
            for name in sorted(names)[1:]:
                tensors[name] = tensors[name].clone()
        return tensors

    def check_device(self, device: Device) -> torch.device:
        """Only the CPU (``SafetensorError`` from safetensors for any other device)."""
        if device is not None and str(device) != "cpu":
            shown = f"cuda:{device}" if isinstance(device, int) else device
            raise UsageError(f"Device {shown} is not supported for framework numpy: numpy "
                             "arrays live on the CPU; pass device='cpu' (or read with "
                             "framework='pt' to load onto a device)")
        return torch.device("cpu")

    def from_tensor(self, tensor: torch.Tensor) -> npt.NDArray[Any]:
        """The tensor's array on the same memory; bf16 as numpy's ``bfloat16`` where
        ``ml_dtypes`` has registered it, a ``NumpyDtypeError`` (a ``TypeError``, as
        safetensors' numpy path raises) where not."""
        if tensor.dtype != torch.bfloat16:
            return tensor.numpy()
        try:
            bfloat16 = np.dtype("bfloat16")
        except TypeError:
            raise NumpyDtypeError(
                "a bf16 tensor has no numpy dtype: data type 'bfloat16' not understood. "
                "Import ml_dtypes first (it gives numpy a bfloat16), or read the file with "
                "framework='pt'") from None
        return tensor.view(torch.int16).numpy().view(bfloat16)

    def index(self, part: TensorSlice, index: Any) -> npt.NDArray[Any]:
        shape = part.get_shape()
        return self.from_tensor(part[_numpy_path_index(index, shape)])

    def load_safetensors_file(self, filename: PathLike, device: Device,
                              options: dict[str, str]) -> dict[str, npt.NDArray[Any]]:
        self.check_device(device)
        loaded: dict[str, npt.NDArray[Any]] = _safetensors_numpy.load_file(filename, **options)
        return loaded

    def load_safetensors_bytes(self, data: bytes) -> dict[str, npt.NDArray[Any]]:
        loaded: dict[str, npt.NDArray[Any]] = _safetensors_numpy.load(data)
        return loaded


TORCH = Torch()
NUMPY = Numpy()
_FRAMEWORKS: tuple[Framework, ...] = (TORCH, NUMPY)


def named(name: str) -> Framework:
    """The framework ``safe_open(framework=name)`` asks for."""
    for framework in _FRAMEWORKS:
        if name in framework.names:
            return framework
    raise UsageError(f"framework {name!r}: .mcnc files are read as torch tensors "
                     f"(framework='pt') or numpy arrays (framework='np')")


def safetensors_device(device: Device) -> str | int:
    """``device`` as safetensors takes it (a name or a CUDA index)."""
    if device is None:
        return "cpu"
    return str(device) if isinstance(device, torch.device) else device


# -- torch: which indices the engine serves without rebuilding the whole tensor ---------------
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


# -- numpy: arrays to tensors, and safetensors' slicer rules ----------------------------------
def _tensor_of(name: str, array: npt.NDArray[Any]) -> torch.Tensor:
    """``array`` as a tensor the writer stores: C order, native (little-endian) byte order,
    on the array's memory where it already is so."""
    if not array.flags.c_contiguous:
        array = np.array(array, order="C")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: the same bits as torch's
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(array)
    except TypeError:
        stored = ", ".join(dtype.value.upper() for dtype in DType)
        raise WriteError(f"tensor {name!r}: numpy dtype {array.dtype} cannot be stored in an "
                         f".mcnc file, which stores {stored}; convert the array to one of "
                         "those") from None


def _numpy_path_index(index: Any, shape: list[int]) -> tuple[int | slice, ...]:
    """``index`` checked and made plain (non-negative integers, slices with bounds inside
    their dimension) as safetensors' numpy path checks it, with its ``SafetensorError``
    texts: integers (negative ones count from the end), slices with positive steps, one
    ``...``, ``()`` (everything) and ``[]`` (nothing of dimension 0). Beyond safetensors,
    negative slice bounds count from the end as numpy's do (safetensors cannot take them),
    and a slice whose stop precedes its start selects nothing."""
    if isinstance(index, list):
        if index:
            raise MCNCIndexError("Non empty lists are not implemented")
        index = slice(0, 0)
    items = list(index) if isinstance(index, tuple) else [index]
    for at, item in enumerate(items):
        if not (isinstance(item, slice) or item is Ellipsis or _is_position(item)):
            raise MCNCIndexError(f"Unsupported slice index at position {at}: expected "
                                 "slice, int, or ellipsis")
    if sum(item is Ellipsis for item in items) > 1:
        raise MCNCIndexError("Only one ellipsis (...) is allowed in slice index")
    if any(item is Ellipsis for item in items):
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        items[at : at + 1] = [slice(None)] * max(len(shape) - (len(items) - 1), 0)
    plain: list[int | slice] = []
    for dim, item in enumerate(items):
        if dim >= len(shape):  # too many: reported as they are by _check_reach
            plain.append(item if isinstance(item, slice) else operator.index(item))
            continue
        size = shape[dim]
        if isinstance(item, slice):
            plain.append(_plain_slice(item, dim, size))
            continue
        plain.append(_from_start(item, dim, size))
    _check_reach(plain, shape)
    return tuple(plain)


def _plain_slice(item: slice, dim: int, size: int) -> slice:
    step = 1 if item.step is None else operator.index(item.step)
    if step <= 0:
        raise MCNCIndexError(f"Slice step must be a positive integer, got {step}")
    start, stop = (None if bound is None else _from_start(bound, dim, size)
                   for bound in (item.start, item.stop))
    if start is not None and stop is not None and stop < start:
        stop = start
    return slice(start, stop, item.step)


def _from_start(position: Any, dim: int, size: int) -> int:
    """An integer position or slice bound, a negative one counted from the end."""
    value = operator.index(position)
    if value >= 0:
        return value
    if value + size < 0:
        raise MCNCIndexError(f"Invalid index {value} for dimension {dim} of size {size}")
    return value + size


def _check_reach(plain: list[int | slice], shape: list[int]) -> None:
    """safetensors' bounds check, last dimension first: too many indices, a position or a
    slice start at or past the dimension's size, a slice stop past it."""

    def error(reason: str) -> MCNCIndexError:
        shown = ", ".join(_shown(item) for item in plain)
        return MCNCIndexError(f"Error during slicing [{shown}] with shape {shape}: {reason}")

    if len(plain) > len(shape):
        raise error("more slicing indexes than dimensions in tensor")
    for dim in reversed(range(len(plain))):
        item, size = plain[dim], shape[dim]
        start, stop = ((item.start or 0, size if item.stop is None else item.stop)
                       if isinstance(item, slice) else (item, item + 1))
        if start >= size or stop > size:
            asked = start if start >= size else stop - 1
            raise error(f"index {asked} out of bounds for tensor dimension #{dim} of size "
                        f"{size}")


def _shown(item: int | slice) -> str:
    """An index item as safetensors' messages show it (``2:``, ``:20``, ``3::2``, ``7``)."""
    if not isinstance(item, slice):
        return str(item)
    text = f"{'' if item.start is None else item.start}:{'' if item.stop is None else item.stop}"
    return text if item.step is None else f"{text}:{item.step}"
