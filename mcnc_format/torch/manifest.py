"""The manifest: everything needed to rebuild a reparametrized model's ``.mcnc`` file.

A reparametrized module stores its manifest as a ``uint8`` buffer holding UTF-8 JSON
(``mcnc_config`` in the state dict), so ``torch.save(model.state_dict())`` followed by
``torch.load(..., weights_only=True)`` is all a converter needs: no pickle, no model class.
The runtime (``runtime.py``) and the exporter (``export.py``) both read this one description,
so what trains is what is written. docs/torch.md documents the layout field by field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import constants as C
from ..constants import Theta0Kind
from ..errors import ReparametrizeError
from ..header import MemberEntry, Theta0Entry
from .config import MCNCConfig

__all__ = [
    "CONFIG_KEY",
    "MANIFEST_FORMAT",
    "LoRASpec",
    "Manifest",
    "MemberSpec",
    "alpha_key",
    "beta_key",
]

CONFIG_KEY = "mcnc_config"
MANIFEST_FORMAT = "mcnc_format.torch/1"


def alpha_key(segment: int) -> str:
    """Name of segment ``segment``'s alpha parameter on the reparametrized module."""
    return f"mcnc_alpha_{segment}"


def beta_key(segment: int) -> str:
    """Name of segment ``segment``'s beta parameter on the reparametrized module."""
    return f"mcnc_beta_{segment}"


@dataclass(frozen=True)
class MemberSpec(MemberEntry):
    """One compressed tensor: where it lives in the module, and in which segment.

    The spec's member fields (``shape``, ``dtype``, ``segment``, ``offset``, ``theta0``) plus
    ``name``, its path in the reparametrized module (``"fc.weight"``,
    ``"q.lora_A.weight"``); ``theta0`` is ``zeros``, ``prng`` (all fields given), or ``blob``,
    meaning "the tensor in the state dict under ``theta0_key``". ``aliases``: the other names
    of a tied parameter (``lm_head.weight`` tied to ``embed.weight``): the plain model has the
    tensor under each of them, the file stores it once, under ``name``.
    """

    name: str
    aliases: tuple[str, ...] = ()

    @property
    def theta0_key(self) -> str:
        """Where ``torch.nn.utils.parametrize`` keeps this tensor's theta0 in the state dict."""
        return self.theta0_key_of(self.name)

    @staticmethod
    def theta0_key_of(name: str) -> str:
        """The state-dict key of the theta0 of the parametrized tensor ``name``."""
        module_path, _, attribute = name.rpartition(".")
        prefix = f"{module_path}." if module_path else ""
        return f"{prefix}parametrizations.{attribute}.original"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **super().to_dict(), **_aliases_dict(self.aliases)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberSpec:
        return cls(tuple(int(s) for s in d["shape"]), str(d["dtype"]), int(d["segment"]),
                   int(d["offset"]), _theta0(d["theta0"]), str(d["name"]),
                   _aliases(d))


def _aliases_dict(aliases: tuple[str, ...]) -> dict[str, Any]:
    """``{"aliases": [...]}`` for a tied tensor, nothing otherwise (so manifests of untied
    models read as they did before ties were supported)."""
    return {"aliases": list(aliases)} if aliases else {}


def _aliases(d: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(a) for a in d.get("aliases", ()))


@dataclass(frozen=True)
class StateDictTheta0(Theta0Entry):
    """A member whose theta0 values are kept in the state dict, under its ``theta0_key``
    (written ``{kind: "blob"}`` without an index): the export stores them in a blob of their
    own (``writer.Theta0.stored``), which gives the file's ``BlobTheta0`` its index."""

    kind: ClassVar[Theta0Kind] = Theta0Kind.BLOB

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value}


def _theta0(value: dict[str, Any]) -> Theta0Entry:
    """A member's theta0; ``{kind: "blob"}`` without an index means "in the state dict"."""
    if value.get("kind") == Theta0Kind.BLOB and "blob" not in value:
        return StateDictTheta0()
    return Theta0Entry.from_dict(value, "MCNC manifest")


@dataclass(frozen=True)
class LoRASpec:
    """An MCNC-LoRA adapter on the Linear at ``module``: ``W = base + scale * B @ A``.

    ``A`` and ``B`` index ``Manifest.members``. In the plain model the merged weight is
    ``{module}.weight``; in the reparametrized one the base Linear is ``{module}.base_layer``.
    ``aliases``: other paths of the same Linear (a layer reused under several names); the
    file stores its weight once, under ``{module}.weight``.
    """

    module: str
    A: int
    B: int
    scale: float
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "A": self.A, "B": self.B, "scale": self.scale,
                **_aliases_dict(self.aliases)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRASpec:
        return cls(str(d["module"]), int(d["A"]), int(d["B"]), float(d["scale"]), _aliases(d))


@dataclass(frozen=True)
class Manifest:
    """The config, the compressed tensors, the segment sizes, the LoRA adapters and ``order``:
    the plain (un-reparametrized) model's state-dict names in order, which the export keeps."""

    config: MCNCConfig
    members: tuple[MemberSpec, ...]
    chunks: tuple[int, ...]
    loras: tuple[LoRASpec, ...]
    order: tuple[str, ...]

    def segment_members(self, segment: int) -> list[int]:
        """Indices of the members of ``segment``, in offset order."""
        found = [i for i, m in enumerate(self.members) if m.segment == segment]
        return sorted(found, key=lambda i: self.members[i].offset)

    def to_json(self) -> str:
        body = {
            "format": MANIFEST_FORMAT,
            "config": self.config.to_dict(),
            "members": [m.to_dict() for m in self.members],
            "chunks": list(self.chunks),
            "lora": [x.to_dict() for x in self.loras],
            "order": list(self.order),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def check(self) -> None:
        """Cross-field consistency, so that export never indexes out of range: raises
        ``ValueError`` naming the first inconsistency (``from_tensor`` reports it)."""
        for member in self.members:
            if not 0 <= member.segment < len(self.chunks):
                raise ValueError(f"member {member.name!r} names segment {member.segment}; "
                                 f"there are {len(self.chunks)}")
            if member.dtype not in C.FLOAT_DTYPES or any(d < 0 for d in member.shape):
                raise ValueError(f"member {member.name!r} has dtype {member.dtype!r} and "
                                 f"shape {list(member.shape)}")
        for lora in self.loras:
            for index in (lora.A, lora.B):
                if not 0 <= index < len(self.members):
                    raise ValueError(f"LoRA {lora.module!r} names member {index}; there are "
                                     f"{len(self.members)}")

    def to_tensor(self) -> torch.Tensor:
        """The manifest as the ``uint8`` tensor stored under ``mcnc_config``."""
        return torch.frombuffer(bytearray(self.to_json().encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, source: str) -> Manifest:
        """Parse the ``mcnc_config`` tensor of a state dict; ``source`` names it in errors."""
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise ReparametrizeError(f"{source}: expected a 1-D uint8 tensor holding the MCNC "
                                     f"manifest, got {tensor.dtype} {list(tensor.shape)}")
        try:
            body = json.loads(tensor.cpu().numpy().tobytes().decode("utf-8"))
            if not isinstance(body, dict):
                raise TypeError(f"expected a JSON object, got {type(body).__name__}")
            if body.get("format") != MANIFEST_FORMAT:
                raise ReparametrizeError(
                    f"{source}: manifest format {body.get('format')!r} is not "
                    f"{MANIFEST_FORMAT!r}; upgrade mcnc-format to read it")
            manifest = cls(
                MCNCConfig.from_dict(body["config"]),
                tuple(MemberSpec.from_dict(m) for m in body["members"]),
                tuple(int(c) for c in body["chunks"]),
                tuple(LoRASpec.from_dict(x) for x in body["lora"]),
                tuple(str(n) for n in body["order"]),
            )
            manifest.check()
            return manifest
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError, IndexError) as exc:
            if isinstance(exc, ReparametrizeError):
                raise
            raise ReparametrizeError(f"{source}: the MCNC manifest is damaged ({exc}); re-save "
                                     "the state dict of the reparametrized model") from exc

