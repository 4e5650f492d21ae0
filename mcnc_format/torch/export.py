"""From a reparametrized state dict to the writer's inputs: ``export_state_dict``, ``save_model``.

``export_state_dict`` is a pure function of the state dict (plus optional theta0 overrides),
so ``save_model(model, path)`` and a converter holding only ``torch.load(...,
weights_only=True)`` of a saved state dict write byte-identical files. The output uses the
plain model's names, in the plain model's state-dict order: ``mcnc_format.load(path)`` feeds
``plain_model.load_state_dict(..., strict=True)`` of the un-reparametrized architecture. A
tied tensor is stored once, under its first name (``mcnc_format.load_into`` ties the others).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..dtypes import to_torch
from ..errors import ReparametrizeError
from ..sharing import without_duplicates
from ..writer import MCNC, DeclaredTheta0, LoRA, Segment, TensorSource, Theta0, save
from .manifest import (
    CONFIG_KEY,
    LoRASpec,
    Manifest,
    MemberSpec,
    StateDictTheta0,
    alpha_key,
    beta_key,
)
from .runtime import stored_values

__all__ = ["export_state_dict", "save_model"]


def export_state_dict(state_dict: Mapping[str, torch.Tensor],
                      theta0: Mapping[str, Theta0] | None = None) -> dict[str, TensorSource]:
    """The writer inputs (``{name: tensor | MCNC | LoRA}``) of a reparametrized state dict.

    Compressed tensors become ``MCNC`` members of segments holding ``clamp(alpha, -L, L)``
    and beta in their storage dtypes; MCNC-LoRA targets become ``LoRA`` entries (theta0 = the
    base weight, stored); everything else stays a dense tensor. A tensor the model ties (an
    output layer tied to the embedding) is stored once under its first name, as tied
    compressed tensors are: the format has no alias entry and the writer refuses tensors that
    share memory (SPEC.md §6); ``load_into`` ties the other names again. ``theta0`` overrides
    the theta0 of compressed or LoRA tensors by output name
    (``{"fc.weight": Theta0.external(...)}``), for files that reference a base checkpoint
    instead of storing it. Several reparametrized submodules in one state dict are each
    exported under their prefix, also one reparametrized inside another (from layers the
    outer ``reparametrize`` left dense): the innermost prefix owns a key.

    Raises ``ReparametrizeError`` if the state dict holds no ``mcnc_config`` key, lacks a key
    the manifest names, holds a merged MCNC-LoRA, or an override names no compressed tensor.
    """
    prefixes = [k[: -len(CONFIG_KEY)] for k in state_dict
                if k == CONFIG_KEY or k.endswith("." + CONFIG_KEY)]
    if not prefixes:
        raise ReparametrizeError(
            "the state dict has no 'mcnc_config' key: it is not the state dict of a "
            "reparametrized model. Call mcnc_format.torch.reparametrize(model, config) before "
            "training, or store plain tensors with mcnc_format.save.")
    overrides = dict(theta0 or {})
    sections: dict[str, _Section] = {}
    sections.update((p, _Section(p, state_dict, overrides, sections)) for p in prefixes)
    out: dict[str, TensorSource] = {}
    for key in state_dict:
        # the innermost: a module reparametrized inside one that was reparametrized before
        owner = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        section = sections[owner] if owner is not None else None
        if section is not None and not section.emitted:
            out.update(section.tensors())
        if section is not None and key in section.consumed:
            continue
        out.setdefault(key, state_dict[key])
    if overrides:
        raise ReparametrizeError(f"theta0 overrides {sorted(overrides)} name no compressed or "
                                 f"LoRA tensor; compressed tensors are {_compressed(out)[:8]}")
    return without_duplicates(out, keep_first=True)[0]


def save_model(model: nn.Module, path: str | os.PathLike[str], *,
               metadata: Mapping[str, str] | None = None,
               theta0: Mapping[str, Theta0] | None = None) -> Path:
    """Write a reparametrized ``model`` as an ``.mcnc`` file (``export_state_dict`` then
    ``mcnc_format.save``); returns the path. The same state dict always gives the same bytes."""
    return save(path, export_state_dict(model.state_dict(), theta0), metadata=metadata)


def _compressed(out: Mapping[str, TensorSource]) -> list[str]:
    return [k for k, v in out.items() if isinstance(v, MCNC | LoRA)]


class _Section:
    """The tensors one reparametrized module contributes, under its state-dict prefix."""

    def __init__(self, prefix: str, state_dict: Mapping[str, torch.Tensor],
                 overrides: dict[str, Theta0], sections: Mapping[str, _Section]) -> None:
        self.prefix = prefix
        self.sections = sections
        self.state_dict = state_dict
        self.overrides = overrides
        self.manifest = Manifest.from_tensor(state_dict[prefix + CONFIG_KEY],
                                             f"state dict key {prefix + CONFIG_KEY!r}")
        self.emitted = False
        self.consumed: set[str] = {prefix + CONFIG_KEY}
        self.next_offset = [0] * len(self.manifest.chunks)
        self.segments: list[Segment] = []

    def get(self, key: str) -> torch.Tensor:
        full = self.prefix + key
        if full not in self.state_dict:
            raise ReparametrizeError(f"the state dict lacks {full!r}, which its MCNC manifest "
                                     "names; save the full model.state_dict()")
        self.consumed.add(full)
        return self.state_dict[full]

    def tensors(self) -> dict[str, TensorSource]:
        self.emitted = True
        manifest = self.manifest
        config = manifest.config
        spec = config.generator()
        for s in range(len(manifest.chunks)):
            alpha = stored_values(self.get(alpha_key(s)).detach(), config.alpha_dtype, config.L)
            beta = stored_values(self.get(beta_key(s)).detach(), config.beta_dtype)
            self.segments.append(Segment(spec, alpha.to(to_torch(config.alpha_dtype)),
                                         beta.to(to_torch(config.beta_dtype))))
        members = {m.name: i for i, m in enumerate(manifest.members)}
        loras = {x.module: x for x in manifest.loras}
        lora_aliases = {a: x for x in manifest.loras for a in x.aliases}
        tied = {a for m in manifest.members for a in m.aliases}
        out: dict[str, TensorSource] = {}
        for name in manifest.order:
            module, _, attribute = name.rpartition(".")
            inner = self.inner_section(self.prefix + name)
            if inner is not None:  # emitted by the section it belongs to, in its place
                if not inner.emitted:
                    out.update(inner.tensors())
                continue
            if name in members:
                out[self.prefix + name] = self.member(members[name], self.theta0_override(name))
            elif name in tied:
                self.drop(MemberSpec.theta0_key_of(name))  # stored once, under its first name
            elif module in loras:
                out[self.prefix + name] = self.lora_part(loras[module], attribute)
            elif module in lora_aliases:
                if attribute == "weight":  # the adapted weight is stored once
                    self.drop(f"{module}.base_layer.weight", f"{module}.lora_merged")
                else:
                    out[self.prefix + name] = self.get(f"{module}.base_layer.{attribute}")
            else:
                out[self.prefix + name] = self.get(name)
        return out

    def inner_section(self, key: str) -> _Section | None:
        """The section of a module reparametrized inside this one (from layers this one left
        dense) that ``key`` belongs to: this manifest lists its plain names, it emits them."""
        inner = [p for p in self.sections if len(p) > len(self.prefix) and key.startswith(p)]
        return self.sections[max(inner, key=len)] if inner else None

    def drop(self, *keys: str) -> None:
        """Mark the keys a tied name holds in the state dict (a reused module's copy of a
        stored theta0 or base layer) as used: their tensors are stored under the first name."""
        self.consumed.update(self.prefix + key for key in keys)

    def theta0_override(self, name: str) -> Theta0 | None:
        return self.overrides.pop(self.prefix + name, None)

    def member(self, index: int, override: Theta0 | None = None) -> MCNC:
        member: MemberSpec = self.manifest.members[index]
        if member.offset != self.next_offset[member.segment]:
            raise ReparametrizeError(
                f"MCNC manifest: {member.name!r} sits at offset {member.offset} of segment "
                f"{member.segment} but the manifest's order reaches it at "
                f"{self.next_offset[member.segment]}; the manifest was edited or damaged")
        self.next_offset[member.segment] += member.numel
        if override is not None:
            theta0 = override
        elif isinstance(member.theta0, StateDictTheta0):
            theta0 = Theta0.stored(self.get(member.theta0_key))
        else:
            theta0 = DeclaredTheta0(member.theta0)
        return MCNC(self.segments[member.segment], member.shape, to_torch(member.dtype), theta0)

    def lora_part(self, lora: LoRASpec, attribute: str) -> TensorSource:
        """The plain model's ``{module}.{attribute}``: the merged weight as a ``LoRA`` entry,
        anything else (the bias) from the base layer."""
        merged = self.get(f"{lora.module}.lora_merged")
        if bool(merged):
            raise ReparametrizeError(
                f"MCNC-LoRA at {self.prefix + lora.module!r} is merged into its base weight; "
                "call mcnc_format.torch.unmerge_mcnc_lora(model) before saving")
        base = self.get(f"{lora.module}.base_layer.{attribute}")
        if attribute != "weight":
            return base
        override = self.theta0_override(f"{lora.module}.weight")
        return LoRA(A=self.member(lora.A), B=self.member(lora.B), scale=lora.scale,
                    dtype=base.dtype, theta0=override or Theta0.stored(base))
