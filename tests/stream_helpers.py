"""What the loader tests share: a file with every feature, and the pipeline's tolerance.

The pipelined loader batches chunks differently from the simple reader, so float32 sums may
round differently: results must agree to one ulp of the output dtype or ``rtol`` of the
tensor's largest value (SPEC.md §10 bounds each against float64 on its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, LoRA, Segment, Theta0
from mcnc_format.reader import tensor_sha256

SEED = int.from_bytes(os.urandom(4), "little")
print(f"stream tests seed: {SEED}")


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  rtol: float = 1e-5) -> None:
    """Same names, shapes, dtypes; values equal up to one ulp of the output dtype or ``rtol``
    of the tensor's largest value (float32 sums round differently in other batch sizes)."""
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for name, expected in want.items():
        value = got[name]
        assert value.dtype == expected.dtype and value.shape == expected.shape, name
        value = value.cpu()
        if not expected.dtype.is_floating_point or expected.numel() == 0:
            assert torch.equal(value, expected), name
            continue
        a, b = value.double(), expected.double()
        ulp = torch.finfo(expected.dtype).eps * b.abs().clamp_min(torch.finfo(expected.dtype).tiny)
        bound = torch.maximum(ulp, rtol * b.abs().max().clamp_min(1e-30).expand_as(b))
        assert bool(((a - b).abs() <= bound).all()), (name, float((a - b).abs().max()))


def mixed_file(directory: Path, seed: int = SEED) -> Path:
    """A file with every theta0 kind, output dtypes, members across chunk boundaries, an
    empty member, packed tensors (f32 and bool, sharing one pack blob), dense raw and zstd
    tensors and a lora tensor, in interleaved order."""
    g = torch.Generator().manual_seed(seed)
    gen = GeneratorSpec(k=5, d=100, hidden=(32, 32), seed=seed % 2**32)
    shapes = [(7, 13), (50,), (3, 4, 5), (0,), (33,), (4, 37)]
    total = sum(torch.Size(s).numel() for s in shapes)
    chunks = -(-total // 100)
    alpha = ((torch.rand(chunks, 2, 5, generator=g) * 2 - 1) * 20).to(torch.bfloat16)
    seg = Segment(gen, alpha, torch.randn(chunks, 2, generator=g), "zstd")
    base = (torch.randn(3, 4, 5, generator=g)).to(torch.bfloat16)
    base32 = torch.randn(4, 37, generator=g)
    save_file({"w": base, "v": base32}, str(directory / "base.safetensors"))
    thetas = [
        Theta0.fan_in_uniform(1, 2),
        Theta0.normal(3, 4, 0.5, 2.0),
        Theta0.external("base.safetensors", "w", tensor_sha256(base)),
        Theta0.zeros(),
        Theta0.stored(torch.randn(33, generator=g).to(torch.float16)),
        Theta0.external("base.safetensors", "v", tensor_sha256(base32)),
    ]
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16, torch.float64,
              torch.bfloat16]
    small = GeneratorSpec(k=4, d=16, hidden=(8,), seed=9, bias=False)
    seg_a = Segment(small, torch.rand(1, 2, 4, generator=g), torch.randn(1, 2, generator=g))
    seg_b = Segment(small, torch.rand(1, 2, 4, generator=g), torch.randn(1, 2, generator=g))
    tensors: dict[str, object] = {"first_dense": torch.randn(4, 4, generator=g)}
    for i, (shape, dtype, theta0) in enumerate(zip(shapes, dtypes, thetas, strict=True)):
        tensors[f"m{i}"] = MCNC(seg, shape, dtype, theta0)
        if i == 2:
            tensors["ints"] = Dense(torch.arange(10) * 3 - 7, "zstd")
            tensors["adapter"] = LoRA(MCNC(seg_a, (2, 8)), MCNC(seg_b, (8, 2)), 0.5,
                                      torch.float32, Theta0.uniform(0.1, 5, 6))
    tensors["flag"] = torch.tensor([True, False, True])
    tensors["last_dense"] = Dense(torch.randn(3, 5, generator=g))
    path = directory / "mixed.mcnc"
    mf.save(path, tensors)  # type: ignore[arg-type]
    return path
