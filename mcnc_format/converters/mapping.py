"""Mapping files: MCNC checkpoints trained by other code, converted without writing code.

A mapping file is a small JSON document that says which checkpoint keys hold alpha, beta,
theta0 and the generator's weights, and what tensor each segment rebuilds. docs/converters.md
is its reference; in short::

    {
      "mcnc_mapping": 1,
      "strip_prefix": "model.",
      "generators": {
        "g": {"k": 8, "d": 400, "hidden": [32, 32], "L": 20.0,
              "weights": ["gen.0.weight", "gen.0.bias", "gen.2.weight", "gen.2.bias",
                          "gen.4.weight", "gen.4.bias"]}
      },
      "tensors": [
        {"name": "{layer}.weight", "generator": "g", "alpha": "{layer}.mcnc.alpha",
         "beta": "{layer}.mcnc.beta", "theta0": "{layer}.mcnc.theta0"}
      ],
      "remaining": "dense"
    }

``{placeholder}`` fields in an entry's ``alpha`` key are matched against the checkpoint's keys;
each match instantiates the entry with the placeholder filled in everywhere. Generator weights
named by ``weights`` were drawn by the other code (typically with PyTorch's RNG, which gives
different numbers on other devices and releases), so they are stored inline in the file; a
``seed`` is written instead only when the mapping gives one and the weights equal the spec's
Philox draw for it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MappingError
from ..generator import GeneratorSpec, draw_philox_weights
from ..reader import tensor_sha256
from ..writer import MCNC, LoRA, Segment, TensorSource, Theta0
from .checkpoint import Checkpoint
from .registry import Conversion

__all__ = ["MAPPING_VERSION", "MappingConverter", "load_mapping"]

MAPPING_VERSION = 1
ALPHA_TRANSFORMS = ("none", "clamp", "tanh")
REMAINING_POLICIES = ("dense", "drop", "error")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = {"mcnc_mapping", "strip_prefix", "generators", "tensors", "remaining", "metadata",
             "info"}
_GENERATOR_KEYS = {"k", "d", "hidden", "L", "omega0", "bias", "normalize", "weights", "seed"}
_SEGMENT_KEYS = {"generator", "alpha", "beta", "alpha_transform"}
_MEMBER_KEYS = {"name", "shape", "theta0", "dtype"}
_LORA_KEYS = {"name", "lora", "shape", "theta0", "dtype", "scale", "rank", "A", "B"}
SEED_MAX = 2**32 - 1  # SPEC R30: a philox seed is a uint32


def load_mapping(path: str | os.PathLike[str]) -> MappingConverter:
    """Read a mapping file; its structure is checked here, its keys against a checkpoint at
    conversion time."""
    source = Path(path)
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MappingError(f"{source}: cannot read the mapping file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise MappingError(f"{source}: not a mapping file: byte {exc.start} is not UTF-8 text "
                           "(a binary file, such as the checkpoint itself?); pass the JSON "
                           "mapping file (docs/converters.md)") from None
    except json.JSONDecodeError as exc:
        raise MappingError(f"{source}: not valid JSON: {exc}") from exc
    except RecursionError:
        raise MappingError(f"{source}: nested too deeply to be a mapping file "
                           "(docs/converters.md)") from None
    return MappingConverter(document, str(source))


@dataclass
class _Use:
    """One instantiated template: which keys an entry reads, with placeholders filled."""

    entry: dict[str, Any]
    where: str


class MappingConverter:
    """A ``Converter`` driven by a mapping document (see the module docstring)."""

    name = "mapping"
    description = "MCNC checkpoints of other code, described by a JSON mapping file"

    def __init__(self, document: Any, source: str = "<mapping>",
                 output_dir: str | os.PathLike[str] = ".") -> None:
        self.source = source
        self.output_dir = Path(output_dir)
        self.doc = self._check_document(document)

    # -- structure -------------------------------------------------------------------------
    def fail(self, where: str, message: str) -> MappingError:
        return MappingError(f"{self.source}: {where}: {message}")

    def _check_document(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise self.fail("top level", "expected a JSON object")
        if doc.get("mcnc_mapping") != MAPPING_VERSION:
            raise self.fail("mcnc_mapping", f"expected {MAPPING_VERSION}, got "
                            f"{doc.get('mcnc_mapping')!r}; this mcnc-format reads mapping "
                            f"version {MAPPING_VERSION}")
        self._no_unknown(doc, _TOP_KEYS, "top level")
        if not isinstance(doc.get("generators"), dict) or not doc["generators"]:
            raise self.fail("generators", "expected an object naming at least one generator")
        for name, g in doc["generators"].items():
            self._no_unknown(g, _GENERATOR_KEYS, f"generators.{name}")
            if "weights" not in g and "seed" not in g:
                raise self.fail(f"generators.{name}", "needs 'weights' (the checkpoint keys of "
                                "[W_1, b_1, ..., W_out, b_out]) or 'seed' (spec Philox)")
        if not isinstance(doc.get("tensors"), list) or not doc["tensors"]:
            raise self.fail("tensors", "expected a non-empty list of entries")
        remaining = doc.get("remaining", "dense")
        if remaining not in REMAINING_POLICIES:
            raise self.fail("remaining", f"expected one of {REMAINING_POLICIES}, got "
                            f"{remaining!r}")
        return doc

    def _no_unknown(self, obj: Any, known: set[str], where: str) -> None:
        if not isinstance(obj, dict):
            raise self.fail(where, "expected a JSON object")
        unknown = sorted(set(obj) - known)
        if unknown:
            raise self.fail(where, f"unknown field(s) {unknown}; known: {sorted(known)}")

    # -- Converter -------------------------------------------------------------------------
    def detect(self, checkpoint: Checkpoint) -> bool:
        """A mapping is chosen explicitly (``--mapping``), never guessed."""
        return False

    def convert(self, checkpoint: Checkpoint) -> Conversion:
        tensors = self._renamed(checkpoint)
        used: set[str] = set()
        generators = {name: self._generator(name, g, tensors, used)
                      for name, g in self.doc["generators"].items()}
        out: dict[str, TensorSource] = {}
        for i, raw in enumerate(self.doc["tensors"]):
            for use in self._expand(raw, f"tensors[{i}]", tensors):
                self._convert_entry(use, tensors, generators, used, out)
        self._remaining(tensors, used, out, checkpoint)
        info = {"producer": "mcnc pack --mapping", "source": checkpoint.path.name}
        info.update(self._strings("info"))
        return Conversion(out, self._strings("metadata"), info)

    def _strings(self, field: str) -> dict[str, str]:
        """``metadata`` / ``info``: a JSON object whose values are written as strings."""
        value = self.doc.get(field, {})
        if not isinstance(value, dict):
            raise self.fail(field, f"expected a JSON object of names to strings, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}

    def _renamed(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        prefix = self.doc.get("strip_prefix", "")
        if not isinstance(prefix, str):
            raise self.fail("strip_prefix", "expected a string")
        renamed: dict[str, torch.Tensor] = {}
        for key, value in checkpoint.tensors.items():
            new = key[len(prefix):] if prefix and key.startswith(prefix) else key
            if new in renamed:
                raise self.fail("strip_prefix", f"stripping {prefix!r} makes two keys {new!r}")
            renamed[new] = value
        return renamed

    # -- generators ------------------------------------------------------------------------
    def _generator(self, name: str, g: dict[str, Any], tensors: dict[str, torch.Tensor],
                   used: set[str]) -> GeneratorSpec:
        where = f"generators.{name}"
        arch = dict(k=self._integer(g.get("k"), f"{where}.k", 1),
                    d=self._integer(g.get("d"), f"{where}.d", 1),
                    hidden=self._integers(g.get("hidden"), f"{where}.hidden", 1),
                    L=self._number(g.get("L", 20.0), f"{where}.L"),
                    omega0=self._number(g.get("omega0", 1.0), f"{where}.omega0"),
                    bias=self._boolean(g.get("bias", True), f"{where}.bias"),
                    normalize=self._boolean(g.get("normalize", True), f"{where}.normalize"))
        seed = None if g.get("seed") is None else self._integer(g["seed"], f"{where}.seed", 0,
                                                                  SEED_MAX)
        if "weights" not in g:
            if seed is None:
                raise self.fail(f"{where}.seed", "expected a uint32 (no 'weights' given)")
            return GeneratorSpec(**arch, seed=seed)
        keys = g["weights"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise self.fail(f"{where}.weights", "expected a list of checkpoint keys")
        shapes = GeneratorSpec(**arch, seed=0).parameter_shapes()
        if len(keys) != len(shapes):
            raise self.fail(f"{where}.weights", f"expected {len(shapes)} keys "
                            f"([W_1, b_1, ..., W_out, b_out]{'' if arch['bias'] else ', no biases'}"
                            f"), got {len(keys)}")
        weights = []
        for key, shape in zip(keys, shapes, strict=True):
            value = self._tensor(tensors, key, f"{where}.weights")
            if tuple(value.shape) != shape:
                raise self.fail(f"{where}.weights", f"{key!r} has shape {list(value.shape)}, "
                                f"the generator needs {list(shape)} (PyTorch Linear layout "
                                "[out, in])")
            weights.append(value.detach().to(torch.float32))
            used.add(key)
        if seed is not None:
            drawn = draw_philox_weights(GeneratorSpec(**arch, seed=seed), "cpu")
            if all(torch.equal(a, b) for a, b in zip(weights, drawn, strict=True)):
                return GeneratorSpec(**arch, seed=seed)
            raise self.fail(where, f"the weights are not the spec's Philox draw for seed "
                            f"{seed}; drop 'seed' to store them inline")
        return GeneratorSpec(**arch, seed=None, inline=tuple(weights))

    # -- templates -------------------------------------------------------------------------
    def _expand(self, raw: Any, where: str, tensors: dict[str, torch.Tensor]) -> Iterator[_Use]:
        if not isinstance(raw, dict):
            raise self.fail(where, "expected a JSON object")
        anchor = self._anchor(raw, where)
        if not _PLACEHOLDER.search(anchor):
            yield _Use(raw, where)
            return
        pattern = _template_pattern(anchor)
        matched = False
        for key in tensors:
            m = pattern.match(key)
            if m:
                matched = True
                yield _Use(_fill(raw, m.groupdict()), f"{where} ({key})")
        if not matched:
            raise self.fail(where, f"the template {anchor!r} matches no checkpoint key")

    def _anchor(self, raw: dict[str, Any], where: str) -> str:
        segment = raw.get("A", raw)
        if not isinstance(segment, dict) or not isinstance(segment.get("alpha"), str):
            raise self.fail(where, "needs 'alpha' (a checkpoint key, possibly a template)")
        return segment["alpha"]

    # -- entries ---------------------------------------------------------------------------
    def _convert_entry(self, use: _Use, tensors: dict[str, torch.Tensor],
                       generators: dict[str, GeneratorSpec], used: set[str],
                       out: dict[str, TensorSource]) -> None:
        entry, where = use.entry, use.where
        if "A" in entry or "B" in entry:
            self._no_unknown(entry, _LORA_KEYS, where)
            name = self._name(entry, where, out)
            out[name] = self._lora(entry, where, tensors, generators, used)
            return
        members = entry.get("members")
        if members is None:
            self._no_unknown(entry, _SEGMENT_KEYS | _MEMBER_KEYS, where)
            located = [(where, {k: v for k, v in entry.items() if k in _MEMBER_KEYS})]
        else:
            self._no_unknown(entry, _SEGMENT_KEYS | {"members"}, where)
            if not isinstance(members, list) or not members:
                raise self.fail(f"{where}.members", "expected a non-empty list of tensors "
                                "sharing the segment")
            located = [(f"{where}.members[{j}]", m) for j, m in enumerate(members)]
        plans = []
        for member_where, member in located:
            self._no_unknown(member, _MEMBER_KEYS, member_where)
            theta0, theta0_shape = self._theta0(member.get("theta0"), member_where, tensors,
                                                used)
            shape = self._shape(member, theta0_shape, member_where)
            plans.append((self._name(member, member_where, out), shape, theta0,
                          self._dtype(member, member_where)))
        segment = self._segment(entry, where, [math.prod(p[1]) for p in plans], tensors,
                                generators, used)
        for name, shape, theta0, dtype in plans:
            out[name] = MCNC(segment, shape, dtype, theta0)

    def _lora(self, entry: dict[str, Any], where: str, tensors: dict[str, torch.Tensor],
              generators: dict[str, GeneratorSpec], used: set[str]) -> LoRA:
        theta0, theta0_shape = self._theta0(entry.get("theta0"), where, tensors, used)
        shape = self._shape(entry, theta0_shape, where)
        if len(shape) != 2:
            raise self.fail(f"{where}.shape", f"a lora tensor is a matrix [out_features, "
                            f"in_features], got shape {list(shape)}")
        out_features, in_features = shape
        rank = self._integer(entry.get("rank"), f"{where}.rank", 1)
        scale = self._number(entry.get("scale"), f"{where}.scale (PEFT: lora_alpha / r)")
        factors = []
        for label, shape in (("A", (rank, in_features)), ("B", (out_features, rank))):
            spec = entry.get(label)
            self._no_unknown(spec, _SEGMENT_KEYS, f"{where}.{label}")
            segment = self._segment(spec, f"{where}.{label}", [math.prod(shape)], tensors,
                                    generators, used)
            factors.append(MCNC(segment, shape, torch.float32))
        return LoRA(factors[0], factors[1], scale, self._dtype(entry, where), theta0)

    def _segment(self, spec: dict[str, Any], where: str, sizes: list[int],
                 tensors: dict[str, torch.Tensor], generators: dict[str, GeneratorSpec],
                 used: set[str]) -> Segment:
        gen_name = spec.get("generator")
        if not isinstance(gen_name, str) or gen_name not in generators:
            raise self.fail(f"{where}.generator", f"names {gen_name!r}; the mapping defines "
                            f"{sorted(generators)}")
        generator = generators[gen_name]
        alpha = self._tensor(tensors, spec.get("alpha"), f"{where}.alpha").detach()
        beta = self._tensor(tensors, spec.get("beta"), f"{where}.beta").detach()
        used.update((spec["alpha"], spec["beta"]))
        chunks = -(-sum(sizes) // generator.d)
        if alpha.dim() == 2:
            alpha = alpha.unsqueeze(1)
        if alpha.dim() != 3 or alpha.shape[0] != chunks or alpha.shape[2] != generator.k:
            raise self.fail(f"{where}.alpha", f"{spec['alpha']!r} has shape "
                            f"{list(alpha.shape)}; expected [chunks={chunks}, k={generator.k}] or "
                            f"[chunks, m, k] for {sum(sizes)} values in chunks of d="
                            f"{generator.d}")
        m = alpha.shape[1]
        if beta.numel() != chunks * m:
            raise self.fail(f"{where}.beta", f"{spec['beta']!r} has shape {list(beta.shape)}; "
                            f"expected {chunks * m} values ([chunks, m] = [{chunks}, {m}])")
        alpha = self._transform(alpha, spec.get("alpha_transform", "none"), generator.L, where)
        stored = (torch.float32, torch.float16, torch.bfloat16)
        alpha = alpha if alpha.dtype in stored else alpha.to(torch.float32)
        beta = beta.reshape(chunks, m)
        beta = beta if beta.dtype in stored else beta.to(torch.float32)
        return Segment(generator, alpha.contiguous(), beta.contiguous())

    def _transform(self, alpha: torch.Tensor, transform: str, bound: float, where: str
                   ) -> torch.Tensor:
        """The other code may keep raw parameters and bound them on use: store the values it
        actually fed the generator."""
        if transform == "none":
            return alpha
        if transform == "clamp":
            return alpha.clamp(-bound, bound)
        if transform == "tanh":
            return (bound * torch.tanh(alpha.to(torch.float32))).to(alpha.dtype)
        raise self.fail(f"{where}.alpha_transform", f"expected one of {ALPHA_TRANSFORMS}, got "
                        f"{transform!r}")

    def _theta0(self, spec: Any, where: str, tensors: dict[str, torch.Tensor], used: set[str]
                ) -> tuple[Theta0, tuple[int, ...] | None]:
        if spec is None:
            return Theta0.zeros(), None
        if isinstance(spec, str):
            value = self._tensor(tensors, spec, f"{where}.theta0")
            used.add(spec)
            return Theta0.stored(value.detach()), tuple(value.shape)
        if (isinstance(spec, dict) and set(spec) == {"external", "tensor"}
                and all(isinstance(v, str) for v in spec.values())):
            return self._external(spec["external"], spec["tensor"], f"{where}.theta0")
        raise self.fail(f"{where}.theta0", "expected a checkpoint key, null (zeros) or "
                        '{"external": "base.safetensors", "tensor": "name"}')

    def _external(self, uri: str, name: str, where: str) -> tuple[Theta0, tuple[int, ...]]:
        from safetensors import safe_open

        path = self.output_dir / uri
        try:
            with safe_open(str(path), framework="pt") as f:
                value = f.get_tensor(name)
        except Exception as exc:
            raise self.fail(where, f"cannot read tensor {name!r} from {path} ({exc}); the "
                            "external path is relative to the output file's folder") from None
        return Theta0.external(uri, name, tensor_sha256(value)), tuple(value.shape)

    def _shape(self, entry: dict[str, Any], theta0_shape: tuple[int, ...] | None, where: str
               ) -> tuple[int, ...]:
        if "shape" in entry:
            shape = self._integers(entry["shape"], f"{where}.shape", 0)
            if theta0_shape is not None and shape != theta0_shape:
                raise self.fail(f"{where}.shape", f"{list(shape)} differs from theta0's shape "
                                f"{list(theta0_shape)}")
            return shape
        if theta0_shape is None:
            raise self.fail(where, "needs 'shape' (no theta0 tensor to take it from)")
        return theta0_shape

    def _dtype(self, entry: dict[str, Any], where: str) -> torch.dtype:
        name = entry.get("dtype", "float32")
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise self.fail(f"{where}.dtype", f"expected a torch float dtype name such as "
                            f"'float32' or 'bfloat16', got {name!r}")
        return dtype

    def _name(self, entry: dict[str, Any], where: str, out: dict[str, TensorSource]) -> str:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(where, "needs 'name', the tensor's name in the model")
        if name in out:
            raise self.fail(where, f"tensor {name!r} is produced twice")
        return name

    def _tensor(self, tensors: dict[str, torch.Tensor], key: Any, where: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise self.fail(where, f"no checkpoint key {key!r}")
        return tensors[key]

    # -- JSON values ---------------------------------------------------------------------------
    def _integer(self, value: Any, where: str, minimum: int, maximum: int | None = None) -> int:
        """A JSON integer in range (``4.0`` passes; ``"4"``, ``true`` and ``4.5`` do not)."""
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not float(value).is_integer()):
            raise self.fail(where, f"expected an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise self.fail(where, f"expected an integer {bound}, got {value!r}")
        return int(value)

    def _integers(self, value: Any, where: str, minimum: int) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list of integers, got {value!r}")
        return tuple(self._integer(v, f"{where}[{i}]", minimum) for i, v in enumerate(value))

    def _number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"expected a number, got {value!r}")
        return float(value)

    def _boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value

    def _remaining(self, tensors: dict[str, torch.Tensor], used: set[str],
                   out: dict[str, TensorSource], checkpoint: Checkpoint) -> None:
        policy = self.doc.get("remaining", "dense")
        rest = [k for k in tensors if k not in used]
        if policy == "error" and rest:
            raise self.fail("remaining", f"{checkpoint.path} has {len(rest)} keys the mapping "
                            f"does not use, e.g. {rest[:5]}; map them or set remaining to "
                            "'dense' or 'drop'")
        if policy == "dense":
            for key in rest:
                if key in out:
                    raise self.fail("remaining", f"checkpoint key {key!r} is also a mapped "
                                    "tensor's name; set remaining to 'drop'")
                out[key] = tensors[key]


def _template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching keys of ``template``: the first ``{x}`` captures, repeats must match
    the same text (a backreference)."""
    parts, seen = [], set()
    for i, part in enumerate(_PLACEHOLDER.split(template)):
        if i % 2 == 0:
            parts.append(re.escape(part))
        elif part in seen:
            parts.append(f"(?P={part})")
        else:
            seen.add(part)
            parts.append(f"(?P<{part}>.+?)")
    return re.compile("".join(parts) + r"\Z")


def _fill(value: Any, groups: dict[str, str]) -> Any:
    """``value`` with every ``{placeholder}`` in its strings replaced."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: groups.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _fill(v, groups) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, groups) for v in value]
    return value
