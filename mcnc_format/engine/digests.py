"""A cache of verified digests, so an unchanged file is not hashed again on every load.

SHA-256 pins (§7.4) make a base checkpoint safe to trust, but hashing a multi-gigabyte base on
every load costs more than reading it. The cache remembers that a file, identified by what
the operating system says of the open descriptor (device, inode, size, modification and
status-change times in nanoseconds), had the pinned digest. Any write to the file changes its
mtime and ctime, and a replaced file has another inode, so a changed or replaced file is
hashed again. The ctime cannot be set back by a user (``touch`` and ``utime`` set it to the
current time), which is why it is part of the key.

A file modified within the kernel's dirty-writeback window (``racy_window_ns``) before it was
hashed is not recorded (git's racy-entry rule): a page of a shared memory map dirtied before
the hash can be written again, changing the bytes, without moving mtime or ctime until
writeback cleans it.

The trade-off: a process with write access to the file system could alter a file and restore
its times only by changing the system clock; ``Verify.FULL`` hashes every load for those who
need that. Entries live under ``$XDG_CACHE_HOME/mcnc-format/verified`` (default
``~/.cache``), one small JSON file per file identity; a damaged, unreadable, oversized or
hostile entry (a FIFO, a symlink, a device) is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import threading
from pathlib import Path

__all__ = ["DigestCache", "FileIdentity", "default_cache_directory", "identity_of", "racy",
           "racy_window_ns"]

_WRITING = threading.Lock()


def _after_fork_in_child() -> None:
    """A lock held by a thread of the parent at fork time would stay held in the child."""
    global _WRITING
    _WRITING = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: The largest entry read. A real one takes about 95 bytes per base tensor (a 7B base's is
#: about 28 KB); anything larger is not one this library wrote.
MAX_ENTRY_BYTES = 4 << 20

_MIN_RACY_WINDOW_NS = 30 * 1_000_000_000

#: What identifies a file's contents without reading them.
FileIdentity = tuple[int, int, int, int, int]


def identity_of(fd: int) -> FileIdentity:
    """The identity of the file open as ``fd``."""
    status = os.fstat(fd)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns)


def _read_entry(path: Path) -> bytes | None:
    """The bytes of a regular file at ``path`` (not through a symlink; a FIFO or device is
    refused without blocking), or ``None`` when it is anything else or over the cap."""
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_ENTRY_BYTES:
            return None
        pieces, size = [], 0
        while size <= MAX_ENTRY_BYTES:  # the file may grow after the fstat
            piece = os.read(fd, MAX_ENTRY_BYTES + 1 - size)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces) if size <= MAX_ENTRY_BYTES else None
    except OSError:
        return None
    finally:
        os.close(fd)


def racy_window_ns() -> int:
    """How long before a hash a file must have been still for its identity to stand for its
    bytes: the kernel's dirty-page expiry (``/proc/sys/vm/dirty_expire_centisecs``), and at
    least 30 s. A page of a shared map written before a hash stays writable until writeback
    cleans it, so writes to it in that time change the bytes but not the times."""
    expiry = 0
    with (contextlib.suppress(OSError, ValueError),
          open("/proc/sys/vm/dirty_expire_centisecs", encoding="ascii") as f):
        expiry = int(f.read()) * 10_000_000
    return max(expiry, _MIN_RACY_WINDOW_NS)


def racy(identity: FileIdentity, hashed_at_ns: int) -> bool:
    """Whether the file was modified (mtime or ctime) within the racy window before
    ``hashed_at_ns``."""
    modified = max(identity[3], identity[4])
    return modified > hashed_at_ns - racy_window_ns()


def default_cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mcnc-format" / "verified"


class DigestCache:
    """Verified ``(name, digest)`` pairs per file identity."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_cache_directory()

    def _entry(self, identity: FileIdentity) -> Path:
        key = hashlib.sha256(repr(identity).encode()).hexdigest()
        return self.directory / key[:2] / key

    def _read(self, identity: FileIdentity) -> dict[str, str]:
        """The entry of ``identity``; anything but a regular file of at most
        ``MAX_ENTRY_BYTES`` holding a JSON object is a miss (``{}``): the cache folder is
        the user's, and whatever another program left there must not hang or exhaust a load."""
        data = _read_entry(self._entry(identity))
        if data is None:
            return {}
        try:
            entries = json.loads(data)
        except (ValueError, RecursionError):  # bad UTF-8 or JSON, absurd nesting
            return {}
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)}

    def known(self, identity: FileIdentity, name: str, digest: str) -> bool:
        """Whether ``name`` of the file ``identity`` was verified to have ``digest``."""
        return self._read(identity).get(name) == digest

    def remember(self, identity: FileIdentity, name: str, digest: str,
                 hashed_at_ns: int | None = None) -> None:
        """Record a verified digest of bytes read from ``hashed_at_ns`` (wall clock) on.
        Not recorded when the file was modified less than ``racy_window_ns()`` before that
        (git's racy-entry rule): writes through a shared memory map can still be pending
        then without moving mtime or ctime. Best effort: a cache that cannot be written
        (read-only home, full disk), or an entry another process rewrote at the same moment,
        only means hashing again next time."""
        if hashed_at_ns is not None and racy(identity, hashed_at_ns):
            return
        with _WRITING:  # hashing threads of one process record into one entry in turn
            self._write(identity, name, digest)

    def _write(self, identity: FileIdentity, name: str, digest: str) -> None:
        entries = self._read(identity)
        entries[name] = digest
        path = self._entry(identity)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(entries, out, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
