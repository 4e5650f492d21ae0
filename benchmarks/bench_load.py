"""How big, how fast, how exact: the numbers behind mcnc-format's claims, on this machine.

One run measures, and prints with the machine's description:

(a) file size against the ideal payload (``m (k + 1)`` alpha/beta values per chunk times their
    item size, plus the bytes of the tensors kept dense) for transformer-like models of about
    1M, 10M and 100M parameters, with the LLaMA and the vision generator, in the paper's layout
    (one segment per model) and in one segment per tensor;
(b) load time of the ``.mcnc`` file (``mcnc_format.load`` on the CPU) against
    ``safetensors.torch.load_file`` of its dense export, warm and "cold (fadvise)": the page
    cache dropped for both files with ``posix_fadvise(DONTNEED)`` before each run;
(c) regeneration throughput (values per second) of one large tensor, with theta0 zeros (the
    generator alone), ``fan_in_uniform`` (generator plus PRNG draw) and stored (the same values
    read from a blob), the output layer's share of the machine's sgemm rate (measured again
    just before), and the seeded/stored ratio (target: at most 1.3); then the parts of a
    rebuild timed alone, which bound that share;
(f) the PRNG draw alone: ``philox.uniform_signed`` on the library's CPU path (the compiled
    kernels on all cores, or NumPy) against randomgen's compiled single-threaded Philox4x32-10
    in the same run (target: at least 2x, and 1 G values/s on 2 cores), and the
    element-indexed draws (a row box and a column slice) against the contiguous one;
(d) the error of regenerated chunks against the float64 reference of ``mcnc_format.reference``,
    in units of SPEC.md §10's bound (pass: at most ``REGEN_RTOL``);
(e) a box: a 1/16 row block of a 100M-value tensor (``get_slice``) against the whole tensor
    (``get_tensor``), LLaMA generator, theta0 zeros (target: at most 1/8 of the time).

Usage: ``python benchmarks/bench_load.py [--quick] [--json out.json]``. ``--quick`` is a small
smoke run (seconds), used by the test suite; its figures mean little. Take real figures on a
quiet machine (``uptime`` load below 0.5) and record them in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import mcnc_format as mcnc
from mcnc_format import constants as C
from mcnc_format import hostmem, philox, reference
from mcnc_format.engine.fused import FusedGenerator
from mcnc_format.engine.theta0 import fan_in_bound

GENERATORS = {
    # The paper's LLaMA-2 adapter generator: 5 -> 32 -> 32 -> 5000.
    "llama": mcnc.GeneratorSpec(k=5, d=5000, hidden=(32, 32), seed=20240628),
    # The paper's vision setting (ResNet / DeiT): k = 16, d = 1600; hidden widths ours.
    "vision": mcnc.GeneratorSpec(k=16, d=1600, hidden=(256, 256), seed=20240628),
}
# (vocabulary, width, layers) of GPT-2-like decoders of about 1M, 10M and 100M parameters
# (and 0.1M for --quick).
MODELS = {"1M": (1024, 128, 4), "10M": (8192, 256, 10), "100M": (32000, 768, 12)}
QUICK_MODELS = {"0.1M": (512, 64, 2)}
TARGET_OVERHEAD_PCT = 1.0
TARGET_LLAMA_VALUES_PER_S = 0.5e9
TARGET_SGEMM_SHARE = 0.6
TARGET_SEEDED_OVER_STORED = 1.3
TARGET_PRNG_OVER_RANDOMGEN = 2.0
TARGET_PRNG_VALUES_PER_S = 1e9
QUIET_LOAD = 0.5
M = 1
ALPHA_BETA_ITEMSIZE = 4  # float32 alpha and beta
PAGE_BYTES = 4096


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    load_repeats: int
    regen_values: int
    regen_repeats: int
    accuracy_chunks: int
    slice_values: int

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(tuple(QUICK_MODELS), 1, 1 << 18, 1, 4, 1 << 20)
        return cls(tuple(MODELS), 3, 20_000_000, 3, 32, 100_000_000)


# -- the machine -------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mcnc_format": mcnc.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "sgemm_gflops": _sgemm_gflops(),
        "philox": philox.backend(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def _sgemm_gflops() -> float:
    """The float32 matrix-product rate of this machine: the ceiling for regeneration."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = _best(lambda: torch.mm(a, b), 3)
    return 2 * n**3 / seconds / 1e9


# -- models ------------------------------------------------------------------------------------
def transformer_tensors(model: str) -> list[tuple[str, tuple[int, ...], bool]]:
    """``(name, shape, compressed)`` of a GPT-2-like decoder. LayerNorm parameters stay dense,
    as the paper leaves normalisation layers uncompressed; everything else is MCNC."""
    vocab, h, layers = {**MODELS, **QUICK_MODELS}[model]
    out: list[tuple[str, tuple[int, ...], bool]] = [("embed.weight", (vocab, h), True)]
    for i in range(layers):
        p = f"layers.{i}."
        out += [
            (p + "ln1.weight", (h,), False), (p + "ln1.bias", (h,), False),
            (p + "attn.qkv.weight", (3 * h, h), True), (p + "attn.qkv.bias", (3 * h,), True),
            (p + "attn.out.weight", (h, h), True), (p + "attn.out.bias", (h,), True),
            (p + "ln2.weight", (h,), False), (p + "ln2.bias", (h,), False),
            (p + "mlp.fc.weight", (4 * h, h), True), (p + "mlp.fc.bias", (4 * h,), True),
            (p + "mlp.proj.weight", (h, 4 * h), True), (p + "mlp.proj.bias", (h,), True),
        ]
    return [*out, ("ln_f.weight", (h,), False), ("ln_f.bias", (h,), False)]


def _segment(spec: mcnc.GeneratorSpec, values: int, rng: torch.Generator) -> mcnc.Segment:
    chunks = math.ceil(values / spec.d)
    alpha = torch.rand(chunks, M, spec.k, generator=rng) * (2 * 20.0) - 20.0
    beta = torch.randn(chunks, M, generator=rng) * 0.01
    return mcnc.Segment(spec, alpha, beta)


def write_model(path: Path, model: str, generator: str, layout: str, seed: int) -> dict[str, Any]:
    """Write a model file and return its sizes against the ideal payload."""
    spec = GENERATORS[generator]
    rng = torch.Generator().manual_seed(seed)
    tensors = transformer_tensors(model)
    compressed = sum(math.prod(s) for _, s, c in tensors if c)
    shared = _segment(spec, compressed, rng) if layout == "model" else None
    entries: dict[str, Any] = {}
    dense_bytes = 0
    for name, shape, is_compressed in tensors:
        if not is_compressed:
            entries[name] = torch.randn(shape, generator=rng)
            dense_bytes += 4 * math.prod(shape)
            continue
        segment = shared or _segment(spec, math.prod(shape), rng)
        entries[name] = mcnc.MCNC(segment, shape)
    mcnc.save(path, entries, metadata={"benchmark": f"{model}/{generator}/{layout}"})
    payload = math.ceil(compressed / spec.d) * M * (spec.k + 1) * ALPHA_BETA_ITEMSIZE
    ideal = payload + dense_bytes
    with mcnc.open(path) as f:
        summary = f.summary()
    file_bytes = path.stat().st_size
    return {
        "model": model,
        "generator": generator,
        "layout": "one segment per model" if layout == "model" else "one segment per tensor",
        "parameters": summary["parameters"],
        "segments": summary["segments"],
        "file_bytes": file_bytes,
        "header_bytes": summary["header_bytes"],
        "ideal_bytes": ideal,
        "alpha_beta_payload_bytes": payload,
        "dense_payload_bytes": dense_bytes,
        "overhead_pct": 100.0 * (file_bytes - ideal) / ideal,
        "dense_f32_bytes": summary["dense_bytes"],
    }


# -- timing ------------------------------------------------------------------------------------
def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: caches, lazy initialisation
    return min(_timed(fn) for _ in range(max(1, repeats)))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _drop_cache(path: Path) -> None:
    """Ask the kernel to drop the file's pages; a no-op where fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _touched(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read one element per 4 KiB page of every tensor. ``safetensors.torch.load_file`` maps
    the file lazily, so without this its "load" reads nothing; a model that is used reads it
    all. Regenerated tensors are already in memory: touching them costs next to nothing."""
    for value in tensors.values():
        flat = value.reshape(-1)
        if flat.numel():
            flat[:: max(1, PAGE_BYTES // flat.element_size())].float().sum()
    return tensors


def load_times(path: Path, model: str, generator: str, repeats: int) -> dict[str, Any]:
    """Warm and cold load (with every page touched) of the .mcnc file and of its dense
    safetensors export."""
    from safetensors.torch import load_file, save_file

    dense = path.with_suffix(".safetensors")
    save_file(mcnc.load(path), str(dense))
    loaders = {"mcnc": lambda: _touched(mcnc.load(path)),
               "safetensors": lambda: _touched(load_file(str(dense)))}
    row: dict[str, Any] = {"model": model, "generator": generator,
                           "mcnc_bytes": path.stat().st_size,
                           "safetensors_bytes": dense.stat().st_size}
    for kind, load in loaders.items():
        row[f"{kind}_warm_s"] = _best(load, repeats)
        cold = []
        for _ in range(repeats):
            _drop_cache(path)
            _drop_cache(dense)
            cold.append(_timed(load))
        row[f"{kind}_cold_s"] = min(cold)
    row["warm_ratio"] = row["mcnc_warm_s"] / row["safetensors_warm_s"]
    row["cold_ratio"] = row["mcnc_cold_s"] / row["safetensors_cold_s"]
    dense.unlink()
    return row


THETA0_KINDS = ("zeros", "fan_in_uniform", "stored")


def regeneration(directory: Path, generator: str, theta0: str, values: int, repeats: int,
                 sgemm_gflops: float) -> tuple[dict[str, Any], Path]:
    """Values per second of ``get_tensor`` on one ``[values / 1000, 1000]`` tensor. theta0
    ``stored`` holds the very values ``fan_in_uniform`` draws, in a blob."""
    spec = GENERATORS[generator]
    rows = max(1, values // 1000)
    shape = (rows, 1000)
    segment = _segment(spec, rows * 1000, torch.Generator().manual_seed(7))
    if theta0 == "zeros":
        start = mcnc.Theta0.zeros()
    elif theta0 == "stored":
        start = mcnc.Theta0.stored(philox.uniform_signed(11, 0, 0, rows * 1000, fan_in_bound(
            shape)).reshape(shape))
    else:
        start = mcnc.Theta0.fan_in_uniform(11, 0)
    path = directory / f"regen-{generator}-{theta0}.mcnc"
    mcnc.save(path, {"w": mcnc.MCNC(segment, shape, theta0=start)})
    with mcnc.open(path) as f:
        seconds = _best(lambda: f.get_tensor("w"), repeats)
    n = rows * 1000
    flops = 2 * n * (M * spec.hidden[-1] + 1)  # the fused output layer dominates
    row = {"generator": generator, "theta0": theta0, "values": n, "seconds": seconds,
           "values_per_s": n / seconds, "output_layer_gflops": flops / seconds / 1e9,
           "sgemm_share": flops / seconds / 1e9 / sgemm_gflops}
    return row, path


def regeneration_parts(generator: str, values: int, repeats: int, sgemm_gflops: float
                       ) -> dict[str, Any]:
    """What bounds (c): the parts of one rebuild of ``values`` values, timed alone on all
    cores: the left factor (hidden layers and row norms, ``FusedGenerator.coefficients``), the
    output product accumulated into a buffer already in memory (``accumulate``, as the engine
    does), a fresh pre-faulted output (``hostmem.zeros``, what every load allocates), and
    the product into fresh memory. Each as the output layer's share of sgemm it would leave."""
    spec = GENERATORS[generator]
    fused = FusedGenerator(spec.weights("cpu"), M)
    segment = _segment(spec, values, torch.Generator().manual_seed(7))
    left = fused.coefficients(segment.alpha, segment.beta)
    rows = left.shape[0]
    warm = torch.zeros(rows, spec.d)

    def fresh() -> None:
        fused.accumulate(left, hostmem.zeros(rows * spec.d).view(rows, spec.d))

    parts = {"left factor (coefficients)": lambda: fused.coefficients(segment.alpha,
                                                                     segment.beta),
             "output product into a warm buffer": lambda: fused.accumulate(left, warm),
             "fresh pre-faulted output (hostmem.zeros)": lambda: hostmem.zeros(rows * spec.d),
             "fresh output + output product": fresh}
    flops = 2 * rows * spec.d * left.shape[1]
    out = []
    for name, fn in parts.items():
        seconds = _best(fn, repeats)
        out.append({"part": name, "seconds": seconds,
                    "sgemm_share_if_alone": flops / seconds / 1e9 / sgemm_gflops})
    return {"generator": generator, "values": rows * spec.d, "output_gflop": flops / 1e9,
            "parts": out}


def slice_time(directory: Path, values: int, repeats: int) -> dict[str, Any]:
    """A 1/16 row block of a tensor (one rank's shard of FSDP) against the whole tensor."""
    spec = GENERATORS["llama"]
    rows = max(16, values // 1000)
    segment = _segment(spec, rows * 1000, torch.Generator().manual_seed(7))
    path = directory / "slice.mcnc"
    mcnc.save(path, {"w": mcnc.MCNC(segment, (rows, 1000))})
    block = slice(7 * rows // 16, 8 * rows // 16)
    with mcnc.open(path) as f:
        whole = _best(lambda: f.get_tensor("w"), repeats)
        part = _best(lambda: f.get_slice("w")[block], 2 * repeats)
        chunks = f.plan(f.requests(boxes={"w": (block,)})).chunks
    path.unlink()
    return {"values": rows * 1000, "whole_seconds": whole, "slice_seconds": part,
            "ratio": part / whole, "target_ratio": 1 / 8, "slice_chunks": chunks,
            "total_chunks": -(-rows * 1000 // spec.d)}


def prng_draw(values: int, repeats: int) -> dict[str, Any]:
    """The PRNG alone, each draw into fresh memory: ``philox.uniform_signed`` (float32 uniform
    values, the library's CPU path), against randomgen's Philox4x32-10 (C, one thread) giving
    the same words (``random_raw``: uint64 words; and float32 uniforms through a NumPy
    ``Generator``); the faster of the two is the baseline. Then element-indexed draws of a row
    box and of a column slice of a ``[values / 1000, 1000]`` tensor against a contiguous draw
    of as many values."""
    import randomgen

    bound = 0.03125
    ours = _best(lambda: philox.uniform_signed(11, 0, 0, values, bound), repeats)
    output = hostmem.zeros(values)  # what a load draws into: its pre-faulted output
    into_output = _best(lambda: philox.uniform_signed(11, 0, 0, values, bound, out=output),
                        repeats)
    bit_generator = randomgen.Philox(key=11, number=4, width=32, counter=0)
    raw = _best(lambda: bit_generator.random_raw(values), repeats)
    floats = np.random.Generator(bit_generator)
    uniform = _best(lambda: floats.random(values, dtype=np.float32), repeats)
    baseline = min(raw, uniform)
    one_thread = None
    try:
        from mcnc_format import _philox  # the kernels themselves, on this thread alone
    except ImportError:
        pass
    else:
        out = np.empty(values, dtype=np.float32)
        one_thread = values / _best(lambda: _philox.uniform(out, 11, 0, 0, 0, bound), repeats)
    rows = values // 1000
    grid = torch.arange(rows * 1000).view(rows, 1000)
    boxes = {"row box (rows 1/4 .. 3/4)": grid[rows // 4 : 3 * rows // 4].reshape(-1),
             "column slice (columns 250 .. 750)": grid[:, 250:750].reshape(-1),
             "column slice (every 2nd column)": grid[:, ::2].reshape(-1)}
    indexed = []
    for name, index in boxes.items():
        n = index.numel()
        at = _best(lambda index=index: philox.uniform_signed_at(11, 0, index, bound), repeats)
        contiguous = _best(lambda n=n: philox.uniform_signed(11, 0, 0, n, bound), repeats)
        indexed.append({"box": name, "values": n, "seconds": at, "contiguous_seconds": contiguous,
                        "ratio": at / contiguous})
    return {"values": values, "backend": philox.backend(), "seconds": ours,
            "values_per_s": values / ours, "one_thread_values_per_s": one_thread,
            "into_output_values_per_s": values / into_output,
            "randomgen_raw_words_per_s": values / raw,
            "randomgen_float32_per_s": values / uniform,
            "randomgen_values_per_s": values / baseline, "over_randomgen": baseline / ours,
            "indexed": indexed}


def accuracy(path: Path, generator: str, theta0: str, chunks: int) -> dict[str, Any]:
    """Error of sampled chunks against the float64 reference, in units of §10's bound."""
    spec = GENERATORS[generator]
    with mcnc.open(path) as f:
        value = f.get_tensor("w").reshape(-1)
        seg = f.header.segments[0]
        alpha = f.blob_tensor(seg.alpha).numpy().astype(np.float64)
        beta = f.blob_tensor(seg.beta).numpy().astype(np.float64)
        shape = f.entry("w").shape
    weights = reference.generator_weights_ref(spec)
    ours = [w.cpu().numpy() for w in spec.weights("cpu").flat()]
    exact_weights = all(np.array_equal(a, b) for a, b in zip(weights, ours, strict=True))
    full_chunks = value.numel() // spec.d
    rng = np.random.default_rng(3)
    sample = rng.choice(full_chunks, size=min(chunks, full_chunks), replace=False)
    errors = []
    for c in sample:
        phi64 = reference.phi_ref(weights, spec, alpha[c])  # [m, d]
        delta = (beta[c][:, None] * phi64).sum(0)
        base = np.zeros(spec.d)
        if theta0 != "zeros":
            base = reference.uniform_signed_ref(11, 0, int(c) * spec.d, spec.d,
                                                fan_in_bound(shape)).astype(np.float64)
        v64 = base + delta
        v = value[c * spec.d : (c + 1) * spec.d].double().numpy()
        bound = np.linalg.norm(base) + np.sum(np.abs(beta[c]) * np.linalg.norm(phi64, axis=1))
        errors.append(float(np.linalg.norm(v - v64) / bound))
    worst = max(errors)
    return {"generator": generator, "theta0": theta0, "chunks": len(errors),
            "max_rel_error": worst, "median_rel_error": statistics.median(errors),
            "bound": C.REGEN_RTOL, "within_bound": worst <= C.REGEN_RTOL,
            "generator_weights_exact": exact_weights}


# -- the run -----------------------------------------------------------------------------------
def run(settings: Settings, directory: Path, console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_info(), "sizes": [], "load": [],
                               "regeneration": [], "prng": None, "accuracy": [], "slice": None}
    _print_machine(console, results["machine"])
    model_files: dict[tuple[str, str], Path] = {}
    cases = [(m, g, lay) for m in settings.models for g in GENERATORS
             for lay in ("model", "tensor")]
    for seed, (model, generator, layout) in enumerate(cases):
        path = directory / f"{model}-{generator}-{layout}.mcnc"
        results["sizes"].append(write_model(path, model, generator, layout, seed))
        if layout == "model":
            model_files[(model, generator)] = path
        else:
            path.unlink()
    _print_sizes(console, results["sizes"])
    for (model, generator), path in model_files.items():
        results["load"].append(load_times(path, model, generator, settings.load_repeats))
        path.unlink()
    _print_load(console, results["load"])
    regen_files = []
    results["sgemm_gflops_at_regeneration"] = sgemm = _sgemm_gflops()
    for generator in GENERATORS:
        for theta0 in THETA0_KINDS:
            row, path = regeneration(directory, generator, theta0, settings.regen_values,
                                     settings.regen_repeats, sgemm)
            results["regeneration"].append(row)
            regen_files.append((path, generator, theta0))
    _print_regeneration(console, results["regeneration"], sgemm)
    results["regeneration_parts"] = [regeneration_parts(g, settings.regen_values,
                                                        settings.regen_repeats, sgemm)
                                     for g in GENERATORS]
    _print_regeneration_parts(console, results["regeneration_parts"])
    results["prng"] = prng_draw(settings.regen_values, settings.regen_repeats)
    _print_prng(console, results["prng"])
    for path, generator, theta0 in regen_files:
        results["accuracy"].append(accuracy(path, generator, theta0, settings.accuracy_chunks))
        path.unlink()
    _print_accuracy(console, results["accuracy"])
    results["slice"] = slice_time(directory, settings.slice_values, settings.regen_repeats)
    _print_slice(console, results["slice"])
    return results


def _print_machine(console: Console, m: dict[str, Any]) -> None:
    console.print(f"[bold]machine[/bold]: {m['cpu']}, {m['cores']} cores "
                  f"({m['cores_usable']} usable, torch uses {m['torch_threads']} threads), "
                  f"Philox {m['philox']}, "
                  f"sgemm {m['sgemm_gflops']:.0f} GFLOP/s; torch {m['torch']}, numpy "
                  f"{m['numpy']}, Python {m['python']}, mcnc-format {m['mcnc_format']}; "
                  f"{m['date_utc']} UTC", soft_wrap=True)
    load = m["load_average"]
    if load is not None and load >= QUIET_LOAD:
        console.print(f"[yellow]warning[/yellow]: load average {load:.2f} >= {QUIET_LOAD}: the "
                      "machine is busy, timings are indicative only", soft_wrap=True)


def _print_sizes(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"(a) file size against the ideal payload (target: overhead <= "
                  f"{TARGET_OVERHEAD_PCT}% from 10M parameters, one segment per model)",
                  title_justify="left")
    for column in ("model", "generator", "layout", "parameters", "segments", "file bytes",
                   "ideal bytes", "= alpha/beta", "+ dense", "header bytes", "overhead",
                   "dense f32 / file"):
        table.add_column(column, justify="left" if column in ("model", "generator", "layout")
                         else "right")
    for r in rows:
        table.add_row(r["model"], r["generator"], r["layout"], f"{r['parameters']:,}",
                      f"{r['segments']:,}", f"{r['file_bytes']:,}", f"{r['ideal_bytes']:,}",
                      f"{r['alpha_beta_payload_bytes']:,}", f"{r['dense_payload_bytes']:,}",
                      f"{r['header_bytes']:,}", f"{r['overhead_pct']:.2f}%",
                      f"{r['dense_f32_bytes'] / r['file_bytes']:,.0f}x")
    console.print(table)


def _print_load(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="(b) load on the CPU, every page touched: mcnc_format.load vs "
                  "safetensors.torch.load_file of the dense export (best of runs; ratio = mcnc / "
                  "safetensors)",
                  title_justify="left")
    for column in ("model", "generator", ".mcnc bytes", ".safetensors bytes", "mcnc warm",
                   "st warm", "ratio warm", "mcnc cold (fadvise)", "st cold (fadvise)",
                   "ratio cold"):
        table.add_column(column, justify="left" if column in ("model", "generator") else "right")
    for r in rows:
        table.add_row(r["model"], r["generator"], f"{r['mcnc_bytes']:,}",
                      f"{r['safetensors_bytes']:,}", _ms(r["mcnc_warm_s"]),
                      _ms(r["safetensors_warm_s"]), f"{r['warm_ratio']:.2f}",
                      _ms(r["mcnc_cold_s"]), _ms(r["safetensors_cold_s"]),
                      f"{r['cold_ratio']:.2f}")
    console.print(table)


def _print_regeneration(console: Console, rows: list[dict[str, Any]], sgemm: float) -> None:
    table = Table(title=f"(c) regeneration, float32 output (targets: llama, theta0 zeros >= "
                  f"{TARGET_LLAMA_VALUES_PER_S / 1e9:g} G values/s; output layer >= "
                  f"{TARGET_SGEMM_SHARE:.0%} of sgemm ({sgemm:.0f} GFLOP/s, measured just "
                  f"before); seeded / stored theta0 <= {TARGET_SEEDED_OVER_STORED})",
                  title_justify="left")
    for column in ("generator", "theta0", "values", "time", "G values/s",
                   "output layer GFLOP/s", "share of sgemm", "seeded / stored"):
        table.add_column(column, justify="left" if column in ("generator", "theta0") else "right")
    stored = {r["generator"]: r["seconds"] for r in rows if r["theta0"] == "stored"}
    for r in rows:
        ratio = (f"{r['seconds'] / stored[r['generator']]:.2f}"
                 if r["theta0"] == "fan_in_uniform" and r["generator"] in stored else "")
        table.add_row(r["generator"], r["theta0"], f"{r['values']:,}", _ms(r["seconds"]),
                      f"{r['values_per_s'] / 1e9:.3f}", f"{r['output_layer_gflops']:.1f}",
                      f"{r['sgemm_share']:.0%}", ratio)
    console.print(table)


def _print_regeneration_parts(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="(c) what bounds it: the parts of one rebuild, each timed alone, as the "
                  "output layer's share of sgemm each would leave on its own", title_justify="left")
    for column in ("generator", "part", "time", "share of sgemm if alone"):
        table.add_column(column, justify="left" if column in ("generator", "part") else "right")
    for r in rows:
        for part in r["parts"]:
            table.add_row(r["generator"], part["part"], _ms(part["seconds"]),
                          f"{part['sgemm_share_if_alone']:.0%}")
    console.print(table)


def _print_prng(console: Console, r: dict[str, Any]) -> None:
    one = r["one_thread_values_per_s"]
    table = Table(title=f"(f) the PRNG alone, into fresh memory: philox.uniform_signed "
                  f"({r['backend']}) against randomgen's Philox4x32-10 (one thread; targets: >= "
                  f"{TARGET_PRNG_OVER_RANDOMGEN:g}x and >= {TARGET_PRNG_VALUES_PER_S / 1e9:g} G "
                  "values/s)", title_justify="left")
    for column in ("draw", "values", "time", "G values/s", "x randomgen"):
        table.add_column(column, justify="left" if column == "draw" else "right")
    base = r["randomgen_values_per_s"]
    table.add_row("philox.uniform_signed (all cores)", f"{r['values']:,}", _ms(r["seconds"]),
                  f"{r['values_per_s'] / 1e9:.3f}", f"{r['over_randomgen']:.2f}")
    into = r["into_output_values_per_s"]
    table.add_row("  the same into a pre-faulted output (what a load does)", f"{r['values']:,}",
                  _ms(r["values"] / into), f"{into / 1e9:.3f}", f"{into / base:.2f}")
    if one is not None:
        table.add_row("  the compiled kernel, one thread, reused buffer", f"{r['values']:,}",
                      _ms(r["values"] / one), f"{one / 1e9:.3f}", f"{one / base:.2f}")
    table.add_row("randomgen Philox random_raw (uint64 words)", f"{r['values']:,}",
                  _ms(r["values"] / r["randomgen_raw_words_per_s"]),
                  f"{r['randomgen_raw_words_per_s'] / 1e9:.3f}",
                  f"{r['randomgen_raw_words_per_s'] / base:.2f}")
    table.add_row("randomgen Philox Generator.random (float32)", f"{r['values']:,}",
                  _ms(r["values"] / r["randomgen_float32_per_s"]),
                  f"{r['randomgen_float32_per_s'] / 1e9:.3f}",
                  f"{r['randomgen_float32_per_s'] / base:.2f}")
    console.print(table)
    boxes = Table(title="(f) element-indexed draws (philox.uniform_signed_at) against a "
                  "contiguous draw of as many values (target: ratio about 1)",
                  title_justify="left")
    for column in ("box", "values", "indexed", "contiguous", "ratio"):
        boxes.add_column(column, justify="left" if column == "box" else "right")
    for b in r["indexed"]:
        boxes.add_row(b["box"], f"{b['values']:,}", _ms(b["seconds"]),
                      _ms(b["contiguous_seconds"]), f"{b['ratio']:.2f}")
    console.print(boxes)


def _print_slice(console: Console, r: dict[str, Any]) -> None:
    table = Table(title="(e) a 1/16 row block against the whole tensor (llama, theta0 zeros; "
                  "target: ratio <= 1/8)", title_justify="left")
    for column in ("values", "whole", "1/16 block", "ratio", "chunks rebuilt"):
        table.add_column(column, justify="right")
    table.add_row(f"{r['values']:,}", _ms(r["whole_seconds"]), _ms(r["slice_seconds"]),
                  f"{r['ratio']:.3f}", f"{r['slice_chunks']:,} of {r['total_chunks']:,}")
    console.print(table)


def _print_accuracy(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"(d) error against the float64 reference, relative to SPEC.md §10's "
                  f"bound (pass: <= REGEN_RTOL = {C.REGEN_RTOL:g})", title_justify="left")
    for column in ("generator", "theta0", "chunks", "max", "median", "pass",
                   "generator weights bit-exact"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["generator"], r["theta0"], str(r["chunks"]), f"{r['max_rel_error']:.2e}",
                      f"{r['median_rel_error']:.2e}", "yes" if r["within_bound"] else "NO",
                      "yes" if r["generator_weights_exact"] else "NO")
    console.print(table)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small smoke run (seconds); its figures mean little")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 160), highlight=False)
    settings = Settings.for_run(args.quick)
    with tempfile.TemporaryDirectory(prefix="mcnc-bench-") as tmp:
        results = run(settings, Path(tmp), console)
    results["quick"] = args.quick
    results["settings"] = asdict(settings)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
