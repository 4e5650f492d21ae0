"""Writing safetensors files through ``atomic_path``, streamed, with no temporary left behind.

``safetensors.torch.save_file`` cannot be used: it writes its own named temporary beside the
path it is given and renames it, which fails on the unnamed ``O_TMPFILE`` file
``atomic_path`` hands out and would leave a stray ``.tmpXXXX`` after a SIGKILL. The format is
small (an 8-byte little-endian header length, a JSON header padded with spaces to 8 bytes,
then the raw tensors back to back), so it is written here, one tensor at a time, without a
second in-memory copy of the model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import atomic_path
from .dtypes import from_torch
from .errors import UnsupportedFeatureError, WriteError

__all__ = ["save_safetensors"]

_HEADER_ALIGNMENT = 8
# The header key of safetensors' string metadata: no tensor can have this name.
_METADATA_KEY = "__metadata__"


def save_safetensors(target: Path, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None, *, overwrite: bool) -> int:
    """Write ``tensors`` (CPU) and ``metadata`` as the safetensors file ``target``, atomically;
    returns its size in bytes. ``safetensors.torch.load_file`` reads it back exactly."""
    if sys.byteorder != "little":
        raise WriteError("safetensors files are little-endian; this host is not")
    header: dict[str, object] = {}
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name, tensor in tensors.items():
        if name == _METADATA_KEY:  # its entry would stand where readers expect the metadata
            raise WriteError(f"{target}: tensor {name!r}: safetensors reserves this name for "
                             "the file's metadata, so no safetensors file can hold the tensor; "
                             "rename it (load the tensors and save them under other names)")
        try:
            dtype = from_torch(tensor.dtype).upper()  # the spec names are safetensors' own
        except UnsupportedFeatureError as exc:
            raise WriteError(f"{target}: tensor {name!r}: {exc}") from exc
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % _HEADER_ALIGNMENT)
    with atomic_path(target, overwrite=overwrite) as tmp, open(tmp, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for tensor in tensors.values():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            out.write(memoryview(flat.view(torch.uint8).numpy()))
    return 8 + len(encoded) + offset
