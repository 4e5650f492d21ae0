"""Byte-level integrity of an ``.mcnc`` file: what a download must pass before it is used.

Why not ``verify.verify_file``: that rebuilds every tensor. A download only needs proof that
the bytes are the ones written: the header checksum and rules (checked by ``open``), every
blob's XXH3-64 checksum and zero padding. That reads the file once, and only once per
download: the digest cache (``engine/digests.py``) remembers the checked file by its identity
(device, inode, size, mtime, ctime), so later opens of the same unchanged copy skip it, and a
copy fetched again (a new file) is checked again.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..engine.digests import DigestCache
from ..engine.source import BlobStore, FileSource, read_header, sweep_bytes

__all__ = ["check_mcnc_bytes"]

#: The digest cache's record of a fully checked ``.mcnc`` file.
CHECKED = "mcnc-bytes"


def check_mcnc_bytes(path: Path) -> Path:
    """Return ``path`` if every checksum holds; raise ``FormatError``/``ChecksumError`` if
    not (the reader's own errors, so callers can tell damage from other failures)."""
    cache = DigestCache()
    checked_at = time.time_ns()  # a file modified just before is not recorded (racy)
    source = FileSource(path, str(path))
    try:
        opened = read_header(source, str(path))
        identity = source.identity()
        if cache.known(identity, CHECKED, "ok"):
            return path
        blobs = BlobStore(source, opened.header, verify=True)
        for _, problem in sweep_bytes(blobs, opened.preamble.header_length):
            if problem is not None:
                raise problem
    finally:
        source.close()
    cache.remember(identity, CHECKED, "ok", checked_at)
    return path
