"""The GPU check's plumbing, which a lent GPU's few minutes depend on, checked without one.

``benchmarks/gpu_check.sh`` runs end to end at toy sizes (its tests all skip here) and leaves
what the device tool can return; ``gpu_record.py`` turns real benchmark and pytest reports
into a record whose path verdicts follow the tests' ``gpu_path`` marks; every test that needs
CUDA is in ``-m gpu`` and every ``GpuPath`` has a test that proves it; ``MEASURED_ON_GPU``
names only paths a recorded run passed; docs/benchmarks.md shows the committed records.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mcnc_format.engine.options import MEASURED_ON_GPU, GpuPath

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_record  # noqa: E402 (a script module beside the benchmarks)

#: Measured on a GPU before records existed: 2026-12-04 18:29 UTC, commit ccffa07, NVIDIA
#: H200 (the compiled-kernel tests and 0.204 T values/s; docs/gpu.md names the run). Any path
#: added to ``MEASURED_ON_GPU`` since needs a committed record that passes it.
MEASURED_BEFORE_RECORDS = frozenset({GpuPath.KERNEL_IEEE})


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_the_record_knows_every_gpu_path() -> None:
    assert tuple(p.value for p in GpuPath) == gpu_record.GPU_PATHS


_COLLECT_PLUGIN = """
import json, os

def pytest_collection_finish(session):
    items = []
    for item in session.items:
        reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")]
        items.append({"id": item.nodeid, "gpu": item.get_closest_marker("gpu") is not None,
                      "paths": [v for m in item.iter_markers("gpu_path") for v in m.args],
                      "reasons": reasons})
    with open(os.environ["COLLECTED"], "w") as f:
        json.dump(items, f)
"""


def test_every_cuda_test_is_in_the_gpu_selection_and_every_path_has_a_proof(
        tmp_path: Path) -> None:
    """What ``pytest -m gpu`` collects: a test skipped for want of a GPU that is not marked
    ``gpu`` would never run on a lent one; a path no test proves could never be recorded."""
    pytest.importorskip("transformers")  # collecting every module needs every test extra
    (tmp_path / "collect_plugin.py").write_text(_COLLECT_PLUGIN)
    out = tmp_path / "collected.json"
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    env["COLLECTED"] = str(out)
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "collect_plugin", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    items = json.loads(out.read_text())
    assert len(items) > 500
    unmarked = [i["id"] for i in items if not i["gpu"] and any(
        "CUDA" in r or "GPU" in r for r in i["reasons"])]
    assert not unmarked, f"skipped without a GPU but not marked gpu: {unmarked[:10]}"
    outside = [i["id"] for i in items if i["paths"] and not i["gpu"]]
    assert not outside, f"prove a GPU path but are not marked gpu: {outside[:10]}"
    proved = {p for i in items for p in i["paths"]}
    assert proved == set(gpu_record.GPU_PATHS), set(gpu_record.GPU_PATHS) - proved


def _fake_gpu_tests(directory: Path) -> Path:
    """A pytest run with one outcome per GPU path, through the real ``gpu_marks`` plugin."""
    test = directory / "test_fake_gpu.py"
    test.write_text(textwrap.dedent("""
        import pytest
        from gpu_marks import proves
        from mcnc_format.engine.options import GpuPath

        @proves(GpuPath.KERNEL_IEEE, GpuPath.PHILOX_KERNEL)
        def test_ieee_and_philox():
            pass

        @proves(GpuPath.PHILOX_KERNEL)
        def test_philox_again():
            pass

        @proves(GpuPath.KERNEL_BF16X3)
        def test_bf16x3():
            assert False, "a wrong product"

        @proves(GpuPath.LORA_MERGE_KERNEL)
        @pytest.mark.skip(reason="needs a CUDA GPU")
        def test_lora_merge():
            pass

        def test_unrelated():
            pass
    """))
    junit = directory / "pytest.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_marks", "-p",
                    "no:cacheprovider", f"--junitxml={junit}", str(test)],
                   cwd=directory, env=_env(), capture_output=True, timeout=120)
    return junit


def _bench(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``bench_gpu.json`` as a GPU run writes it (the keys ``bench_gpu.main`` fills)."""
    peak = {"gpu_peak_bytes": 4.0 * 2**30 + (32 << 20), "host_peak_bytes": 1 << 20}
    return {
        "machine": {"date": "2026-12-07T08:00:00+00:00", "python": "3.12.3",
                    "torch": "2.11.0+cu130", "triton": "3.6.0", "device": "cuda",
                    "gpu": "NVIDIA H100 80GB HBM3", "cuda": "13.0"},
        "a_llama": {"fused_params_per_s": 1.2e12}, "a_vision": {"fused_params_per_s": 4e11},
        "e_accuracy": {"llama_fp32_max_rel_error": 3e-7, "vision_fp32_max_rel_error": 2e-7,
                       "llama_ieee_product_max_rel_error": 3e-7,
                       "llama_bf16x3_product_max_rel_error": 2e-5,
                       "vision_bf16x3_product_max_rel_error": 1.4e-5},
        "b_scratch": {"warm_ratio": 0.02, "cold_ratio": 0.05, "weights_bytes": 4.0 * 2**30,
                      "mcnc_memory": peak},
        "c_delta": {"warm_ratio": 0.6, "weights_bytes": 4.0 * 2**30, "mcnc_memory": peak},
        "c_delta_cached": {"warm_ratio": 0.3, "cold_ratio": 1.05},
        "errors": {"f_slice": "Traceback (most recent call last):\n  ...\nRuntimeError: x"},
        **(extra or {}),
    }


@pytest.fixture(scope="module")
def gpu_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPU check's output folder: the fake tests' junit report and a bench report."""
    out = tmp_path_factory.mktemp("gpu-out")
    _fake_gpu_tests(out)
    (out / "bench_gpu.json").write_text(json.dumps(_bench()))
    return out


def test_a_record_follows_the_reports(gpu_out: Path, tmp_path: Path) -> None:
    record = gpu_record.build_record(gpu_out, "abc1234")
    assert gpu_record.record_name(record) == "gpu-2026-12-07-nvidia-h100-80gb-hbm3.json"
    assert (record["device"], record["commit"], record["torch"], record["triton"]) == (
        "NVIDIA H100 80GB HBM3", "abc1234", "2.11.0+cu130", "3.6.0")
    assert record["tests"]["passed"] == 3 and record["tests"]["failed"] == 1
    assert record["tests"]["skipped"] == 1
    assert record["tests"]["failing"] == ["test_fake_gpu::test_bf16x3"]
    verdicts = {p: v["verdict"] for p, v in record["paths"].items()}
    assert verdicts == {"kernel-ieee": "pass", "philox-kernel": "pass",
                        "kernel-bf16x3": "fail", "lora-merge-kernel": "not run"}
    assert record["paths"]["philox-kernel"]["passed"] == 2
    assert record["regeneration_values_per_s"] == 1.2e12
    assert record["regeneration_error"] == 3e-7
    assert record["base_delta_ratio_warm_full"] == 0.6
    assert record["base_delta_ratio_cold"] == 1.05
    assert record["gpu_peak_over_weights"] == pytest.approx(1 + 32 / 4096)
    met = {k: v["met"] for k, v in record["targets"].items()}
    assert met["regeneration_values_per_s"] and met["scratch_load_ratio_warm"]
    assert met["scratch_load_ratio_cold"] is False and met["base_delta_ratio_warm_full"] is False
    assert met["gpu_peak_over_weights"] is True and met["lora_merged_over_base"] is None
    assert record["errors"] == {"f_slice": "RuntimeError: x"}
    assert set(record["definitions"]) == set(gpu_record.FIGURES)
    # A kernel's measured error beyond its bound fails its path even where its tests pass.
    shutil.copy(gpu_out / "pytest.xml", tmp_path)
    wide = _bench({"e_accuracy": {"llama_ieee_product_max_rel_error": 3e-5}})
    (tmp_path / "bench_gpu.json").write_text(json.dumps(wide))
    assert gpu_record.build_record(tmp_path)["paths"]["kernel-ieee"]["verdict"] == "fail"


@pytest.mark.parametrize("tool", ["lora", "adapters"])
def test_the_extras_reports_give_their_figures(tmp_path: Path, tool: str) -> None:
    """The lora and adapter benchmarks' real JSON (quick sizes, on the CPU) fill their keys."""
    pytest.importorskip("transformers")  # the benchmarks' models
    report = tmp_path / f"bench_{tool}.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"bench_{tool}.py"), "--size",
                           "quick", "--json", str(report)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads(report.read_text())
    figures = gpu_record.figures(tmp_path)
    if tool == "lora":
        assert figures["lora_merged_over_base"] == raw["cached"]["ratio"]
    else:
        assert figures["adapters_per_gib"] == raw["resident"]["ratio"]
        assert figures["adapter_switch_speedup"] == pytest.approx(
            raw["switch"]["peft_warm"] / raw["switch"]["rebuild"])
        tokens = raw["throughput"]["tokens_per_s"]
        assert figures["mixed_batch_speedup"] == pytest.approx(tokens["mixed"] / tokens["peft"])


def test_the_8_way_projection_is_the_worse_split(tmp_path: Path) -> None:
    (tmp_path / "bench_distributed.json").write_text(json.dumps(
        {"whole_s": 2.0, "splits": {"FSDP2 (rows)": [0.2, 0.3], "TP": [0.25, 0.5, 0.1]}}))
    assert gpu_record.figures(tmp_path)["projected_8gpu_ratio"] == 0.25


def test_a_second_calls_record_completes_the_first(gpu_out: Path, tmp_path: Path) -> None:
    first = gpu_record.build_record(gpu_out, "abc1234")
    extras = tmp_path / "extras"
    extras.mkdir()
    (extras / "versions.txt").write_text("python 3.12.3\ngpu NVIDIA H100 80GB HBM3 79.2 GiB "
                                         "sm 132\n")
    (extras / "bench_lora.json").write_text(json.dumps(
        {"machine": {"date_utc": "2026-12-07 08:09"}, "cached": {"ratio": 1.04}}))
    second = gpu_record.build_record(extras, "abc1234")
    assert second["device"] == first["device"] and second["tests"]["passed"] == 0
    merged = gpu_record.merge(first, second)
    assert merged["lora_merged_over_base"] == 1.04
    assert merged["targets"]["lora_merged_over_base"]["met"] is True
    assert merged["regeneration_values_per_s"] == 1.2e12 and merged["tests"]["passed"] == 3
    assert merged["paths"]["kernel-bf16x3"]["verdict"] == "fail"
    other = {**second, "device": "NVIDIA H200"}
    with pytest.raises(SystemExit, match="different devices"):
        gpu_record.merge(first, other)


def test_the_check_runs_end_to_end_and_leaves_what_the_device_tool_returns(
        tmp_path: Path) -> None:
    """``gpu_check.sh`` at toy sizes, as a lent GPU would run it: its tests all skip here, so
    its record proves nothing, but every step runs and $OUT stays within the tool's eight
    files."""
    pytest.importorskip("transformers")  # collecting every module needs every test extra
    out = tmp_path / "out"
    env = {**_env(), "OUT": str(out), "BENCH_ARGS": "--small", "MCNC_COMMIT": "dry",
           "GPU_INSTALL": "0", "PYTHON": sys.executable, "SCRATCH": str(tmp_path / "scratch")}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"summary.md", "logs.tar.gz", "bench_gpu.json"} <= set(files)
    [name] = [f for f in files if f.startswith("gpu-")]
    record = json.loads((out / name).read_text())
    assert record["device"] == gpu_record.DRY_RUN and record["commit"] == "dry"
    assert record["tests"]["failed"] == record["tests"]["errors"] == 0
    assert record["tests"]["skipped"] > 100  # the whole -m gpu selection, collected
    assert all(v["verdict"] == "not run" for v in record["paths"].values())
    assert record["scratch_load_ratio_warm"] is not None  # the CPU times its loads too
    assert "tests (rc 0)" in (out / "summary.md").read_text()


def test_auto_picks_only_paths_a_record_passed() -> None:
    """``MEASURED_ON_GPU`` (what ``Precision.AUTO`` and ``use_triton=None`` may pick) grows only
    with a committed record of a GPU run that passed the path, and docs/gpu.md names a run for
    every path in it."""
    records = [r for r in gpu_record.committed_records() if r.get("device") != gpu_record.DRY_RUN]
    passed = {p for r in records for p, v in r["paths"].items() if v["verdict"] == "pass"}
    for path in MEASURED_ON_GPU - MEASURED_BEFORE_RECORDS:
        assert path.value in passed, f"{path} is in MEASURED_ON_GPU without a passing record"
    rows = [line for line in (ROOT / "docs" / "gpu.md").read_text().splitlines()
            if line.startswith("|") and "`GpuPath." in line]
    for path in GpuPath:
        [row] = [r for r in rows if f"`GpuPath.{path.name}`" in r]
        ran = not row.split("|")[3].strip().startswith("never run")
        assert ran or path not in MEASURED_ON_GPU, row


def test_the_docs_show_the_committed_records() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    begin, end = text.index(gpu_record.TABLE_BEGIN), text.index(gpu_record.TABLE_END)
    shown = text[begin:end + len(gpu_record.TABLE_END)] + "\n"
    assert shown == gpu_record.table(gpu_record.committed_records()), (
        "run `python benchmarks/gpu_record.py table` and paste its output into "
        "docs/benchmarks.md")
