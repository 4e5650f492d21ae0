"""Descriptors of external bases: opened once per file however many threads touch a base
first (under a lock), and never again after ``close()``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from stream_helpers import mixed_file

import mcnc_format as mf
from mcnc_format.errors import MCNCError


def _in_threads(count: int, work: Callable[[], None], meanwhile: Callable[[], None] = lambda: None
                ) -> list[BaseException]:
    """Run ``work`` on ``count`` threads (``meanwhile`` on this one once they started); what
    they raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    meanwhile()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_threads_opening_a_base_together_open_it_once(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    mf.load(path)
    before = _descriptors()
    for _ in range(30):
        with mf.open(path, verify="none") as f:
            start = threading.Barrier(8)

            def touch(f: mf.MCNCFile = f, start: threading.Barrier = start) -> None:
                start.wait()
                f.get_tensor("m2")

            assert not _in_threads(8, touch)
    assert _descriptors() <= before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_check_references_after_close_raises(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    f = mf.open(path)
    f.get_tensor("m0")
    f.close()
    before = _descriptors()
    for _ in range(3):
        with pytest.raises(MCNCError, match="closed"):
            f.check_references()
        with pytest.raises(MCNCError, match="closed"):
            f.get_tensor("m2")
    assert _descriptors() == before


def test_close_racing_loads_that_await_a_base_check_raises_mcnc_errors(tmp_path: Path
                                                                         ) -> None:
    """A load waiting on a base's SHA-256 check when another thread closes the file gets an
    ``MCNCError``, not the ``CancelledError`` of the check the close cancelled."""
    path = mixed_file(tmp_path)
    errors: list[BaseException] = []
    for _ in range(30):
        f = mf.open(path, verify="full")

        def load(f: mf.MCNCFile = f) -> None:
            for _ in range(5):
                f.get_slice("m2")[0:1]  # a box: its check reads the base on a worker
                f.get_tensor("m5")

        errors += _in_threads(3, load, meanwhile=f.close)
    assert all(isinstance(exc, MCNCError) for exc in errors), {type(e) for e in errors}
