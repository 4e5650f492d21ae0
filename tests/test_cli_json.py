"""``--json`` on every command that has one: one JSON object on stdout, for success and for
failure (then with the error's fields, and exit status 2 with the one ``error:`` line)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from click.testing import CliRunner
from hub_server import WRITE_TOKEN, HubServer

import mcnc_format as mf
from mcnc_format.cli.main import cli

ERROR_KEYS = {"error", "message", "rule", "path", "field", "tensor"}


def _invoke(args: list[str], **env: str) -> tuple[int, dict[str, object], str]:
    result = CliRunner().invoke(cli, args, env=env or None)
    return result.exit_code, json.loads(result.stdout), result.stderr


def _adapter(path: Path) -> Path:
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    spec = mf.GeneratorSpec(k=3, d=64, hidden=(8,), seed=5)
    a = mf.Segment(spec, torch.rand(1, 1, 3, generator=gen), torch.rand(1, 1, generator=gen))
    b = mf.Segment(spec, torch.rand(1, 1, 3, generator=gen), torch.rand(1, 1, generator=gen))
    return mf.save(path, {
        "layer.q_proj.weight": mf.LoRA(A=mf.MCNC(a, (2, 16)), B=mf.MCNC(b, (16, 2)), scale=2.0,
                                       theta0=mf.Theta0.stored(torch.randn(16, 16, generator=gen))),
        "layer.bias": torch.randn(16, generator=gen),
    })


def test_unpack_json(tmp_path: Path) -> None:
    source = _adapter(tmp_path / "a.mcnc")
    out = tmp_path / "dense.safetensors"
    code, facts, _ = _invoke(["unpack", str(source), str(out), "--json"])
    assert code == 0
    assert facts == {"file": str(source), "out": str(out), "bytes": out.stat().st_size,
                     "dtype": None}
    code, facts, stderr = _invoke(["unpack", str(source), str(out), "--json"])
    assert code == 2 and stderr.startswith("error: ")
    assert facts["file"] == str(source) and facts["out"] == str(out)
    error = facts["error"]
    assert isinstance(error, dict) and set(error) == ERROR_KEYS
    assert error["error"] == "WriteError" and "--force" in str(error["message"])


def test_export_peft_json(tmp_path: Path) -> None:
    source = _adapter(tmp_path / "a.mcnc")
    code, facts, _ = _invoke(["export-peft", str(source), str(tmp_path / "peft"), "--json",
                              "--skip-non-lora"])
    assert code == 0
    assert facts["modules"] == ["layer.q_proj"] and facts["rank"] == 2
    assert facts["skipped"] == ["layer.bias"]
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    code, facts, _ = _invoke(["export-peft", str(tmp_path / "missing.mcnc"),
                              str(tmp_path / "peft2"), "--json"])
    assert code == 2
    error = facts["error"]
    assert isinstance(error, dict) and error["path"] == str(tmp_path / "missing.mcnc")


def test_verify_json_when_the_check_cannot_run(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.mcnc")
    code, facts, _ = _invoke(["verify", missing, "--json"])
    assert code == 2
    assert facts["path"] == missing
    assert isinstance(facts["error"], dict) and facts["error"]["path"] == missing


def test_push_and_pull_json(hub: HubServer, tmp_path: Path) -> None:
    source = _adapter(tmp_path / "a.mcnc")
    code, facts, _ = _invoke(["push", str(source), "alice/model", "--json"],
                             HF_TOKEN=WRITE_TOKEN)
    assert code == 0
    commit = hub.head("alice/model")
    assert facts == {"repo_id": "alice/model", "revision": "main", "commit": commit,
                     "paths": ["a.mcnc", "README.md"],
                     "uris": [f"hf://alice/model@{commit}/a.mcnc",
                              f"hf://alice/model@{commit}/README.md"]}
    code, facts, _ = _invoke(["pull", "alice/model", "a.mcnc", "--json"])
    assert code == 0
    assert Path(str(facts["path"])).read_bytes() == source.read_bytes()
    assert facts["repo_id"] == "alice/model" and facts["filename"] == "a.mcnc"
    code, facts, stderr = _invoke(["pull", "alice/model", "missing.mcnc", "--json"])
    assert code == 2 and stderr.startswith("error: ")
    error = facts["error"]
    assert isinstance(error, dict) and error["error"] == "HubFileNotFoundError"
    code, facts, _ = _invoke(["push", str(source), "alice/other", "--json"])
    assert code == 2
    assert isinstance(facts["error"], dict)
    assert facts["error"]["error"] == "HubPermissionError"
