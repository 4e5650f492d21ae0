"""Byte-level integrity of an ``.mcnc`` file: what a download must pass before it is used.

Why not ``verify.verify_file``: that rebuilds every tensor. A download only needs proof that
the bytes are the ones written: the header checksum and rules (checked by ``open``), every
blob's XXH3-64 checksum and zero padding. That reads the file once and is cheap next to a
download.
"""

from __future__ import annotations

from pathlib import Path

from ..reader import MCNCFile

__all__ = ["check_mcnc_bytes"]


def check_mcnc_bytes(path: Path) -> Path:
    """Return ``path`` if every checksum holds; raise ``FormatError``/``ChecksumError`` if
    not (the reader's own errors, so callers can tell damage from other failures)."""
    with MCNCFile(path, verify=True) as mcnc_file:
        for index in range(len(mcnc_file.header.blobs)):
            mcnc_file.blob_bytes(index)
        mcnc_file.check_padding()
    return path
