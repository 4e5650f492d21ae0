"""``mcnc --version``, ``--help``, ``inspect``, ``push`` and ``pull`` start without torch.

Importing torch takes seconds; these commands read headers and talk to the Hub only. Each check
runs the real command in a fresh interpreter (``sys.modules`` of this one holds torch already)
and lists the heavy modules it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
import torch
from hub_server import WRITE_TOKEN, HubServer

import mcnc_format as mf
from mcnc_format.cli.main import COMMANDS, cli

HEAVY = ("torch", "transformers", "peft", "triton", "safetensors.torch")


def _run_cli(args: list[str], script_name: str = "mcnc") -> tuple[int, str, list[str]]:
    """``mcnc ARGS`` (or the ``mcnc-pack`` script's) in a fresh interpreter: exit status,
    stdout, heavy modules loaded."""
    module, command = {"mcnc": ("main", "cli"), "mcnc-pack": ("pack_cmd", "pack_command")
                       }[script_name]
    script = textwrap.dedent(f"""
        import json, sys
        from mcnc_format.cli.{module} import {command} as cli
        try:
            cli.main({args!r}, prog_name={script_name!r})
        except SystemExit as exc:
            code = exc.code or 0
        else:
            code = 0
        print(json.dumps({{"code": code,
                           "heavy": [m for m in {list(HEAVY)!r} if m in sys.modules]}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    *output, last = run.stdout.strip().splitlines()
    result = json.loads(last)
    return result["code"], "\n".join(output), result["heavy"]


def _small_file(path: Path) -> Path:
    spec = mf.GeneratorSpec(k=2, d=16, hidden=(4,), seed=1)
    segment = mf.Segment(spec, torch.rand(2, 1, 2), torch.rand(2, 1))
    return mf.save(path, {"w": mf.MCNC(segment, (4, 8)), "b": torch.ones(3)})


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["push", "--help"],
                                  ["pull", "--help"], ["verify", "--help"],
                                  ["unpack", "--help"], ["demo", "--help"],
                                  ["pack", "--help"]])
def test_version_and_help_import_no_torch(args: list[str]) -> None:
    code, output, heavy = _run_cli(args)
    assert code == 0, output
    assert heavy == []


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_mcnc_pack_script_has_version_and_help_without_torch(args: list[str]) -> None:
    """The ``mcnc-pack`` script answers ``--version`` as ``mcnc`` does (issue 22, item 4)."""
    code, output, heavy = _run_cli(args, "mcnc-pack")
    assert code == 0, output
    assert heavy == []
    if args == ["--version"]:
        assert output == f"mcnc-pack, version {mf.__version__}"
    _, mcnc_output, _ = _run_cli(args)
    if args == ["--version"]:
        assert mcnc_output == output.replace("mcnc-pack", "mcnc")


def test_inspect_imports_no_torch(tmp_path: Path) -> None:
    path = _small_file(tmp_path / "m.mcnc")
    code, output, heavy = _run_cli(["inspect", "--json", str(path)])
    assert code == 0, output
    assert json.loads(output)["summary"]["tensors"] == 2
    assert heavy == []


def test_push_and_pull_import_no_torch(hub: HubServer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = _small_file(tmp_path / "m.mcnc")
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)  # the subprocess reads the environment
    code, output, heavy = _run_cli(["push", str(path), "alice/model"])
    assert code == 0, output
    assert heavy == []
    code, output, heavy = _run_cli(["pull", "alice/model", "m.mcnc"])
    assert code == 0, output
    assert Path(output.strip()).read_bytes() == path.read_bytes()
    assert heavy == []


def test_help_summaries_are_the_commands_own() -> None:
    """``mcnc --help`` lists ``COMMANDS``' summaries without importing the commands: they
    are the commands' own short help."""
    ctx = click.Context(cli)
    for name, (_, _, summary) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(limit=1000) == summary


def test_startup_benchmark_times_this_interpreters_mcnc(tmp_path: Path) -> None:
    """``benchmarks/bench_startup.py`` times the ``mcnc`` installed with the interpreter it
    runs under, not another one found first on PATH (whose start-up says nothing about this
    torch)."""
    mine = Path(sys.executable).parent / "mcnc"
    if not mine.is_file():
        pytest.skip("mcnc is not installed beside this interpreter")
    other = tmp_path / "bin"
    other.mkdir()
    marker = tmp_path / "other-mcnc-ran"
    (other / "mcnc").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (other / "mcnc").chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_startup.py"
    run = subprocess.run([sys.executable, str(script), "--repeat", "1"], capture_output=True,
                         text=True, timeout=120, env={"PATH": f"{other}:/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mcnc inspect FILE" in run.stdout, run.stdout
    assert not marker.exists()
