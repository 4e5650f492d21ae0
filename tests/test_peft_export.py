"""``mcnc export-peft``: .mcnc LoRA adapters as PEFT folders that real PEFT loads.

A tiny LLaMA (transformers config, random init, no download) gets MCNC-LoRA adapters, is
packed against its base checkpoint and exported; ``PeftModel.from_pretrained`` on a fresh copy
of the base must give the logits of the base with the .mcnc file's merged weights loaded. A
plain torch model with adapters of different ranks and scales checks ``rank_pattern`` and
``alpha_pattern`` through PEFT's custom-model support, and one whose module names share a
suffix (``q``, ``blk.q``) checks that each setting reaches its own module only.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import mcnc_format as mf
import mcnc_format.converters.peft_export as peft_export_module
from mcnc_format import MCNC, LoRA, Segment, Theta0
from mcnc_format.cli.export_peft_cmd import export_peft_command
from mcnc_format.converters.pack import pack
from mcnc_format.converters.peft_export import export_peft
from mcnc_format.errors import MCNCError, WriteError
from mcnc_format.generator import GeneratorSpec
from mcnc_format.reader import tensor_sha256
from mcnc_format.torch import MCNCConfig, add_mcnc_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed so a failure can be replayed with MCNC_TEST_SEED."""
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


def _tiny_llama(seed: int) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _randomize_betas(model: nn.Module, seed: int) -> None:
    """Adapters start as the identity (B = 0); give them values so the test means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mcnc_beta"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_llama_adapter_loads_in_peft(seed: int, tmp_path: Path) -> None:
    base = _tiny_llama(seed)
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    model = add_mcnc_lora(copy.deepcopy(base),
                          MCNCConfig(k=4, d=64, hidden=(16, 16), seed=seed % 2**32),
                          target_modules=["q_proj", "v_proj"], rank=4, lora_alpha=8)
    _randomize_betas(model, seed)
    torch.save(model.state_dict(), tmp_path / "adapter.pt")
    pack(tmp_path / "adapter.pt", tmp_path / "adapter.mcnc", base=tmp_path / "base.safetensors")

    result = CliRunner().invoke(export_peft_command, [str(tmp_path / "adapter.mcnc"),
                                                      str(tmp_path / "peft"),
                                                      "--task-type", "CAUSAL_LM"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "base.safetensors"
    assert len(config["target_modules"].split("|")) == 4  # one regex, full-matched by PEFT
    assert all(re.fullmatch(config["target_modules"], f"model.layers.{i}.self_attn.{p}_proj")
               for i in range(2) for p in "qv")

    merged = copy.deepcopy(base)
    merged.load_state_dict(mf.load(tmp_path / "adapter.mcnc"), strict=False)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    peft_model.eval()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = merged(tokens).logits
        got = peft_model(tokens).logits
        trained = model(tokens).logits
        plain = base(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the model


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(9, 14)
        self.second = nn.Linear(14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _lora(name: str, rank: int, scale: float, base: torch.Tensor, spec: GeneratorSpec,
          g: torch.Generator) -> LoRA:
    """A lora entry on ``base`` (referenced in base.safetensors) with random factors."""
    def factor(rows: int, cols: int) -> MCNC:
        chunks = -(-rows * cols // spec.d)
        segment = Segment(spec, torch.rand(chunks, 1, spec.k, generator=g) * 40 - 20,
                          torch.randn(chunks, 1, generator=g))
        return MCNC(segment, (rows, cols))
    return LoRA(factor(rank, base.shape[1]), factor(base.shape[0], rank), scale,
                theta0=Theta0.external("base.safetensors", name, tensor_sha256(base)))


def test_mixed_ranks_use_patterns(seed: int, tmp_path: Path) -> None:
    torch.manual_seed(seed)
    base = TwoLayer()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    spec = GeneratorSpec(k=3, d=20, hidden=(8, 8), seed=seed % 2**32)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, rank, scale in (("first", 2, 1.5), ("second", 3, 0.25)):
        weight = base.state_dict()[f"{name}.weight"]
        tensors[f"{name}.weight"] = _lora(f"{name}.weight", rank, scale, weight, spec, g)
    tensors["first.bias"] = base.first.bias.detach()
    mf.save(tmp_path / "a.mcnc", tensors, info={"base_model": "two-layer"})

    with pytest.raises(MCNCError, match="--skip-non-lora"):
        export_peft(tmp_path / "a.mcnc", tmp_path / "peft")
    exported = export_peft(tmp_path / "a.mcnc", tmp_path / "peft", skip_non_lora=True)
    assert exported.skipped == ("first.bias",)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "two-layer"
    assert {config["r"], *config["rank_pattern"].values()} == {2, 3}
    assert len(config["rank_pattern"]) == 1 and len(config["alpha_pattern"]) == 1

    merged = copy.deepcopy(base)
    merged.load_state_dict(mf.load(tmp_path / "a.mcnc"), strict=False)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    x = torch.randn(6, 9, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), merged(x), rtol=1e-5, atol=1e-5)

    with pytest.raises(MCNCError, match=r"adapter_config\.json, .*: already exist; pass --force"):
        export_peft(tmp_path / "a.mcnc", tmp_path / "peft", skip_non_lora=True)
    export_peft(tmp_path / "a.mcnc", tmp_path / "peft", skip_non_lora=True, force=True)


def test_file_without_lora_is_refused(tmp_path: Path) -> None:
    mf.save(tmp_path / "d.mcnc", {"w": torch.ones(2, 2)})
    with pytest.raises(MCNCError, match="no lora tensors"):
        export_peft(tmp_path / "d.mcnc", tmp_path / "out")


class SharedSuffix(nn.Module):
    """Three modules ending in ``q``: PEFT's suffix matching would confuse them."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.blk = nn.ModuleDict({"q": nn.Linear(8, 8)})
        self.blk2 = nn.ModuleDict({"q": nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blk2["q"](torch.tanh(self.blk["q"](torch.tanh(self.q(x)))))


def test_modules_sharing_a_suffix_keep_their_own_rank(seed: int, tmp_path: Path) -> None:
    torch.manual_seed(seed)
    base = SharedSuffix()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    spec = GeneratorSpec(k=4, d=64, hidden=(8,), seed=seed % 2**32)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{name}.weight": _lora(f"{name}.weight", rank, scale,
                                       base.state_dict()[f"{name}.weight"], spec, g)
               for name, rank, scale in (("q", 8, 2.0), ("blk.q", 4, 0.5), ("blk2.q", 4, 0.5))}
    mf.save(tmp_path / "s.mcnc", tensors)
    export_peft(tmp_path / "s.mcnc", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 2)
    assert config["rank_pattern"] == {"^q": 8} and config["alpha_pattern"] == {"^q": 16}

    merged = copy.deepcopy(base)
    merged.load_state_dict(mf.load(tmp_path / "s.mcnc"), strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert not [w for w in caught if "pattern" in str(w.message) or "target_modules" in
                str(w.message)]
    adapted = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {f"base_model.model.{m}" for m in ("q", "blk.q", "blk2.q")}
    x = torch.randn(6, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), merged(x), rtol=1e-5, atol=1e-5)
        assert (peft_model(x) - base(x)).abs().max() > 1e-3


def _adapter_file(tmp_path: Path, name: str, seed: int) -> Path:
    """A one-module lora file on base.safetensors (written once), factors drawn from ``seed``."""
    torch.manual_seed(0)
    base = SharedSuffix()
    if not (tmp_path / "base.safetensors").exists():
        save_file(base.state_dict(), tmp_path / "base.safetensors")
    spec = GeneratorSpec(k=4, d=64, hidden=(8,), seed=seed % 2**32)
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / name
    mf.save(path, {"q.weight": _lora("q.weight", 4, 1.0, base.q.weight.detach(), spec, g)})
    return path


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_forced_export_leaves_the_old_adapter_whole(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both files are written before either replaces its predecessor: a write failing after
    the weights (here the config's, with a full disk) keeps the old weights beside the old
    config, and no temporary is left in the folder."""
    export_peft(_adapter_file(tmp_path, "old.mcnc", seed), tmp_path / "peft")
    before = _folder_bytes(tmp_path / "peft")
    newer = _adapter_file(tmp_path, "new.mcnc", seed + 1)

    def full_disk(*args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(peft_export_module.json, "dumps", full_disk)
    with pytest.raises(WriteError, match="free some space"):
        export_peft(newer, tmp_path / "peft", force=True)
    assert _folder_bytes(tmp_path / "peft") == before


def test_an_adapter_appearing_during_an_export_keeps_its_files(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --force, a config another writer placed while this export ran is refused when
    the files are placed, and the weights this export had already placed are taken back: the
    folder holds the other writer's files only, never a mixed pair."""
    folder = tmp_path / "peft"
    real_dumps = json.dumps

    def racing_writer(*args: object, **kwargs: object) -> str:
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text("{}\n")
        return real_dumps(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(peft_export_module.json, "dumps", racing_writer)
    with pytest.raises(WriteError, match=r"adapter_config\.json.*already exists"):
        export_peft(_adapter_file(tmp_path, "a.mcnc", seed), folder)
    assert _folder_bytes(folder) == {"adapter_config.json": b"{}\n"}
