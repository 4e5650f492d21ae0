"""A GPU run's record: what ``benchmarks/gpu_check.sh`` measured, in the form that is committed.

``record`` reads one check's output folder (``bench_gpu.json``, ``pytest.xml``, and where the
extras ran ``bench_lora.json``, ``bench_adapters.json``, ``bench_distributed.json``) and
writes ``gpu-DATE-DEVICE.json``: the issue 25 figures under fixed keys, the test counts, each
target's verdict, and each ``GpuPath``'s verdict. A path passes when at least one test that
``proves`` it (tests/gpu_marks.py) ran and passed, none failed, and its kernel error in
``bench_gpu.py`` section (e), where measured, is within SPEC.md §10.1's bound.
``engine.options.MEASURED_ON_GPU`` may name a path only when a committed record passes it
(tests/test_gpu_record.py holds the code to that).

``merge`` joins the record of a second call (the extras alone, ``GPU_MAIN=0``) into the
first's. ``table`` prints the committed records as the markdown docs/benchmarks.md shows.

Usage::

    python benchmarks/gpu_record.py record OUT [--commit SHA] [--into DIR]
    python benchmarks/gpu_record.py merge FIRST.json SECOND.json [-o FILE]
    python benchmarks/gpu_record.py table [FILE.json ...]   # default: benchmarks/results/gpu-*

Torch-free: it reads files only, so it runs anywhere the records are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_targets import TARGETS, gpu_peak_allowed

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1
#: The values of ``mcnc_format.engine.options.GpuPath``, kept here so that reading a record
#: needs neither torch nor the package (the test checks that the two lists agree).
GPU_PATHS = ("kernel-ieee", "kernel-bf16x3", "lora-merge-kernel", "philox-kernel")
#: A kernel path's product in ``bench_gpu.py`` section (e), and the bound its error must meet.
KERNEL_ERRORS = {"kernel-ieee": ("ieee", "fp32_rel_error"),
                 "kernel-bf16x3": ("bf16x3", "narrow_rel_error")}
PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
#: The device of a record made without a GPU (``BENCH_ARGS=--small`` on any machine): it
#: checks the scripts and proves nothing.
DRY_RUN = "no GPU (dry run)"

#: Every figure of a record: its meaning, and its target as (comparison, TARGETS key) or None.
FIGURES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "regeneration_values_per_s": (
        "fused kernel, LLaMA generator (k=5, hidden 32,32, d=5000), bf16 output, values per "
        "second at the best tile (bench_gpu.py (a))", (">=", "fused_llama_params_per_s")),
    "regeneration_values_per_s_vision": (
        "the same for the vision generator (k=16, hidden 256,256, d=1600)", None),
    "regeneration_error": (
        "largest float32 relative error of a load against the float64 reference, LLaMA and "
        "vision generators (bench_gpu.py (e); SPEC.md §10.1)", ("<=", "fp32_rel_error")),
    "scratch_load_ratio_warm": (
        "2.1 B parameters from scratch: mcnc load time over safetensors.torch.load_file("
        "device='cuda') of the dense export, page cache warm", ("<=", "warm_ratio")),
    "scratch_load_ratio_cold": ("the same, page cache dropped", ("<=", "cold_ratio")),
    "base_delta_ratio_warm_cached": (
        "base + MCNC delta over safetensors' load of the base alone, warm, verify='cached'",
        ("<=", "delta_ratio")),
    "base_delta_ratio_warm_full": (
        "the same with verify='full' (every byte of the base hashed)",
        ("<=", "delta_ratio_full")),
    "base_delta_ratio_cold": (
        "base + delta, page cache dropped, verify='cached'", ("<=", "delta_cold_ratio")),
    "gpu_peak_over_weights": (
        "largest GPU peak of an mcnc load (max_memory_allocated) over its outputs' bytes; "
        "target: peak <= weights + max(64 MiB, 2 %)", None),
    "lora_merged_over_base": (
        "an MCNC-LoRA merged while its Llama-2-7B-shaped base streams in, over the base "
        "alone, digest cached (bench_lora.py)", ("<=", "lora_merged_over_base")),
    "adapters_per_gib": (
        "adapters resident per GiB, the adapter bank over PEFT's dense LoRA (bench_adapters.py)",
        (">=", "adapters_per_gib")),
    "adapter_switch_speedup": (
        "PEFT load_adapter (warm) over the bank's rebuild of an uncached adapter",
        (">=", "adapter_switch_speedup")),
    "mixed_batch_speedup": (
        "tokens/s of one mixed batch through the bank over PEFT one adapter at a time",
        (">=", "mixed_batch_speedup")),
    "projected_8gpu_ratio": (
        "2.1 B parameters split 8 ways (the worse of FSDP2 rows and TP): slowest rank's load "
        "over the whole model's on one GPU; 0.125 is a perfect split (bench_distributed.py)",
        None),
}


# -- reading a check's output ----------------------------------------------------------------


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{path.name}: {exc}"}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ratio(top: Any, bottom: Any) -> float | None:
    a, b = _number(top), _number(bottom)
    return None if a is None or b is None or b == 0 else a / b


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def junit_outcomes(junit: Path) -> tuple[dict[str, Any], dict[str, dict[str, list[str]]]]:
    """Counts of a junit report, and for each GPU path the tests that passed, failed or were
    skipped among those that carry it (their ``gpu_path`` properties)."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                              "failing": []}
    paths: dict[str, dict[str, list[str]]] = {}
    if not junit.is_file():
        return {**counts, "missing": junit.name}, paths
    try:
        cases = ElementTree.parse(junit).getroot().iter("testcase")
    except ElementTree.ParseError as exc:
        return {**counts, "unreadable": f"{junit.name}: {exc}"}, paths
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "errors"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            counts["failing"].append(name)
        for prop in case.iter("property"):
            if prop.get("name") == "gpu_path":
                paths.setdefault(prop.get("value", ""), {}).setdefault(outcome, []).append(name)
    return counts, paths


def path_verdicts(outcomes: dict[str, dict[str, list[str]]], accuracy: dict[str, Any]
                  ) -> dict[str, dict[str, Any]]:
    """Each GPU path's verdict from its tests' outcomes and its kernel error, if measured."""
    verdicts: dict[str, dict[str, Any]] = {}
    for path in GPU_PATHS:
        seen = outcomes.get(path, {})
        bad = seen.get("failed", []) + seen.get("errors", [])
        entry: dict[str, Any] = {"passed": len(seen.get("passed", [])), "failing": bad}
        verdict = FAIL if bad else PASS if seen.get("passed") else NOT_RUN
        if path in KERNEL_ERRORS:
            product, bound = KERNEL_ERRORS[path]
            errors = {label: _number(accuracy.get(f"{label}_{product}_product_max_rel_error"))
                      for label in ("llama", "vision")}
            measured = {k: v for k, v in errors.items() if v is not None}
            if measured:
                entry["max_rel_error"] = measured
                entry["bound"] = TARGETS[bound]
                if max(measured.values()) > TARGETS[bound]:
                    verdict = FAIL
        entry["verdict"] = verdict
        verdicts[path] = entry
    return verdicts


def figures(out: Path) -> dict[str, Any]:
    """The record's figures from the benchmark reports in ``out`` (None where not measured)."""
    bench = _load_json(out / "bench_gpu.json")
    llama, vision = bench.get("a_llama", {}), bench.get("a_vision", {})
    accuracy = bench.get("e_accuracy", {})
    scratch, full = bench.get("b_scratch", {}), bench.get("c_delta", {})
    cached = bench.get("c_delta_cached", {})
    peaks = [(_number(r.get("mcnc_memory", {}).get("gpu_peak_bytes")),
              _number(r.get("weights_bytes"))) for r in (scratch, full, cached)]
    peaks = [(p, w) for p, w in peaks if p is not None and w]
    lora = _load_json(out / "bench_lora.json")
    adapters = _load_json(out / "bench_adapters.json")
    switch = adapters.get("switch", {})
    tokens = adapters.get("throughput", {}).get("tokens_per_s", {})
    distributed = _load_json(out / "bench_distributed.json")
    whole = _number(distributed.get("whole_s"))
    splits = distributed.get("splits", {})
    projected = _max(_ratio(max(times), whole) for times in splits.values()
                     if isinstance(times, list) and times and whole)
    return {
        "regeneration_values_per_s": _number(llama.get("fused_params_per_s")),
        "regeneration_values_per_s_vision": _number(vision.get("fused_params_per_s")),
        "regeneration_error": _max(_number(accuracy.get(f"{label}_fp32_max_rel_error"))
                                   for label in ("llama", "vision")),
        "scratch_load_ratio_warm": _number(scratch.get("warm_ratio")),
        "scratch_load_ratio_cold": _number(scratch.get("cold_ratio")),
        "base_delta_ratio_warm_cached": _number(cached.get("warm_ratio")),
        "base_delta_ratio_warm_full": _number(full.get("warm_ratio")),
        "base_delta_ratio_cold": _number(cached.get("cold_ratio")),
        "gpu_peak_over_weights": _max(p / w for p, w in peaks),
        "gpu_peak_within_bound": (all(p <= gpu_peak_allowed(w) for p, w in peaks)
                                  if peaks else None),
        "lora_merged_over_base": _number(lora.get("cached", {}).get("ratio")),
        "adapters_per_gib": _number(adapters.get("resident", {}).get("ratio")),
        "adapter_switch_speedup": _ratio(switch.get("peft_warm"), switch.get("rebuild")),
        "mixed_batch_speedup": _ratio(tokens.get("mixed"), tokens.get("peft")),
        "projected_8gpu_ratio": projected,
    }


def target_verdicts(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target's verdict from a record's figures: met, missed, or not measured (None)."""
    verdicts: dict[str, dict[str, Any]] = {}
    for key, (_, target) in FIGURES.items():
        if target is None:
            continue
        comparison, name = target
        value, bound = record.get(key), TARGETS[name]
        met = None if value is None else value >= bound if comparison == ">=" else (
            value <= bound)
        verdicts[key] = {"target": f"{comparison} {bound:.6g}", "met": met}
    verdicts["gpu_peak_over_weights"] = {"target": "peak <= weights + max(64 MiB, 2 %)",
                                         "met": record.get("gpu_peak_within_bound")}
    return verdicts


def _commit(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("MCNC_COMMIT"):
        return os.environ["MCNC_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"],
                              cwd=ROOT, capture_output=True, text=True, check=True
                              ).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_record(out: Path, commit: str | None = None) -> dict[str, Any]:
    """The record of the check whose output folder is ``out``."""
    bench = _load_json(out / "bench_gpu.json")
    machine = bench.get("machine", {})
    extras = [_load_json(out / f"bench_{name}.json").get("machine", {})
              for name in ("lora", "adapters", "distributed")]
    tests, outcomes = junit_outcomes(out / "pytest.xml")
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "device": machine.get("gpu") or _device_from_versions(out) or (
            DRY_RUN if machine.get("device") == "cpu" else "unknown"),
        "date": machine.get("date") or next((m["date_utc"] for m in extras if "date_utc" in m),
                                            None) or _now(),
        "commit": _commit(commit),
        "torch": machine.get("torch") or next((m["torch"] for m in extras if "torch" in m),
                                              None),
        "triton": machine.get("triton"),
        "cuda": machine.get("cuda"),
        "python": machine.get("python"),
        **figures(out),
        "tests": tests,
        "paths": path_verdicts(outcomes, bench.get("e_accuracy", {})),
        "errors": {key: str(text).strip().splitlines()[-1] if str(text).strip() else ""
                   for key, text in bench.get("errors", {}).items()},
    }
    record["targets"] = target_verdicts(record)
    record["definitions"] = {key: meaning for key, (meaning, _) in FIGURES.items()}
    return record


def _device_from_versions(out: Path) -> str | None:
    try:
        text = (out / "versions.txt").read_text()
    except OSError:
        return None
    found = re.search(r"^gpu (.+?) [0-9.]+ GiB", text, re.MULTILINE)
    return found.group(1) if found else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_name(record: dict[str, Any]) -> str:
    """``gpu-DATE-DEVICE.json``: the run's day and its GPU's name, lowercase, dashed."""
    day = str(record.get("date", ""))[:10] or "undated"
    device = re.sub(r"[^a-z0-9]+", "-", str(record.get("device", "unknown")).lower()).strip("-")
    return f"gpu-{day}-{device or 'unknown'}.json"


# -- joining two calls' records --------------------------------------------------------------


def merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """``first`` with ``second``'s figures where ``first`` has none: a second call on the same
    machine (the extras) completes the first call's record. Test counts add; a path failed in
    either call fails."""
    if first.get("device") != second.get("device"):
        raise SystemExit(f"records of different devices: {first.get('device')!r} and "
                         f"{second.get('device')!r}")
    merged = dict(first)
    for key in FIGURES:
        if merged.get(key) is None:
            merged[key] = second.get(key)
    if merged.get("gpu_peak_within_bound") is None:
        merged["gpu_peak_within_bound"] = second.get("gpu_peak_within_bound")
    tests = dict(first.get("tests", {}))
    for key, value in second.get("tests", {}).items():
        if isinstance(value, int):
            tests[key] = tests.get(key, 0) + value
        elif isinstance(value, list):
            tests[key] = [*tests.get(key, []), *value]
    merged["tests"] = tests
    paths = {}
    rank = {FAIL: 2, PASS: 1, NOT_RUN: 0}
    for path in GPU_PATHS:
        a = first.get("paths", {}).get(path, {"verdict": NOT_RUN})
        b = second.get("paths", {}).get(path, {"verdict": NOT_RUN})
        paths[path] = a if rank[a["verdict"]] >= rank[b["verdict"]] else b
    merged["paths"] = paths
    merged["errors"] = {**second.get("errors", {}), **first.get("errors", {})}
    merged["targets"] = target_verdicts(merged)
    return merged


# -- the table docs/benchmarks.md shows ------------------------------------------------------

TABLE_BEGIN = "<!-- gpu-records: written by benchmarks/gpu_record.py table -->"
TABLE_END = "<!-- /gpu-records -->"


def _cell(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return "not measured"
    if key.startswith("regeneration_values"):
        text = f"{value / 1e12:.3f} T/s"
    elif key in ("adapters_per_gib", "adapter_switch_speedup", "mixed_batch_speedup"):
        text = f"{value:,.1f}x"
    else:
        text = f"{value:.3g}"
    met = record.get("targets", {}).get(key, {}).get("met")
    return text if met is None else f"{text} ({'met' if met else 'missed'})"


def table(records: list[dict[str, Any]]) -> str:
    """The markdown of the records, one column per run, between the markers the docs test
    looks for."""
    lines = [TABLE_BEGIN]
    if not records:
        lines += ["No GPU run is recorded yet: `benchmarks/results/` holds no `gpu-*.json`."]
    else:
        lines += ["| | " + " | ".join(f"{r['device']}, {str(r['date'])[:10]}, "
                                      f"`{str(r['commit'])[:7]}`" for r in records) + " |",
                  "|---|" + "---|" * len(records)]
        lines.append("| tests passed / failed | " + " | ".join(
            f"{r['tests'].get('passed', 0)} / "
            f"{r['tests'].get('failed', 0) + r['tests'].get('errors', 0)}"
            for r in records) + " |")
        for key in FIGURES:
            target = FIGURES[key][1]
            label = key if target is None else (
                f"{key} (target {target[0]} {TARGETS[target[1]]:.3g})")
            lines.append(f"| {label} | " + " | ".join(_cell(r, key) for r in records) + " |")
        for path in GPU_PATHS:
            lines.append(f"| path `{path}` | " + " | ".join(
                r.get("paths", {}).get(path, {}).get("verdict", NOT_RUN) for r in records)
                + " |")
    lines.append(TABLE_END)
    return "\n".join(lines) + "\n"


def committed_records(directory: Path = RESULTS) -> list[dict[str, Any]]:
    """The committed records, oldest first."""
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("gpu-*.json"))]
    return sorted(records, key=lambda r: str(r.get("date", "")))


# -- command line ----------------------------------------------------------------------------


def _write(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    passed = [p for p, v in record["paths"].items() if v["verdict"] == PASS]
    failed = [p for p, v in record["paths"].items() if v["verdict"] == FAIL]
    print(f"paths proved: {', '.join(passed) or 'none'}; failed: {', '.join(failed) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    rec = verbs.add_parser("record", help="a check's output folder -> its record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--commit", help="the commit the check ran (default: $MCNC_COMMIT, git)")
    rec.add_argument("--into", type=Path, help="folder for the record (default: OUT)")
    mer = verbs.add_parser("merge", help="a second call's record into the first's")
    mer.add_argument("first", type=Path)
    mer.add_argument("second", type=Path)
    mer.add_argument("-o", "--output", type=Path, help="default: FIRST, rewritten")
    tab = verbs.add_parser("table", help="markdown of records for docs/benchmarks.md")
    tab.add_argument("files", type=Path, nargs="*")
    args = parser.parse_args(argv)
    if args.verb == "record":
        record = build_record(args.out, args.commit)
        _write(record, (args.into or args.out) / record_name(record))
    elif args.verb == "merge":
        record = merge(json.loads(args.first.read_text()), json.loads(args.second.read_text()))
        _write(record, args.output or args.first)
    else:
        records = ([json.loads(p.read_text()) for p in args.files] if args.files
                   else committed_records())
        print(table(records), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
