"""Where the GPU loader's time goes: kernel variants, their accuracy, and a profiled load.

A diagnostic companion to ``bench_gpu.py`` (which reports the issue's figures), for the next
round of tuning on a GPU machine:

1. the fused kernel alone (LLaMA generator, bfloat16 out, theta0 zeros) for each output-layer
   precision (``ieee``, ``bf16x3``, ``tf32x3``) and a few tiles, in G params/s;
2. each precision's error against the float64 reference, per chunk, in units of SPEC.md
   §10.1's scale (``|beta|``; pass: at most ``REGEN_RTOL``);
3. ``torch.cuda`` allocation of a model's outputs alone, then a ``torch.profiler`` trace of
   one warm ``load`` of a from-scratch decoder: the top operators by device and by host time.

Usage: ``python benchmarks/profile_gpu.py [--params 5e8] [--out DIR]`` (needs CUDA + Triton).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import LLAMA, PRECISIONS, decoder_shapes, product_errors, scratch_model, timed

from mcnc_format import reference
from mcnc_format.api import load
from mcnc_format.engine import triton_kernels as tk
from mcnc_format.engine.fused import FusedGenerator

TILES = [(64, 128, 4), (128, 128, 8), (128, 64, 4), (128, 256, 8)]


def kernel_sweep(chunks: int) -> dict[str, float]:
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    alpha = ((torch.rand(chunks, 1, LLAMA.k, generator=g) * 2 - 1) * LLAMA.L).to(device)
    beta = (torch.randn(chunks, 1, generator=g) * 0.05).to(device)
    gen = FusedGenerator(LLAMA.weights(device), 1)
    left = gen.coefficients(alpha, beta)
    dest = torch.empty(chunks * LLAMA.d, dtype=torch.bfloat16, device=device)
    has_bias = gen.weights.out_bias is not None
    out: dict[str, float] = {}
    for precision in PRECISIONS:
        for tile in TILES:
            def run(p: str = precision, t: tuple[int, int, int] = tile) -> None:
                tk.fused_regenerate(left, gen.stacked, has_bias, dest, 0, tk.KernelTheta0(),
                                    p, t, split=gen.split)
            try:
                run()
                out[f"{precision} {tile}"] = dest.numel() / min(timed(run, device, 5)) / 1e9
            except Exception as exc:  # a tile this GPU cannot hold
                out[f"{precision} {tile}"] = f"{type(exc).__name__}: {exc}"[:120]
            print(f"kernel {precision} {tile}: {out[f'{precision} {tile}']}", flush=True)
    t0 = time.perf_counter()
    for _ in range(5):
        gen.coefficients(alpha, beta)
    torch.cuda.synchronize()
    out["coefficients G chunks-values/s"] = 5 * dest.numel() / (time.perf_counter() - t0) / 1e9
    return out


def precision_errors(chunks: int = 64) -> dict[str, float]:
    """Each product's error before rounding (``bench_gpu.product_errors``), LLaMA generator."""
    g = torch.Generator().manual_seed(2)
    alpha = (torch.rand(chunks, 1, LLAMA.k, generator=g) * 2 - 1) * LLAMA.L
    beta = torch.randn(chunks, 1, generator=g) * 0.05
    weights = [w.numpy() for w in LLAMA.weights().flat()]
    phi = reference.phi_ref(weights, LLAMA, alpha.double().numpy())[:, 0, :]
    out = product_errors("llama", LLAMA, alpha, beta, phi, torch.device("cuda"))
    for key, value in out.items():
        print(f"error {key}: {value:.3g}", flush=True)
    return out


def profiled_load(params: float, directory: Path) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    shapes = decoder_shapes(params)
    path = scratch_model(shapes, directory)
    out: dict[str, Any] = {"params": sum(math.prod(s) for s in shapes.values())}
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    outs = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in shapes.values()]
    torch.cuda.synchronize()
    out["alloc_fresh_s"] = time.perf_counter() - t0
    del outs
    t0 = time.perf_counter()
    outs = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in shapes.values()]
    torch.cuda.synchronize()
    out["alloc_cached_s"] = time.perf_counter() - t0
    del outs
    for label, clear in (("load_cached_alloc_s", False), ("load_fresh_alloc_s", True)):
        times = []
        for _ in range(3):
            if clear:
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            got = load(path, "cuda")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del got
        out[label] = min(times)
        print(f"{label}: {out[label]:.4f}", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        got = load(path, "cuda")
        torch.cuda.synchronize()
    del got
    averages = prof.key_averages()
    out["by_device_time"] = averages.table(sort_by="self_cuda_time_total", row_limit=15)
    out["by_host_time"] = averages.table(sort_by="self_cpu_time_total", row_limit=20)
    print(out["by_device_time"], flush=True)
    print(out["by_host_time"], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=5e8)
    parser.add_argument("--chunks", type=int, default=215_000)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for key, fn in (("errors", precision_errors), ("kernel", lambda: kernel_sweep(args.chunks))):
        try:
            report[key] = fn()
        except Exception as exc:
            report[key] = repr(exc)
            print(f"{key} failed: {exc!r}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            report["load"] = profiled_load(args.params, Path(scratch))
        except Exception as exc:
            report["load"] = repr(exc)
            print(f"load failed: {exc!r}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_gpu.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
