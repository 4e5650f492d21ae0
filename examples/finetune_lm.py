"""Fine-tune a tiny language model with MCNC-LoRA and with plain LoRA, then ship the adapter.

1. Pretrain a small byte-level transformer briefly on Python code: the source of the standard
   library's ``argparse`` module (ships with every Python; no download).
2. Fine-tune it on English: the help texts of ``pydoc_data.topics`` (also in the standard
   library), twice from the same base and with the same batches: MCNC-LoRA
   (``mcnc_format.torch.add_mcnc_lora``) and plain LoRA of the same rank on the same layers.
3. Report validation loss on held-out English and the trainable parameter counts.
4. Pack the MCNC-LoRA adapter with ``mcnc pack --base``: theta0 of every adapted weight is a
   sha256-pinned reference to the base checkpoint (a safetensors file beside it), so the
   ``.mcnc`` file holds only the adapter.
5. Load base + adapter into a fresh model and check its logits against the trained model's.

Run ``python examples/finetune_lm.py`` (about five minutes on two busy CPU cores; ``--size
tiny`` takes seconds and is what the tests run). docs/finetune.md has the figures.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import mcnc_format as mf
from mcnc_format.converters.pack import pack
from mcnc_format.torch import MCNCConfig, add_mcnc_lora

VOCAB = 256  # bytes
TARGETS = ("q_proj", "v_proj", "o_proj", "fc_in", "fc_out")


@dataclass(frozen=True)
class Size:
    """Model and schedule. ``full`` is what docs/finetune.md reports; ``tiny`` is for tests."""

    dim: int
    layers: int
    heads: int
    context: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    rank: int
    k: int
    d: int
    mcnc_lr: float = 0.05
    lora_lr: float = 3e-3
    pretrain_lr: float = 3e-3
    eval_windows: int = 64


SIZES = {
    "full": Size(dim=96, layers=2, heads=4, context=64, batch=32, pretrain_steps=400,
                 finetune_steps=200, rank=8, k=8, d=128),
    "tiny": Size(dim=32, layers=1, heads=2, context=32, batch=8, pretrain_steps=20,
                 finetune_steps=10, rank=2, k=4, d=32, eval_windows=8),
}


# -- data ----------------------------------------------------------------------------------
def texts() -> tuple[bytes, bytes]:
    """(pretraining text, fine-tuning text), both from the standard library."""
    import pydoc_data.topics

    code = inspect.getsource(argparse).encode("utf-8")
    topics = pydoc_data.topics.topics
    english = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    return code, english


def as_tokens(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.long)


def batches(tokens: torch.Tensor, size: Size, steps: int, seed: int):
    """``steps`` batches of random windows, the same sequence for the same seed."""
    g = torch.Generator().manual_seed(seed)
    span = size.context + 1
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - span, (size.batch,), generator=g)
        window = torch.stack([tokens[s : s + span] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


# -- model ---------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, 4 * dim)
        self.fc_out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x))))


class TinyLM(nn.Module):
    """A byte-level decoder-only transformer."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, size.dim)
        self.position = nn.Embedding(size.context, size.dim)
        self.blocks = nn.ModuleList(Block(size.dim, size.heads) for _ in range(size.layers))
        self.norm = nn.LayerNorm(size.dim)
        self.head = nn.Linear(size.dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class PlainLoRALinear(nn.Module):
    """LoRA as PEFT does it: frozen base, ``A`` Kaiming-uniform, ``B`` zero, ``scale =
    lora_alpha / r``; the baseline MCNC-LoRA is compared with."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def add_plain_lora(model: nn.Module, rank: int, scale: float) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for name in TARGETS:
            setattr(block, name, PlainLoRALinear(getattr(block, name), rank, scale))
    return model


# -- training and evaluation ---------------------------------------------------------------
def train(model: nn.Module, tokens: torch.Tensor, size: Size, steps: int, lr: float,
          seed: int, label: str, log: Callable[[str], None]) -> float:
    """Adam on the trainable parameters; returns seconds taken. Every tenth of the steps is
    reported to ``log`` with the batch's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    every = max(1, steps // 10)
    model.train()
    for step, (x, y) in enumerate(batches(tokens, size, steps, seed), 1):
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            log(f"  {label}: step {step}/{steps}, loss {loss.item():.3f}, "
                f"{time.perf_counter() - start:.1f} s")
    model.eval()
    return time.perf_counter() - start


def validation_loss(model: nn.Module, tokens: torch.Tensor, size: Size) -> float:
    """Mean next-byte cross-entropy (nats) over evenly spaced held-out windows."""
    span = size.context + 1
    starts = torch.linspace(0, len(tokens) - span, size.eval_windows).long().tolist()
    window = torch.stack([tokens[s : s + span] for s in starts])
    with torch.no_grad():
        logits = model(window[:, :-1])
        return float(F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1)))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the example ---------------------------------------------------------------------------
def run(size_name: str, out_dir: Path, seed: int = 0,
        log: Callable[[str], None] = lambda line: None) -> dict[str, object]:
    """The whole example; files go to ``out_dir``. Returns the figures; each step is told to
    ``log`` as it runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: on a shared CPU, more threads only wait
    try:
        return _run(SIZES[size_name], size_name, out_dir, seed, log)
    finally:
        torch.set_num_threads(threads)


def _run(size: Size, size_name: str, out_dir: Path, seed: int,
         log: Callable[[str], None]) -> dict[str, object]:
    code, english = texts()
    pretrain_tokens = as_tokens(code)
    english_tokens = as_tokens(english)
    split = int(len(english_tokens) * 0.9)
    finetune_tokens, held_out = english_tokens[:split], english_tokens[split:]

    torch.manual_seed(seed)
    base = TinyLM(size)
    log(f"1/5 pretraining the base model on code ({size.pretrain_steps} steps)")
    pretrain_seconds = train(base, pretrain_tokens, size, size.pretrain_steps, size.pretrain_lr,
                             seed, "pretrain", log)
    save_file(base.state_dict(), out_dir / "base.safetensors")

    config = MCNCConfig(k=size.k, d=size.d, hidden=(32, 32), seed=seed)
    scale = 2.0  # lora_alpha = 2 r, as is common
    mcnc_model = add_mcnc_lora(copy.deepcopy(base), config, target_modules=TARGETS,
                               rank=size.rank, lora_alpha=scale * size.rank)
    lora_model = add_plain_lora(copy.deepcopy(base), size.rank, scale)
    log(f"2/5 fine-tuning MCNC-LoRA and plain LoRA on English ({size.finetune_steps} steps "
        "each)")
    mcnc_seconds = train(mcnc_model, finetune_tokens, size, size.finetune_steps, size.mcnc_lr,
                         seed + 1, "MCNC-LoRA", log)
    lora_seconds = train(lora_model, finetune_tokens, size, size.finetune_steps, size.lora_lr,
                         seed + 1, "LoRA", log)

    log("3/5 packing the MCNC-LoRA adapter into adapter.mcnc (theta0: base.safetensors)")
    torch.save(mcnc_model.state_dict(), out_dir / "adapter.pt")
    packed = pack(out_dir / "adapter.pt", out_dir / "adapter.mcnc",
                  base=out_dir / "base.safetensors", force=True)

    log("4/5 loading base + adapter into a fresh model and comparing logits")
    start = time.perf_counter()
    restored = TinyLM(size)
    restored.load_state_dict(load_file(out_dir / "base.safetensors"))
    restored.load_state_dict(mf.load(out_dir / "adapter.mcnc"), strict=False)
    load_seconds = time.perf_counter() - start
    probe = held_out[: size.context].unsqueeze(0)
    with torch.no_grad():
        difference = float((restored(probe) - mcnc_model(probe)).abs().max())
    if difference > 1e-4:
        raise SystemExit(f"base + adapter logits differ from the trained model by {difference}")

    log("5/5 measuring validation loss")
    return {
        "size": size_name,
        "settings": asdict(size),
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "validation_loss": {
            "base": validation_loss(base, held_out, size),
            "mcnc_lora": validation_loss(mcnc_model, held_out, size),
            "lora": validation_loss(lora_model, held_out, size),
        },
        "trainable_parameters": {"mcnc_lora": trainable(mcnc_model), "lora": trainable(lora_model)},
        "adapter_bytes": packed.output_bytes,
        "adapter_pt_bytes": (out_dir / "adapter.pt").stat().st_size,
        "base_bytes": (out_dir / "base.safetensors").stat().st_size,
        "max_logit_difference": difference,
        "seconds": {"pretrain": pretrain_seconds, "mcnc_lora": mcnc_seconds,
                    "lora": lora_seconds, "load_base_and_adapter": load_seconds},
        "pretrain_bytes": len(code),
        "finetune_bytes": split,
        "validation_bytes": len(held_out),
    }


def _to_stderr(line: str) -> None:
    """Steps go to stderr, so ``--json``'s stdout stays one JSON object."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", type=Path, default=None, help="keep the files here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = run(args.size, args.out, args.seed, log=_to_stderr)
    else:
        with tempfile.TemporaryDirectory(prefix="mcnc-finetune-") as tmp:
            result = run(args.size, Path(tmp), args.seed, log=_to_stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    losses, counts = result["validation_loss"], result["trainable_parameters"]
    print(f"validation loss (nats/byte): base {losses['base']:.4f}, "
          f"MCNC-LoRA {losses['mcnc_lora']:.4f}, LoRA {losses['lora']:.4f}")
    print(f"trainable parameters: MCNC-LoRA {counts['mcnc_lora']:,}, LoRA {counts['lora']:,}")
    print(f"adapter.mcnc: {result['adapter_bytes']:,} bytes (base.safetensors "
          f"{result['base_bytes']:,}); base + adapter logits within "
          f"{result['max_logit_difference']:.1e} of the trained model")


if __name__ == "__main__":
    main()
