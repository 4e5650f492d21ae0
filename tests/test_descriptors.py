"""Descriptors of external bases: opened once per file however many threads touch a base
first (under a lock), and never again after ``close()``."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from stream_helpers import mixed_file

import mcnc_format as mf
from mcnc_format.errors import MCNCError


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
            errors: list[BaseException] = []

            def touch(f: mf.MCNCFile = f, start: threading.Barrier = start,
                      errors: list[BaseException] = errors) -> None:
                start.wait()
                try:
                    f.get_tensor("m2")
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=touch) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors
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
