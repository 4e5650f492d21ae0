"""Peak memory of ``mcnc pack`` on a large sharded checkpoint: streamed against read-it-all.

A model of about ``--params`` parameters (default 1e9) in ``nn.Linear`` layers of
``--width`` x ``--width``, with MCNC-LoRA adapters on every layer (``add_mcnc_lora``), is
saved as a safetensors shard set of about four shards with ``model.safetensors.index.json``
(``huggingface_hub.save_torch_state_dict``, the writer of ``save_pretrained``) in ``--dtype``
(bfloat16: 2 GB for 1e9 parameters). Then, each in a fresh process:

* **streamed**: ``mcnc_format.converters.pack(folder, out)``: the shard-set converter reads
  tensor by tensor and the writer spools each blob as it goes;
* **read-it-all** (the alternative, what ``pack`` did before): every shard read with
  ``safetensors.torch.load_file``, ``export_state_dict`` of the whole state dict, ``save``.

Both write the same file (theta0 of each adapted layer stored: the output is as large as the
checkpoint, so the writer is exercised at full size), which is checked. Each process reports
its peak RSS (``ru_maxrss``, which counts memory-mapped file pages it touched too) and its
RSS after the imports; the script prints both, the largest tensor, the ratio, and the machine.
The checkpoint and outputs are written under ``--dir`` (default: a new folder in /tmp, on the
machine's disk here) and deleted afterwards; the writer's spool file goes beside the output.

Usage: ``nice python benchmarks/bench_pack.py [--params 1e9] [--width 8192] [--dtype
bfloat16] [--json out.json]``; ``--params 2e7 --width 1024`` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_load import machine_info


def _rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(folder: Path, params: float, width: int, dtype: str) -> dict[str, Any]:
    """The adapted model's state dict as a shard set (four shards or so)."""
    from huggingface_hub import save_torch_state_dict
    from torch import nn

    from mcnc_format.torch import MCNCConfig, add_mcnc_lora

    layers = max(1, round(params / (width * width + width)))
    torch.set_default_dtype(getattr(torch, dtype))
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    torch.set_default_dtype(torch.float32)
    add_mcnc_lora(model, MCNCConfig(k=8, d=4096, hidden=(32, 32), seed=1),
                  target_modules=["*"], rank=16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    save_torch_state_dict(state, folder, max_shard_size=total // 4)
    largest = max(t.numel() * t.element_size() for t in state.values())
    return {"layers": layers, "parameters": sum(p.numel() for p in model.parameters()),
            "tensors": len(state), "largest_tensor_bytes": largest,
            "checkpoint_bytes": sum(p.stat().st_size for p in folder.iterdir()),
            "shards": len(list(folder.glob("*.safetensors")))}


def streamed(folder: Path, out: Path) -> dict[str, Any]:
    from mcnc_format.converters.pack import pack

    after_imports = _rss_now_mib()
    start = time.perf_counter()
    pack(folder, out)
    return {"seconds": time.perf_counter() - start, "rss_after_imports_mib": after_imports,
            "peak_rss_mib": _peak_mib()}


def read_it_all(folder: Path, out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    import mcnc_format as mf
    from mcnc_format.torch.export import export_state_dict

    after_imports = _rss_now_mib()
    start = time.perf_counter()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(index["weight_map"].values()):
        state.update(load_file(folder / shard))
    mf.save(out, export_state_dict(state))
    return {"seconds": time.perf_counter() - start, "rss_after_imports_mib": after_imports,
            "peak_rss_mib": _peak_mib()}


def _child(stage: str, *args: str) -> dict[str, Any]:
    """Run one stage in a fresh process; its JSON result."""
    done = subprocess.run([sys.executable, __file__, "--stage", stage, *args],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"stage {stage} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.stage is not None:
        stages = {"build": lambda a: build(Path(a[0]), float(a[1]), int(a[2]), a[3]),
                  "streamed": lambda a: streamed(Path(a[0]), Path(a[1])),
                  "read-it-all": lambda a: read_it_all(Path(a[0]), Path(a[1]))}
        print(json.dumps(stages[options.stage](options.args)))
        return
    root = Path(tempfile.mkdtemp(prefix="mcnc-bench-pack-", dir=options.dir))
    try:
        folder = root / "checkpoint"
        checkpoint = _child("build", str(folder), str(options.params), str(options.width),
                            options.dtype)
        results = {"machine": machine_info(), "checkpoint": checkpoint, "dtype": options.dtype,
                   "streamed": _child("streamed", str(folder), str(root / "streamed.mcnc")),
                   "read_it_all": _child("read-it-all", str(folder),
                                         str(root / "read-it-all.mcnc"))}
        same = _sha256(root / "streamed.mcnc") == _sha256(root / "read-it-all.mcnc")
        results["identical_files"] = same
        results["output_bytes"] = (root / "streamed.mcnc").stat().st_size
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _report(results)
    if options.json is not None:
        options.json.write_text(json.dumps(results, indent=2))
    if not same:
        sys.exit("the streamed and the read-it-all files differ")


def _report(results: dict[str, Any]) -> None:
    c, s, r = results["checkpoint"], results["streamed"], results["read_it_all"]
    mib = 1 << 20
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"torch {results['machine']['torch']}")
    print(f"checkpoint: {c['parameters'] / 1e9:.2f}e9 parameters ({results['dtype']}), "
          f"{c['tensors']} tensors in {c['shards']} shards, {c['checkpoint_bytes'] / mib:,.0f} "
          f"MiB; largest tensor {c['largest_tensor_bytes'] / mib:,.0f} MiB; output "
          f"{results['output_bytes'] / mib:,.0f} MiB; identical files: "
          f"{results['identical_files']}")
    for label, row in (("streamed (mcnc pack)", s), ("read-it-all", r)):
        print(f"{label:22s} peak RSS {row['peak_rss_mib']:8,.0f} MiB (after imports "
              f"{row['rss_after_imports_mib']:6,.0f} MiB; above them "
              f"{row['peak_rss_mib'] - row['rss_after_imports_mib']:8,.0f} MiB) "
              f"{row['seconds']:6.1f} s")
    above = s["peak_rss_mib"] - s["rss_after_imports_mib"]
    print(f"streamed peak above imports: {above / (c['largest_tensor_bytes'] / mib):.2f}x the "
          f"largest tensor; read-it-all / streamed peak: "
          f"{r['peak_rss_mib'] / s['peak_rss_mib']:.1f}x")


if __name__ == "__main__":
    main()
