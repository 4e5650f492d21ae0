"""What a file can make the reader spend, and files that change or block under it.

- ``mcnc verify`` streams: a file of a few hundred bytes declaring a tensor of 2^28 values
  (1 GiB as float32) verifies within the memory of a much smaller one; ``load`` onto the
  ``meta`` device returns shapes without allocating them.
- A file truncated by another process while it is open gives ``FormatError``, never SIGBUS.
- A FIFO given to ``mcnc inspect`` or ``mcnc_format.open`` is refused at once.

Each runs in a child process: peak memory is per process, a SIGBUS shows as a signal exit
instead of killing the test run, and a reader that blocks on a FIFO runs into the timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINUX_PROC = Path("/proc/self/status").exists()


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


# A segment of one generator with d = 2^24: alpha and beta of a few floats per 2^24 values, so
# the file stays tiny however large the tensor it declares.
_MAKE = """
    import re, sys, torch
    import mcnc_format as mf

    def make(path, log2_numel):
        spec = mf.GeneratorSpec(k=1, d=2**24, hidden=(1,), L=1.0, seed=3)
        chunks = 2**log2_numel // spec.d
        g = torch.Generator().manual_seed(log2_numel)
        seg = mf.Segment(spec, torch.rand(chunks, 1, 1, generator=g) - 0.5,
                         torch.rand(chunks, 1, generator=g))
        shape = (2 ** (log2_numel // 2), 2 ** (log2_numel - log2_numel // 2))
        mf.save(path, {"w": mf.MCNC(seg, shape)})
        return shape

    def peak_bytes():
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
"""


@pytest.mark.skipif(not LINUX_PROC, reason="peak RSS from /proc/self/status (Linux)")
def test_verify_and_meta_load_are_bounded_in_memory(tmp_path: Path) -> None:
    """One child: verify a 2^26-value file, then a 2^28-value one through the CLI; the peak
    RSS may not grow by a quarter of the 768 MiB the second tensor adds (a verifier that held
    the tensor once would add all of it), and stays within 1.25 GiB of what the imports took (a
    CUDA build of torch maps several hundred MiB more than a CPU build before any work). Then
    a file that declares 2^30 values loads onto ``meta`` without moving the peak. About 25 s
    on 2 cores; the 2^30 file itself takes about 50 s to verify, with the same peak."""
    code = _MAKE + """
    from mcnc_format.cli.main import cli
    print("peak", peak_bytes())
    small, large, huge = (sys.argv[1] + f"/{n}.mcnc" for n in ("small", "large", "huge"))
    make(small, 26)
    make(large, 28)
    for path in (small, large):
        cli.main(["verify", path], standalone_mode=False)
        print("peak", peak_bytes())
    shape = make(huge, 30)
    meta = mf.load(huge, "meta")
    assert meta["w"].is_meta and tuple(meta["w"].shape) == shape, meta
    assert meta["w"].dtype == torch.float32
    print("peak", peak_bytes())
    """
    child = run_child(code, str(tmp_path), timeout=300)
    assert child.returncode == 0, child.stdout + child.stderr
    assert child.stdout.count("valid:") == 2, child.stdout
    peaks = [int(line.split()[1]) for line in child.stdout.splitlines()
             if line.startswith("peak")]
    imported, small, large, after_meta = peaks
    added = (2**28 - 2**26) * 4
    assert large - small < added // 4, (small, large)
    assert large - imported < 1.25 * 2**30, (imported, large)
    assert after_meta - large < 64 << 20, "loading onto meta allocated the tensor"
    assert (tmp_path / "huge.mcnc").stat().st_size < 2048


def test_truncated_while_open_is_a_format_error_not_sigbus(tmp_path: Path) -> None:
    """Another process cuts the file to its header while it is open: every read of the
    vanished bytes (an mcnc tensor's alpha and beta, a dense tensor) is a ``FormatError``."""
    code = """
    import os, sys, torch
    import mcnc_format as mf

    path = sys.argv[1]
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    spec = mf.GeneratorSpec(k=4, d=64, hidden=(16,), seed=1)
    seg = mf.Segment(spec, torch.rand(16, 2, 4, generator=g), torch.rand(16, 2, generator=g))
    mf.save(path, {"w": mf.MCNC(seg, (32, 32)),
                   "d": mf.Dense(torch.randn(256, 256, generator=g))})
    with mf.open(path) as f:
        cut = f.header.blobs[0].offset
        os.truncate(path, cut)
        for name in ("w", "d"):
            try:
                f.get_tensor(name)
            except mf.FormatError as exc:
                print(name, type(exc).__name__, "truncated" in str(exc))
            else:
                print(name, "read")
    """
    child = run_child(code, str(tmp_path / "cut.mcnc"))
    assert child.returncode == 0, (child.returncode, child.stdout, child.stderr)
    assert child.stdout.split("\n")[:2] == ["w FormatError True", "d FormatError True"], \
        child.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """``mcnc_format.open``, ``mcnc inspect`` and ``mcnc verify`` on a FIFO no process writes
    to: each returns at once, the commands with one error line and exit status 2."""
    fifo = tmp_path / "pipe.mcnc"
    os.mkfifo(fifo)
    code = """
    import json, sys
    from click.testing import CliRunner
    import mcnc_format as mf
    from mcnc_format.cli.main import cli

    try:
        mf.open(sys.argv[1])
        opened = "opened"
    except mf.MCNCError as exc:
        opened = str(exc)
    runs = {c: CliRunner().invoke(cli, [c, sys.argv[1]]) for c in ("inspect", "verify")}
    print(json.dumps({"open": opened, **{c: [r.exit_code, r.stdout, r.stderr]
                                         for c, r in runs.items()}}))
    """
    child = run_child(code, str(fifo), timeout=60)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    assert "not a regular file" in got["open"] and str(fifo) in got["open"], got
    for command in ("inspect", "verify"):
        code, stdout, stderr = got[command]
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), got
        assert "not a regular file" in lines[0] and not stdout, got


def test_large_reads_are_split_across_threads_and_damage_still_reported(tmp_path: Path) -> None:
    """A range of several pieces is read by reader threads: the bytes are the file's, and a
    file cut short inside any piece is a FormatError naming where it ended."""
    from mcnc_format.engine import source
    from mcnc_format.errors import FormatError

    data = os.urandom(5 * source.PARALLEL_PIECE_BYTES // 2 + 12345)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    reader = source.FileSource(path, "big.bin")
    try:
        assert bytes(reader.read(7, len(data) - 7)) == data[7:]
        os.truncate(path, len(data) - source.PARALLEL_PIECE_BYTES)
        with pytest.raises(FormatError, match="truncated or replaced while open"):
            reader.read(0, len(data))
    finally:
        reader.close()
