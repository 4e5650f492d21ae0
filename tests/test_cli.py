"""The ``mcnc`` command (inspect, verify, unpack), ``verify_file``, README's example and the
benchmark's smoke run.

Each test file is built from fresh random values; the seed is printed (``-s`` shows it) and
pytest reports it on failure through the fixture's name in the traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

import mcnc_format as mcnc
from mcnc_format import constants as C
from mcnc_format.cli.main import cli
from mcnc_format.container import checksum
from mcnc_format.reader import tensor_sha256
from mcnc_format.verify import verify_file

REPO = Path(__file__).resolve().parents[1]
SEED = random.SystemRandom().randrange(2**31)


def _segment(spec: mcnc.GeneratorSpec, values: int, m: int, gen: torch.Generator,
             codec: str = C.Codec.RAW) -> mcnc.Segment:
    chunks = math.ceil(values / spec.d)
    alpha = torch.rand(chunks, m, spec.k, generator=gen) * 40 - 20
    beta = torch.randn(chunks, m, generator=gen) * 0.05
    return mcnc.Segment(spec, alpha, beta, codec)


def _write_model(path: Path, seed: int, *, beta_nan: bool = False) -> Path:
    """A small file with every encoding: mcnc (two theta0 kinds, f16 output), a dense tensor
    (zstd), packed float and int tensors sharing one blob, and a lora tensor whose factors live
    in a zstd segment and a raw one."""
    print(f"test file {path.name}: seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    main_gen = mcnc.GeneratorSpec(k=5, d=300, hidden=(16, 16), seed=seed % 2**32)
    lora_gen = mcnc.GeneratorSpec(k=4, d=64, hidden=(8,), seed=(seed + 1) % 2**32)
    shared = _segment(main_gen, 48 * 24 + 10 * 48, 1, gen)
    if beta_nan:
        shared.beta[0, 0] = float("nan")
    a_seg = _segment(lora_gen, 4 * 24, 2, gen, C.Codec.ZSTD)
    b_seg = _segment(lora_gen, 16 * 4, 2, gen)
    mcnc.save(path, {
        "encoder.weight": mcnc.MCNC(shared, (48, 24), theta0=mcnc.Theta0.fan_in_uniform(3, 0)),
        "encoder.bias": mcnc.Dense(torch.randn(48, generator=gen), C.Codec.ZSTD),
        "head.weight": mcnc.MCNC(shared, (10, 48), dtype=torch.float16),
        "head.bias": torch.randn(10, generator=gen).half(),
        "adapter.weight": mcnc.LoRA(A=mcnc.MCNC(a_seg, (4, 24)), B=mcnc.MCNC(b_seg, (16, 4)),
                                    scale=0.5, theta0=mcnc.Theta0.stored(
                                        torch.randn(16, 24, generator=gen))),
        "steps": torch.tensor([seed % 1000, 7], dtype=torch.int64),
    }, metadata={"task": "tests", "seed": str(seed)}, info={"producer": "tests/test_cli.py"})
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model(tmp_path_factory.mktemp("cli") / "model.mcnc", SEED)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _assert_one_line_error(result: Result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


# -- inspect -----------------------------------------------------------------------------------
def test_inspect_table_lists_tensors_summary_generators_and_segments(runner, model_file):
    result = runner.invoke(cli, ["inspect", str(model_file)])
    assert result.exit_code == 0, result.output
    out = result.output
    for name in ("encoder.weight", "encoder.bias", "head.weight", "head.bias", "adapter.weight",
                 "steps"):
        assert name in out
    for text in ("file ratio", "weights ratio", "dense equivalent", "format version",
                 "fan_in_uniform", "philox seed", "segments", "generators", "tests/test_cli.py",
                 "lora", "zstd", "dense", "packed"):
        assert text in out, text


def test_inspect_json_has_the_documented_keys_and_the_file_facts(runner, model_file):
    result = runner.invoke(cli, ["inspect", "--json", str(model_file)])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert set(facts) == {"file", "format_version", "alignment", "summary", "metadata", "info",
                          "tensors", "generators", "segments"}
    with mcnc.open(model_file) as f:
        summary = f.summary()
        assert facts["summary"] == {key: summary[key] for key in facts["summary"]}
        assert [t["name"] for t in facts["tensors"]] == f.keys()
        for t in facts["tensors"]:
            info = f.tensor_info(t["name"])
            assert (t["stored_values"], t["stored_bytes"]) == (info.stored_values,
                                                               info.stored_bytes)
    assert set(facts["summary"]) >= {"file_bytes", "dense_bytes", "file_ratio",
                                     "weights_ratio", "parameters", "format_version"}
    assert facts["format_version"] == "1.1"
    assert facts["metadata"] == {"task": "tests", "seed": str(SEED)}
    by_name = {t["name"]: t for t in facts["tensors"]}
    assert by_name["encoder.weight"]["theta0_scheme"] == "fan_in_uniform"
    assert by_name["head.weight"]["dtype"] == "f16"
    assert by_name["encoder.bias"]["segment"] is None
    encodings = {name: t["encoding"] for name, t in by_name.items()}
    assert encodings == {"encoder.weight": "mcnc", "encoder.bias": "dense", "head.weight": "mcnc",
                         "head.bias": "packed", "adapter.weight": "lora", "steps": "packed"}
    # A packed tensor's storage is its own bytes within the shared pack blob (§6.4).
    assert (by_name["steps"]["stored_values"], by_name["steps"]["stored_bytes"]) == (2, 16)
    assert (by_name["head.bias"]["stored_values"], by_name["head.bias"]["stored_bytes"]) == (10,
                                                                                            20)
    assert set(by_name["adapter.weight"]["factors"]) == {"A", "B"}
    gen = facts["generators"][0]
    assert (gen["k"], gen["d"], gen["hidden"], gen["weights"]["kind"]) == (5, 300, [16, 16],
                                                                            "philox")
    codecs = {(s["alpha"]["codec"], s["alpha"]["dtype"]) for s in facts["segments"]}
    assert codecs == {("raw", "f32"), ("zstd", "f32")}


# -- verify ------------------------------------------------------------------------------------
def test_verify_passes_a_good_file(runner, model_file):
    result = runner.invoke(cli, ["verify", str(model_file)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("valid")
    report = verify_file(model_file)
    assert report.ok and report.status == "valid" and not report.problems
    with mcnc.open(model_file) as f:
        assert report.counts["blobs"] == len(f.header.blobs)
        assert report.counts["tensors"] == len(f)
        assert report.counts["values"] == f.summary()["parameters"]


def _blob_offset(path: Path, index: int) -> int:
    with mcnc.open(path) as f:
        blob = f.header.blobs[index]
        return blob.offset + blob.length // 2


def test_verify_fails_on_a_flipped_blob_byte(runner, model_file, tmp_path):
    bad = _copy(model_file, tmp_path / "flipped.mcnc")
    data = bytearray(bad.read_bytes())
    data[_blob_offset(bad, 0)] ^= 0x10
    bad.write_bytes(data)
    result = runner.invoke(cli, ["verify", str(bad)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert re.search(r"^  x R24 checksum: .*segments\[0\]\.alpha", result.output, re.M), \
        result.output
    report = verify_file(bad)
    assert report.status == "invalid" and report.counts["skipped_tensors"] == 2
    problem = report.problems[0].to_dict()
    assert (problem["rule"], problem["field"]) == ("R24", "segments[0].alpha")


def test_verify_fails_on_nonzero_padding(runner, model_file, tmp_path):
    bad = _copy(model_file, tmp_path / "padding.mcnc")
    with mcnc.open(bad) as f:
        position = C.PREAMBLE_SIZE + f.header_length
        gaps = []
        for blob in f.header.blobs:
            gaps.append((position, blob.offset))
            position = blob.offset + blob.length
    start, stop = next((a, b) for a, b in gaps if b > a)
    data = bytearray(bad.read_bytes())
    data[random.Random(SEED).randrange(start, stop)] = 0xAB
    bad.write_bytes(data)
    result = runner.invoke(cli, ["verify", "--json", str(bad)])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["ok"] and report["status"] == "invalid"
    assert [(p["check"], p["rule"]) for p in report["problems"]] == [("padding", "R22")]
    assert report["counts"]["tensors"] == 6  # everything else was still checked


def test_verify_fails_on_a_truncated_file(model_file, tmp_path):
    bad = tmp_path / "truncated.mcnc"
    bad.write_bytes(model_file.read_bytes()[:-3])
    report = verify_file(bad)
    assert report.status == "invalid"
    assert [(p.check, p.rule) for p in report.problems] == [("structure", "R21")]


def test_verify_of_a_missing_file_is_file_not_found(tmp_path):
    """As ``open`` raises for it (it was a plain ``MCNCError``: ``except FileNotFoundError``
    missed it), naming the file once."""
    missing = tmp_path / "missing.mcnc"
    with pytest.raises(FileNotFoundError) as raised:
        verify_file(missing)
    assert isinstance(raised.value, mcnc.MCNCFileNotFoundError)
    assert str(raised.value).count(str(missing)) == 1


def test_verify_reports_nonfinite_regenerated_values(runner, tmp_path):
    bad = _write_model(tmp_path / "nan.mcnc", SEED + 1, beta_nan=True)
    result = runner.invoke(cli, ["verify", str(bad)])
    assert result.exit_code == 1, result.output
    report = verify_file(bad)
    assert {p.check for p in report.problems} == {"finite"}
    assert any("'encoder.weight'" in p.message and "non-finite" in p.message
               for p in report.problems)


def test_verify_checks_external_references(runner, tmp_path):
    gen = torch.Generator().manual_seed(SEED + 2)
    base = torch.randn(20, 30, generator=gen)
    save_file({"layer.weight": base}, str(tmp_path / "base.safetensors"))
    spec = mcnc.GeneratorSpec(k=3, d=128, hidden=(8,), seed=SEED % 2**32)
    path = tmp_path / "delta.mcnc"
    mcnc.save(path, {"layer.weight": mcnc.MCNC(
        _segment(spec, 600, 1, gen), (20, 30),
        theta0=mcnc.Theta0.external("base.safetensors", "layer.weight", tensor_sha256(base)))})
    good = verify_file(path)
    assert good.ok and good.counts["external_references"] == 1, good.problems
    save_file({"layer.weight": base + 1}, str(tmp_path / "base.safetensors"))
    result = runner.invoke(cli, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    assert re.search(r"^  x R75 external: .*sha256", result.output, re.M), result.output


def test_verify_of_an_adapter_whose_base_is_missing_exits_3_with_one_line(runner, tmp_path):
    """A missing base is one problem, not one per tensor, and not damage: exit 3."""
    gen = torch.Generator().manual_seed(SEED + 3)
    bases = {f"layers.{i}.weight": torch.randn(8, 12, generator=gen) for i in range(4)}
    save_file(bases, str(tmp_path / "base.safetensors"))
    spec = mcnc.GeneratorSpec(k=3, d=32, hidden=(8,), seed=SEED % 2**32)
    path = tmp_path / "adapter.mcnc"
    mcnc.save(path, {name: mcnc.MCNC(_segment(spec, 96, 1, gen), (8, 12),
                                     theta0=mcnc.Theta0.external("base.safetensors", name,
                                                                 tensor_sha256(value)))
                     for name, value in bases.items()})
    (tmp_path / "base.safetensors").unlink()
    result = runner.invoke(cli, ["verify", str(path)])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("  x ")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("  x R75 unavailable: ") and not lines[0].endswith("(R75)")
    assert lines[0].count("adapter.mcnc") == 1 and lines[0].count("base.safetensors") == 2
    assert "(tensors layers.0.weight, layers.1.weight, layers.2.weight and 1 more)" in lines[0]
    report = json.loads(runner.invoke(cli, ["verify", "--json", str(path)]).stdout)
    assert report["status"] == "incomplete"
    (problem,) = report["problems"]
    assert problem["check"] == "unavailable" and problem["tensors"] == list(bases)
    with pytest.raises(mcnc.ExternalReferenceMissing):
        mcnc.load(path)


def test_inspect_json_of_a_missing_file_names_it(runner, tmp_path):
    missing = str(tmp_path / "nosuch.mcnc")
    result = runner.invoke(cli, ["inspect", "--json", missing])
    assert result.exit_code == 2
    facts = json.loads(result.stdout)
    assert facts["file"] == missing and facts["error"]["path"] == missing


def test_verify_exit_2_for_features_this_reader_does_not_know(runner, model_file, tmp_path):
    """A newer minor version with an unknown encoding cannot be judged: exit 2, not 1. Here
    the two packed tensors' encoding is renamed, which also leaves their pack blob unclaimed."""
    path = _copy(model_file, tmp_path / "future.mcnc")
    data = bytearray(path.read_bytes())
    header_length = struct.unpack_from("<Q", data, 16)[0]
    header = bytes(data[32 : 32 + header_length])
    assert header.count(b"\xa6packed") == 2
    header = header.replace(b"\xa6packed", b"\xa6packe2")  # same length: offsets unchanged
    data[32 : 32 + header_length] = header
    struct.pack_into("<H", data, 10, C.FORMAT_MINOR + 1)  # preamble: minor version
    struct.pack_into("<Q", data, 24, checksum(header))  # preamble: header XXH3-64
    path.write_bytes(data)
    result = runner.invoke(cli, ["verify", str(path)])
    assert result.exit_code == 2, result.output
    assert "could not be verified" in result.output and "R46" in result.output
    assert verify_file(path).status == "unverifiable"


# -- unpack ------------------------------------------------------------------------------------
def test_unpack_writes_safetensors_equal_to_load(runner, model_file, tmp_path):
    out = tmp_path / "dense.safetensors"
    result = runner.invoke(cli, ["unpack", str(model_file), str(out)])
    assert result.exit_code == 0, result.output
    dense = load_file(str(out))
    expected = mcnc.load(model_file)
    assert dense.keys() == expected.keys()
    for name, value in expected.items():
        assert dense[name].dtype == value.dtype and torch.equal(dense[name], value), name
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["task"] == "tests" and metadata["seed"] == str(SEED)
    assert metadata["mcnc.format_version"] == "1.1"
    assert metadata["mcnc.source"] == "model.mcnc"
    assert metadata["mcnc.info.producer"] == "tests/test_cli.py"
    assert metadata["format"] == "pt"
    assert not list(tmp_path.glob(".*.tmp"))


def test_unpack_of_a_file_whose_name_is_not_utf8_writes_a_readable_file(runner, model_file,
                                                                         tmp_path):
    """A file name that is not UTF-8 (a str with a lone surrogate in Python) went into the
    ``mcnc.source`` metadata as a surrogate escape, which safetensors refuses to read: the
    export was reported written but no safetensors reader opened it."""
    from safetensors import safe_open

    source = _copy(model_file, tmp_path / os.fsdecode(b"m\xff.mcnc"))
    out = tmp_path / "dense.safetensors"
    result = runner.invoke(cli, ["unpack", str(source), str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["mcnc.source"] == "m\ufffd.mcnc"
    assert load_file(str(out)).keys() == mcnc.load(model_file).keys()


@pytest.mark.parametrize("metadata", [{}, {"task": "tests"}])
def test_unpack_of_a_tensor_named_like_the_safetensors_metadata_is_refused(runner, tmp_path,
                                                                          metadata):
    """``__metadata__`` is a legal .mcnc tensor name but the key of safetensors' metadata:
    written as a tensor entry it made a file no safetensors reader opens (reported as
    written). It is one error line, and nothing is written."""
    values = torch.randn(4, generator=torch.Generator().manual_seed(SEED))
    path = mcnc.save(tmp_path / "m.mcnc", {"__metadata__": values, "w": torch.ones(2)},
                     metadata=metadata)
    out = tmp_path / "dense.safetensors"
    result = runner.invoke(cli, ["unpack", str(path), str(out)])
    _assert_one_line_error(result, "tensor '__metadata__': safetensors reserves this name")
    assert sorted(tmp_path.iterdir()) == [path]


def test_unpack_refuses_to_overwrite_without_force_and_casts_dtype(runner, model_file, tmp_path):
    out = tmp_path / "dense.safetensors"
    out.write_bytes(b"precious")
    result = runner.invoke(cli, ["unpack", str(model_file), str(out)])
    _assert_one_line_error(result, "--force")
    assert out.read_bytes() == b"precious"
    result = runner.invoke(cli, ["unpack", str(model_file), str(out), "--force", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    dense = load_file(str(out))
    assert dense["encoder.weight"].dtype == torch.bfloat16
    assert dense["steps"].dtype == torch.int64
    expected = mcnc.load(model_file, dtype=torch.bfloat16)
    assert all(torch.equal(dense[k], v) for k, v in expected.items())


@pytest.mark.parametrize("dtype", ["i8", "int8", "bool", "f64x", ""])
def test_unpack_takes_floating_dtypes_only(runner, model_file, tmp_path, dtype):
    """``--dtype`` names the output dtype of floating tensors: anything else is a usage
    error (exit 2) that lists the choices, and nothing is written."""
    out = tmp_path / "dense.safetensors"
    result = runner.invoke(cli, ["unpack", str(model_file), str(out), "--dtype", dtype])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "'bf16', 'f16', 'f32'" in result.stderr, result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- errors and help ---------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["inspect"], ["inspect", "--json"], ["verify"],
                                  ["verify", "--json"], ["unpack"]])
def test_missing_file_is_one_line_exit_2(runner, tmp_path, args):
    missing = tmp_path / "missing.mcnc"
    extra = [str(tmp_path / "out.safetensors")] if args == ["unpack"] else []
    result = runner.invoke(cli, [*args, str(missing), *extra])
    _assert_one_line_error(result, "missing.mcnc")


def test_not_an_mcnc_file(runner, tmp_path):
    text = tmp_path / "notes.mcnc"
    text.write_text("hello, this is not a checkpoint\n")
    _assert_one_line_error(runner.invoke(cli, ["inspect", str(text)]), "R1")
    result = runner.invoke(cli, ["verify", str(text)])
    assert result.exit_code == 1 and "R1 structure" in result.output, result.output


def test_inspect_json_gives_the_error_fields(runner, model_file, tmp_path):
    """A file that breaks a rule: stdout has the error's fields, stderr the one line."""
    path = _copy(model_file, tmp_path / "bad-codec.mcnc")
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 12, 7)  # preamble: header_codec 7 (R3)
    path.write_bytes(data)
    result = runner.invoke(cli, ["inspect", "--json", str(path)])
    _assert_one_line_error(result, "R3")
    error = json.loads(result.stdout)["error"]
    assert error == {"error": "FormatError", "message": error["message"], "rule": "R3",
                     "path": str(path), "field": None, "tensor": None}


@pytest.mark.parametrize(("command", "option"), [("inspect", "--json"), ("verify", "--json"),
                                                ("unpack", "--force")])
def test_every_command_has_help(runner, command, option):
    result = runner.invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {command}" in result.output and option in result.output


def _mcnc_script() -> str:
    beside = Path(sys.executable).with_name("mcnc")
    found = str(beside) if beside.exists() else shutil.which("mcnc")
    if found is None:
        pytest.fail("the `mcnc` console script is not installed: run `pip install -e .`")
    return found


def test_console_script_runs_for_real(model_file):
    """One real process through the installed entry point (the rest use CliRunner)."""
    run = subprocess.run([_mcnc_script(), "verify", "--json", str(model_file)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["status"] == "valid"
    assert run.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"]])
def test_help_and_version_on_a_full_stdout_are_one_line(args):
    """``mcnc --help`` and ``--version`` print while click parses, outside the commands'
    error handling: a full stdout (or any OSError there) is one ``error:`` line, exit 2."""
    with open("/dev/full", "w") as full:
        run = subprocess.run([_mcnc_script(), *args], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "error: No space left on device; free some space or write to another disk"]


# -- README and benchmark ----------------------------------------------------------------------
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```python\n(.*?)```", readme, re.S)
    assert match, "README.md has no ```python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's mkdtemp lands here
    exec(compile(match.group(1), "README.md", "exec"), {"__name__": "readme_example"})
    assert "smaller than dense" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command_and_setup_needs_no_test_extras():
    """The newcomer's set-up installs the package alone; the test command installs the test
    extras itself, and CI runs that command exactly as README.md writes it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    setup = next(b for b in blocks if "mcnc demo" in b)
    tests = next(b for b in blocks if "pytest" in b)
    assert "[test]" not in setup and "pip install -e . " in setup
    assert tests == "pip install -e '.[test]' && python -m pytest -q"
    assert tests in (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ignored = (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert "venv/" in ignored and ".venv/" in ignored


def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_load.py"), "--quick",
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert results["quick"] and results["machine"]["torch"] == torch.__version__
    assert {r["layout"] for r in results["sizes"]} == {"one segment per model",
                                                       "one segment per tensor"}
    assert all(r["file_bytes"] > r["ideal_bytes"] > 0 for r in results["sizes"])
    assert len(results["load"]) == 2 and len(results["regeneration"]) == 6
    assert all(r["within_bound"] and r["generator_weights_exact"] for r in results["accuracy"])


def test_inspect_shows_names_and_metadata_that_look_like_markup(tmp_path: Path) -> None:
    """Strings from the file are shown as they are, never read as rich markup."""
    path = tmp_path / "markup.mcnc"
    mcnc.save(path, {"x[bold]": torch.arange(3.0)}, metadata={"k": "[/x]"})
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "x[bold]" in result.output and "[/x]" in result.output


# -- OS errors: one line, exit 2 ---------------------------------------------------------------
def test_os_errors_of_every_command_are_one_line(runner, model_file, tmp_path):
    """A name too long, a path through a regular file (ENOTDIR: root ignores permissions, so
    this is how a test makes a folder that cannot be written) and a demo folder inside a
    file: each is one ``error:`` line naming the path and the fix, never a traceback."""
    long_name = tmp_path / ("n" * 300 + ".safetensors")
    result = runner.invoke(cli, ["unpack", str(model_file), str(long_name)])
    _assert_one_line_error(result, "File name too long; choose a shorter file name")
    plain = tmp_path / "plain.txt"
    plain.write_text("a file, not a folder")
    result = runner.invoke(cli, ["unpack", str(model_file), str(plain / "out.safetensors")])
    _assert_one_line_error(result, "Not a directory; a part of the path is a file")
    result = runner.invoke(cli, ["export-peft", "--skip-non-lora", str(model_file),
                                 str(plain / "adapter")])
    _assert_one_line_error(result, "plain.txt/adapter: Not a directory")
    result = runner.invoke(cli, ["demo", "--quick", "--out", str(plain / "demo")])
    _assert_one_line_error(result, "plain.txt/demo: Not a directory")
    assert plain.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_unpack_to_a_fifo_is_refused_before_any_work(runner, model_file, tmp_path,
                                                    monkeypatch, force):
    """OUT a FIFO (or a device: ``/dev/null`` as root) is one line naming it, before a tensor
    is rebuilt, and stays what it was; it is not replaced by a regular file with --force, nor
    does the error suggest --force."""
    from mcnc_format import api

    def no_work(*args, **kwargs):
        raise AssertionError("unpack rebuilt tensors before refusing its output")

    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(api, "stream", no_work)
    result = runner.invoke(cli, ["unpack", *force, str(model_file), str(fifo)])
    _assert_one_line_error(result, "out.safetensors: is a FIFO (named pipe), not a file")
    assert "--force" not in result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize(("code", "needle"), [
    (errno.ENOSPC, "No space left on device; free some space"),
    (errno.EROFS, "Read-only file system; write somewhere else"),
])
def test_full_or_read_only_disk_is_one_line(runner, model_file, tmp_path, monkeypatch, code,
                                            needle):
    """The disk fails at the last write primitive (fsync of the finished file) for unpack,
    export-peft and demo --out: one line, the previous output kept, nothing temporary left."""
    from mcnc_format import atomic

    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    monkeypatch.setattr(atomic.os, "fsync", fail)
    result = runner.invoke(cli, ["unpack", "--force", str(model_file), str(out)])
    _assert_one_line_error(result, needle)
    result = runner.invoke(cli, ["export-peft", "--skip-non-lora", str(model_file),
                                 str(tmp_path / "adapter")])
    _assert_one_line_error(result, needle)
    result = runner.invoke(cli, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    _assert_one_line_error(result, needle)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapter", "demo", "out.safetensors"]


# -- terminal safety ---------------------------------------------------------------------------
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u009b31m[bold]x[/bold]"
HOSTILE_SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m[bold]x[/bold]"


def _assert_terminal_safe(text: str) -> None:
    assert not any(ch in text for ch in "\x1b\x07\u009b"), repr(text)


def test_strings_from_files_cannot_drive_the_terminal(runner, tmp_path):
    """Escape sequences and rich markup in a tensor name, metadata and the file's own name are
    shown escaped and literal by inspect, verify, unpack and in errors; --json is exact."""
    path = tmp_path / f"m{HOSTILE.replace('/', '')}.mcnc"
    mcnc.save(path, {f"w{HOSTILE}": torch.arange(3.0)}, metadata={f"k{HOSTILE}": HOSTILE},
              info={"producer": HOSTILE})
    result = runner.invoke(cli, ["inspect", str(path)], terminal_width=400)
    assert result.exit_code == 0, result.output
    _assert_terminal_safe(result.output)
    assert f"w{HOSTILE_SHOWN}" in result.output and f"k{HOSTILE_SHOWN}" in result.output
    facts = json.loads(runner.invoke(cli, ["inspect", "--json", str(path)]).output)
    assert facts["tensors"][0]["name"] == f"w{HOSTILE}"
    assert facts["metadata"] == {f"k{HOSTILE}": HOSTILE}
    for args in (["verify", str(path)],
                 ["unpack", str(path), str(tmp_path / f"o{HOSTILE.replace('/', '')}")],
                 ["inspect", str(tmp_path / f"missing{HOSTILE.replace('/', '')}")]):
        result = runner.invoke(cli, args, terminal_width=400)
        _assert_terminal_safe(result.output)
        assert "\\x1b]0;pwned\\x07" in result.output, result.output


def test_usage_errors_quoting_arguments_cannot_drive_the_terminal(runner, model_file,
                                                                   monkeypatch, capsys):
    """A file name from a glob (``mcnc inspect *.mcnc`` in a downloaded folder) shows in
    click's usage error for an extra argument, which click does not escape: it is escaped,
    in ``mcnc`` and in the ``mcnc-pack`` script."""
    from mcnc_format.cli import pack_cmd

    extra = f"x{HOSTILE}.mcnc"
    result = runner.invoke(cli, ["inspect", str(model_file), extra])
    assert result.exit_code == 2
    _assert_terminal_safe(result.output)
    assert "\\x1b]0;pwned\\x07" in result.output, result.output
    monkeypatch.setattr(sys, "argv", ["mcnc-pack", "a.pt", "b.mcnc", extra])
    with pytest.raises(SystemExit) as exited:
        pack_cmd.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    _assert_terminal_safe(err)
    assert "\\x1b]0;pwned\\x07" in err, err


#: What ``json.dumps(..., ensure_ascii=False)`` leaves raw: DEL, a C1 control (U+009B is a
#: one-character CSI), a bidi override that reorders what follows, a line separator.
JSON_HOSTILE = "\x1b[2J\x7f\u009b31m\u202eevil\u2028x"


def _assert_printable_json(text: str) -> None:
    assert all(ch == "\n" or ch.isprintable() for ch in text), repr(text)


def test_json_output_cannot_drive_the_terminal(runner, tmp_path):
    """``--json`` of inspect, verify (a problem naming a tensor that is not finite) and of a
    failure (an error quoting the output path) escapes every character a terminal would act
    on, and still decodes to the exact strings of the file."""
    name = f"w{JSON_HOSTILE}"
    spec = mcnc.GeneratorSpec(k=3, d=32, hidden=(8,), seed=SEED % 2**32)
    segment = _segment(spec, 64, 1, torch.Generator().manual_seed(SEED))
    segment.beta[0, 0] = float("nan")
    path = mcnc.save(tmp_path / "m.mcnc", {name: mcnc.MCNC(segment, (8, 8))},
                     metadata={"k": JSON_HOSTILE})
    result = runner.invoke(cli, ["inspect", "--json", str(path)])
    assert result.exit_code == 0, result.output
    _assert_printable_json(result.stdout)
    facts = json.loads(result.stdout)
    assert facts["tensors"][0]["name"] == name and facts["metadata"] == {"k": JSON_HOSTILE}
    result = runner.invoke(cli, ["verify", "--json", str(path)])
    assert result.exit_code == 1, result.output
    _assert_printable_json(result.stdout)
    assert json.loads(result.stdout)["problems"][0]["tensors"] == [name]
    out = tmp_path / f"o{JSON_HOSTILE}.safetensors"
    out.write_bytes(b"kept")
    result = runner.invoke(cli, ["unpack", "--json", str(path), str(out)])
    assert result.exit_code == 2, result.output
    _assert_printable_json(result.stdout)
    assert json.loads(result.stdout)["out"] == str(out)
