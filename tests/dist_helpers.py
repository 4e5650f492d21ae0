"""What the distributed tests share: a small transformer-like model and an ``.mcnc`` file of
it that uses every encoding and theta0 kind, and the worker that runs one gloo rank.

The model's linear layers are what tensor parallelism splits: ``up`` and ``gate`` column-wise
(rows of their weights), ``down`` row-wise (columns of its weight). Its sizes are uneven on
purpose (90 rows over 4 ranks), and the generator's chunks (``d = 100``) straddle rows.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, LoRA, Segment, Theta0
from mcnc_format.reader import tensor_sha256


def _current_distributed() -> bool:
    """Whether this torch has what the sharded tests use: DCP's current API (what
    mcnc_format.distributed needs), FSDP2's public ``fully_shard`` and public ``DTensor``."""
    from torch.distributed import fsdp

    from mcnc_format.errors import UsageError
    from mcnc_format.torch_compat import require_checkpoint_api

    try:
        require_checkpoint_api("the sharded tests")
        from torch.distributed.tensor import DTensor  # noqa: F401
    except (UsageError, ImportError):
        return False
    return hasattr(fsdp, "fully_shard")


#: Why the sharded tests skip on an older torch (.ci/floor runs the suite on torch 2.3).
OLD_DISTRIBUTED = ("needs torch's current distributed API (DCP's StorageMeta and no_dist, "
                   "FSDP2's public fully_shard, torch.distributed.tensor.DTensor)")
requires_current_distributed = pytest.mark.skipif(not _current_distributed(),
                                                  reason=OLD_DISTRIBUTED)

VOCAB, DIM, HIDDEN, LAYERS = 90, 24, 40, 2
D = 100


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.gate = nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def write_model_file(directory: Path, seed: int) -> Path:
    """``TinyLM``'s state dict as a ``.mcnc`` file: mcnc tensors with PRNG (uniform, normal,
    fan-in), zeros, stored and external theta0, lora tensors (one on an external base), dense
    norms and a dense bias."""
    g = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(t.shape) for name, t in TinyLM().state_dict().items()}
    base = {"gate0": torch.randn(HIDDEN, DIM, generator=g),
            "gate1": torch.randn(HIDDEN, DIM, generator=g)}
    save_file(base, str(directory / "base.safetensors"))
    rank = 3
    encoded: dict[str, object] = {}
    for name, shape in shapes.items():
        if "norm" in name or name == "layers.0.down.bias":
            encoded[name] = Dense(torch.randn(shape, generator=g))
        elif name == "layers.0.down.weight":
            encoded[name] = ("lora", Theta0.fan_in_uniform(7, 1))
        elif name == "layers.1.gate.weight":
            encoded[name] = ("lora", Theta0.external("base.safetensors", "gate1",
                                                     tensor_sha256(base["gate1"])))
        elif name == "layers.0.gate.weight":
            encoded[name] = Theta0.external("base.safetensors", "gate0",
                                            tensor_sha256(base["gate0"]))
        elif name == "layers.1.up.weight":
            encoded[name] = Theta0.stored(torch.randn(shape, generator=g).to(torch.float16))
        elif name == "embed.weight":
            encoded[name] = Theta0.normal(3, 2, 0.0, 0.5)
        elif name.endswith("bias"):
            encoded[name] = Theta0.zeros()
        elif name == "head.weight":
            encoded[name] = Theta0.uniform(0.2, 5, 3)
        else:
            encoded[name] = Theta0.fan_in_uniform(11, len(encoded))
    gen = GeneratorSpec(k=5, d=D, hidden=(32, 32), seed=seed % 2**32)
    values = sum(math.prod(shapes[n]) for n, e in encoded.items() if isinstance(e, Theta0))
    seg = _segment(gen, values, g)
    factors = [(rank, shapes[n][1]) for n, e in encoded.items() if isinstance(e, tuple)]
    factors += [(shapes[n][0], rank) for n, e in encoded.items() if isinstance(e, tuple)]
    small = GeneratorSpec(k=4, d=16, hidden=(8,), seed=(seed + 1) % 2**32)
    lora_seg = _segment(small, sum(math.prod(s) for s in factors), g)
    tensors: dict[str, object] = {}
    for name, e in encoded.items():
        shape = shapes[name]
        if isinstance(e, Theta0):
            tensors[name] = MCNC(seg, shape, torch.float32, e)
        elif isinstance(e, tuple):
            tensors[name] = LoRA(MCNC(lora_seg, (rank, shape[1])),
                                 MCNC(lora_seg, (shape[0], rank)), 0.25, torch.float32, e[1])
        else:
            tensors[name] = e
    path = directory / "model.mcnc"
    mf.save(path, tensors)  # type: ignore[arg-type]
    return path


def _segment(gen: GeneratorSpec, values: int, g: torch.Generator) -> Segment:
    chunks = -(-values // gen.d)
    alpha = (torch.rand(chunks, 1, gen.k, generator=g) * 2 - 1) * 3
    return Segment(gen, alpha, torch.randn(chunks, 1, generator=g) * 0.1)


def init_gloo(rank: int, world: int, store: str) -> None:
    """Join a gloo group of ``world`` processes rendezvousing through the file ``store``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)


def leave_gloo() -> None:
    """End a rank that succeeded: every rank leaves the group together, then the process
    ends at once. Tearing gloo down while a peer's collective threads still run, or letting
    C++ static destructors run after its threads, aborted a rank now and then (SIGABRT,
    "terminate called without an active exception") although its work had succeeded;
    ``os._exit`` skips those destructors. A rank that fails raises instead, and its error
    reaches the parent through torch.multiprocessing as usual."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
