"""A read racing ``close()`` of the same source (the descriptor is reference-counted).

Before, ``FileSource.read`` checked the descriptor and then ``pread`` it; ``close()`` in
between freed the number, another ``open`` could get it, and the read returned *that* file's
bytes as if they were this one's. Now a read holds the descriptor until it returns: a close
during the read takes effect when the read ends, and reads that begin after it raise.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest
import torch
from stream_helpers import mixed_file

import mcnc_format as mf
from mcnc_format.engine import source as source_module
from mcnc_format.engine.source import FileSource
from mcnc_format.errors import MCNCError


def _file(path: Path, byte: int, size: int = 1 << 16) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


def test_close_during_a_read_never_yields_another_files_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read is paused inside ``pread``'s call; meanwhile the source is closed and other
    files are opened (one would take the freed number); the read still returns its own file's
    bytes, and the descriptor closes when it ends."""
    ours = FileSource(_file(tmp_path / "a.bin", 0xAA), "a.bin")
    other = _file(tmp_path / "b.bin", 0xBB)
    entered, release = threading.Event(), threading.Event()
    real_preadv = os.preadv

    def paused_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        entered.set()
        assert release.wait(10)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(source_module.os, "preadv", paused_preadv)
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(bytes(ours.read(0, 4096))))
    reader.start()
    assert entered.wait(10)
    ours.close()
    opened = [os.open(other, os.O_RDONLY) for _ in range(4)]
    try:
        release.set()
        reader.join(10)
    finally:
        for fd in opened:
            os.close(fd)
    assert result == [bytes([0xAA]) * 4096]
    with pytest.raises(MCNCError, match="closed"):
        ours.read(0, 16)


def test_threads_reading_while_another_closes(tmp_path: Path) -> None:
    """Many threads read while the source is closed and descriptors are reopened: every
    read returns this file's bytes or raises ``MCNCError``; no descriptor leaks."""
    other = _file(tmp_path / "b.bin", 0xBB)
    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else None
    for round_ in range(20):
        ours = FileSource(_file(tmp_path / f"a{round_}.bin", 0xAA), "a.bin")
        wrong: list[bytes] = []

        def read_many(source: FileSource = ours, wrong: list[bytes] = wrong) -> None:
            for _ in range(200):
                try:
                    data = bytes(source.read(0, 1024))
                except MCNCError:
                    return
                if data != bytes([0xAA]) * 1024:
                    wrong.append(data[:8])

        threads = [threading.Thread(target=read_many) for _ in range(4)]
        for thread in threads:
            thread.start()
        ours.close()
        fds = [os.open(other, os.O_RDONLY) for _ in range(4)]
        for thread in threads:
            thread.join(30)
        for fd in fds:
            os.close(fd)
        assert not wrong
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before


def test_reads_after_close_name_the_file_once(tmp_path: Path) -> None:
    """Every read of a closed file, the external bases' included, is an ``MCNCError`` whose
    text names the file once (the bases' said ``PATH: PATH: the file is closed``)."""
    path = mixed_file(tmp_path)
    f = mf.open(path)
    f.get_tensor("first_dense")
    f.close()
    for read in (lambda: f.get_tensor("m2"), f.check_references,
                 lambda: f.get_slice("m5")[1:]):
        with pytest.raises(MCNCError, match="closed") as raised:
            read()
        assert str(raised.value).count(str(path)) == 1, str(raised.value)


def test_a_file_left_open_releases_its_descriptors_when_collected(tmp_path: Path) -> None:
    """``mf.open(path).get_tensor(name)`` without ``close()`` (or ``with``) kept the file's
    descriptor, and its base's, for the life of the process: a loop of them ran out of
    descriptors (EMFILE). As a Python file object does, a source closes its descriptor when
    it is collected."""
    path = mixed_file(tmp_path)
    want = mf.load(path, names=["m2"])["m2"]
    fds = Path("/proc/self/fd")
    if not fds.exists():
        pytest.skip("needs /proc/self/fd to count descriptors")
    before = len(list(fds.iterdir()))
    for _ in range(20):
        assert torch.equal(mf.open(path).get_tensor("m2"), want)  # reads the base too
    gc.collect()
    assert len(list(fds.iterdir())) <= before
