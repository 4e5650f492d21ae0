"""An interrupted save never damages the file already at the target path.

``save`` writes an unnamed (``O_TMPFILE``) file in the target's directory, fsyncs it and links
it into place. Whatever stops it before that (an I/O error, Ctrl-C, the process being killed,
even by SIGKILL) leaves the previous file byte-identical and no temporary file. Where the file
system has no ``O_TMPFILE``, named temporaries of dead writers are removed by the next write.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, Segment, atomic
from mcnc_format import writer as writer_module

KILL_WAIT_S = 120  # generous: the child imports torch on a busy machine


def _inputs(seed: int, scale: int = 1) -> dict[str, Any]:
    rng = torch.Generator().manual_seed(seed)
    gen = GeneratorSpec(k=3, d=16, hidden=(8,), seed=seed % 2**32)
    segment = Segment(gen, torch.rand(4, 2, 3, generator=rng), torch.randn(4, 2, generator=rng))
    return {
        "w": MCNC(segment, (8, 8)),
        "big": Dense(torch.randn(scale, 1024, generator=rng)),
        "ids": Dense(torch.arange(100 * scale), "zstd"),
    }


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


@pytest.fixture
def previous(tmp_path: Path, seed: int) -> tuple[Path, bytes]:
    """A valid file already at the target path, and its bytes."""
    path = tmp_path / "model.mcnc"
    mf.save(path, _inputs(seed), metadata={"version": "old"})
    return path, path.read_bytes()


def _assert_intact(path: Path, old: bytes) -> None:
    assert path.read_bytes() == old
    with mf.open(path) as f:
        assert f.metadata == {"version": "old"}
        f.tensors()
        f.check_padding()


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


class _FailingFile:
    """Wraps the writer's file object; the ``fail_at``-th write raises ``error``."""

    def __init__(self, inner: Any, fail_at: int, error: BaseException) -> None:
        self.inner, self.fail_at, self.error, self.writes = inner, fail_at, error, 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == self.fail_at:
            self.inner.write(data[: len(data) // 2])  # a partial write first, as a disk would
            raise self.error
        return self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


def _fail_writes(monkeypatch: pytest.MonkeyPatch, fail_at: int, error: BaseException) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(writer_module.os, "fdopen",
                        lambda fd, *a, **k: _FailingFile(real_fdopen(fd, *a, **k), fail_at, error))


@pytest.mark.parametrize("fail_at", [1, 2, 4, 6])
def test_io_error_while_writing_blobs(fail_at: int, previous: tuple[Path, bytes], seed: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes: preamble, header, then padding and payload per blob; fail at each stage."""
    path, old = previous
    _fail_writes(monkeypatch, fail_at, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(mf.WriteError, match="unchanged") as info:
        mf.save(path, _inputs(seed + 1, 4), metadata={"version": "new"})
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    monkeypatch.undo()
    _assert_intact(path, old)
    assert _temporaries(path.parent) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")],
                         ids=["KeyboardInterrupt", "RuntimeError"])
def test_interrupt_while_writing_blobs(error: BaseException, previous: tuple[Path, bytes],
                                       seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    path, old = previous
    _fail_writes(monkeypatch, 4, error)
    with pytest.raises(type(error)):
        mf.save(path, _inputs(seed + 1, 4), metadata={"version": "new"})
    monkeypatch.undo()
    _assert_intact(path, old)
    assert _temporaries(path.parent) == []


def test_fsync_failure(previous: tuple[Path, bytes], seed: int,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    path, old = previous

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_module.os, "fsync", fail)
    with pytest.raises(mf.WriteError):
        mf.save(path, _inputs(seed + 1), metadata={"version": "new"})
    monkeypatch.undo()
    _assert_intact(path, old)
    assert _temporaries(path.parent) == []


def test_invalid_input_leaves_previous_file(previous: tuple[Path, bytes]) -> None:
    path, old = previous
    with pytest.raises(mf.WriteError):
        mf.save(path, {"w": Dense(torch.ones(2), "lz4")})
    _assert_intact(path, old)
    assert _temporaries(path.parent) == []


def test_shared_and_non_contiguous_tensors_are_refused(previous: tuple[Path, bytes]) -> None:
    """As safetensors: a tie would be stored twice and load back untied; the message points
    to save_model (which keeps one name per tie) and .clone()/.contiguous()."""
    path, old = previous
    weight = torch.randn(4, 6)
    for tensors in ({"a": weight, "b": weight}, {"a": weight, "b": Dense(weight[1:])}):
        with pytest.raises(mf.SharedTensorError, match="save_model") as raised:
            mf.save(path, tensors)
        assert isinstance(raised.value, RuntimeError) and "clone()" in str(raised.value)
    with pytest.raises(mf.InvalidTensorError, match=r"contiguous\(\)") as refused:
        mf.save(path, {"t": weight.t()})
    assert isinstance(refused.value, ValueError)
    with pytest.raises(mf.InvalidTensorError, match="dict"):
        mf.save(path, [("a", weight)])  # type: ignore[arg-type]
    _assert_intact(path, old)
    mf.save(path, {"a": weight[:2], "b": weight[2:]})  # disjoint views share nothing
    assert torch.equal(mf.load(path)["b"], weight[2:])


def test_failed_first_save_creates_nothing(tmp_path: Path, seed: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_writes(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(mf.WriteError):
        mf.save(tmp_path / "new.mcnc", _inputs(seed))
    assert list(tmp_path.iterdir()) == []


def test_successful_save_replaces(previous: tuple[Path, bytes], seed: int) -> None:
    path, old = previous
    mf.save(path, _inputs(seed + 1), metadata={"version": "new"})
    assert path.read_bytes() != old
    assert mf.open(path).metadata == {"version": "new"}
    assert _temporaries(path.parent) == []


# -- SIGKILL ------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_writer_atomic import _inputs
    import mcnc_format as mf
    from mcnc_format import writer
    inputs = _inputs({seed}, {scale})
    def blocked(fd):  # every byte is written; the rename has not happened
        open({marker!r}, "w").close()
        time.sleep(600)
    writer.os.fsync = blocked
    open({ready!r}, "w").close()
    mf.save({path!r}, inputs, metadata={{"version": "new"}})
""")


def _run_child(path: Path, seed: int, scale: int) -> tuple[subprocess.Popen, Path, Path]:
    """A child process saving to ``path`` whose fsync blocks; (process, fsync marker, ready)."""
    marker, ready = path.parent / "blocked.flag", path.parent / "ready.flag"
    code = _CHILD.format(tests=str(Path(__file__).parent), seed=seed, scale=scale,
                         marker=str(marker), ready=str(ready), path=str(path))
    return subprocess.Popen([sys.executable, "-c", code]), marker, ready


def _wait_for(condition: Any, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    return False


def test_sigkill_while_writing_leaves_no_temporary(previous: tuple[Path, bytes],
                                                   seed: int) -> None:
    """A child saving 16 MiB is killed once every byte is written (its fsync, patched to
    block, has begun, so the link into place can never win): nothing but the old file and the
    test's flags remain in the folder."""
    path, old = previous
    proc, marker, ready = _run_child(path, seed + 1, 4096)
    try:
        assert _wait_for(ready.exists, proc), "the child failed to start"
        assert _wait_for(marker.exists, proc), "the child never reached fsync"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=KILL_WAIT_S) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    _assert_intact(path, old)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "blocked.flag", "model.mcnc", "ready.flag"]


def _dead_pid() -> int:
    """The pid of a process that has finished (not reused this soon)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    return int(finished.stdout)


def _open_temporary(path: Path, pid: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path]:
    """A named temporary of a writer with process id ``pid`` (this machine's unless the host
    name is patched), still being written: the open ``atomic_path`` and its path."""
    with monkeypatch.context() as patched:
        patched.setattr(os, "getpid", lambda: pid)
        writing = atomic.atomic_path(path, overwrite=True)
        temporary = writing.__enter__()
    return writing, temporary


def test_without_o_tmpfile_stale_temporaries_of_dead_writers_are_removed(
        previous: tuple[Path, bytes], seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The named-temporary fallback: a temporary of a process that no longer exists is
    removed by the next write to the same target; one of a running process (pid 1) is not."""
    path, _old = previous
    monkeypatch.delattr(os, "O_TMPFILE")
    _, dead = _open_temporary(path, _dead_pid(), monkeypatch)
    alive_writer, alive = _open_temporary(path, 1, monkeypatch)
    dead.write_bytes(b"left by a killed writer")
    alive.write_bytes(b"being written")
    mf.save(path, _inputs(seed + 1), metadata={"version": "new"})
    assert not dead.exists() and alive.exists()
    assert mf.open(path).metadata == {"version": "new"}
    alive_writer.__exit__(ValueError, ValueError("abandoned"), None)
    assert _temporaries(path.parent) == []


def test_a_temporary_of_a_writer_on_another_machine_is_left_alone(
        previous: tuple[Path, bytes], seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without O_TMPFILE (NFS, a folder several machines write to) a process id says nothing
    about another machine's writers: node-b's save removed the named temporary of node-a's
    writer, whose pid is not running on node-b, and node-a's save then failed. Each machine
    removes only its own dead writers' temporaries."""
    path, _old = previous
    monkeypatch.delattr(os, "O_TMPFILE")
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    node_a, temporary = _open_temporary(path, _dead_pid(), monkeypatch)
    temporary.write_bytes(b"node-a's file")
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    mf.save(path, _inputs(seed + 1), metadata={"version": "node-b"})
    assert temporary.exists()
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    node_a.__exit__(None, None, None)
    assert path.read_bytes() == b"node-a's file"
    assert _temporaries(path.parent) == []


@pytest.mark.parametrize("o_tmpfile", [True, False], ids=["O_TMPFILE", "named-temporary"])
def test_no_overwrite_fails_at_the_final_link_when_the_target_appeared(
        tmp_path: Path, seed: int, o_tmpfile: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target appears while the new file is being written: without overwrite the save
    fails and leaves the newcomer alone; nothing temporary remains."""
    if not o_tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE")
    path = tmp_path / "model.mcnc"
    real_fsync = os.fsync

    def someone_else_writes(fd: int) -> None:
        path.write_bytes(b"the other writer's file")
        real_fsync(fd)

    monkeypatch.setattr(writer_module.os, "fsync", someone_else_writes)
    with pytest.raises(mf.WriteError, match=r"already exists .*appeared while"):
        mf.save(path, _inputs(seed), overwrite=False)
    assert path.read_bytes() == b"the other writer's file"
    assert sorted(tmp_path.iterdir()) == [path]


def test_replacement_keeps_the_old_mode_and_new_files_follow_the_umask(tmp_path: Path,
                                                                        seed: int) -> None:
    """A model saved over a 0600 file stays private; a new file gets 0666 minus the umask."""
    private = tmp_path / "private.mcnc"
    private.write_bytes(b"old")
    private.chmod(0o600)
    mf.save(private, _inputs(seed, 1))
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    old = os.umask(0o077)
    try:
        fresh = tmp_path / "fresh.mcnc"
        mf.save(fresh, _inputs(seed, 1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


def test_an_output_symlink_to_a_device_gives_the_new_file_the_umask_mode(
        tmp_path: Path, seed: int) -> None:
    """The link is replaced by the new file; its mode is not the device's 0666."""
    link = tmp_path / "model.mcnc"
    link.symlink_to("/dev/full")
    old = os.umask(0o022)
    try:
        mf.save(link, _inputs(seed, 1))
    finally:
        os.umask(old)
    assert not link.is_symlink() and link.is_file()
    assert stat.S_IMODE(link.stat().st_mode) == 0o644
    assert stat.S_IMODE(os.stat("/dev/full").st_mode) == 0o666  # the device is untouched


def test_a_dangling_symlink_as_output_is_named_as_such(tmp_path: Path, seed: int) -> None:
    link = tmp_path / "model.mcnc"
    link.symlink_to(tmp_path / "nowhere" / "x.mcnc")
    with pytest.raises(mf.WriteError, match="symbolic link") as caught:
        mf.save(link, _inputs(seed, 1), overwrite=False)
    assert "appeared while" not in str(caught.value)
    assert "nowhere" in str(caught.value)
    assert link.is_symlink() and sorted(tmp_path.iterdir()) == [link]


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_fifo_or_folder_at_the_output_path_is_refused_not_replaced(
        tmp_path: Path, seed: int, overwrite: bool) -> None:
    """A rename over a FIFO or a device would put a regular file in its place (``mcnc unpack
    --force m.mcnc /dev/null`` run as root replaced /dev/null): such a target is refused,
    named for what it is, and left as it was; so is a folder (without overwrite it was said to
    have appeared while the file was written)."""
    fifo = tmp_path / "model.mcnc"
    os.mkfifo(fifo)
    with pytest.raises(mf.WriteError, match="is a FIFO") as caught:
        mf.save(fifo, _inputs(seed), overwrite=overwrite)
    assert "--force" not in str(caught.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    folder = tmp_path / "folder.mcnc"
    folder.mkdir()
    with pytest.raises(mf.WriteError, match="is a folder"):
        mf.save(folder, _inputs(seed), overwrite=overwrite)
    assert folder.is_dir() and sorted(tmp_path.iterdir()) == [folder, fifo]


def test_of_two_sets_racing_to_new_names_one_is_placed_whole(tmp_path: Path) -> None:
    """``atomic_files(overwrite=False)``: the set finished second finds a name taken, and the
    names it had already placed are taken back; the folder holds the first set only."""
    first, second = os.urandom(64), os.urandom(64)
    with pytest.raises(mf.MCNCError, match=r"b\.bin.*already exists"), \
            atomic.atomic_files(tmp_path, overwrite=False) as late:
        (late / "a.bin").write_bytes(second)
        (late / "b.bin").write_bytes(second)
        with atomic.atomic_files(tmp_path, overwrite=False) as early:
            (early / "b.bin").write_bytes(first)
            (early / "c.bin").write_bytes(first)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        "b.bin": first, "c.bin": first}
