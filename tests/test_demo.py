"""``mcnc demo`` and ``examples/finetune_lm.py``: the walk-throughs run offline and report
what they promise.

Both run at reduced size here (the demo's ``--quick``, the example's ``tiny``); the full
figures are in README.md and docs/finetune.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mcnc_format as mf
from mcnc_format.cli.demo_cmd import demo
from mcnc_format.examples.digits import load_digits, split_digits
from mcnc_format.header import LoRATensor

REQUIRED_KEYS = {"weights_ratio", "file_ratio", "mcnc_test_accuracy", "dense_test_accuracy",
                 "file_bytes", "dense_bytes", "dense_file_bytes"}


def test_digits_ship_with_the_package() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    a, b = split_digits(seed=3), split_digits(seed=3)
    assert a.y_test.tolist() == b.y_test.tolist() and len(a.x_test) == 359


def test_demo_json_quick(tmp_path: Path) -> None:
    result = CliRunner().invoke(demo, ["--json", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert set(summary) >= REQUIRED_KEYS
    assert summary["weights_ratio"] >= 40
    assert "compression_ratio" not in summary  # one name per ratio (README)
    with mf.open(tmp_path / "digits.mcnc") as f:  # the same figures as mcnc inspect
        facts = f.summary()
    assert summary["file_ratio"] == facts["file_ratio"]
    assert summary["weights_ratio"] == facts["weights_ratio"]
    assert summary["file_ratio"] == pytest.approx(summary["dense_bytes"] / summary["file_bytes"])
    assert summary["predictions_match"] is True
    assert 0.5 < summary["mcnc_test_accuracy"] <= 1.0
    assert summary["file_bytes"] == (tmp_path / "digits.mcnc").stat().st_size
    assert summary["dense_bytes"] > 20 * summary["file_bytes"]


def test_demo_walkthrough_shows_inspect() -> None:
    result = CliRunner().invoke(demo, ["--quick"])
    assert result.exit_code == 0, result.output
    for text in ("test accuracy", "file ratio", "weights ratio", "tensors", "generators",
                 "load time", "files removed"):
        assert text in result.output


def test_finetune_example_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).parents[1] / "examples" / "finetune_lm.py"
    spec = importlib.util.spec_from_file_location("finetune_lm", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "finetune_lm", example)  # dataclasses look it up
    spec.loader.exec_module(example)
    steps: list[str] = []
    result = example.run("tiny", tmp_path, log=steps.append)
    assert [line[:3] for line in steps if not line.startswith(" ")] == [
        "1/5", "2/5", "3/5", "4/5", "5/5"]
    assert any("MCNC-LoRA: step 10/10" in line for line in steps)  # training reports its steps
    counts = result["trainable_parameters"]
    assert 0 < counts["mcnc_lora"] < counts["lora"]
    assert result["max_logit_difference"] <= 1e-4
    assert set(result["validation_loss"]) == {"base", "mcnc_lora", "lora"}
    with mf.open(tmp_path / "adapter.mcnc") as f:
        names = f.keys()
        assert names and all(isinstance(f.entry(n), LoRATensor) for n in names)
        assert {f.entry(n).theta0.uri for n in names} == {"base.safetensors"}
