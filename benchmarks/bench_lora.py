"""An MCNC-LoRA adapter merged onto its base while the base streams in, against the base alone.

In one run, on the CPU or (``--device cuda``) a GPU, with warm files (in the page cache),
best of ``--repeats`` after a warm-up:

- *merged*: ``mcnc_format.load(adapter)``: the adapter's factors rebuilt from alpha/beta, each
  base weight read straight into its output tensor and ``base + scale * B @ A`` merged into it
  in place (``engine/fused.lora_merge``);
- *base alone (our reader)*: the same base tensors read by the same engine code, nothing else:
  the adapter file opened, and for each tensor its base read by ``Theta0Source.dense_read``
  through ``StagingRing.stream`` into a fresh output tensor (straight into it on the CPU),
  its SHA-256 pin judged from those bytes as the load would, then awaited;
- *safetensors*: ``safetensors.torch.load_file`` of the base with one element per 4 KiB page
  of every tensor read (it maps the file lazily, and would otherwise read nothing);
- *merge arithmetic*: the merge alone on tensors already in memory (factors, bases and reused
  outputs given): ``fused.lora_merge`` on the CPU, the one-pass kernel
  (``triton_kernels.lora_merge``) on a GPU with Triton.

each with ``verify="cached"`` (the digest cache knows the unchanged base: nothing is hashed)
and ``verify="full"`` (every base tensor hashed, from the bytes as they are read). Ratios are
merged / base alone. The adapter is written as ``mcnc pack --base`` writes it: a model with the
base's Linear layers, ``add_mcnc_lora`` on them (random beta), its state dict packed against
the base checkpoint, so each lora tensor's theta0 is a sha256-pinned reference to its base
weight. ``--size llama`` is one Llama-2-7B decoder layer's projections in bfloat16 (4 of
4096 x 4096, 3 of 4096 x 11008: 386 MiB); ``quick`` is a smoke run of a few seconds.

Usage: ``python benchmarks/bench_lora.py [--size llama|quick] [--rank 16] [--repeats 3]
[--device cpu|cuda] [--json out.json]``; figures go in docs/benchmarks.md with the machine line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_load import _best, _touched, machine_info
from safetensors.torch import load_file, save_file
from torch import nn

import mcnc_format as mcnc
from mcnc_format import hostmem
from mcnc_format.converters.pack import pack
from mcnc_format.engine.backend import triton_available
from mcnc_format.engine.fused import MERGE_BLOCK_ELEMENTS, lora_merge
from mcnc_format.engine.staging import CudaCopyEngine, StagingRing, SyncCopyEngine
from mcnc_format.header import LoRATensor
from mcnc_format.torch import MCNCConfig, add_mcnc_lora

#: (name, out_features, in_features) of the projections of one decoder layer.
LLAMA = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
         ("o_proj", 4096, 4096), ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096),
         ("down_proj", 4096, 11008)]
SIZES = {"llama": (LLAMA, 5000), "quick": ([(n, o // 64, i // 64) for n, o, i in LLAMA], 500)}


def build(directory: Path, size: str, rank: int) -> tuple[Path, Path]:
    """The base checkpoint and an adapter over every projection, packed against it."""
    shapes, d = SIZES[size]
    torch.manual_seed(0)
    base = nn.Module()
    for name, out_f, in_f in shapes:
        layer = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        base.add_module(name, layer)
    base_path = directory / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    model = add_mcnc_lora(copy.deepcopy(base), MCNCConfig(k=5, d=d, hidden=(32, 32), seed=1),
                          target_modules=[n for n, _, _ in shapes], rank=rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mcnc_beta" in name:
                p.normal_(0, 0.01)
    checkpoint = directory / "adapter.pt"
    torch.save(model.state_dict(), checkpoint)
    del model, base
    adapter = directory / "adapter.mcnc"
    pack(checkpoint, adapter, base=base_path)
    checkpoint.unlink()
    return base_path, adapter


def base_alone(adapter: Path, verify: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The lora tensors' base weights read through the engine's base path, nothing else."""
    out: dict[str, torch.Tensor] = {}
    with mcnc.MCNCFile(adapter, verify=verify) as f:
        engine = CudaCopyEngine(device) if device.type == "cuda" else SyncCopyEngine(device)
        ring = StagingRing(engine, f.options.staging_bytes // 2, 2)
        pending: list[tuple[str, Any]] = []
        for name in f.keys():  # noqa: SIM118
            t = f.entry(name)
            assert isinstance(t, LoRATensor) and t.theta0 is not None
            numel = t.A.shape[1] * t.B.shape[0]
            read = f.context.theta0.dense_read(t.theta0, t.shape, 0, numel, name)  # type: ignore[arg-type]
            # Allocated as the executor allocates outputs (pre-faulted huge pages on the CPU).
            tensor = (hostmem.zeros(numel, read.dtype).view(t.shape) if device.type == "cpu"
                      else engine.output_empty(t.shape, read.dtype))
            engine.wait_compute(ring.stream(read.nbytes, tensor.view(torch.uint8).reshape(-1),
                                            read.read, read.hash.feed if read.hash else None))
            # As the executor does: a tensor is handed out once its pin holds, after the next
            # one is read (its hash runs meanwhile).
            _await(f, pending)
            pending = [(name, t.theta0)]
            out[name] = tensor
        _await(f, pending)
        ring.drain()
    return out


def _await(f: mcnc.MCNCFile, pending: list[tuple[str, Any]]) -> None:
    for _, entry in pending:
        check = f.context.theta0.pending_check(entry)
        if check is not None:
            check.result()


def merge_only(adapter: Path, device: torch.device) -> Callable[[], None]:
    """The merge of every tensor, factors, bases and outputs already in memory (the outputs
    reused: no allocation, no page faults)."""
    with mcnc.open(adapter) as f:
        jobs = []
        bases = base_alone(adapter, "none", device)
        for name in f.keys():  # noqa: SIM118
            a, b, scale = f.get_lora_factors(name, device=device)
            jobs.append((torch.empty_like(bases[name]), bases[name], b, a, scale))
    kernel = device.type == "cuda" and triton_available()

    def run() -> None:
        for out, base, b, a, scale in jobs:
            if kernel:
                from mcnc_format.engine import triton_kernels

                triton_kernels.lora_merge(out, b, a, scale, base)
            else:
                lora_merge(out, b, a, scale, base, MERGE_BLOCK_ELEMENTS)
        synchronize(device)

    return run


def synchronize(device: torch.device) -> None:
    """Wait for the device: a timed GPU call ends when its work does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def call() -> None:
        fn()
        synchronize(device)

    return call


def run(size: str, rank: int, repeats: int, directory: Path, device: torch.device
        ) -> dict[str, Any]:
    base_path, adapter = build(directory, size, rank)
    results: dict[str, Any] = {"size": size, "rank": rank, "device": str(device),
                               "base_bytes": base_path.stat().st_size,
                               "adapter_bytes": adapter.stat().st_size}
    want = mcnc.load(adapter, device, verify="full")  # hashes; records the pins in the cache
    alone = base_alone(adapter, "full", device)
    stored = load_file(str(base_path), device=str(device))
    assert all(torch.equal(alone[n], stored[n]) for n in alone), "base bytes differ"
    assert all(want[n].dtype == stored[n].dtype for n in want)
    del want, alone, stored
    for verify in ("cached", "full"):
        merged = _best(synced(lambda v=verify: mcnc.load(adapter, device, verify=v), device),
                       repeats)
        plain = _best(synced(lambda v=verify: base_alone(adapter, v, device), device), repeats)
        results[verify] = {"merged_s": merged, "base_alone_s": plain,
                           "ratio": merged / plain}
    results["safetensors_s"] = _best(synced(lambda: _touched(load_file(
        str(base_path), device=str(device))), device), repeats)
    results["merge_arithmetic_s"] = _best(merge_only(adapter, device), repeats)
    return results


def report(r: dict[str, Any]) -> None:
    st = r["safetensors_s"]
    lines = [f"base {r['base_bytes']:,} bytes (bfloat16), adapter {r['adapter_bytes']:,} bytes, "
             f"rank {r['rank']}, size {r['size']}, device {r['device']}",
             f"{'verify':8} {'merged':>10} {'base alone':>11} {'merged/base':>12} "
             f"{'base/safetensors':>17}"]
    lines += [f"{v:8} {r[v]['merged_s'] * 1e3:8.1f} ms {r[v]['base_alone_s'] * 1e3:8.1f} ms "
              f"{r[v]['ratio']:11.2f}x {r[v]['base_alone_s'] / st:16.2f}x"
              for v in ("cached", "full")]
    lines.append(f"safetensors.load_file (pages touched): {st * 1e3:.1f} ms; merge arithmetic "
                 f"alone (factors given): {r['merge_arithmetic_s'] * 1e3:.1f} ms")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="llama")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable, torch "
          f"{m['torch_threads']} threads), sgemm {m['sgemm_gflops']:.0f} GFLOP/s; torch "
          f"{m['torch']}, Python {m['python']}, mcnc-format {m['mcnc_format']}; "
          f"{m['date_utc']} UTC; load average {m['load_average']:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.size, args.rank, args.repeats, Path(tmp), torch.device(args.device))
    report(r)
    if args.json:
        args.json.write_text(json.dumps({"machine": m, **r}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
