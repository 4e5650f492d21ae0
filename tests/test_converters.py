"""Checkpoint reading, the converter registry and mapping files (mcnc_format.converters).

Three promises. A checkpoint that would need pickle execution is refused and nothing in it
runs. Plug-in converters arrive through the entry-point group. And an MCNC checkpoint written
by "other code" (its own key names, generator weights drawn with PyTorch's RNG) packs through a
mapping file into a file whose generator is stored inline and whose weights are the ones that
code computes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mcnc_format as mf
from mcnc_format import UnsafeCheckpointError
from mcnc_format.converters import registry
from mcnc_format.converters.checkpoint import Checkpoint, read_checkpoint
from mcnc_format.converters.mapping import MappingConverter, load_mapping
from mcnc_format.converters.pack import pack
from mcnc_format.errors import MappingError, MCNCError
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


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "legacy torch.save", "pickle protocol 2",
                                       "pickle protocol 5"])
def test_pickled_code_is_refused_and_never_runs(container: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(3), "trap": _WritesMarker(marker)}
    if container == "torch.save":
        torch.save(payload, evil)
    elif container == "legacy torch.save":
        torch.save(payload, evil, _use_new_zipfile_serialization=False)
    else:  # protocol 5 starts with FRAME, which torch refuses before it sees any global
        evil.write_bytes(pickle.dumps(payload, protocol=int(container[-1])))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refusing to load.*safetensors"):
        read_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError):
        pack(evil, tmp_path / "out.mcnc")
    assert not marker.exists()
    assert not (tmp_path / "out.mcnc").exists()


def test_nested_checkpoint_is_flattened(seed: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    torch.save({"encoder": {"fc": {"weight": w, "bias": b}}, "epoch": 7, "tags": ("a", 1)},
               tmp_path / "ckpt.pt")
    ckpt = read_checkpoint(tmp_path / "ckpt.pt")
    assert list(ckpt.tensors) == ["encoder.fc.weight", "encoder.fc.bias"]
    assert torch.equal(ckpt.tensors["encoder.fc.weight"], w)
    assert ckpt.notes == []  # "encoder" is no wrapper: nothing unwrapped
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


def _zip_checkpoint(seed: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))}, buffer)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", ["text", "random bytes", "empty", "truncated zip",
                                    "plain-data pickle 5"])
def test_damaged_checkpoints_are_unreadable_not_unsafe(damage: str, seed: int,
                                                       tmp_path: Path) -> None:
    rng = random.Random(seed)
    content = {
        "text": b"not a checkpoint at all",
        # 0x9c is no pickle opcode: torch says "Unsupported operand 156", as for any noise
        "random bytes": b"\x9c" + rng.randbytes(200),
        "empty": b"",
        "truncated zip": _zip_checkpoint(seed)[: rng.randrange(100, 400)],
        "plain-data pickle 5": pickle.dumps({"step": 3}, protocol=5),
    }[damage]
    (tmp_path / "bad.pt").write_bytes(content)
    said = ("a pickle that torch.save did not write" if damage.startswith("plain-data")
            else "not a readable torch checkpoint")
    with pytest.raises(MCNCError, match=rf"bad\.pt is {said}") as caught:
        read_checkpoint(tmp_path / "bad.pt")
    assert not isinstance(caught.value, UnsafeCheckpointError)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Detected pickle protocol")
def test_damaged_bytes_only_raise_mcnc_errors(seed: int, tmp_path: Path) -> None:
    """Noise, truncations and flipped bytes of a legacy (plain pickle) torch file: torch's
    unpickler raises IndexError, KeyError, UnicodeDecodeError... on them; the reader turns
    every one into an MCNCError naming the file."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3), "meta": {"step": 1}}, buffer,
               _use_new_zipfile_serialization=False)
    legacy = buffer.getvalue()
    path = tmp_path / "fuzz.pt"
    for i in range(300):
        if i % 3 == 0:
            content = rng.randbytes(rng.randrange(1, 300))
        elif i % 3 == 1:
            content = legacy[: rng.randrange(len(legacy))]
        else:
            flipped = bytearray(legacy)
            for _ in range(3):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            content = bytes(flipped)
        path.write_bytes(content)
        try:
            read_checkpoint(path)
        except MCNCError as exc:
            assert "fuzz.pt" in str(exc)


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(2), tmp_path / "bad.pt")
    with pytest.raises(MCNCError, match="expected a state dict"):
        read_checkpoint(tmp_path / "bad.pt")


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
        converter.convert(read_checkpoint(path, unwrap=False))
    assert isinstance(MappingConverter(FOREIGN_MAPPING), MappingConverter)


# -- malformed mapping documents -----------------------------------------------------------
def _small_checkpoint(seed: int) -> Checkpoint:
    """Alpha and beta for one 10x10 tensor (chunks of d=64) and for LoRA factors (5x5, r=2)."""
    g = torch.Generator().manual_seed(seed)
    return Checkpoint(Path("small.pt"), {
        "l.alpha": torch.rand(2, 4, generator=g) * 2 - 1, "l.beta": torch.randn(2, generator=g),
        "q.lora_alpha": torch.rand(1, 4, generator=g) * 2 - 1,
        "q.lora_beta": torch.randn(1, generator=g),
    })


def _small_mapping() -> dict:
    return {"mcnc_mapping": 1, "remaining": "drop",
            "generators": {"g": {"k": 4, "d": 64, "hidden": [8], "seed": 0}},
            "tensors": [{"name": "{x}.weight", "generator": "g", "alpha": "{x}.alpha",
                         "beta": "{x}.beta", "shape": [10, 10]}]}


def _lora_entry(shape: list[int]) -> dict:
    factor = {"generator": "g", "alpha": "q.lora_alpha", "beta": "q.lora_beta"}
    return {"name": "q.weight", "rank": 2, "scale": 1.0, "shape": shape, "A": factor,
            "B": factor}


def _set(path: str, value: object) -> dict:
    """The small mapping with the field at ``path`` (dot-separated, list indices as digits)
    replaced by ``value``."""
    doc = _small_mapping()
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value
    return doc


@pytest.mark.parametrize("doc, match", [
    (_set("generators.g.seed", "abc"), r"generators\.g\.seed: expected an integer, got 'abc'"),
    (_set("generators.g.seed", -1), r"generators\.g\.seed: expected an integer in \[0, "),
    (_set("generators.g.seed", 2**32), r"generators\.g\.seed: expected an integer in"),
    (_set("generators.g.k", 0), r"generators\.g\.k: expected an integer >= 1"),
    (_set("generators.g.d", 6.5), r"generators\.g\.d: expected an integer, got 6\.5"),
    (_set("generators.g.hidden", 8), r"generators\.g\.hidden: expected a list of integers"),
    (_set("generators.g.hidden", [8, "x"]), r"generators\.g\.hidden\[1\]: expected an integer"),
    (_set("generators.g.L", "big"), r"generators\.g\.L: expected a number"),
    (_set("generators.g.bias", "yes"), r"generators\.g\.bias: expected true or false"),
    (_set("tensors.0.shape", "ab"), r"tensors\[0\] \(l\.alpha\)\.shape: expected a list of "),
    (_set("tensors.0.shape", 5), r"\.shape: expected a list of integers, got 5"),
    (_set("tensors.0.shape", [10, -10]), r"\.shape\[1\]: expected an integer >= 0"),
    (_set("tensors.0.generator", ["g"]), r"\.generator: names \['g'\]"),
    (_set("tensors.0.alpha", "{x}.{x}"), r"tensors\[0\]: the template '\{x\}\.\{x\}' matches no"),
    (_set("tensors.0.theta0", {"external": 5, "tensor": "t"}), r"\.theta0: expected a checkpoint"),
    (_set("tensors.0", {"generator": "g", "alpha": "l.alpha", "beta": "l.beta", "members": 5}),
     r"tensors\[0\]\.members: expected a non-empty list"),
    (_set("tensors.0", _lora_entry([2, 5, 5])), r"tensors\[0\]\.shape: a lora tensor is a matrix"),
    (_set("tensors.0", _lora_entry([5])), r"tensors\[0\]\.shape: a lora tensor is a matrix"),
    (_set("tensors.0", {**_lora_entry([5, 5]), "rank": "two"}), r"tensors\[0\]\.rank: expected"),
    (_set("tensors.0", {**_lora_entry([5, 5]), "scale": None}), r"tensors\[0\]\.scale"),
    (_set("metadata", [1, 2]), r"metadata: expected a JSON object of names to strings"),
    (_set("info", "me"), r"info: expected a JSON object of names to strings"),
], ids=lambda v: None if isinstance(v, dict) else v[:40])
def test_malformed_mapping_raises_mapping_error(doc: dict, match: str, seed: int) -> None:
    """Every malformed field is a MappingError naming it, never a bare Python exception."""
    with pytest.raises(MappingError, match=match):
        MappingConverter(doc, "m.json").convert(_small_checkpoint(seed))


def test_small_mapping_and_lora_entry_convert(seed: int) -> None:
    """The documents the malformed cases start from are themselves valid."""
    checkpoint = _small_checkpoint(seed)
    assert set(MappingConverter(_small_mapping()).convert(checkpoint).tensors) == {"l.weight"}
    lora = MappingConverter(_set("tensors.0", _lora_entry([5, 5]))).convert(checkpoint)
    assert set(lora.tensors) == {"q.weight"}


def test_repeated_placeholder_must_match_the_same_text(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {key: torch.rand(2, 4, generator=g) for key in ("a.alpha.a", "b.alpha.c")}
    tensors |= {key: torch.randn(2, generator=g) for key in ("a.beta", "b.beta")}
    doc = _set("tensors.0.alpha", "{x}.alpha.{x}")
    conversion = MappingConverter(doc).convert(Checkpoint(Path("rep.pt"), tensors))
    assert set(conversion.tensors) == {"a.weight"}  # "b.alpha.c": the two {x} differ


def test_a_safetensors_file_is_read_tensor_by_tensor(tmp_path: Path) -> None:
    """``mcnc pack model.safetensors`` holds one tensor at a time, not the file: the
    checkpoint lists names and shapes up front and reads each tensor when it is asked for
    (under a shared prefix taken off, too)."""
    save_file({"module.a": torch.ones(3), "module.b": torch.zeros(2, 2)},
              tmp_path / "c.safetensors")
    seen: list[tuple[str, int]] = []
    ckpt = read_checkpoint(tmp_path / "c.safetensors", lambda n, b: seen.append((n, b)))
    assert sorted(ckpt.tensors) == ["a", "b"] and seen == []
    assert torch.equal(ckpt.tensors["b"], torch.zeros(2, 2))
    assert seen == [("module.b", 16)]
