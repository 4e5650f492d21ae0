"""Start-up time of the ``mcnc`` command, against what importing torch alone costs.

``mcnc --version``, ``--help``, ``inspect``, ``push`` and ``pull`` import no torch
(tests/test_cli_startup.py checks which modules they load); this measures what that buys. Each
command runs in a fresh interpreter, ``--repeat`` times; the median wall time is printed next to
the median of ``python -c "import torch"``, the floor every command paid before.

    python benchmarks/bench_startup.py [--repeat 5] [FILE.mcnc]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _median_seconds(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sample_file(folder: Path) -> Path:
    import torch

    import mcnc_format as mf

    spec = mf.GeneratorSpec(k=8, d=1000, hidden=(32, 32), seed=1)
    segment = mf.Segment(spec, torch.rand(200, 1, 8) * 2 - 1, 0.01 * torch.randn(200, 1))
    return mf.save(folder / "sample.mcnc", {"w": mf.MCNC(segment, (400, 500)),
                                            "b": torch.ones(400)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, help="an .mcnc file for inspect")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    # The mcnc beside this interpreter first: the one on PATH may belong to another install
    # (or be missing when the venv is not activated), and would be timed against this torch.
    beside = Path(sys.executable).parent / "mcnc"
    mcnc = (str(beside) if beside.is_file() else shutil.which("mcnc")) or sys.exit(
        f"no mcnc beside {sys.executable} nor on PATH: pip install -e . first")
    with tempfile.TemporaryDirectory() as tmp:
        file = args.file or _sample_file(Path(tmp))
        torch_floor = _median_seconds([sys.executable, "-c", "import torch"], args.repeat)
        print(f"load average {os.getloadavg()[0]:.2f}; median of {args.repeat} runs")
        print(f"{'command':<28} {'seconds':>8} {'/ import torch':>15}")
        floor_label = 'python -c "import torch"'
        print(f"{floor_label:<28} {torch_floor:8.2f} {1.0:15.2f}")
        for label, command in (("mcnc --version", [mcnc, "--version"]),
                               ("mcnc --help", [mcnc, "--help"]),
                               ("mcnc inspect FILE", [mcnc, "inspect", str(file)])):
            seconds = _median_seconds(command, args.repeat)
            print(f"{label:<28} {seconds:8.2f} {seconds / torch_floor:15.2f}")


if __name__ == "__main__":
    main()
