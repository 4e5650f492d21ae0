"""The writer streams: ``save`` takes a ``TensorStream`` of ``(name, source)`` pairs read one
at a time, spools the encoded blobs (in memory, then in an unnamed file beside the output)
and writes the bytes an in-memory write gives, whatever the spool threshold."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mcnc_format as mf
from mcnc_format import writer
from mcnc_format.generator import GeneratorSpec
from mcnc_format.writer import MCNC, Dense, LoRA, Segment, TensorStream, Theta0


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


def _inputs(seed: int) -> dict[str, object]:
    """Every kind of input: dense (raw, zstd, packed), mcnc members with stored theta0, a
    LoRA entry, inline generator weights."""
    g = torch.Generator().manual_seed(seed)
    spec = GeneratorSpec(k=4, d=50, hidden=(8,), seed=seed % 2**32)
    inline = GeneratorSpec(k=3, d=40, hidden=(6,), seed=None, inline=tuple(
        torch.randn(s, generator=g) for s in GeneratorSpec(k=3, d=40, hidden=(6,),
                                                           seed=0).parameter_shapes()))
    shared = Segment(spec, torch.randn(5, 1, 4, generator=g), torch.randn(5, 1, generator=g))
    a = Segment(inline, torch.randn(3, 1, 3, generator=g), torch.randn(3, 1, generator=g))
    b = Segment(spec, torch.randn(2, 1, 4, generator=g), torch.randn(2, 1, generator=g))
    return {
        "embed": torch.randn(300, 70, generator=g),
        "norm": torch.randn(70, generator=g),
        "fc.weight": MCNC(shared, (10, 20), torch.float32,
                          Theta0.stored(torch.randn(10, 20, generator=g))),
        "fc2.weight": MCNC(shared, (5, 10)),
        "zstd": Dense(torch.zeros(4000), codec="zstd"),
        "bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "lora": LoRA(MCNC(a, (4, 30)), MCNC(b, (25, 4)), 0.5, torch.float32,
                     Theta0.stored(torch.randn(25, 30, generator=g))),
        "big": Dense(torch.randn(200, 300, generator=g)),
    }


@pytest.mark.parametrize("spool_bytes", [0, 1000, 64 << 20])
def test_pairs_write_the_bytes_of_a_mapping(seed: int, spool_bytes: int, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _inputs(seed)
    mf.save(tmp_path / "mapping.mcnc", inputs)
    monkeypatch.setattr(writer, "SPOOL_MEMORY_BYTES", spool_bytes)
    monkeypatch.setattr(writer, "SPOOL_COPY_BYTES", 4096)
    mf.save(tmp_path / "pairs.mcnc", TensorStream(iter(list(inputs.items()))))
    assert (tmp_path / "pairs.mcnc").read_bytes() == (tmp_path / "mapping.mcnc").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapping.mcnc", "pairs.mcnc"]
    loaded = mf.load(tmp_path / "pairs.mcnc")
    assert torch.equal(loaded["embed"], inputs["embed"])


def test_the_writer_keeps_no_tensor_it_has_written(seed: int, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each dense tensor is freed once the next pair is asked for: a generator that checks,
    before yielding, that the tensors it yielded earlier are gone."""
    monkeypatch.setattr(writer, "SPOOL_MEMORY_BYTES", 0)
    g = torch.Generator().manual_seed(seed)
    alive: list[weakref.ref[torch.Tensor]] = []

    def pairs() -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(4):
            assert all(ref() is None for ref in alive), "the writer kept an earlier tensor"
            tensor = torch.randn(100, 200, generator=g)
            alive.append(weakref.ref(tensor))
            yield f"t{i}", tensor
            del tensor

    mf.save(tmp_path / "out.mcnc", TensorStream(pairs()))
    assert list(mf.load(tmp_path / "out.mcnc")) == ["t0", "t1", "t2", "t3"]


def test_pairs_sharing_memory_are_refused(tmp_path: Path) -> None:
    """Tied tensors given as pairs (a generator over a live state dict) are refused as in a
    mapping; a tensor freed before the next is read may share its address."""
    weight = torch.randn(300, 70)
    state = {"embed": weight, "head": weight[:10]}
    with pytest.raises(mf.SharedTensorError, match="share memory"):
        mf.save(tmp_path / "tied.mcnc", TensorStream(pair for pair in state.items()))
    assert not (tmp_path / "tied.mcnc").exists()

    def fresh() -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(3):
            yield f"t{i}", torch.randn(300, 70)

    mf.save(tmp_path / "fresh.mcnc", TensorStream(fresh()))
