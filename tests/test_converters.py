"""Checkpoint reading, the converter registry and mapping files (mcnc_format.converters).

Three promises. A checkpoint that would need pickle execution is refused and nothing in it
runs. Plug-in converters arrive through the entry-point group. And an MCNC checkpoint written
by "other code" (its own key names, generator weights drawn with PyTorch's RNG) packs through a
mapping file into a file whose generator is stored inline and whose weights are the ones that
code computes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mcnc_format as mf
from mcnc_format import UnsafeCheckpointError
from mcnc_format.converters import registry
from mcnc_format.converters.checkpoint import read_checkpoint
from mcnc_format.converters.mapping import MappingConverter, load_mapping
from mcnc_format.converters.pack import pack
from mcnc_format.errors import MCNCError
from mcnc_format.generator import GeneratorSpec, draw_philox_weights
from mcnc_format.reader import tensor_sha256


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed so a failure can be replayed with MCNC_TEST_SEED."""
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


# -- safe loading --------------------------------------------------------------------------
class _WritesMarker:
    """Unpickling this object would create the marker file: the attack a .pt file can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickled_code_is_refused_and_never_runs(container: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(3), "trap": _WritesMarker(marker)}
    if container == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refusing to load.*safetensors"):
        read_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError):
        pack(evil, tmp_path / "out.mcnc")
    assert not marker.exists()
    assert not (tmp_path / "out.mcnc").exists()


def test_nested_checkpoint_is_flattened(seed: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    torch.save({"state_dict": {"fc": {"weight": w, "bias": b}}, "epoch": 7, "tags": ("a", 1)},
               tmp_path / "ckpt.pt")
    ckpt = read_checkpoint(tmp_path / "ckpt.pt")
    assert list(ckpt.tensors) == ["state_dict.fc.weight", "state_dict.fc.bias"]
    assert torch.equal(ckpt.tensors["state_dict.fc.weight"], w)
    assert ckpt.extras == {"epoch": 7, "tags": ["a", 1]}
    assert ckpt.nbytes == (12 + 4) * 4


def test_safetensors_checkpoint(seed: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {"a": torch.randn(5, generator=g), "b": torch.randint(0, 9, (2, 2), generator=g)}
    save_file(tensors, tmp_path / "c.safetensors", metadata={"k": "v"})
    seen: list[tuple[str, int]] = []
    ckpt = read_checkpoint(tmp_path / "c.safetensors", lambda n, b: seen.append((n, b)))
    assert ckpt.metadata == {"k": "v"}
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in tensors.items())
    assert sorted(seen) == [("a", 20), ("b", 32)]


@pytest.mark.parametrize("content, match", [
    (b"not a checkpoint at all", "refusing to load"),
    (None, "expected a state dict"),
])
def test_unreadable_checkpoints(content: bytes | None, match: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save(torch.zeros(2), path)
    else:
        path.write_bytes(content)
    with pytest.raises(MCNCError, match=match):
        read_checkpoint(path)


# -- registry ------------------------------------------------------------------------------
def test_plugin_converter_from_entry_point(monkeypatch: pytest.MonkeyPatch, seed: int,
                                           tmp_path: Path) -> None:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "toy_mcnc_plugin.py").write_text(
        "from mcnc_format.converters.registry import Conversion\n"
        "class ToyConverter:\n"
        "    name = 'toy'\n"
        "    description = 'keys starting with toy.'\n"
        "    def detect(self, checkpoint):\n"
        "        return all(k.startswith('toy.') for k in checkpoint.tensors)\n"
        "    def convert(self, checkpoint):\n"
        "        return Conversion({k[4:]: v for k, v in checkpoint.tensors.items()},\n"
        "                          {'converted_by': 'toy'})\n"
    )
    monkeypatch.syspath_prepend(str(plugin_dir))
    entry = EntryPoint("toy", "toy_mcnc_plugin:ToyConverter", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [entry] if group == registry.ENTRY_POINT_GROUP else [])
    assert "toy" in registry.available_converters()
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))
    torch.save({"toy.w": w}, tmp_path / "toy.pt")
    result = pack(tmp_path / "toy.pt", tmp_path / "toy.mcnc")
    assert result.converter == "toy"
    with mf.open(tmp_path / "toy.mcnc") as f:
        assert f.metadata == {"converted_by": "toy"}
        assert torch.equal(f.get_tensor("w"), w)
    sys.modules.pop("toy_mcnc_plugin", None)


def test_unknown_layout_and_converter_are_explained(tmp_path: Path) -> None:
    torch.save({"just.a.weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(MCNCError, match="--mapping FILE"):
        pack(tmp_path / "plain.pt", tmp_path / "out.mcnc")
    with pytest.raises(MCNCError, match="no converter named 'nope'"):
        pack(tmp_path / "plain.pt", tmp_path / "out.mcnc", converter="nope")


# -- a foreign MCNC implementation ("other code") ------------------------------------------
class ForeignGenerator(torch.nn.Module):
    """Another codebase's generator: sine MLP, PyTorch's default init under manual_seed."""

    def __init__(self, k: int, d: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.ModuleList([torch.nn.Linear(k, hidden), torch.nn.Linear(hidden, hidden),
                                        torch.nn.Linear(hidden, d)])

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        x = torch.sin(self.net[0](alpha))
        x = torch.sin(self.net[1](x))
        y = self.net[2](x)
        return y / y.norm(dim=-1, keepdim=True)


class ForeignMCNCLinear(torch.nn.Module):
    """Another codebase's MCNC layer: raw alpha squashed by L * tanh, theta0 in a buffer."""

    def __init__(self, out_f: int, in_f: int, k: int, d: int, L: float, g: torch.Generator
                 ) -> None:
        super().__init__()
        self.shape, self.d, self.L = (out_f, in_f), d, L
        chunks = math.ceil(out_f * in_f / d)
        self.register_buffer("theta_init", torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        self.raw_alpha = torch.nn.Parameter(torch.randn(chunks, k, generator=g))
        self.coef = torch.nn.Parameter(torch.randn(chunks, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(out_f, generator=g))

    def weight(self, generator: ForeignGenerator) -> torch.Tensor:
        phi = generator(self.L * torch.tanh(self.raw_alpha))
        delta = (self.coef[:, None] * phi).reshape(-1)[: math.prod(self.shape)]
        return self.theta_init + delta.reshape(self.shape)


def _foreign_checkpoint(seed: int, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor],
                                                             ForeignGenerator]:
    k, d, hidden, L = 5, 40, 16, 20.0
    torch.manual_seed(seed)  # the other code's generator: PyTorch's own, non-portable RNG
    generator = ForeignGenerator(k, d, hidden)
    g = torch.Generator().manual_seed(seed + 1)
    layers = {"enc": ForeignMCNCLinear(12, 9, k, d, L, g), "dec": ForeignMCNCLinear(7, 12, k, d,
                                                                                    L, g)}
    state: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, value in layer.state_dict().items():
            state[f"net.{name}.{key}"] = value
        expected[f"{name}.weight"] = layer.weight(generator).detach()
        expected[f"{name}.bias"] = layer.bias.detach()
    for key, value in generator.state_dict().items():
        state[f"net.gen.{key}"] = value
    state["net.head.scale"] = torch.rand(3, generator=g)
    expected["head.scale"] = state["net.head.scale"]
    path = tmp_path / "foreign.pt"
    torch.save({"model": state, "step": 1200}, path)
    return path, expected, generator


FOREIGN_MAPPING = {
    "mcnc_mapping": 1,
    "strip_prefix": "model.net.",
    "generators": {
        "g": {"k": 5, "d": 40, "hidden": [16, 16], "L": 20.0,
              "weights": ["gen.net.0.weight", "gen.net.0.bias", "gen.net.1.weight",
                          "gen.net.1.bias", "gen.net.2.weight", "gen.net.2.bias"]},
    },
    "tensors": [
        {"name": "{layer}.weight", "generator": "g", "alpha": "{layer}.raw_alpha",
         "alpha_transform": "tanh", "beta": "{layer}.coef", "theta0": "{layer}.theta_init"},
    ],
    "remaining": "dense",
    "metadata": {"trained_by": "other code"},
}


def test_foreign_checkpoint_round_trip(seed: int, tmp_path: Path) -> None:
    path, expected, generator = _foreign_checkpoint(seed, tmp_path)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(FOREIGN_MAPPING))
    out = tmp_path / "foreign.mcnc"
    result = pack(path, out, mapping=mapping)
    assert result.converter == "mapping"
    with mf.open(out) as f:
        assert len(f.header.generators) == 1
        gen = f.header.generators[0]
        assert gen.seed is None and gen.blobs is not None  # PyTorch's RNG: stored inline
        inline = f.generator_spec(0).inline
        assert inline is not None
        assert all(torch.equal(a, b) for a, b in zip(inline, generator.state_dict().values(),
                                                     strict=True))
        assert f.metadata == {"trained_by": "other code"}
        assert set(f.keys()) == set(expected)
        loaded = f.tensors()
    for name, value in expected.items():
        scale = value.norm().item() + 1.0
        assert (loaded[name] - value).norm().item() <= 1e-5 * scale, name
    copy = tmp_path / "again.mcnc"
    pack(path, copy, mapping=mapping)
    assert copy.read_bytes() == out.read_bytes()


def test_mapping_with_spec_seed_writes_seed_only(seed: int, tmp_path: Path) -> None:
    spec = GeneratorSpec(k=3, d=16, hidden=(8, 8), seed=seed % 2**32)
    g = torch.Generator().manual_seed(seed)
    state = {f"gen.{i}": w for i, w in enumerate(draw_philox_weights(spec, "cpu"))}
    state |= {"a": torch.rand(5, 2, 3, generator=g) * 40 - 20, "b": torch.randn(5, 2, generator=g)}
    torch.save(state, tmp_path / "c.pt")
    doc = {"mcnc_mapping": 1, "remaining": "error",
           "generators": {"g": {"k": 3, "d": 16, "hidden": [8, 8], "seed": spec.seed,
                                "weights": [f"gen.{i}" for i in range(6)]}},
           "tensors": [{"generator": "g", "alpha": "a", "beta": "b",
                        "members": [{"name": "x", "shape": [6, 6]},
                                    {"name": "y", "shape": [4, 11]}]}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    pack(tmp_path / "c.pt", tmp_path / "c.mcnc", mapping=tmp_path / "m.json")
    with mf.open(tmp_path / "c.mcnc") as f:
        assert f.header.generators[0].seed == spec.seed
        assert len(f.header.segments) == 1 and f.header.segments[0].m == 2
        assert f.get_tensor("y").shape == (4, 11)
    doc["generators"]["g"]["seed"] = (spec.seed + 1) % 2**32
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(MCNCError, match="not the spec's Philox draw"):
        pack(tmp_path / "c.pt", tmp_path / "d.mcnc", mapping=tmp_path / "m.json")


def test_mapping_lora_entry_with_external_base(seed: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(10, 6, generator=g)
    save_file({"layer.weight": base}, tmp_path / "base.safetensors")
    torch.manual_seed(seed)
    generator = ForeignGenerator(4, 20, 8)
    state = {f"gen.{k}": v for k, v in generator.state_dict().items()}
    r = 2
    for part, n in (("A", r * 6), ("B", 10 * r)):
        chunks = math.ceil(n / 20)
        state[f"layer.lora_{part}.alpha"] = torch.rand(chunks, 4, generator=g) * 40 - 20
        state[f"layer.lora_{part}.beta"] = torch.randn(chunks, generator=g)
    torch.save(state, tmp_path / "adapter.pt")
    doc = {"mcnc_mapping": 1, "remaining": "error",
           "generators": {"g": {"k": 4, "d": 20, "hidden": [8, 8],
                                "weights": [f"gen.net.{i}.{w}" for i in range(3)
                                            for w in ("weight", "bias")]}},
           "tensors": [{"name": "{m}.weight", "rank": r, "scale": 0.5,
                        "theta0": {"external": "base.safetensors", "tensor": "{m}.weight"},
                        "A": {"generator": "g", "alpha": "{m}.lora_A.alpha",
                              "beta": "{m}.lora_A.beta"},
                        "B": {"generator": "g", "alpha": "{m}.lora_B.alpha",
                              "beta": "{m}.lora_B.beta"}}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    pack(tmp_path / "adapter.pt", tmp_path / "adapter.mcnc", mapping=tmp_path / "m.json")
    with mf.open(tmp_path / "adapter.mcnc") as f:
        entry = f.entry("layer.weight")
        assert entry.theta0.kind == "external" and entry.theta0.sha256 == tensor_sha256(base)
        a, b, scale = f.get_lora_factors("layer.weight")
        merged = f.get_tensor("layer.weight")
    with torch.no_grad():
        phi_a = generator(state["layer.lora_A.alpha"]) * state["layer.lora_A.beta"][:, None]
        phi_b = generator(state["layer.lora_B.alpha"]) * state["layer.lora_B.beta"][:, None]
    want_a = phi_a.reshape(-1)[: r * 6].reshape(r, 6)
    want_b = phi_b.reshape(-1)[: 10 * r].reshape(10, r)
    assert scale == 0.5
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, want_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged, base + 0.5 * want_b @ want_a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    ({"mcnc_mapping": 2}, "mcnc_mapping: expected 1"),
    ({"extra": 1}, "unknown field"),
    ({"remaining": "keep"}, "remaining: expected one of"),
    ({"tensors": [{"name": "{layer}.weight", "generator": "g", "alpha": "{layer}.nope",
                   "beta": "{layer}.coef"}]}, "matches no checkpoint key"),
    ({"tensors": [{"name": "enc.weight", "generator": "h", "alpha": "enc.raw_alpha",
                   "beta": "enc.coef", "theta0": "enc.theta_init"}]}, "names 'h'"),
    ({"tensors": [{"name": "enc.weight", "generator": "g", "alpha": "enc.raw_alpha",
                   "beta": "enc.coef"}]}, "needs 'shape'"),
])
def test_mapping_errors_name_the_field(change: dict, match: str, seed: int,
                                       tmp_path: Path) -> None:
    path, _, _ = _foreign_checkpoint(seed, tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(FOREIGN_MAPPING | change))
    with pytest.raises(MCNCError, match=match):
        converter = load_mapping(tmp_path / "m.json")
        converter.convert(read_checkpoint(path))
    assert isinstance(MappingConverter(FOREIGN_MAPPING), MappingConverter)
