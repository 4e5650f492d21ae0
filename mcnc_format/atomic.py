"""Atomic, race-free creation and replacement of output files.

Used for every file the library writes (``.mcnc`` files, dense safetensors exports, PEFT
adapters, the demo's files). Three promises:

* The old file survives any failure of the new one: the new bytes are written to an unnamed
  file and only appear under the target's name once complete and fsynced.
* A writer killed at any moment (even SIGKILL) leaves nothing behind: on Linux the file is
  created with ``O_TMPFILE`` (no name until it is linked into place). Where the file system
  lacks ``O_TMPFILE`` a named temporary ``.NAME.<pid>.<host>.<random>.tmp`` is used (replacing
  a file also names the finished file so for a moment before the rename), and temporaries of
  writers that no longer run on this machine are removed by the next write to that target.
  ``<host>`` tells this machine's temporaries from those of other machines writing the same
  folder (NFS has no ``O_TMPFILE``), whose process ids say nothing here.
* A set of files (``atomic_files``: a model folder's weights, config and card, a PEFT
  adapter's weights and config) is written to a temporary folder beside them, and moved into
  place one atomic rename each only once all were written and fsynced: a failure half-way
  leaves every old file as it was.
* Without ``overwrite`` the target is created only if it still does not exist at the moment the
  finished file is linked into place (``link`` fails with ``EEXIST``): of two writers racing to
  the same new path exactly one succeeds. With ``overwrite`` the target is replaced by a
  rename, atomically.
* Only a regular file (or a symbolic link, which the new file replaces) is ever replaced: a
  rename over a device, FIFO or socket would put a regular file in its place (``/dev/null``,
  for a writer running as root), so such a target, and a folder, is refused up front.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import WriteError

__all__ = ["atomic_files", "atomic_path", "describe_os_error", "refuse_overwrite",
           "refuse_same_file"]

# Room left in a 255-byte file name for the temporary name's dot, pid, random part and suffix.
_NAME_CHARS = 120
_FIXES = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space or write to another disk",
    errno.EROFS: "write somewhere else, or remount the file system read-write",
    errno.ENAMETOOLONG: "choose a shorter file name",
    errno.EACCES: "check the permissions of the folder, or write somewhere else",
    errno.EPERM: "check the permissions of the folder, or write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.ENOENT: "check that the folder exists",
    errno.EISDIR: "the path is a folder; name a file",
}


def describe_os_error(exc: OSError) -> str:
    """``PATH: what failed; what to do`` for an ``OSError``, as one line for a user (without
    ``PATH:`` when the error names no path)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or 0)
    line = what + (f"; {fix}" if fix else "")
    return line if exc.filename is None else f"{exc.filename}: {line}"


def refuse_overwrite(outputs: list[Path], overwrite: bool) -> None:
    """Fail early (before any expensive work) when an output exists (a dangling symlink
    too) and may not be replaced, or is no file at all; ``atomic_path`` checks again at the
    final link, where it counts."""
    for path in outputs:
        _refuse_non_file(path)
    if overwrite:
        return
    dangling = [path for path in outputs if os.path.islink(path) and not path.exists()]
    if dangling:
        raise WriteError(f"{dangling[0]}: {_existing(dangling[0])}")
    existing = [str(path) for path in outputs if path.exists()]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise WriteError(f"{', '.join(existing)}: already {verb}; pass --force (force=True) to "
                         "overwrite")


def _refuse_non_file(path: Path) -> None:
    """Refuse a target that is neither a regular file nor a symbolic link (the link itself,
    not what it points to: the new file replaces the link)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # nothing there (or unreachable: creating the file reports why)
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    what = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
    raise WriteError(f"{path}: is {what}, not a file; it cannot be replaced by one. Name a "
                     "file to write")


def _existing(path: Path) -> str:
    """What is in the way at ``path`` at the final link: a dangling symbolic link, or a file
    that appeared while the new file was being written."""
    if os.path.islink(path) and not os.path.exists(path):
        return (f"is a symbolic link to {os.readlink(path)}, which does not exist; remove "
                "the link, or pass --force (force=True) to replace it")
    return ("already exists (it appeared while this file was being written); pass --force "
            "(force=True) to overwrite")


def refuse_same_file(source: str | os.PathLike[str], target: Path) -> None:
    """Refuse to write over the input being read (also through symlinks and hard links):
    the input would be destroyed, and with it the only copy of what is being converted."""
    with contextlib.suppress(OSError):
        if os.path.samefile(source, target):
            raise WriteError(f"{target}: is the input file {source} itself (or a link to it); "
                             "choose another output path")


@contextlib.contextmanager
def atomic_path(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a path to write the new file to; on success it becomes ``target``.

    The path names an unnamed ``O_TMPFILE`` file (``/proc/self/fd/N``) where the OS has it,
    else a named temporary in the target's folder. Open it for writing as often as needed
    (``O_TRUNC`` works), but do not rename or delete it. On any exception the new bytes are
    discarded and ``target`` is untouched; an ``OSError`` becomes a ``WriteError`` naming the
    target and the fix. Without ``overwrite`` an existing ``target`` (even one that appeared
    while writing) is a ``WriteError``.
    """
    _refuse_non_file(target)
    directory = target.parent if str(target.parent) else Path(".")
    _remove_stale_temporaries(target, directory)
    fd, named = _create(target, directory)
    try:
        yield Path(f"/proc/self/fd/{fd}") if named is None else named
        os.fsync(fd)
        os.fchmod(fd, _mode_for(target))
        _publish(fd, named, target, directory, overwrite)
    except BaseException as exc:
        if named is not None:
            named.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"{target}: write failed: {describe_os_error(exc)}; the "
                             "previous file, if any, is unchanged") from exc
        raise
    finally:
        os.close(fd)
    _fsync_directory(directory)


#: The temporary folder of ``atomic_files`` is named like a temporary of a file of this name.
_STAGING = "mcnc-staging"


@contextlib.contextmanager
def atomic_files(folder: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to write a set of files into; when the block succeeds, each
    file written there replaces the file of its name in ``folder`` (keeping that file's
    mode, as ``atomic_path`` does), by a rename, after all of them were written and fsynced.
    On any exception nothing is moved and the temporary folder is removed; an ``OSError``
    becomes a ``WriteError`` naming the folder and the fix. Files only: a subfolder written
    there is a ``WriteError``.

    Without ``overwrite`` the files are linked into place instead (``link`` fails if a name
    exists): the first existing name, even one that appeared while writing, is a
    ``WriteError``, and the files this call already placed are taken back, so of two writers
    racing to the same new set exactly one succeeds and neither leaves a mixed set."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{folder}: cannot create the folder: {describe_os_error(exc)}"
                         ) from exc
    stand_in = folder / _STAGING
    _remove_stale_temporaries(stand_in, folder)
    try:
        staging = Path(tempfile.mkdtemp(prefix=_writer_prefix(stand_in), suffix=".tmp",
                                        dir=folder))
    except OSError as exc:
        raise WriteError(f"{folder}: cannot create a temporary folder: "
                         f"{describe_os_error(exc)}") from exc
    try:
        yield staging
        written = sorted(staging.iterdir())
        folders = [p.name for p in written if p.is_dir()]
        if folders:
            raise WriteError(f"{folder}: the save wrote folders {folders}; only files can be "
                             "moved into place together")
        for path in written:
            _refuse_non_file(folder / path.name)
            _finish(path, folder / path.name)
        if overwrite:
            for path in written:
                os.replace(path, folder / path.name)
        else:
            _link_all(written, folder)
        _fsync_directory(folder)
    except OSError as exc:
        raise WriteError(f"{folder}: write failed: {describe_os_error(exc)}; the files "
                         "already there are unchanged") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_all(written: list[Path], folder: Path) -> None:
    """Link each written file into ``folder`` under its name, all or none: on the first name
    that exists, unlink the ones placed so far (only those still this call's files: a name
    another writer has since replaced is left to it)."""
    placed: list[Path] = []
    for path in written:
        target = folder / path.name
        try:
            _link(path, target)
        except FileExistsError:
            for mine in placed:
                with contextlib.suppress(OSError):
                    if os.path.samefile(mine, folder / mine.name):
                        (folder / mine.name).unlink()
            raise WriteError(f"{target}: {_existing(target)}") from None
        placed.append(path)


def _finish(path: Path, target: Path) -> None:
    """Make a written file durable and give it the mode of the file it replaces."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.fchmod(fd, _mode_for(target))
    finally:
        os.close(fd)


def _create(target: Path, directory: Path) -> tuple[int, Path | None]:
    """An open descriptor of the new file, and its name (``None`` for an ``O_TMPFILE``)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600), None
    except AttributeError:  # no O_TMPFILE on this OS
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise WriteError(f"{target}: cannot create the file: "
                             f"{describe_os_error(exc)}") from exc
    try:
        fd, name = tempfile.mkstemp(prefix=_writer_prefix(target), suffix=".tmp",
                                    dir=directory)
    except OSError as exc:
        raise WriteError(f"{target}: cannot create a temporary file: "
                         f"{describe_os_error(exc)}") from exc
    return fd, Path(name)


def _publish(fd: int, named: Path | None, target: Path, directory: Path,
             overwrite: bool) -> None:
    """Give the finished file the target's name: link (fails if it exists) or rename over."""
    source = named if named is not None else Path(f"/proc/self/fd/{fd}")
    if overwrite:
        if named is None:  # an unnamed file cannot be renamed: name it first, then rename
            named = directory / f"{_writer_prefix(target)}{secrets.token_hex(4)}.tmp"
            _link(source, named)
        try:
            os.replace(named, target)
        except BaseException:
            named.unlink(missing_ok=True)
            raise
        return
    try:
        _link(source, target)
    except FileExistsError:
        raise WriteError(f"{target}: {_existing(target)}") from None
    if named is not None:
        named.unlink()


def _link(source: Path, dest: Path) -> None:
    """Hard-link ``source`` (following a ``/proc/self/fd/N`` link to the file itself) as
    ``dest``; fails with ``EEXIST`` if ``dest`` exists. ``os.link`` calls ``linkat`` with
    ``AT_SYMLINK_FOLLOW`` only when given a folder descriptor: plain ``link`` would try to link
    the ``/proc`` symlink itself (``EXDEV``)."""
    folder = os.open(dest.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.link(source, dest.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name[:_NAME_CHARS]}."


def _writer_prefix(target: Path) -> str:
    """``.NAME.<pid>.<host>.``: what this process's temporaries for ``target`` start with."""
    return f"{_temporary_prefix(target)}{os.getpid()}.{_host()}."


def _host() -> str:
    """This machine, as 8 hex digits (a host name may hold dots and is of any length)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _remove_stale_temporaries(target: Path, directory: Path) -> None:
    """Remove ``.NAME.<pid>.<host>.*.tmp`` files of this machine whose writer process no
    longer exists: what a writer killed before it could clean up left behind (only named
    temporaries can be left). Another machine's are its own to remove."""
    prefix, host = _temporary_prefix(target), _host()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            parts = entry.name[len(prefix):].split(".")
            if (entry.name.startswith(prefix) and len(parts) == 4 and parts[3] == "tmp"
                    and parts[1] == host and parts[0].isdigit()
                    and not _alive(int(parts[0]))):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):  # an ``atomic_files`` folder
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _mode_for(target: Path) -> int:
    """The replaced file's permissions (a regular file's, also through a symlink), or what a
    plain ``open`` would give under the umask (temporary files are created 0600): a device
    or FIFO the target links to lends nothing (``/dev/full`` is 0666)."""
    try:
        status = os.stat(target)
    except OSError:
        status = None
    if status is not None and stat.S_ISREG(status.st_mode):
        return stat.S_IMODE(status.st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync_directory(directory: Path) -> None:
    """Make the new name durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
