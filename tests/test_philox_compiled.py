"""The compiled Philox kernels (``mcnc_format/_philox.c``) against the NumPy path they replace.

``mcnc_format.philox`` picks its CPU path once, at import: the compiled kernels when built,
unless ``MCNC_PHILOX=python``. Here a second copy of the module is imported with the NumPy path
forced, and the two are compared on every vector of spec/vectors/philox.json and on fresh
random keys, ranges and index sets: words and uniform values bit for bit, normal values within
§8.3's tolerance (and bit for bit between the compiled kernels' own paths: a box or a scattered
draw gives the bits of the same elements of a range). Every instruction set the CPU has is
checked against the portable scalar C. CI runs the whole Philox suite a second time with
``MCNC_PHILOX=python`` (.ci/run), where the compiled-only tests here are skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mcnc_format import philox, reference
from mcnc_format.constants import NORMAL_ATOL

compiled = pytest.importorskip("mcnc_format._philox", reason="the extension was not built")
pytestmark = pytest.mark.skipif(
    not philox.backend().startswith("compiled"),
    reason=f"the compiled path is not in use ({philox.BACKEND_VARIABLE}=python)")

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "philox.json"
U32 = 0xFFFFFFFF
u32 = st.integers(0, U32)
#: Element offsets at the edges of the counter layout (block 2**32 carries into word 1) and
#: near the last block a stream may address (2**63 - 1).
starts = st.one_of(
    st.integers(0, 300),
    st.integers(0, 2**40),
    st.integers(4 * (2**32 - 40), 4 * (2**32 + 40)),
    st.integers(4 * (2**63 - 600), 4 * 2**63 - 1),
)
counts = st.one_of(st.integers(0, 80), st.integers(80, 3000))


def _load_numpy_path() -> ModuleType:
    """A second ``mcnc_format.philox`` imported with ``MCNC_PHILOX=python``."""
    saved = os.environ.get(philox.BACKEND_VARIABLE)
    os.environ[philox.BACKEND_VARIABLE] = "python"
    try:
        spec = importlib.util.spec_from_file_location("mcnc_format._philox_numpy_copy",
                                                      philox.__file__)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ[philox.BACKEND_VARIABLE]
        else:
            os.environ[philox.BACKEND_VARIABLE] = saved
    assert module.backend() == "python"
    return module


numpy_path = _load_numpy_path()


def _instruction_sets() -> list[str]:
    """The kernels' instruction sets this CPU runs, the portable scalar C first."""
    supported = []
    current = compiled.isa()
    for name in ("scalar", "avx2", "avx512"):
        try:
            compiled.set_isa(name)
        except ValueError:
            continue
        supported.append(name)
    compiled.set_isa(current)
    return supported


@contextlib.contextmanager
def instruction_set(name: str) -> Iterator[None]:
    current = compiled.isa()
    compiled.set_isa(name)
    try:
        yield
    finally:
        compiled.set_isa(current)


def _bits(values: torch.Tensor) -> np.ndarray:
    return values.numpy().view(np.uint32)


def _normal_error(z: torch.Tensor, z64: np.ndarray) -> float:
    if not z64.size:
        return 0.0
    err = np.abs(z.numpy().astype(np.float64) - z64) / np.maximum(1.0, np.abs(z64))
    return float(err.max())


# -- spec/vectors/philox.json ------------------------------------------------------------------
def test_every_vector() -> None:
    doc = json.loads(VECTORS.read_text())
    for kat in doc["known_answers"]:
        c0, c1, c2, c3 = (int(w, 16) for w in kat["counter"])
        if c2 or c3:  # not a stream counter (§8.1): the bijection itself is tested elsewhere
            continue
        seed, stream = (int(w, 16) for w in kat["key"])
        block = c0 | c1 << 32
        expected = [int(w, 16) for w in kat["output"]]
        assert philox.stream_words(seed, stream, 4 * block, 4).tolist() == expected
    for case in doc["streams"]:
        args = (case["seed"], case["stream"], case["start"], case["count"])
        expected = [int(w, 16) for w in case["words"]]
        assert philox.stream_words(*args).tolist() == expected
        assert numpy_path.stream_words(*args).tolist() == expected
    for case in doc["uniform"]:
        args = (case["seed"], case["stream"], case["start"], case["count"], case["bound"])
        expected = np.array([int(w, 16) for w in case["float32_bits"]], dtype=np.uint32)
        assert np.array_equal(_bits(philox.uniform_signed(*args)), expected)
        assert np.array_equal(_bits(numpy_path.uniform_signed(*args)), expected)
    for case in doc["normal"]:
        args = (case["seed"], case["stream"], case["start"], case["count"])
        z64 = np.array(case["z64"])
        assert _normal_error(philox.normal(*args), z64) <= NORMAL_ATOL
        assert _normal_error(numpy_path.normal(*args), z64) <= NORMAL_ATOL


# -- ranges --------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(seed=u32, stream=u32, start=starts, count=counts)
def test_words_and_uniform_match_numpy_path(seed: int, stream: int, start: int, count: int
                                            ) -> None:
    if count and (start + count - 1) // 4 >= 2**63:
        with pytest.raises(ValueError):
            philox.stream_words(seed, stream, start, count)
        return
    assert torch.equal(philox.stream_words(seed, stream, start, count),
                       numpy_path.stream_words(seed, stream, start, count))
    bound = 0.0123
    assert np.array_equal(_bits(philox.uniform_signed(seed, stream, start, count, bound)),
                          _bits(numpy_path.uniform_signed(seed, stream, start, count, bound)))


@settings(max_examples=80, deadline=None)
@given(seed=u32, stream=u32, start=starts, count=counts)
def test_normal_within_tolerance_of_numpy_path(seed: int, stream: int, start: int,
                                               count: int) -> None:
    start //= 2  # two normals per block
    if count and (start + count - 1) // 2 >= 2**63:
        with pytest.raises(ValueError):
            philox.normal(seed, stream, start, count)
        return
    z = philox.normal(seed, stream, start, count)
    assert z.dtype == torch.float32 and z.shape == (count,)
    assert _normal_error(z, reference.normal_ref(seed, stream, start, count)) <= NORMAL_ATOL
    z_numpy = numpy_path.normal(seed, stream, start, count).numpy().astype(np.float64)
    assert _normal_error(z, z_numpy) <= 2 * NORMAL_ATOL


def test_large_draws_split_across_threads_agree() -> None:
    """Draws large enough to be split between threads equal the NumPy path's, element for
    element, whatever the split points (unaligned starts too)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    for start in (0, 3, 4 * (2**32 - 100_000) + 1):
        count = 1_500_001
        assert torch.equal(philox.stream_words(seed, stream, start, count),
                           numpy_path.stream_words(seed, stream, start, count))
        assert np.array_equal(_bits(philox.uniform_signed(seed, stream, start, count, 0.5)),
                              _bits(numpy_path.uniform_signed(seed, stream, start, count, 0.5)))
    z = philox.normal(seed, stream, 1, 1_000_001)
    assert _normal_error(z, reference.normal_ref(seed, stream, 1, 1_000_001)) <= NORMAL_ATOL


def test_normal_accuracy_over_a_large_draw() -> None:
    """§8.3 over a million values: the polynomial log and cos near u1 = 1 and u2 = 1/4."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    z = philox.normal(seed, stream, 0, 1 << 20)
    assert _normal_error(z, reference.normal_ref(seed, stream, 0, 1 << 20)) <= NORMAL_ATOL


@pytest.mark.parametrize("isa", _instruction_sets())
def test_instruction_sets_agree_with_scalar_c(isa: str) -> None:
    """Each vector kernel gives the portable scalar C's bits, normals included."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    cases = [(0, 5000), (7, 4099), (4 * (2**32 - 70) + 2, 700), (4 * (2**63 - 300), 199)]
    draws = []
    for name in ("scalar", isa):
        with instruction_set(name):
            draws.append([
                (philox.stream_words(seed, stream, s, n), philox.uniform_signed(
                    seed, stream, s, n, 3.5), philox.normal(seed, stream, s // 2, n))
                for s, n in cases])
    for ours, scalar in zip(*draws, strict=True):
        for a, b in zip(ours, scalar, strict=True):
            assert np.array_equal(a.numpy().view(np.uint8), b.numpy().view(np.uint8))


# -- element-indexed draws ------------------------------------------------------------------------
@st.composite
def index_sets(draw: st.DrawFn) -> np.ndarray:
    """Element indices as a box or a scattered read makes them: runs (rows of a box, column
    slices), ascending indices a few apart (every second or fourth column: drawn as the range
    they span, in stretches), single elements, repeats, any order, near 2**32 blocks and near
    the top."""
    base = draw(st.one_of(st.integers(0, 1000), st.integers(4 * (2**32 - 300), 4 * 2**32),
                          st.integers(0, 2**62)))
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["run", "strided", "spaced", "scatter", "repeat"]))
        at = base + draw(st.integers(0, 5000))
        if kind == "run":
            pieces.append(np.arange(at, at + draw(st.integers(1, 300))))
        elif kind == "strided":  # a column slice: short runs, one per row
            width, stride = draw(st.integers(1, 40)), draw(st.integers(41, 200))
            rows = draw(st.integers(1, 30))
            pieces.append((at + stride * np.arange(rows)[:, None] + np.arange(width)).ravel())
        elif kind == "spaced":  # steps of 2 .. 5 (within a block of 4 uniforms or not), fixed
            widest = draw(st.integers(2, 5))  # or mixed with shorter ones
            count = draw(st.integers(1, 3000))
            mixed = np.random.default_rng(draw(st.integers(0, 2**32)))
            steps = (mixed.integers(1, widest + 1, size=count) if draw(st.booleans())
                     else np.full(count, widest))
            pieces.append(at + np.cumsum(steps))
        elif kind == "scatter":
            pieces.append(np.array(draw(st.lists(st.integers(base, base + 10_000), max_size=80))))
        else:
            pieces.append(np.full(draw(st.integers(1, 9)), at))
    index = np.concatenate(pieces).astype(np.int64)
    if draw(st.booleans()):
        index = index[::-1].copy()
    return index


@settings(max_examples=120, deadline=None)
@given(seed=u32, stream=u32, index=index_sets())
def test_indexed_draws_match_numpy_path(seed: int, stream: int, index: np.ndarray) -> None:
    at = torch.from_numpy(index)
    bound = 0.25
    got = philox.uniform_signed_at(seed, stream, at, bound)
    assert np.array_equal(_bits(got), _bits(numpy_path.uniform_signed_at(seed, stream, at,
                                                                         bound)))
    half = at // 2
    z = philox.normal_at(seed, stream, half)
    z_numpy = numpy_path.normal_at(seed, stream, half).numpy().astype(np.float64)
    assert _normal_error(z, z_numpy) <= 2 * NORMAL_ATOL
    # The bits of the same elements drawn as a range: a box equals the whole tensor.
    if not half.numel():
        return
    lo, hi = int(half.min()), int(half.max())
    if hi - lo < 200_000:
        whole = philox.normal(seed, stream, lo, hi - lo + 1)
        assert np.array_equal(_bits(z), _bits(whole[half - lo]))


def test_indexed_draws_of_many_elements_split_across_threads() -> None:
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    rows, cols = 1200, 1000
    box = torch.arange(rows * cols).view(rows, cols)[:, 300:700].reshape(-1)  # column slice
    got = philox.uniform_signed_at(seed, stream, box, 1.0)
    assert np.array_equal(_bits(got), _bits(numpy_path.uniform_signed_at(seed, stream, box,
                                                                          1.0)))
    assert np.array_equal(_bits(philox.normal_at(seed, stream, box)),
                          _bits(philox.normal(seed, stream, 0, rows * cols)[box]))


def test_indexed_draw_keeps_the_index_shape() -> None:
    index = torch.arange(12).view(3, 4)
    assert philox.uniform_signed_at(1, 2, index, 1.0).shape == (3, 4)
    assert philox.uniform_signed_at(1, 2, index[:0], 1.0).shape == (0, 4)


def test_negative_index_is_refused() -> None:
    with pytest.raises(ValueError):
        philox.uniform_signed_at(1, 2, torch.tensor([5, -1, 7]), 1.0)
    with pytest.raises(ValueError):
        philox.normal_at(1, 2, torch.tensor([-3]))


def test_kernels_refuse_bad_buffers() -> None:
    with pytest.raises(ValueError):
        compiled.uniform(np.empty(3, dtype=np.float32), 2**32, 0, 0, 0, 1.0)
    with pytest.raises(ValueError):
        compiled.words(np.empty(3, dtype=np.int64), 1, 2, 2**63, 0)
    with pytest.raises(ValueError):
        compiled.uniform_at(np.empty(3, dtype=np.float32), 1, 2, np.arange(4), 1.0)
    with pytest.raises((ValueError, BufferError)):  # not contiguous
        compiled.uniform(np.empty(3, dtype=np.float32)[::2], 1, 2, 0, 0, 1.0)
    with pytest.raises((TypeError, BufferError)):
        compiled.uniform(b"read only", 1, 2, 0, 0, 1.0)


# -- choosing the path ----------------------------------------------------------------------------
def _backend_in_subprocess(value: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, philox.BACKEND_VARIABLE: value}
    return subprocess.run([sys.executable, "-c",
                           "from mcnc_format import philox; print(philox.backend())"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_picks_the_path() -> None:
    assert _backend_in_subprocess("python").stdout.strip() == "python"
    assert _backend_in_subprocess("compiled").stdout.strip().startswith("compiled (")
    refused = _backend_in_subprocess("fortran")
    assert refused.returncode != 0 and "MCNC_PHILOX" in refused.stderr

