"""What the adapter bank tests share: a tiny Llama, three trained MCNC-LoRA adapters packed
as serving systems get them, and the bank over them.

The adapters are trained with ``add_mcnc_lora`` (a few Adam steps each, different ranks,
generator seeds and chunkings) and packed two with ``mcnc pack --base`` (theta0 references
the base safetensors file), one with ``save_model`` (the base stored in the file).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch_helpers import SEED
from transformers import LlamaConfig, LlamaForCausalLM

from mcnc_format.converters.pack import pack
from mcnc_format.serving import AdapterBank, Route
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, merge_mcnc_lora, save_model

VOCAB = 64
TARGETS = ("q_proj", "v_proj", "down_proj")
#: (rank, generator seed, chunking, packed against the base file).
ADAPTERS = {"a": (4, 1, "tensor", True), "b": (4, 2, "model", True), "c": (8, 1, "tensor", False)}


def make_llama(hidden: int = 32) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()


def make_tokens(rows: int, length: int, offset: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + offset)
    return torch.randint(0, VOCAB, (rows, length), generator=g)


def train(model: torch.nn.Module, offset: int) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    tokens = make_tokens(4, 12, offset)
    for _ in range(3):
        opt.zero_grad()
        logits = model(tokens[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
    model.eval()


def serve(tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[LlamaForCausalLM, dict[str, Path], dict[str, torch.nn.Module]]:
    """The base, the adapter files, and each trained adapted model (a module fixture)."""
    root: Path = tmp_path_factory.mktemp("serving")
    base = make_llama()
    save_file(base.state_dict(), root / "base.safetensors")
    files, trained = {}, {}
    for i, (name, (rank, seed, chunking, against_base)) in enumerate(ADAPTERS.items()):
        config = MCNCConfig(k=4, d=32, hidden=(16, 16), seed=(SEED + seed) & 0xFFFF,
                            chunking=chunking)
        model = add_mcnc_lora(copy.deepcopy(base), config, target_modules=TARGETS, rank=rank,
                              lora_alpha=2 * rank)
        train(model, 10 * i)
        if against_base:
            torch.save(model.state_dict(), root / f"{name}.pt")
            files[name] = pack(root / f"{name}.pt", root / f"{name}.mcnc",
                               base=root / "base.safetensors").output
        else:
            files[name] = save_model(model, root / f"{name}.mcnc")
        trained[name] = model
    return base, files, trained


def make_bank(served, cache: int = 1 << 20, route: Route = Route.TORCH) -> AdapterBank:
    base, files, _ = served
    bank = AdapterBank(base, device="cpu", factor_cache_bytes=cache, route=route)
    for name, path in files.items():
        bank.add(name, path)
    return bank


def merged_model(served, name: str) -> torch.nn.Module:
    return merge_mcnc_lora(copy.deepcopy(served[2][name]))
