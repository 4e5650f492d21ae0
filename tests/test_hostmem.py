"""Huge-page-backed CPU outputs are zero-filled, behave like ordinary tensors, and big loads
use them."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

import mcnc_format as mf
from mcnc_format.engine.fused import FusedGenerator
from mcnc_format.hostmem import HUGE_PAGE_MIN_BYTES, zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_large_buffer_is_writable_and_outlives_its_first_view(dtype: torch.dtype) -> None:
    numel = HUGE_PAGE_MIN_BYTES // dtype.itemsize + 123
    values = torch.randn(numel).to(dtype)
    buffer = zeros(numel, dtype)
    assert buffer.dtype == dtype and buffer.shape == (numel,)
    assert not buffer.any()
    buffer.copy_(values)
    view = buffer[7:].reshape(-1)
    del buffer
    gc.collect()
    assert torch.equal(view, values[7:])
    assert torch.equal(zeros(5, dtype), torch.zeros(5, dtype=dtype))


def test_a_load_above_the_threshold_matches_the_fused_generator(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    spec = mf.GeneratorSpec(k=5, d=5000, hidden=(32, 32), seed=seed & 0xFFFFFFFF)
    numel = HUGE_PAGE_MIN_BYTES // 4 + 5000 * 3 + 17
    chunks = -(-numel // spec.d)
    alpha = torch.rand(chunks, 1, 5, generator=gen) * 40 - 20
    beta = torch.randn(chunks, 1, generator=gen)
    path = tmp_path / "big.mcnc"
    mf.save(path, {"w": mf.MCNC(mf.Segment(spec, alpha, beta), (numel,))})
    loaded = mf.load(path)["w"]
    expected = FusedGenerator(spec.weights(), 1).delta(alpha, beta).reshape(-1)[:numel]
    assert torch.allclose(loaded, expected, rtol=0, atol=1e-6 * float(beta.abs().max()))
