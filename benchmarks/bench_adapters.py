"""Many adapters over one base: MCNC-LoRA served from alpha/beta against PEFT's dense LoRA.

In one run, on one device, with the same adapters in both forms (the MCNC file, and its PEFT
export ``adapter_model.safetensors`` holding the same factors densely):

(a) adapters resident per GiB of device memory: what the bank keeps per adapter (alpha and
    beta) against the dense factors ``A``, ``B`` PEFT keeps, same rank and dtype (float32);
(b) switch time to an adapter that is not in the factor cache: the bank's rebuild from
    alpha/beta already on the device, against loading the same adapter's
    ``adapter_model.safetensors`` (``safetensors.torch.load_file`` onto the device, and
    PEFT's whole ``load_adapter``), warm (file in the page cache) and cold (the file's pages
    dropped with ``posix_fadvise(DONTNEED)``: ``/proc/sys/vm/drop_caches`` needs root);
(c) tokens per second of greedy generation for a batch mixing 8 adapters (``bank.generate``)
    against PEFT running the adapters' rows one adapter at a time (``set_adapter`` then
    ``generate`` per group), and the base alone for scale; on CUDA with Triton, the bank's
    two routes (``Route.TORCH``: two ``F.linear`` per adapter group; ``Route.TRITON``: the
    SGMV kernels, one launch pair per module) both run, and one forward of the batch's
    prompts (prefill) is timed on each, so that the run says which route pays.

The base is a Llama built from a config with random weights (nothing is downloaded); the
adapters follow the paper's LLaMA setting (rank 16 on q_proj and v_proj; generator k = 5,
hidden 32, 32, d = 5000, m = 1) with random alpha and beta. ``--size 7b`` uses Llama-2-7B's
shapes (bfloat16 base; for a GPU), ``cpu`` a 4-layer model of width 1024, ``quick`` a smoke
run. Usage: ``python benchmarks/bench_adapters.py [--size cpu|7b|quick] [--device cuda]
[--threads N] [--json out.json]``; figures go in docs/benchmarks.md with the machine line.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_gpu import timed
from bench_load import _drop_cache, machine_info
from transformers import LlamaConfig, LlamaForCausalLM

import mcnc_format as mcnc
from mcnc_format.converters.peft_export import export_peft
from mcnc_format.engine.backend import triton_available
from mcnc_format.reader import tensor_sha256
from mcnc_format.serving import AdapterBank, Route

TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    dtype: str
    rank: int
    k: int
    d: int
    adapters: int
    rows_per_adapter: int
    prompt: int
    new_tokens: int
    repeats: int


SIZES = {
    "7b": Size(4096, 11008, 32, 32, 32000, "bfloat16", 16, 5, 5000, 8, 4, 64, 32, 5),
    "cpu": Size(1024, 2816, 4, 16, 8000, "float32", 16, 5, 5000, 8, 2, 16, 8, 3),
    "quick": Size(64, 128, 2, 4, 128, "float32", 4, 5, 500, 8, 1, 4, 3, 1),
}


def _times(fn: Callable[[], object], repeats: int, device: torch.device,
           before: Callable[[], None] | None = None) -> list[float]:
    return timed(fn, device, repeats, before)


def build_base(size: Size, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden,
                         intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                         num_attention_heads=size.heads, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, size.dtype)).eval()


def write_adapter(path: Path, base: LlamaForCausalLM, size: Size, seed: int,
                  hashes: dict[str, str]) -> None:
    """An adapter as ``mcnc pack --base`` writes one: per target, A and B in segments of
    their own (``fan_in_uniform`` and zeros theta0) and theta0 a sha256-pinned reference to
    the base weight."""
    spec = mcnc.GeneratorSpec(k=size.k, d=size.d, hidden=(32, 32), seed=1234)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, mcnc.LoRA] = {}
    for stream, (name, module) in enumerate(
            (n, m) for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS):
        out_f, in_f = module.weight.shape

        def member(shape: tuple[int, int], theta0: mcnc.Theta0, beta_scale: float
                   ) -> mcnc.MCNC:
            chunks = math.ceil(math.prod(shape) / size.d)
            alpha = (torch.rand(chunks, 1, size.k, generator=g) * 2 - 1) * 2
            beta = torch.randn(chunks, 1, generator=g) * beta_scale
            return mcnc.MCNC(mcnc.Segment(spec, alpha, beta), shape, torch.float32, theta0)

        weight = f"{name}.weight"
        if weight not in hashes:
            hashes[weight] = tensor_sha256(module.weight)
        tensors[weight] = mcnc.LoRA(
            A=member((size.rank, in_f), mcnc.Theta0.fan_in_uniform(seed, 2 * stream), 0.1),
            B=member((out_f, size.rank), mcnc.Theta0.zeros(), 0.02), scale=2.0,
            dtype=module.weight.dtype,
            theta0=mcnc.Theta0.external("base.safetensors", weight, hashes[weight]))
    mcnc.save(path, tensors)


def resident(bank: AdapterBank, peft_file: Path) -> dict[str, Any]:
    from safetensors import safe_open

    stats = bank.stats()
    per_adapter = stats.resident_bytes / stats.adapters
    with safe_open(str(peft_file), framework="pt") as f:
        dense = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 4
                    for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    gib = 1 << 30
    return {"mcnc_bytes_per_adapter": per_adapter,
            "generator_bytes_shared": stats.generator_bytes, "peft_bytes_per_adapter": dense,
            "mcnc_per_gib": (gib - stats.generator_bytes) / per_adapter,
            "peft_per_gib": gib / dense, "ratio": dense / per_adapter}


def rebuild_time(bank: AdapterBank, names: list[str], device: torch.device, repeats: int
                 ) -> float:
    """Median seconds of ``prepare`` of an adapter not in the cache (the cache holds one
    adapter and the names are cycled, so each call evicts one and rebuilds the next)."""
    order = iter(names * (repeats + 1))
    return statistics.median(_times(lambda: bank.prepare([next(order)]),
                                    len(names) * repeats, device))


class _Folders:
    """Cycles through adapter folders; ``cold``: drops the weights file's cached pages."""

    def __init__(self, folders: list[Path], cold: bool) -> None:
        self.folders = folders
        self.cold = cold
        self.i = -1

    @property
    def weights(self) -> Path:
        return self.folders[self.i % len(self.folders)] / "adapter_model.safetensors"

    def next(self) -> None:
        self.i += 1
        if self.cold:
            _drop_cache(self.weights)


def load_times(peft_model: Any, folders: list[Path], device: torch.device, repeats: int
               ) -> dict[str, float]:
    """Median seconds to load an adapter from its PEFT folder, warm and cold: its
    ``adapter_model.safetensors`` onto the device (``load_file``), and PEFT's
    ``load_adapter`` (read, build the LoRA layers, copy the factors in)."""
    from safetensors.torch import load_file

    out = {}
    for temperature in ("warm", "cold"):
        cycle = _Folders(folders, temperature == "cold")

        def load_adapter(cycle: _Folders = cycle) -> None:
            peft_model.load_adapter(str(cycle.weights.parent), adapter_name="switch")
            peft_model.delete_adapter("switch")

        weights = _times(lambda cycle=cycle: load_file(str(cycle.weights), device=str(device)),
                         len(folders) * repeats, device, cycle.next)
        peft = _times(load_adapter, len(folders) * repeats, device, cycle.next)
        out[f"safetensors_{temperature}"] = statistics.median(weights)
        out[f"peft_{temperature}"] = statistics.median(peft)
    return out


class Workload:
    """The mixed batch: ``rows_per_adapter`` prompts per adapter, greedy, fixed length."""

    def __init__(self, names: list[str], size: Size, device: torch.device) -> None:
        self.names = names
        self.size = size
        self.device = device
        self.rows = [n for n in names for _ in range(size.rows_per_adapter)]
        g = torch.Generator().manual_seed(7)
        self.prompts = torch.randint(3, size.vocab, (len(self.rows), size.prompt),
                                     generator=g).to(device)
        self.kwargs = {"max_new_tokens": size.new_tokens, "min_new_tokens": size.new_tokens,
                       "do_sample": False, "pad_token_id": 0}
        self.tokens = len(self.rows) * size.new_tokens

    def group(self, i: int) -> torch.Tensor:
        per = self.size.rows_per_adapter
        return self.prompts[i * per : (i + 1) * per]

    def tokens_per_s(self, fn: Callable[[], object]) -> float:
        with torch.no_grad():
            return self.tokens / min(_times(fn, self.size.repeats, self.device))


def run(size_name: str, device: torch.device, folder: Path) -> dict[str, Any]:
    from peft import PeftModel

    size = SIZES[size_name]
    base = build_base(size, device)
    names = [f"a{i}" for i in range(size.adapters)]
    hashes: dict[str, str] = {}
    for i, name in enumerate(names):
        write_adapter(folder / f"{name}.mcnc", base, size, 100 + i, hashes)
        export_peft(folder / f"{name}.mcnc", folder / name, base_model="random-llama",
                    task_type="CAUSAL_LM")
    one = sum(math.prod(shape) * 4 for shape in _factor_shapes(base, size))
    work = Workload(names, size, device)
    result: dict[str, Any] = {"size": size_name, "settings": asdict(size), "device": str(device)}

    # The bank first: PEFT wraps the base's Linears in place.
    speed, route_logits = bank_phase(base, names, folder, one, work, result)
    probe = work.prompts[:: size.rows_per_adapter]

    peft_model = PeftModel.from_pretrained(base, str(folder / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(folder / name), adapter_name=name)
    peft_model.eval()
    result["switch"].update(load_times(peft_model, [folder / n for n in names], device,
                                       size.repeats))

    def one_at_a_time() -> None:
        for i, name in enumerate(names):
            peft_model.set_adapter(name)
            peft_model.generate(input_ids=work.group(i), **work.kwargs)

    speed["peft"] = work.tokens_per_s(one_at_a_time)
    result["throughput"] = {"rows": len(work.rows), "prompt": size.prompt,
                            "new_tokens": size.new_tokens, "tokens_per_s": speed}
    worst = dict.fromkeys(route_logits, 0.0)
    with torch.no_grad():
        for i, name in enumerate(names):
            peft_model.set_adapter(name)
            want = peft_model(input_ids=probe[i : i + 1]).logits[0].float()
            for route, logits in route_logits.items():
                worst[route] = max(worst[route], float((logits[i] - want).abs().max()))
    result["max_logit_difference_vs_peft"] = max(worst.values())
    result["max_logit_difference_vs_peft_by_route"] = worst
    return result


def routes(device: torch.device) -> list[Route]:
    """The bank's routes this device runs: both on CUDA with Triton (or anywhere under
    ``TRITON_INTERPRET=1``, a smoke run of the kernels' code path), else the torch route."""
    if not triton_available():
        return [Route.TORCH]
    from mcnc_format.engine import triton_kernels

    if device.type == "cuda" or not triton_kernels.compiled():
        return [Route.TORCH, Route.TRITON]
    return [Route.TORCH]


def bank_phase(base: torch.nn.Module, names: list[str], folder: Path, one: int,
               work: Workload, result: dict[str, Any]
               ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(a), the bank's side of (b) into ``result`` and, per route, its prefill time; the
    bank's tokens/s (``mixed`` on the torch route, ``mixed_triton`` on the Triton route, base
    alone) and each route's logits for the first prompt of each adapter."""
    size, device = work.size, work.device
    switching = AdapterBank(base, device=device, factor_cache_bytes=one)
    start = time.perf_counter()
    for name in names:
        switching.add(name, folder / f"{name}.mcnc")
    result["add_seconds"] = (time.perf_counter() - start) / len(names)
    result["resident"] = resident(switching, folder / names[0] / "adapter_model.safetensors")
    result["switch"] = {"rebuild": rebuild_time(switching, names, device, size.repeats)}
    speed: dict[str, float] = {}
    logits: dict[str, torch.Tensor] = {}
    result["prefill_seconds"] = {}
    if Route.TRITON in routes(device):
        from mcnc_format.engine import triton_kernels

        result["triton_interpreted"] = not triton_kernels.compiled()
    for route in routes(device):
        bank = AdapterBank(base, device=device, factor_cache_bytes=one * len(names),
                           route=route)
        for name in names:
            bank.add(name, folder / f"{name}.mcnc")
        bank.prepare(names)
        key = "mixed" if route is Route.TORCH else f"mixed_{route.value}"
        speed[key] = work.tokens_per_s(lambda bank=bank: bank.generate(
            work.prompts, adapters=work.rows, **work.kwargs))
        with torch.no_grad():
            result["prefill_seconds"][route.value] = min(_times(
                lambda bank=bank: bank(work.prompts, adapters=work.rows), size.repeats, device))
            logits[route.value] = bank(work.prompts[:: size.rows_per_adapter],
                                       adapters=names).logits.float()
        if route is Route.TORCH:
            speed["base"] = work.tokens_per_s(lambda bank=bank: bank.generate(
                work.prompts, adapters=[None] * len(work.rows), **work.kwargs))
        del bank
    return speed, logits


def _factor_shapes(base: torch.nn.Module, size: Size) -> list[tuple[int, int]]:
    shapes = []
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = module.weight.shape
            shapes += [(size.rank, in_f), (out_f, size.rank)]
    return shapes


def report(result: dict[str, Any], machine: dict[str, Any]) -> None:
    print(f"machine: {machine['cpu']}, {machine['cores_usable']} cores, torch "
          f"{machine['torch']} ({machine['torch_threads']} threads), "
          f"{result['device']}; load average {machine['load_average']:.2f}; "
          f"{machine['date_utc']} UTC")
    s = result["settings"]
    print(f"base: Llama {s['layers']} layers x {s['hidden']} ({s['dtype']}); adapters: rank "
          f"{s['rank']} on {', '.join(TARGETS)}, generator k={s['k']} d={s['d']}")
    r = result["resident"]
    print(f"(a) per adapter: MCNC {r['mcnc_bytes_per_adapter']:,.0f} B (+ one shared "
          f"generator {r['generator_bytes_shared']:,} B), PEFT factors "
          f"{r['peft_bytes_per_adapter']:,} B (float32)")
    print(f"    adapters per GiB: MCNC {r['mcnc_per_gib']:,.0f}, PEFT {r['peft_per_gib']:,.1f}:"
          f" ratio {r['ratio']:,.0f}x (target >= 500x)")
    w = result["switch"]
    print(f"(b) switch to an uncached adapter: MCNC rebuild {w['rebuild'] * 1e3:.2f} ms; "
          f"bank.add (file to device, once) {result['add_seconds'] * 1e3:.1f} ms")
    for t in ("warm", "cold"):
        print(f"    {t}: load_file {w[f'safetensors_{t}'] * 1e3:.2f} ms "
              f"(ratio {w[f'safetensors_{t}'] / w['rebuild']:.2f}x), PEFT load_adapter "
              f"{w[f'peft_{t}'] * 1e3:.2f} ms (ratio {w[f'peft_{t}'] / w['rebuild']:.2f}x; "
              "target >= 10x warm)")
    p = result["throughput"]
    v = p["tokens_per_s"]
    print(f"(c) {p['rows']} rows ({s['adapters']} adapters), prompt {p['prompt']}, "
          f"{p['new_tokens']} new tokens: mixed batch {v['mixed']:,.1f} tok/s, PEFT one "
          f"adapter at a time {v['peft']:,.1f} tok/s: ratio {v['mixed'] / v['peft']:.2f}x "
          f"(target >= 3x); base alone {v['base']:,.1f} tok/s")
    prefill = result["prefill_seconds"]
    if "mixed_triton" in v:
        if result["triton_interpreted"]:
            print("    Triton route (TRITON_INTERPRET=1: interpreted, the times say nothing):")
        print(f"    Triton route: mixed batch {v['mixed_triton']:,.1f} tok/s, "
              f"{v['mixed_triton'] / v['mixed']:.2f}x the torch route's, "
              f"{v['mixed_triton'] / v['peft']:.2f}x PEFT's; one forward of the prompts "
              f"(prefill) {prefill['triton'] * 1e3:.2f} ms against {prefill['torch'] * 1e3:.2f}"
              f" ms: ratio {prefill['torch'] / prefill['triton']:.2f}x")
    else:
        print(f"    Triton route: not run (needs CUDA and Triton); one forward of the prompts "
              f"(prefill) on the torch route {prefill['torch'] * 1e3:.2f} ms")
    for route, worst in result["max_logit_difference_vs_peft_by_route"].items():
        print(f"    largest logit difference, bank ({route} route) vs PEFT: {worst:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); on a busy CPU, 1 "
                             "keeps small products from waiting on each other")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info()
    folder = Path(tempfile.mkdtemp(prefix="mcnc-bench-adapters-"))
    try:
        result = run(args.size, device, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(result, machine)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
