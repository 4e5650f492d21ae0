"""``safetensors.numpy``'s names over ``.mcnc`` files::

    from mcnc_format.safetensors.numpy import save_file, load_file, save, load

The same reader and writer as the torch names serve these: arrays are written as dense
``.mcnc`` tensors (in sorted name order, so the same arrays give the same bytes whatever the
dict's order), and every encoding comes back as numpy arrays. As safetensors.numpy does,
arrays sharing memory are each stored (numpy has no tied weights), big-endian arrays are
stored little-endian, and a bf16 tensor needs ``ml_dtypes`` imported to come back (numpy has
no bfloat16 of its own; ``NumpyDtypeError``, a ``TypeError``, otherwise). A safetensors file
is read by ``safetensors.numpy`` itself.
"""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from . import files
from .frameworks import NUMPY, PathLike

__all__ = ["load", "load_file", "save", "save_file"]


def save(tensor_dict: dict[str, npt.NDArray[Any]], metadata: dict[str, str] | None = None
         ) -> bytes:
    """The bytes ``save_file`` would write."""
    return files.save_bytes(NUMPY, tensor_dict, metadata)


def save_file(tensor_dict: dict[str, npt.NDArray[Any]], filename: PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write arrays as dense ``.mcnc`` tensors. A non-dict or a value that is not an
    ``np.ndarray`` raises ``InvalidTensorError`` (a ``ValueError``); a dtype the format does
    not store (complex, unsigned 16/32/64-bit, fp8) a ``WriteError``."""
    files.save_file(NUMPY, tensor_dict, filename, metadata)


def load(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of a file given as bytes (``save``'s output), as arrays."""
    return files.load_bytes(NUMPY, data)


def load_file(filename: PathLike, *, backend: str = "mmap") -> dict[str, npt.NDArray[Any]]:
    """Every tensor of a file as arrays."""
    return files.load_file(NUMPY, filename, "cpu", backend)
