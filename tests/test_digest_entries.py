"""Hostile digest-cache entries: whatever sits at an entry's path (a FIFO, a symlink to
``/dev/zero``, JSON nested a million deep, a 1 GiB sparse file, a directory) is a miss: the
base is hashed again, without hanging, raising or reading more than a small cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from stream_helpers import mixed_file

import mcnc_format as mf

EXTERNAL = ["m2", "m5"]


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "mcnc-format" / "verified").rglob("*") if p.is_file())


def _replace(entry: Path, kind: str) -> None:
    entry.unlink()
    if kind == "fifo":
        os.mkfifo(entry)
    elif kind == "dev-zero":
        entry.symlink_to("/dev/zero")
    elif kind == "deep-json":
        entry.write_text("[" * 1_000_000 + "]" * 1_000_000)
    elif kind == "sparse":
        with open(entry, "wb") as f:
            f.truncate(1 << 30)
    elif kind == "directory":
        entry.mkdir()
    elif kind == "not-an-object":
        entry.write_text(json.dumps(["x"] * 10))


#: Loads the file twice in a child process limited to 1 GiB of data, printing the hash count.
_CHILD = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))
    import mcnc_format as mf
    from mcnc_format.engine.digests import DigestCache
    seen = []
    real = DigestCache.remember
    DigestCache.remember = lambda self, *a, **k: (seen.append(a[1]), real(self, *a, **k))
    mf.load(sys.argv[1], names=["m2", "m5"])
    print(len(seen))
""")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "deep-json", "sparse", "directory",
                                  "not-an-object"])
def test_a_hostile_entry_is_a_miss(tmp_path: Path, _own_cache_directory: Path,
                                   kind: str) -> None:
    path = mixed_file(tmp_path)
    mf.load(path, names=EXTERNAL)
    entries = _entries(_own_cache_directory)
    assert len(entries) == 1
    _replace(entries[0], kind)
    child = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                           text=True, timeout=60,
                           env={**os.environ, "XDG_CACHE_HOME": str(_own_cache_directory)})
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-1] == "2"  # a miss: both base tensors hashed again
