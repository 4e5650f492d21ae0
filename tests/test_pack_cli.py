"""``mcnc pack`` / ``mcnc-pack``: checkpoints of mcnc_format.torch models in, .mcnc files out.

The packed file of a reparametrized model's ``.pt`` (or ``.safetensors``) state dict is the
file ``save_model`` writes, byte for byte; packing is deterministic; the generator is stored
as a seed; existing outputs survive without ``--force``; an MCNC-LoRA adapter packs against
its base checkpoint by sha256-pinned reference and loads back onto it.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mcnc_format as mf
from mcnc_format.cli import pack_cmd
from mcnc_format.cli.main import cli
from mcnc_format.converters.base_ref import reference_base
from mcnc_format.converters.pack import pack
from mcnc_format.errors import MCNCError
from mcnc_format.reader import tensor_sha256
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, reparametrize, save_model
from mcnc_format.verify import verify_file


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed so a failure can be replayed with MCNC_TEST_SEED."""
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 7))


def _trained(seed: int, config: MCNCConfig) -> nn.Module:
    """A reparametrized MLP after a few optimizer steps, so alpha and beta are not initial."""
    model = reparametrize(_mlp(seed), config)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 7, (32,), generator=g)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _run_pack(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the ``mcnc-pack`` console script in-process; returns its exit status."""
    monkeypatch.setattr(sys, "argv", ["mcnc-pack", *args])
    try:
        pack_cmd.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize("container", [".pt", ".safetensors"])
@pytest.mark.parametrize("chunking", ["tensor", "model"])
def test_pack_equals_save_model(container: str, chunking: str, seed: int, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = MCNCConfig(k=4, d=48, hidden=(16, 16), seed=seed % 2**32, chunking=chunking)
    model = _trained(seed, config)
    save_model(model, tmp_path / "direct.mcnc")
    checkpoint = tmp_path / f"model{container}"
    if container == ".pt":
        torch.save(model.state_dict(), checkpoint)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
    assert _run_pack([str(checkpoint), str(tmp_path / "packed.mcnc")], monkeypatch) == 0
    packed = (tmp_path / "packed.mcnc").read_bytes()
    assert packed == (tmp_path / "direct.mcnc").read_bytes()
    with mf.open(tmp_path / "packed.mcnc") as f:
        assert [g.seed for g in f.header.generators] == [config.seed]  # seed-only
        assert all(g.blobs is None for g in f.header.generators)
        loaded = f.tensors()
    plain = _mlp(seed + 1)
    plain.load_state_dict(loaded, strict=True)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    renamed = tmp_path / f"other-name{container}"
    renamed.write_bytes(checkpoint.read_bytes())
    pack(renamed, tmp_path / "again.mcnc")
    assert (tmp_path / "again.mcnc").read_bytes() == packed  # deterministic, name-independent


def test_pack_refuses_to_overwrite_without_force(seed: int, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8)))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "m.mcnc"
    out.write_bytes(b"precious")
    assert _run_pack([str(tmp_path / "m.pt"), str(out)], monkeypatch) != 0
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert _run_pack([str(tmp_path / "m.pt"), str(out), "--force", "--progress"],
                     monkeypatch) == 0
    assert out.read_bytes() != b"precious" and mf.open(out).keys()


def test_pack_command_reports_and_shows_progress(seed: int, tmp_path: Path) -> None:
    model = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8)))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result = CliRunner().invoke(pack_cmd.pack_command,
                                [str(tmp_path / "m.pt"), str(tmp_path / "m.mcnc"), "--progress"])
    assert result.exit_code == 0, result.output
    assert "converter mcnc-torch" in result.output
    seen: list[str] = []
    pack(tmp_path / "m.pt", tmp_path / "m.mcnc", force=True,
         progress=lambda stage, done, total: seen.append(stage))
    assert seen[0] == "read" and seen[-2:] == ["convert", "write"]


def test_pack_reports_the_ratios_inspect_reports(seed: int, tmp_path: Path) -> None:
    """The checkpoint holds the same alpha and beta as the file, so "smaller than the
    checkpoint" said nothing: pack reports ``file_ratio`` and ``weights_ratio`` as ``mcnc
    inspect`` does, in its line and in ``--json`` (issue 22, item 6)."""
    model = _trained(seed, MCNCConfig(k=4, d=256, hidden=(16, 16), seed=seed % 2**32))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "m.mcnc"
    result = CliRunner().invoke(cli, ["pack", str(tmp_path / "m.pt"), str(out), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    inspected = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).stdout)
    for key in ("file_ratio", "weights_ratio", "dense_bytes", "file_bytes"):
        assert facts[key] == inspected["summary"][key]
    assert facts["file_ratio"] > 1 and facts["weights_ratio"] > 1
    assert facts["checkpoint_bytes"] == (tmp_path / "m.pt").stat().st_size
    assert (facts["converter"], facts["tensors"]) == ("mcnc-torch", 4)
    line = CliRunner().invoke(cli, ["pack", str(tmp_path / "m.pt"), str(out), "--force"]).output
    assert f"file_ratio {facts['file_ratio']:,.1f}x" in line
    assert f"weights_ratio {facts['weights_ratio']:,.1f}x" in line
    assert "checkpoint)" not in line
    failed = CliRunner().invoke(cli, ["pack", str(tmp_path / "m.pt"), str(out), "--json"])
    assert failed.exit_code == 2
    assert "already exists" in json.loads(failed.stdout)["error"]["message"]


def test_unsafe_checkpoint_exits_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04definitely not a state dict")
    assert _run_pack([str(tmp_path / "bad.pt"), str(tmp_path / "o.mcnc")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o.mcnc").exists()


def test_an_mcnc_file_as_checkpoint_is_named_as_one(seed: int, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Packing an .mcnc file says it is one and what to do, not "Unsupported operand 67"
    (issue 22, item 8)."""
    model = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8)))
    save_model(model, tmp_path / "m.mcnc")
    assert _run_pack([str(tmp_path / "m.mcnc"), str(tmp_path / "o.mcnc")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already an .mcnc file" in err
    assert f"mcnc inspect {tmp_path / 'm.mcnc'}" in err and "mcnc unpack" in err
    assert "operand" not in err and not (tmp_path / "o.mcnc").exists()


def test_a_plain_pickle_is_one_line_without_torch_warnings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """torch's weights-only reader warns in several lines of a protocol-4 pickle before it
    refuses it: pack says one line, naming what the file is (issue 22, item 8)."""
    state = {"w": [random.random() for _ in range(4)], "step": random.randrange(100)}
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(state, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = _run_pack([str(tmp_path / "plain.pkl"), str(tmp_path / "o.mcnc")], monkeypatch)
    assert code == 2
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a pickle that torch.save did not write" in err


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 24)
        self.down = nn.Linear(24, 6)
        self.norm = nn.LayerNorm(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


def _adapted(base: nn.Module, targets: list[str], seed: int) -> nn.Module:
    """An MCNC-LoRA copy of ``base`` whose betas are random, so the adapter changes it."""
    model = add_mcnc_lora(copy.deepcopy(base),
                          MCNCConfig(k=3, d=32, hidden=(8, 8), seed=seed % 2**32),
                          target_modules=targets, rank=2, lora_alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mcnc_beta"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def test_lora_adapter_against_base_checkpoint(seed: int, tmp_path: Path) -> None:
    torch.manual_seed(seed)
    base = TinyNet()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    model = _adapted(base, ["up", "down"], seed)
    torch.save(model.state_dict(), tmp_path / "adapter.pt")
    result = pack(tmp_path / "adapter.pt", tmp_path / "adapter.mcnc",
                  base=tmp_path / "base.safetensors")
    with mf.open(tmp_path / "adapter.mcnc") as f:
        names = f.keys()
        assert names == ["up.weight", "down.weight"]  # biases and norm come from the base
        assert {f.entry(n).theta0.kind for n in names} == {"external"}
        assert f.info["base_model"] == "base.safetensors"
        adapter = f.tensors()
    assert result.output_bytes < (tmp_path / "base.safetensors").stat().st_size
    restored = TinyNet()
    restored.load_state_dict(base.state_dict())
    restored.load_state_dict(adapter, strict=False)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=1e-5, atol=1e-5)
    other = TinyNet()
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(MCNCError, match="trained on another base"):
        pack(tmp_path / "adapter.pt", tmp_path / "x.mcnc", base=tmp_path / "other.safetensors")


def test_tied_base_saved_with_safetensors_is_followed(seed: int, tmp_path: Path) -> None:
    """A tied Llama's base saved by ``save_pretrained`` holds ``model.embed_tokens.weight``
    but no ``lm_head.weight``; the adapter's checkpoint, saved with safetensors too, holds both
    as separate copies. ``lm_head.weight`` is the base's embedding: left out with a note, not
    stored dense (issue 22, item 7); and the adapter loads back onto the tied base."""
    transformers = pytest.importorskip("transformers")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=32, tie_word_embeddings=True)
    base = LlamaForCausalLM(config)
    base.save_pretrained(tmp_path)  # model.safetensors: the tie saved under one name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    model = _adapted(base, ["q_proj", "v_proj"], seed)
    save_file({k: v.clone() for k, v in model.state_dict().items()},
              tmp_path / "adapter.safetensors")
    result = CliRunner().invoke(cli, ["pack", str(tmp_path / "adapter.safetensors"),
                                      str(tmp_path / "adapter.mcnc"), "--base",
                                      str(tmp_path / "model.safetensors")])
    assert result.exit_code == 0, result.output
    lm_head_bytes = 512 * 32 * 4
    assert (f"note: left out 'lm_head.weight' ({lm_head_bytes:,} bytes): model.safetensors "
            "holds it as 'model.embed_tokens.weight'") in result.stderr
    assert (tmp_path / "adapter.mcnc").stat().st_size < lm_head_bytes / 8
    with mf.open(tmp_path / "adapter.mcnc") as f:
        names = f.keys()
        assert "lm_head.weight" not in names and len(names) == 4
        adapter = f.tensors()
    restored = LlamaForCausalLM.from_pretrained(tmp_path)
    restored.load_state_dict(adapter, strict=False)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, model(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_theta0_of_a_tied_weight_references_the_base_name(seed: int, tmp_path: Path) -> None:
    """A stored theta0 whose name the base lacks but whose values it holds under another
    name references that name, pinned by its SHA-256 (issue 22, item 7)."""
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(16, 8, generator=gen)
    save_file({"embed.weight": embedding, "other.weight": torch.randn(16, 8, generator=gen),
               "norm.weight": torch.ones(8)}, tmp_path / "base.safetensors")
    segment = mf.Segment(mf.GeneratorSpec(k=2, d=32, hidden=(4,), seed=seed % 2**32),
                         torch.rand(4, 1, 2, generator=gen), torch.rand(4, 1, generator=gen))
    head = mf.MCNC(segment, (16, 8), theta0=mf.Theta0.stored(embedding.clone()))
    new_norm = torch.ones(8)  # equal to the base's norm.weight, but constant: no tie
    inputs, uri, notes = reference_base({"head.weight": head, "new_norm.weight": new_norm},
                                        tmp_path / "base.safetensors", tmp_path)
    [(name, referenced), kept] = list(inputs)
    assert kept == ("new_norm.weight", new_norm) and notes == []
    assert name == "head.weight" and isinstance(referenced, mf.MCNC)
    assert referenced.theta0 == mf.Theta0.external(uri, "embed.weight",
                                                   tensor_sha256(embedding))
    stranger = mf.MCNC(segment, (16, 8), theta0=mf.Theta0.stored(torch.randn(16, 8)))
    with pytest.raises(MCNCError, match="nor its values under another name"):
        list(reference_base({"head.weight": stranger}, tmp_path / "base.safetensors",
                            tmp_path)[0])


def test_two_packs_racing_to_the_same_new_output(seed: int, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Both runs pass the early "already exists" check and write their file; they meet at the
    final step (a barrier in fsync), where exactly one may create OUT."""
    import threading

    from mcnc_format import atomic

    torch.save(_trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8))).state_dict(),
               tmp_path / "m.pt")
    out = tmp_path / "m.mcnc"
    barrier, real_fsync, met = threading.Barrier(2, timeout=60), os.fsync, threading.local()

    def meet(fd: int) -> None:  # the file's fsync, not the folder's that follows success
        if not getattr(met, "done", False):
            met.done = True
            barrier.wait()
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", meet)
    outcomes: list[object] = []

    def run() -> None:
        try:
            outcomes.append(pack(tmp_path / "m.pt", out))
        except MCNCError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [o for o in outcomes if isinstance(o, MCNCError)]
    assert len(outcomes) == 2 and len(errors) == 1, outcomes
    assert "already exists" in str(errors[0]) and "pass --force" in str(errors[0])
    monkeypatch.undo()
    assert verify_file(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mcnc", "m.pt"]


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_pack_refuses_to_write_over_its_own_checkpoint(link: str, seed: int, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """``mcnc-pack --force m.pt m.pt`` (or OUT a link to m.pt) would destroy the checkpoint."""
    checkpoint = tmp_path / "m.pt"
    torch.save(_trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8))).state_dict(), checkpoint)
    before = checkpoint.read_bytes()
    out = {"same": checkpoint, "symlink": tmp_path / "link.mcnc",
           "hardlink": tmp_path / "hard.mcnc"}[link]
    if link == "symlink":
        out.symlink_to(checkpoint)
    elif link == "hardlink":
        os.link(checkpoint, out)
    assert _run_pack(["--force", str(checkpoint), str(out)], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the input file" in err[0] and "choose another output" in err[0]
    assert checkpoint.read_bytes() == before


def test_pack_refuses_to_write_over_its_base_or_mapping(seed: int, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """OUT the --base checkpoint (or the --mapping file) is refused as OUT the checkpoint is:
    with --force it replaced the base by an adapter pinned to the base it destroyed."""
    torch.manual_seed(seed)
    base = TinyNet()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    torch.save(_adapted(base, ["up"], seed).state_dict(), tmp_path / "adapter.pt")
    (tmp_path / "map.json").write_text('{"mcnc_mapping": 1}')
    inputs = {path: path.read_bytes() for path in tmp_path.iterdir()}
    for option, path in (("--base", "base.safetensors"), ("--mapping", "map.json")):
        args = ["--force", str(tmp_path / "adapter.pt"), str(tmp_path / path), option,
                str(tmp_path / path)]
        assert _run_pack(args, monkeypatch) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is the input file" in err[0], err
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == inputs


def test_names_that_are_not_utf8_text_are_one_line_errors(seed: int, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """A pickle may hold a str with a lone surrogate (a name decoded with surrogateescape);
    as a tensor name msgpack could not encode it and pack ended in a UnicodeEncodeError
    traceback. It is one line naming the tensor; save refuses such metadata the same way."""
    state = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8))).state_dict()
    state["extra\udc80"] = torch.zeros(2)
    torch.save(state, tmp_path / "m.pt")
    assert _run_pack([str(tmp_path / "m.pt"), str(tmp_path / "m.mcnc")], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'extra\\udc80'" in err[0] and "UTF-8" in err[0], err
    for field in ("metadata", "info"):
        with pytest.raises(mf.WriteError, match="UTF-8"):
            mf.save(tmp_path / "m.mcnc", {"w": torch.zeros(2)},
                    **{field: {"producer": "x\udc80"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_checkpoint_path_that_is_not_utf8_is_named_as_such(suffix: str, seed: int,
                                                             tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """torch and safetensors open only UTF-8 paths: a .pt whose name is not UTF-8 was called
    "not a readable torch checkpoint ... damaged or truncated?". The one line says what is
    wrong with it and what to do; the --base checkpoint too."""
    state = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8))).state_dict()
    good = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(state, good)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, good)
    odd = tmp_path / os.fsdecode(b"m\xff" + suffix.encode())
    odd.write_bytes(good.read_bytes())
    for args in ([str(odd), str(tmp_path / "o.mcnc")],
                 [str(good), str(tmp_path / "o.mcnc"), "--base", str(odd)]):
        assert _run_pack(args, monkeypatch) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not valid UTF-8" in err[0] and "rename it" in err[0], err
        assert "damaged" not in err[0]
    assert not (tmp_path / "o.mcnc").exists()


@pytest.mark.parametrize("content", ["binary", "deep"])
def test_mapping_that_is_no_json_text_is_a_one_line_mapping_error(
        content: str, seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--mapping`` given the checkpoint itself (binary) or absurdly nested JSON."""
    checkpoint = tmp_path / "m.pt"
    torch.save(_trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8))).state_dict(), checkpoint)
    mapping = checkpoint if content == "binary" else tmp_path / "deep.json"
    if content == "deep":
        mapping.write_text("[" * 100_000 + "]" * 100_000)
    assert _run_pack([str(checkpoint), str(tmp_path / "m.mcnc"), "--mapping", str(mapping)],
                     monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = "is not UTF-8 text" if content == "binary" else "nested too deeply"
    assert len(err) == 1 and expected in err[0] and "docs/converters.md" in err[0], err
    assert not (tmp_path / "m.mcnc").exists()


def test_plain_dense_checkpoint_says_it_holds_no_mcnc_parameters(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_mlp(seed).state_dict(), tmp_path / "dense.pt")
    assert _run_pack([str(tmp_path / "dense.pt"), str(tmp_path / "d.mcnc")], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no MCNC parameters" in err[0], err
    assert "mcnc_format.torch.reparametrize (docs/torch.md)" in err[0]
    assert "mapping file (docs/converters.md)" in err[0]


def _wrapped(kind: str, state: dict[str, torch.Tensor], model: nn.Module) -> object:
    """The checkpoint layouts of common training code around ``state``."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    optimizer.step()  # Adam's state: tensors under integer keys
    if kind == "state_dict+epoch":
        return {"state_dict": state, "epoch": 3}
    if kind == "lightning":
        return {"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
                "state_dict": state, "optimizer_states": [optimizer.state_dict()],
                "lr_schedulers": [], "callbacks": {}}
    if kind == "ddp":
        return {f"module.{k}": v for k, v in state.items()}
    if kind == "model+optimizer":
        return {"model": state, "optimizer": optimizer.state_dict(), "epoch": 3}
    return {"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}


@pytest.mark.parametrize(("kind", "notes"), [
    ("state_dict+epoch", ["packed the state dict under 'state_dict'; dropped the other "
                          "entries: epoch"]),
    ("lightning", ["packed the state dict under 'state_dict'; dropped the other entries: "
                   "epoch, global_step, pytorch-lightning_version, optimizer_states, "
                   "lr_schedulers, callbacks"]),
    ("ddp", ["removed the prefix 'module.' that every name had"]),
    ("model+optimizer", ["packed the state dict under 'model'; dropped the other entries: "
                         "optimizer, epoch"]),
    ("ddp+compile", ["packed the state dict under 'state_dict'",
                     "removed the prefix 'module.' that every name had",
                     "removed the prefix '_orig_mod.' that every name had"]),
])
def test_wrapped_checkpoints_pack_as_the_bare_state_dict(
        kind: str, notes: list[str], seed: int, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Names come out as the model's own (the same bytes as ``save_model``) and stderr says
    what was unwrapped and dropped."""
    model = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8)))
    save_model(model, tmp_path / "direct.mcnc")
    state = {k: v.clone() for k, v in model.state_dict().items()}  # before Adam steps
    torch.save(_wrapped(kind, state, model), tmp_path / "ckpt.pt")
    assert _run_pack([str(tmp_path / "ckpt.pt"), str(tmp_path / "packed.mcnc")],
                     monkeypatch) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {note}" for note in notes]
    assert (tmp_path / "packed.mcnc").read_bytes() == (tmp_path / "direct.mcnc").read_bytes()


def test_checkpoint_with_two_candidate_state_dicts_is_refused(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8))).state_dict()
    torch.save({"model": state, "ema": state, "epoch": 3}, tmp_path / "ckpt.pt")
    assert _run_pack([str(tmp_path / "ckpt.pt"), str(tmp_path / "p.mcnc")], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds tensors under model, ema" in err[0], err
    assert "torch.save(ckpt['model'], path)" in err[0]
    # two wrapper keys: each named once (the second was listed twice)
    torch.save({"state_dict": state, "model": state}, tmp_path / "ckpt.pt")
    assert _run_pack([str(tmp_path / "ckpt.pt"), str(tmp_path / "p.mcnc")], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds tensors under state_dict, model, so" in err[0], err


def test_an_optimizer_state_is_said_to_be_one(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A Trainer folder's ``optimizer.pt`` given to pack: named as an optimizer's state, not
    "key 0 under 'state' is not a string"."""
    model = _trained(seed, MCNCConfig(k=3, d=40, hidden=(8, 8)))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 12)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert _run_pack([str(tmp_path / "optimizer.pt"), str(tmp_path / "p.mcnc")],
                     monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an optimizer's state" in err[0], err
