"""The reader on platforms without ``os.preadv`` (Windows; some Unixes) and without the memory
advice of Linux: each fallback is simulated here by removing the function, and must read the
same bytes and load the same tensors."""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest
import torch

import mcnc_format as mf
from mcnc_format import hostmem
from mcnc_format.engine import source
from mcnc_format.engine.source import PARALLEL_PIECE_BYTES, FileSource, positional_reader


def _model(path: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    spec = mf.GeneratorSpec(k=3, d=64, hidden=(8,), seed=seed % 2**31)
    segment = mf.Segment(spec, torch.rand(4, 1, 3, generator=gen),
                         torch.rand(4, 1, generator=gen))
    return mf.save(path, {"w": mf.MCNC(segment, (16, 16)),
                          "dense": mf.Dense(torch.randn(64, 64, generator=gen)),
                          "b": torch.randn(5, generator=gen)})


@pytest.mark.parametrize("missing", [("preadv",), ("preadv", "pread")])
def test_reads_without_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              missing: tuple[str, ...]) -> None:
    seed = random.SystemRandom().randrange(2**31)
    path = _model(tmp_path / "m.mcnc", seed)
    expected = mf.load(path)
    blob = tmp_path / "blob.bin"
    data = random.Random(seed).randbytes(2 * PARALLEL_PIECE_BYTES + 12345)
    blob.write_bytes(data)
    for name in missing:
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(source, "_pread_into", positional_reader())
    got = mf.load(path, verify="full")
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    file = FileSource(blob, "blob.bin")
    try:  # a large read is split across reader threads: the lock keeps each piece whole
        assert bytes(file.read(0, len(data))) == data
        assert bytes(file.read(777, 1000)) == data[777:1777]
        with pytest.raises(mf.FormatError, match="ended at byte"):
            file.read(len(data) - 10, 20)
    finally:
        file.close()


@pytest.mark.parametrize("missing", ["MAP_ANONYMOUS", "MADV_HUGEPAGE"])
def test_output_buffers_without_linux_memory_advice(monkeypatch: pytest.MonkeyPatch,
                                                    missing: str) -> None:
    monkeypatch.delattr(mmap, missing, raising=False)
    numel = hostmem.HUGE_PAGE_MIN_BYTES // 4 + 3
    buffer = hostmem.zeros(numel)
    assert buffer.shape == (numel,) and buffer.dtype == torch.float32
    assert not buffer.any()
    buffer += 1  # writable
    assert float(buffer.sum()) == numel
