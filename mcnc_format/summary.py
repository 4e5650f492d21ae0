"""What the header says of a file's tensors and sizes, without reading any blob or torch.

``mcnc inspect``, ``MCNCFile.summary()``/``tensor_info()``, the demo and the Hub model card
report the same figures from here: ``file_ratio`` (dense bytes / file bytes) and
``weights_ratio`` (compressed parameters / stored alpha-beta values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import constants as C
from .engine.source import FileSource, OpenedHeader, read_header
from .header import DenseTensor, Header, LoRATensor, MCNCTensor, PackedTensor, TensorEntry

__all__ = ["TensorInfo", "file_summary", "opened_summary", "read_file_header", "tensor_info"]


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


def tensor_info(header: Header, t: TensorEntry) -> TensorInfo:
    """``TensorInfo`` of entry ``t`` of ``header``."""
    stored_values, stored_bytes = _stored(header, t)
    members = t.members()
    segment = members[0].segment if members else None
    generator = header.segments[segment].generator if segment is not None else None
    theta0 = str(t.theta0.kind) if isinstance(t, MCNCTensor | LoRATensor) else None
    return TensorInfo(t.name, str(t.encoding), t.shape, t.dtype, stored_values,
                      stored_bytes, theta0, segment, generator)


def _stored(header: Header, t: TensorEntry) -> tuple[int, int]:
    """Values and bytes this tensor's own storage takes (its share of segment blobs)."""
    if isinstance(t, DenseTensor):
        blob = header.blobs[t.blob]
        return blob.numel, blob.length
    if isinstance(t, PackedTensor):  # its share of the (possibly zstd) pack blob
        blob = header.blobs[t.blob]
        return t.numel, round(t.nbytes * blob.length / max(blob.decoded_length, 1))
    values = 0.0
    nbytes = 0.0
    for member in t.members():
        seg = header.segments[member.segment]
        d = header.generators[seg.generator].d
        share = member.numel / max(seg.chunks * d, 1)
        for blob_index in (seg.alpha, seg.beta):
            blob = header.blobs[blob_index]
            values += share * blob.numel
            nbytes += share * blob.length
    return round(values), round(nbytes)


def file_summary(header: Header, file_size: int, header_length: int, minor: int
                 ) -> dict[str, Any]:
    """Sizes and ratios for ``mcnc inspect`` and for users deciding what to ship."""
    dense_bytes = sum(t.numel * C.DTYPE_SIZES.get(t.dtype, 4) for t in header.tensors)
    compressed = [t for t in header.tensors if not t.stores_values]
    compressed_params = sum(t.numel for t in compressed)
    trainable = sum(header.blobs[s.alpha].numel + header.blobs[s.beta].numel
                    for s in header.segments)
    return {
        "file_bytes": file_size,
        "header_bytes": header_length,
        "dense_bytes": dense_bytes,
        "parameters": sum(t.numel for t in header.tensors),
        "compressed_parameters": compressed_params,
        "stored_alpha_beta_values": trainable,
        "file_ratio": dense_bytes / file_size if file_size else 0.0,
        "weights_ratio": compressed_params / trainable if trainable else 0.0,
        "tensors": len(header.tensors),
        "segments": len(header.segments),
        "generators": len(header.generators),
        "format_version": f"{C.FORMAT_MAJOR}.{minor}",
    }


def read_file_header(path: Path, label: str) -> OpenedHeader:
    """The checked preamble and header of the local file ``path`` (``label`` names it in
    errors); the file is closed again. What ``mcnc inspect`` and the Hub's model card read."""
    source = FileSource(path, label)
    try:
        return read_header(source, label)
    finally:
        source.close()


def opened_summary(opened: OpenedHeader) -> dict[str, Any]:
    """``file_summary`` of a header read by ``read_header``."""
    return file_summary(opened.header, opened.file_size, opened.preamble.header_length,
                        opened.preamble.minor)
