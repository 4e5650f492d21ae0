"""Sharded loading: each rank's bytes read and wall time, ``.mcnc`` against dense safetensors.

CPU (the default): the same model through DCP's own ``HuggingFaceStorageReader`` on its dense
safetensors export and through ``mcnc_format.distributed.MCNCStorageReader``, with 1, 2 and 4
gloo ranks, each rank's state dict a DTensor per tensor sharded as FSDP2 shards (rows,
``Shard(0)``) and as tensor parallelism's row-wise layers shard (columns, ``Shard(1)`` of every
matrix). Per rank: wall time of ``torch.distributed.checkpoint.load`` (best of ``--repeats``,
the slowest rank of each run), and bytes read: for ``.mcnc`` the bytes the process read with
``pread`` during the load (``rchar`` of ``/proc/self/io``: header, alpha/beta, dense bytes);
for safetensors the bytes of its boxes (a lower bound: the reader maps the file, and a column
box touches every page of its tensor). Ratios are mcnc / safetensors in the same run.

``--cuda`` (one GPU): an 8-way split of the 2.1 B-parameter decoder of ``bench_gpu.py``
measured rank by rank on the one GPU (each rank's boxes are one engine load, the call
``MCNCStorageReader.read_data`` makes), and the projected 8-GPU load time, the slowest rank,
beside the whole model's load on the one GPU.

Usage: ``python benchmarks/bench_distributed.py [--model 100M] [--repeats 3] [--json out]``,
``python benchmarks/bench_distributed.py --cuda [--params 2.1e9] [--scratch DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, LoadPlan, LoadPlanner
from torch.distributed.tensor import Shard, empty

import mcnc_format as mf
from mcnc_format.distributed import MCNCStorageReader
from mcnc_format.dtypes import to_torch
from mcnc_format.engine.box import Box

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import machine_info, write_model

WORLDS = (1, 2, 4)
LAYOUTS = {"rows (FSDP2)": 0, "columns (TP row-wise)": 1}
GPU_WORLD = 8


# -- CPU: gloo ranks ------------------------------------------------------------------------
class CountingHFReader(HuggingFaceStorageReader):
    """DCP's safetensors reader, counting the bytes of the boxes it copies."""

    def __init__(self, path: str, itemsize: dict[str, int]) -> None:
        super().__init__(path)
        self.itemsize = itemsize
        self.box_bytes = 0

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        self.box_bytes = sum(math.prod(item.lengths) * self.itemsize[item.storage_index.fqn]
                             for item in plan.items)
        return super().read_data(plan, planner)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _rank_main(rank: int, world: int, store: str, mcnc_path: str, dense_dir: str,
               repeats: int, out: str) -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    with mf.open(mcnc_path) as f:
        shapes = {t.name: (t.shape, to_torch(t.dtype)) for t in f.header.tensors}
    itemsize = {n: dt.itemsize for n, (_, dt) in shapes.items()}
    rows = []
    for layout, dim in LAYOUTS.items():
        def state(dim: int = dim) -> dict[str, torch.Tensor]:
            return {n: empty(shape, dtype=dt, device_mesh=mesh,
                             placements=[Shard(min(dim, len(shape) - 1))])
                    for n, (shape, dt) in shapes.items()}
        for reader_name in ("safetensors", "mcnc"):
            best = math.inf
            nbytes = 0
            for attempt in range(repeats + 1):  # the first run warms the page cache
                reader: Any = (CountingHFReader(dense_dir, itemsize) if reader_name == "safetensors"
                               else MCNCStorageReader(mcnc_path))
                target = state()
                dist.barrier()
                before = _rchar()
                start = time.perf_counter()
                torch.distributed.checkpoint.load(target, storage_reader=reader)
                seconds = time.perf_counter() - start
                read = _rchar() - before
                slowest = [0.0] * world
                dist.all_gather_object(slowest, seconds)
                if attempt:
                    best = min(best, max(slowest))
                nbytes = reader.box_bytes if reader_name == "safetensors" else read
            per_rank: list[int] = [0] * world
            dist.all_gather_object(per_rank, nbytes)
            rows.append({"world": world, "layout": layout, "reader": reader_name,
                         "seconds": best, "bytes_per_rank": per_rank})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def cpu_run(model: str, repeats: int, directory: Path) -> dict[str, Any]:
    mcnc_path = directory / "model.mcnc"
    write_model(mcnc_path, model, "llama", "model", seed=1)
    dense_dir = directory / "dense"
    dense_dir.mkdir()
    save_file(mf.load(mcnc_path), str(dense_dir / "model.safetensors"))
    rows = []
    for world in WORLDS:
        out = directory / f"world{world}.json"
        mp.start_processes(_rank_main, args=(world, str(directory / f"store{world}"),
                                             str(mcnc_path), str(dense_dir), repeats,
                                             str(out)),
                           nprocs=world, join=True, start_method="spawn")
        rows += json.loads(out.read_text())
    return {"model": model, "mcnc_bytes": mcnc_path.stat().st_size,
            "safetensors_bytes": (dense_dir / "model.safetensors").stat().st_size,
            "rows": rows}


def print_cpu(report: dict[str, Any]) -> None:
    print(f"\nmodel {report['model']}: .mcnc {report['mcnc_bytes']:,} bytes, safetensors "
          f"{report['safetensors_bytes']:,} bytes")
    print("| ranks | shards | safetensors: bytes per rank | mcnc: bytes per rank | bytes ratio "
          "| safetensors: wall | mcnc: wall | wall ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    by_key = {(r["world"], r["layout"], r["reader"]): r for r in report["rows"]}
    for world in WORLDS:
        for layout in LAYOUTS:
            st, mc = by_key[world, layout, "safetensors"], by_key[world, layout, "mcnc"]
            st_bytes, mc_bytes = max(st["bytes_per_rank"]), max(mc["bytes_per_rank"])
            print(f"| {world} | {layout} | {st_bytes:,} | {mc_bytes:,} | "
                  f"{mc_bytes / st_bytes:.5f} | {st['seconds'] * 1e3:.1f} ms | "
                  f"{mc['seconds'] * 1e3:.1f} ms | {mc['seconds'] / st['seconds']:.2f} |")


# -- GPU: an 8-way split measured rank by rank ---------------------------------------------
def shard_box(shape: tuple[int, ...], dim: int, rank: int, world: int) -> Box:
    """Rank ``rank``'s box of ``Shard(dim)`` over ``world`` ranks (torch.chunk's split)."""
    if not shape:
        return Box.full(shape)
    dim = min(dim, len(shape) - 1)
    step = -(-shape[dim] // world)
    start = min(rank * step, shape[dim])
    stop = min(start + step, shape[dim])
    starts = tuple(start if d == dim else 0 for d in range(len(shape)))
    stops = tuple(stop if d == dim else n for d, n in enumerate(shape))
    return Box(tuple(shape), starts, stops)


def tp_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """Megatron-style tensor parallelism: o and down row-wise (columns), the other matrices
    column-wise (rows), vectors replicated (``None``)."""
    if len(shape) < 2:
        return None
    return 1 if name.endswith(("attn.o.weight", "mlp.down.weight")) else 0


def gpu_run(params: float, directory: Path, repeats: int) -> dict[str, Any]:
    from bench_gpu import decoder_shapes, scratch_model

    device = torch.device("cuda")
    shapes = decoder_shapes(params)
    path = scratch_model(shapes, directory)

    def timed(boxes: dict[str, Box] | None) -> float:
        best = math.inf
        with mf.open(path) as f:
            names = list(boxes) if boxes is not None else None
            for _ in range(repeats + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _name, tensor in f.stream(names, device, boxes=boxes):
                    del tensor
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        return best

    whole = timed(None)
    splits: dict[str, list[float]] = {}
    for label in ("FSDP2 (rows)", "TP (columns and rows)"):
        times = []
        for rank in range(GPU_WORLD):
            boxes = {}
            for name, shape in shapes.items():
                dim = 0 if label.startswith("FSDP2") else tp_dim(name, shape)
                boxes[name] = (Box.full(shape) if dim is None
                               else shard_box(shape, dim, rank, GPU_WORLD))
            times.append(timed(boxes))
        splits[label] = times
    return {"params": sum(math.prod(s) for s in shapes.values()), "whole_s": whole,
            "gpu": torch.cuda.get_device_name(device), "splits": splits}


def print_gpu(report: dict[str, Any]) -> None:
    print(f"\n{report['params']:,} parameters on {report['gpu']}: whole model on one GPU "
          f"{report['whole_s'] * 1e3:.1f} ms")
    print(f"| split | slowest of {GPU_WORLD} ranks (projected {GPU_WORLD}-GPU load) | fastest "
          "| whole / slowest |")
    print("|---|---:|---:|---:|")
    for label, times in report["splits"].items():
        print(f"| {label} | {max(times) * 1e3:.1f} ms | {min(times) * 1e3:.1f} ms | "
              f"{report['whole_s'] / max(times):.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="100M", choices=["1M", "10M", "100M"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda", action="store_true", help="the one-GPU 8-way projection")
    parser.add_argument("--params", type=float, default=2.1e9)
    parser.add_argument("--scratch", type=Path, help="where model files go (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    info = machine_info()
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        if args.cuda:
            report = gpu_run(args.params, Path(tmp), args.repeats)
            print_gpu(report)
        else:
            report = cpu_run(args.model, args.repeats, Path(tmp))
            print_cpu(report)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
