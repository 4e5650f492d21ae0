"""A short run of the coverage-guided fuzzer of the preamble, header and blob decoders
(``tests/fuzz/fuzz_decoders.py``): only ``MCNCError`` subclasses may escape them. The long
run (``nice -n 19 python tests/fuzz/fuzz_decoders.py CORPUS -max_total_time=2700``) is made
by hand; what it found is fixed and pinned by tests in test_robustness.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_decoders.py"
SECONDS = 20


def test_the_decoders_survive_a_short_fuzzing_run(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(HARNESS), str(tmp_path / "corpus"), f"-max_total_time={SECONDS}",
         "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=SECONDS + 240)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name != "corpus")
    assert run.returncode == 0 and not found, (found, run.stderr[-3000:])
    assert "Done" in run.stderr
