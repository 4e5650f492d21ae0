"""Bit-for-bit checks of the spec's PRNG (SPEC.md §8) against three independent sources.

The format stores only seeds, so a reader that draws one different bit regenerates a different
model. We therefore check the torch implementation (``mcnc_format.philox``) against the
Random123 known answers, against randomgen's Philox4x32-10 (third-party C code), and against
the NumPy oracle ``mcnc_format.reference``, on fresh random keys and at offsets that cross
block and 2**32-block boundaries. Triton's ``tl.randint4x`` is checked in test_philox_triton.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
from gpu_marks import requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

from mcnc_format import philox, reference
from mcnc_format.constants import NORMAL_ATOL

U32 = 0xFFFFFFFF
u32 = st.integers(0, U32)

# Random123's kat_vectors for philox4x32_10: (counter, key, output).
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
    ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
]

# Element offsets chosen to hit the edges of the counter layout: block starts and ends,
# the carry from counter word 0 into word 1 (block 2**32), and large blocks.
EDGE_STARTS = [
    0,
    1,
    3,
    4,
    7,
    4 * 12345 + 2,
    4 * (2**32 - 1) - 1,  # straddles blocks 2**32 - 2 .. 2**32: c1 goes 0 -> 1
    4 * 2**32,
    4 * 2**32 + 3,
    4 * (2**33 - 1) + 1,  # c1 goes 1 -> 2
    4 * 2**40 + 5,
    4 * (2**62 - 3) + 2,
]


def _fresh_rng() -> tuple[np.random.Generator, int]:
    """A generator seeded from the OS, with its seed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(8), "little")
    return np.random.default_rng(seed), seed


@pytest.mark.parametrize(("counter", "key", "expected"), KATS)
def test_known_answers_reference(counter, key, expected) -> None:
    assert reference.philox4x32_ref(counter, key) == expected


@pytest.mark.parametrize(("counter", "key", "expected"), KATS)
def test_known_answers_torch(counter, key, expected) -> None:
    c = [torch.tensor([w], dtype=torch.int64) for w in counter]
    out = philox.philox4x32(*c, key[0], key[1])
    assert tuple(int(w) for w in out) == expected


def test_block_zero_is_kat_under_key_zero() -> None:
    """Block 0 of stream (0, 0) is the all-zero Random123 vector: the layout adds nothing."""
    assert tuple(int(w) for w in philox.stream_words(0, 0, 0, 4)) == KATS[0][2]


@settings(max_examples=40, deadline=None)
@given(seed=u32, stream=u32, block=st.integers(0, 2**64 - 1))
def test_reference_blocks_match_scalar_philox(seed: int, stream: int, block: int) -> None:
    """The oracle's vectorised blocks agree with its one-block form on the §8.1 counter."""
    counter = (block & U32, block >> 32, 0, 0)
    expected = reference.philox4x32_ref(counter, (seed, stream))
    assert tuple(int(w) for w in reference.philox_blocks_ref(seed, stream, block, 1)[0]) == expected


def _randomgen_words(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Elements of a stream from randomgen's Philox4x32-10 (C code we did not write).

    randomgen increments its 128-bit counter before each block, so to get block ``b`` first
    we start it at ``b - 1`` (mod 2**128).
    """
    randomgen = pytest.importorskip("randomgen")
    first = start // 4
    gen = randomgen.Philox(
        key=seed | (stream << 32), number=4, width=32, counter=(first - 1) % 2**128
    )
    skip = start - 4 * first
    raw = gen.random_raw(skip + count)
    return np.asarray(raw, dtype=np.uint64)[skip:].astype(np.int64)


def test_randomgen_first_output_is_block_one() -> None:
    """The offset convention the helper above relies on (a counter of 0 yields block 1)."""
    randomgen = pytest.importorskip("randomgen")
    rng, _ = _fresh_rng()
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    gen = randomgen.Philox(key=seed | (stream << 32), number=4, width=32, counter=0)
    assert np.array_equal(
        np.asarray(gen.random_raw(8), dtype=np.int64), philox.stream_words(seed, stream, 4, 8)
    )


@pytest.mark.parametrize("start", EDGE_STARTS)
def test_torch_matches_randomgen(start: int) -> None:
    rng, rng_seed = _fresh_rng()
    for _ in range(4):
        seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
        count = int(rng.integers(1, 40))
        expected = _randomgen_words(seed, stream, start, count)
        got = philox.stream_words(seed, stream, start, count).numpy()
        assert np.array_equal(got, expected), (rng_seed, seed, stream, start, count)
        ref = reference.stream_words_ref(seed, stream, start, count).astype(np.int64)
        assert np.array_equal(ref, expected), (rng_seed, seed, stream, start, count)


@pytest.mark.parametrize("seed", [0, U32])
@pytest.mark.parametrize("stream", [0, U32])
def test_extreme_keys_match_randomgen(seed: int, stream: int) -> None:
    expected = _randomgen_words(seed, stream, 4 * 2**32 - 6, 12)
    assert np.array_equal(philox.stream_words(seed, stream, 4 * 2**32 - 6, 12).numpy(), expected)


def test_reference_reaches_last_block() -> None:
    """Blocks up to 2**64 - 1 are valid in the spec; the oracle handles them (torch stops at
    2**63, far beyond what a file can address)."""
    expected = _randomgen_words(9, 10, 4 * (2**64 - 2), 8)
    got = reference.stream_words_ref(9, 10, 4 * (2**64 - 2), 8).astype(np.int64)
    assert np.array_equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(
    seed=u32,
    stream=u32,
    start=st.one_of(st.integers(0, 70), st.integers(0, 2**64), st.sampled_from(EDGE_STARTS)),
    count=st.integers(0, 50),
)
def test_torch_matches_reference(seed: int, stream: int, start: int, count: int) -> None:
    got = philox.stream_words(seed, stream, start, count)
    assert got.dtype == torch.int64
    expected = reference.stream_words_ref(seed, stream, start, count).astype(np.int64)
    assert np.array_equal(got.numpy(), expected)


@settings(max_examples=30, deadline=None)
@given(key=st.tuples(u32, u32), first_block=st.integers(0, 2**63 - 65))
def test_torch_int64_rounds_match_reference(key: tuple[int, int], first_block: int) -> None:
    """The split-product int64 rounds that ``blocks`` uses off the CPU (the CPU path runs in
    NumPy), checked here on CPU tensors with the §8.1 counter layout."""
    index = torch.arange(first_block, first_block + 64, dtype=torch.int64)
    zero = torch.zeros_like(index)
    words = philox.philox4x32(index & U32, index >> 32, zero, zero, key[0], key[1])
    got = torch.stack(words, dim=-1).numpy()
    expected = reference.philox_blocks_ref(key[0], key[1], first_block, 64).astype(np.int64)
    assert np.array_equal(got, expected)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_torch_int64_rounds_on_arbitrary_counters(data: st.DataObject) -> None:
    """All four counter words in play (the stream layout keeps c2 = c3 = 0)."""
    counters = data.draw(st.lists(st.tuples(u32, u32, u32, u32), min_size=1, max_size=16))
    key = data.draw(st.tuples(u32, u32))
    columns = [torch.tensor([c[j] for c in counters], dtype=torch.int64) for j in range(4)]
    got = torch.stack(philox.philox4x32(*columns, key[0], key[1]), dim=-1).tolist()
    assert [tuple(row) for row in got] == [reference.philox4x32_ref(c, key) for c in counters]


@requires_cuda
def test_cuda_stream_matches_reference() -> None:
    rng, rng_seed = _fresh_rng()
    for start in EDGE_STARTS:
        seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
        got = philox.stream_words(seed, stream, start, 37, device="cuda").cpu().numpy()
        expected = reference.stream_words_ref(seed, stream, start, 37).astype(np.int64)
        assert np.array_equal(got, expected), (rng_seed, start)
        # A normal takes half a block: halve the start to stay within the blocks of §8.1.
        z = philox.normal(seed, stream, start // 2, 4001, device="cuda").cpu().numpy()
        z64 = reference.normal_ref(seed, stream, start // 2, 4001)
        err = np.abs(z.astype(np.float64) - z64) / np.maximum(1.0, np.abs(z64))
        assert err.max() <= NORMAL_ATOL, (rng_seed, start, float(err.max()))


def test_slices_are_consistent() -> None:
    """Any slice of a stream equals the same range of a longer draw (counter-based access)."""
    rng, rng_seed = _fresh_rng()
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    full = philox.stream_words(seed, stream, 0, 1000)
    for _ in range(20):
        start = int(rng.integers(0, 990))
        count = int(rng.integers(0, 1000 - start))
        part = philox.stream_words(seed, stream, start, count)
        assert torch.equal(part, full[start : start + count]), (rng_seed, start, count)


def test_words_are_uint32() -> None:
    rng, _ = _fresh_rng()
    words = philox.stream_words(int(rng.integers(2**32)), int(rng.integers(2**32)), 0, 100_000)
    assert int(words.min()) >= 0 and int(words.max()) <= U32
    # 100k words: both halves of the range occur, so the high bit is really produced.
    assert int(words.max()) > 2**31 and int(words.min()) < 2**31


@pytest.mark.parametrize(("seed", "stream"), [(-1, 0), (2**32, 0), (0, -1), (0, 2**32)])
def test_key_out_of_range_is_refused(seed: int, stream: int) -> None:
    with pytest.raises(ValueError):
        philox.stream_words(seed, stream, 0, 4)
    with pytest.raises(ValueError):
        reference.stream_words_ref(seed, stream, 0, 4)


def test_negative_offset_is_refused() -> None:
    with pytest.raises(ValueError):
        philox.stream_words(1, 2, -3, 5)
    with pytest.raises(ValueError):
        philox.normal(1, 2, -1, 3)


def test_signed_unit_endpoints() -> None:
    words = torch.tensor([0, 0xFF, 0x100, 0x7FFFFFFF, 0x80000000, 0xFFFFFF00, U32])
    got = philox.words_to_signed_unit(words)
    assert got.dtype == torch.float32
    expected = [-1.0, -1.0, -1.0 + 2**-23, -(2**-23), 0.0, 1.0 - 2**-23, 1.0 - 2**-23]
    assert got.tolist() == expected


def test_signed_unit_matches_reference_exactly() -> None:
    rng, rng_seed = _fresh_rng()
    words = rng.integers(0, 2**32, size=200_000, dtype=np.int64)
    got = philox.words_to_signed_unit(torch.from_numpy(words)).numpy().astype(np.float64)
    expected = reference.signed_unit_ref(words.astype(np.uint32))
    assert np.array_equal(got, expected), rng_seed
    assert got.min() >= -1.0 and got.max() < 1.0


@settings(max_examples=50, deadline=None)
@given(
    seed=u32,
    stream=u32,
    start=st.integers(0, 2**40),
    bound=st.floats(1e-30, 1e30, allow_nan=False, allow_infinity=False),
)
def test_uniform_signed_is_exact(seed: int, stream: int, start: int, bound: float) -> None:
    """§8.2: ``float32(bound) * s`` rounded once to float32, identical on every device."""
    got = philox.uniform_signed(seed, stream, start, 64, bound).numpy()
    assert got.dtype == np.float32
    s32 = reference.signed_unit_ref(reference.stream_words_ref(seed, stream, start, 64))
    expected = np.float32(bound) * s32.astype(np.float32)  # an IEEE float32 product
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    ref = reference.uniform_signed_ref(seed, stream, start, 64, bound)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    b32 = float(np.float32(bound))
    assert np.all(got >= -b32) and np.all(got < b32)


def test_normal_within_spec_tolerance() -> None:
    """§8.3: ``|z - z64| <= NORMAL_ATOL * max(1, |z64|)`` against the float64 evaluation."""
    rng, rng_seed = _fresh_rng()
    worst = 0.0
    for start in (0, 1, int(rng.integers(2, 2**40))):
        seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
        count = 200_000 if start == 0 else 1001
        z = philox.normal(seed, stream, start, count).numpy()
        assert z.dtype == np.float32
        z64 = reference.normal_ref(seed, stream, start, count)
        err = np.abs(z.astype(np.float64) - z64) / np.maximum(1.0, np.abs(z64))
        worst = max(worst, float(err.max()))
    assert worst <= NORMAL_ATOL, (rng_seed, worst)


def test_normal_moments() -> None:
    """A coarse check that the map is a standard normal (catches swapped words or scales)."""
    rng, rng_seed = _fresh_rng()
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    z = reference.normal_ref(seed, stream, 0, 200_000)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02, rng_seed
    assert np.all(np.isfinite(z)) and np.abs(z).max() <= np.sqrt(-2 * np.log(2.0**-24))


def test_normal_uses_words_in_pairs() -> None:
    """Element i of the normal stream comes from words 2i, 2i + 1 of the uniform stream."""
    rng, _ = _fresh_rng()
    seed, stream = (int(x) for x in rng.integers(0, 2**32, size=2))
    words = reference.stream_words_ref(seed, stream, 6, 2).astype(np.int64)  # element 3
    u1 = ((words[0] >> 8) + 1) * 2.0**-24
    u2 = (words[1] >> 8) * 2.0**-24
    expected = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    assert np.isclose(reference.normal_ref(seed, stream, 3, 1)[0], expected, rtol=1e-14, atol=0)
    assert abs(float(philox.normal(seed, stream, 3, 1)[0]) - expected) <= NORMAL_ATOL * max(
        1.0, abs(expected)
    )


def test_draws_into_a_given_tensor() -> None:
    """``out=``: the same values written into the caller's tensor, which is returned."""
    out = torch.full((3, 401), float("nan"))
    assert philox.uniform_signed(5, 6, 7, 1203, 0.25, out=out) is out
    assert torch.equal(out.reshape(-1), philox.uniform_signed(5, 6, 7, 1203, 0.25))
    z = torch.empty(999)
    assert philox.normal(5, 6, 3, 999, out=z) is z
    assert torch.equal(z, philox.normal(5, 6, 3, 999))
    for wrong in (torch.empty(1202), torch.empty(1203, dtype=torch.float64),
                  torch.empty(2406)[::2]):
        with pytest.raises(ValueError):
            philox.uniform_signed(5, 6, 7, 1203, 0.25, out=wrong)


def test_empty_draws() -> None:
    assert philox.stream_words(1, 2, 5, 0).numel() == 0
    assert philox.normal(1, 2, 5, 0).numel() == 0
    assert reference.stream_words_ref(1, 2, 5, 0).size == 0
    assert reference.normal_ref(1, 2, 5, 0).size == 0


def _numpy_tiles() -> np.ndarray:
    """The NumPy path's tiled draw: several tiles, so the pool is used."""
    return philox._draw_numpy(3, 4, 5, 1 << 16, np.uint64, philox._store_words)


def _cpu_draw() -> np.ndarray:
    """The CPU path in use (the compiled kernels, split across the pool, where built)."""
    return philox.uniform_signed(3, 4, 5, 1 << 20, 0.5).numpy()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("draw", [_numpy_tiles, _cpu_draw])
def test_threaded_draws_work_in_a_forked_child(draw: Callable[[], np.ndarray]) -> None:
    """The CPU draw's thread pool is rebuilt in a forked child (DataLoader workers fork).

    The child draws through NumPy or the compiled kernels only (torch's own thread pools are
    not fork-safe) and is killed if it does not finish in time, so a regression fails instead
    of hanging."""
    import signal
    import time

    parent = draw()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        child = draw()
        os._exit(0 if np.array_equal(parent, child) else 3)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung drawing Philox values")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
