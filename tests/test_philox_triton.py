"""Triton's ``tl.randint4x(seed | stream << 32, block)`` draws exactly the spec's blocks (§8.1).

GPU kernels regenerate generator weights and theta0 in registers with ``tl.randint4x``, so
its key and counter layout must match ours word for word, including blocks past 2**32 (where
the counter's second word is used) and keys with the top bit set.

The kernel runs in a child process: ``TRITON_INTERPRET`` must be set before Triton decides how
to run a kernel, and setting it in this process would leak into every other test. The child
uses the interpreter (any machine); where CUDA is present a second child runs it compiled.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from gpu_marks import proves, requires_cuda

from mcnc_format import philox, reference
from mcnc_format.engine.backend import triton_available
from mcnc_format.engine.options import GpuPath

# Written to a file, not passed with -c: @triton.jit reads the kernel's source from its file.
_CHILD = """
import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _blocks(out_ptr, key, first_block, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    block = first_block + i.to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(key, block)
    mask = i < n
    tl.store(out_ptr + 4 * i, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=mask)


device, cases = json.load(sys.stdin)
results = []
for key, first_block, n in cases:
    out = torch.full((4 * n,), -1, dtype=torch.int64, device=device)
    _blocks[(triton.cdiv(n, 16),)](out, key, first_block, n, BLOCK=16)
    results.append(out.cpu().tolist())
json.dump(results, sys.stdout)
"""

# First blocks covering the counter's edges: word 0 only, the carry into word 1, large blocks.
FIRST_BLOCKS = [0, 1, 7, 2**31 - 2, 2**32 - 3, 2**32, 2**32 + 5, 2**40 + 11, 2**62]
COUNT = 21  # more than one program of 16, and not a multiple of 16: exercises the mask


def _cases() -> tuple[list[tuple[int, int, int]], int]:
    """(key, first_block, count) cases from fresh random keys plus the extreme keys."""
    rng_seed = int.from_bytes(os.urandom(8), "little")
    rng = np.random.default_rng(rng_seed)
    keys = [0, 2**64 - 1, 1 << 63, 0xFFFFFFFF]
    for _ in range(3):
        seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
        keys.append(seed | (stream << 32))
    cases = [(key, fb, COUNT) for key in keys for fb in FIRST_BLOCKS[::2]]
    cases += [(keys[-1], fb, COUNT) for fb in FIRST_BLOCKS[1::2]]
    return cases, rng_seed


class _Child:
    """The kernel run in a child process, started at once and collected later.

    Most of the child's time is importing torch and Triton; starting it when this module is
    collected lets that overlap with the other test files instead of adding to the total.
    A child nobody collects (test deselected) is killed at exit.
    """

    def __init__(self, device: str, interpret: bool) -> None:
        self.cases, self.rng_seed = _cases()
        self._dir = tempfile.TemporaryDirectory(prefix="mcnc-randint4x-")
        script = Path(self._dir.name) / "randint4x_child.py"
        script.write_text(_CHILD)
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        self._proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._input: str | None = json.dumps([device, self.cases])
        atexit.register(self.close)

    def results(self) -> list[list[int]]:
        out, err = self._proc.communicate(self._input, timeout=300)
        self._input = None
        self.close()
        assert self._proc.returncode == 0, err[-4000:]
        return json.loads(out)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        self._dir.cleanup()


_HAVE_TRITON = triton_available()
_INTERPRETED = _Child("cpu", interpret=True) if _HAVE_TRITON else None


pytestmark = pytest.mark.skipif(not _HAVE_TRITON, reason="triton is not installed")


def _check(results: list[list[int]], cases: list[tuple[int, int, int]], rng_seed: int) -> None:
    assert len(results) == len(cases)
    for got, (key, first_block, n) in zip(results, cases, strict=True):
        seed, stream = key & 0xFFFFFFFF, key >> 32
        expected = philox.blocks(seed, stream, first_block, n).reshape(-1).tolist()
        ref = reference.philox_blocks_ref(seed, stream, first_block, n).reshape(-1).tolist()
        assert expected == ref, (rng_seed, key, first_block)
        assert got == expected, (rng_seed, key, first_block)


def test_randint4x_interpreted_matches_stream() -> None:
    assert _INTERPRETED is not None
    _check(_INTERPRETED.results(), _INTERPRETED.cases, _INTERPRETED.rng_seed)


@requires_cuda
@proves(GpuPath.PHILOX_KERNEL)
def test_randint4x_compiled_matches_stream() -> None:
    child = _Child("cuda", interpret=False)
    _check(child.results(), child.cases, child.rng_seed)
