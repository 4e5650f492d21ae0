"""git's racy-entry rule for the digest cache: a base modified within the kernel's
dirty-writeback window before it was hashed is not recorded as verified. Pages of a shared
memory map dirtied before the hash and written again stay writable until writeback, so such
writes move neither mtime nor ctime: only a file that has been still for longer than that
window can be trusted by its identity."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from stream_helpers import mixed_file

import mcnc_format as mf
from mcnc_format.engine import digests

EXTERNAL = ["m2", "m5"]
NS = 1_000_000_000


@pytest.fixture
def real_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule as shipped (conftest.py turns it off for the other tests, which hash bases
    they have just written)."""
    monkeypatch.setattr(digests, "racy_window_ns", _REAL_WINDOW)


_REAL_WINDOW = digests.racy_window_ns


def test_the_window_covers_the_kernels_writeback_expiry() -> None:
    window = _REAL_WINDOW()
    assert window >= 30 * NS
    try:
        with open("/proc/sys/vm/dirty_expire_centisecs") as f:
            expiry = int(f.read()) * 10_000_000
    except OSError:
        return
    assert window >= expiry


def test_a_base_written_just_now_is_hashed_but_not_recorded(
        tmp_path: Path, hashes: list[str], real_window: None) -> None:
    path = mixed_file(tmp_path)
    for _ in range(2):
        mf.load(path, names=EXTERNAL)
    assert len(hashes) == 4  # hashed every time: nothing recorded


def test_a_base_still_for_longer_than_the_window_is_recorded(
        tmp_path: Path, hashes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "racy_window_ns", lambda: NS // 2)
    path = mixed_file(tmp_path)
    mf.load(path, names=EXTERNAL)
    assert len(hashes) == 2
    time.sleep(0.6)
    mf.load(path, names=EXTERNAL)  # hashed: the last hash was racy
    assert len(hashes) == 4
    for _ in range(2):
        mf.load(path, names=EXTERNAL)
    assert len(hashes) == 4  # recorded: still since long before that hash
