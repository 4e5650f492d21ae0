"""One MCNC-LoRA adapter kept on the device as what it is stored as: alpha, beta and a seed.

``ResidentAdapter.load`` opens an adapter file (``mcnc pack --base`` or ``save_model`` of an
``add_mcnc_lora`` model), checks it against the base model (every ``lora`` tensor names an
``nn.Linear`` of the base with its shape; what the file records of the base, the SHA-256
pins of external theta0 and any stored tensors, matches the base's weights) and copies each
segment's alpha and beta onto the device. The file is closed afterwards.

``ResidentAdapter.rebuild`` turns them back into LoRA factors ``A [r, in]``, ``B [out, r]``:
the segments that share a generator (and ``m`` and storage dtypes) form one *group*, and a
group is one call of the engine's ``rebuild_members`` over the concatenation of its
segments' chunks. theta0 of the factors (A's ``fan_in_uniform`` draw, B's zeros) is drawn
from its seed on the device at each rebuild, so nothing of factor size stays resident.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..dtypes import to_torch
from ..engine.backend import default_backend
from ..engine.fused import FusedGenerator
from ..engine.members import MemberRun, rebuild_members
from ..engine.resolve import Resolver
from ..engine.theta0 import prng_values
from ..errors import MCNCError
from ..header import BlobTheta0, ExternalTheta0, LoRATensor, MemberEntry, Theta0Entry
from ..reader import MCNCFile, cached_tensor_sha256

__all__ = ["Factors", "GeneratorKey", "ResidentAdapter"]

#: ``{module name: (A, B, scale)}``: an adapter's rebuilt factors.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
#: Identifies a generator prepared for ``m`` components: adapters drawn from the same seed and
#: architecture share one (inline generators are keyed by their adapter and index).
GeneratorKey = tuple[object, ...]


@dataclass(frozen=True)
class _Factor:
    """One factor (``A`` or ``B``) of one adapted module, within its group's chunks."""

    module: str
    role: str  # "A" or "B"
    start: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    theta0: Theta0Entry | torch.Tensor  # an entry drawn at rebuild, or resident values
    label: str


@dataclass
class _Group:
    """Segments of one adapter sharing a generator: rebuilt by one engine call."""

    generator: GeneratorKey
    alpha: torch.Tensor  # [chunks, m, k], stored dtype, on the device
    beta: torch.Tensor  # [chunks, m]
    factors: list[_Factor]


@dataclass
class ResidentAdapter:
    """An adapter on the device: its groups, per-module scales, and the bytes it keeps."""

    name: str
    source: str
    groups: list[_Group]
    scales: dict[str, float]
    resident_bytes: int
    factor_bytes: int

    @classmethod
    def load(cls, name: str, source: str | os.PathLike[str], base: nn.Module,
             device: torch.device, generator: Callable[[MCNCFile, int, int], GeneratorKey],
             base_sha256: Callable[[str], str], check_base: bool,
             resolver: Resolver | None) -> ResidentAdapter:
        """Read and check the adapter file at ``source`` (through ``resolver``, the default
        one when ``None``); ``generator(file, index, m)`` makes the bank hold the file's
        generator ``index`` and returns its key; ``base_sha256`` hashes a base parameter by
        name (cached by the bank)."""
        from ..api import open as open_mcnc

        with open_mcnc(source, resolver=resolver) as f:
            return _Reader(name, f, base, device, check_base, base_sha256).read(generator)

    def rebuild(self, generators: dict[GeneratorKey, FusedGenerator]) -> Factors:
        """The factors of every adapted module, one engine call per group. A module's A and
        B may sit in different groups, in either order: each value goes to its role."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for group in self.groups:
            runs = [MemberRun(f.start, f.shape, f.dtype, self._theta0(f, group.alpha.device))
                    for f in group.factors]
            values = rebuild_members(generators[group.generator], group.alpha, group.beta, runs)
            for factor, value in zip(group.factors, values, strict=True):
                parts.setdefault(factor.module, {})[factor.role] = value
        return {module: (roles["A"], roles["B"], self.scales[module])
                for module, roles in parts.items()}

    def factor_dtypes(self) -> dict[str, tuple[torch.dtype, torch.dtype]]:
        """Each adapted module's (A, B) factor dtypes."""
        roles = {(f.module, f.role): f.dtype for g in self.groups for f in g.factors}
        return {module: (roles[module, "A"], roles[module, "B"]) for module, _ in roles}

    @staticmethod
    def _theta0(factor: _Factor, device: torch.device) -> torch.Tensor | None:
        if isinstance(factor.theta0, torch.Tensor):
            return factor.theta0
        return prng_values(factor.theta0, factor.shape, 0, math.prod(factor.shape), device,
                           factor.label, default_backend(device).draw_uniform())


class _Reader:
    """Reads one open adapter file into a ``ResidentAdapter``, refusing another base's."""

    def __init__(self, name: str, f: MCNCFile, base: nn.Module, device: torch.device,
                 check_base: bool, base_sha256: Callable[[str], str]) -> None:
        self.name = name
        self.f = f
        self.base = base
        self.device = device
        self.check_base = check_base
        self.base_sha256 = base_sha256
        self.base_state = dict(base.state_dict(keep_vars=True))

    def refuse(self, message: str, tensor: str | None = None) -> MCNCError:
        return MCNCError(f"adapter {self.name!r}: {message}", path=self.f.label, tensor=tensor)

    def read(self, generator: Callable[[MCNCFile, int, int], GeneratorKey]) -> ResidentAdapter:
        header = self.f.header
        loras: list[LoRATensor] = []
        for entry in header.tensors:
            if isinstance(entry, LoRATensor):
                self.check_lora(entry)
                loras.append(entry)
            elif entry.stores_values:
                self.check_stored(entry.name)
            else:
                raise self.refuse(
                    f"{entry.name!r} is a {entry.encoding} tensor: a bank serves LoRA "
                    "adapters (lora tensors) over a shared base, not changed base weights; "
                    "load this file into a model of its own with mcnc_format.load_into",
                    entry.name)
        if not loras:
            raise self.refuse("holds no lora tensor; pack an add_mcnc_lora model (mcnc pack "
                              "--base, or mcnc_format.save_model)")
        members: dict[int, list[tuple[str, MemberEntry, str]]] = {}
        for entry in loras:
            module = entry.name.removesuffix(".weight")
            for label, member in entry.labelled_members():
                members.setdefault(member.segment, []).append((module, member, label))
        groups: dict[tuple[object, ...], _Group] = {}
        chunk_base: dict[tuple[object, ...], int] = {}
        resident = 0
        for index in sorted(members):
            seg = header.segments[index]
            d = header.generators[seg.generator].d
            alpha = self.f.blob_tensor(seg.alpha, f"segments[{index}].alpha").to(self.device)
            beta = self.f.blob_tensor(seg.beta, f"segments[{index}].beta").to(self.device)
            key = (seg.generator, seg.m, alpha.dtype, beta.dtype)
            if key not in groups:
                groups[key] = _Group(generator(self.f, seg.generator, seg.m), alpha, beta, [])
                chunk_base[key] = 0
            else:
                group = groups[key]
                group.alpha = torch.cat([group.alpha, alpha])
                group.beta = torch.cat([group.beta, beta])
            first = chunk_base[key] * d
            chunk_base[key] += seg.chunks
            resident += alpha.nbytes + beta.nbytes
            for module, member, label in members[index]:
                theta0 = self.theta0(member, label)
                if isinstance(theta0, torch.Tensor):
                    resident += theta0.nbytes
                groups[key].factors.append(_Factor(
                    module, label.rsplit(":", 1)[1], first + member.offset, member.shape,
                    to_torch(member.dtype), theta0, label))
        factor_bytes = sum(m.numel * to_torch(m.dtype).itemsize
                           for t in loras for m in t.members())
        return ResidentAdapter(self.name, self.f.label, list(groups.values()),
                               {t.name.removesuffix(".weight"): float(t.scale or 0.0)
                                for t in loras}, resident, factor_bytes)

    def theta0(self, member: MemberEntry, label: str) -> Theta0Entry | torch.Tensor:
        """A factor's theta0: an entry to draw from at each rebuild, or, for the rare stored
        one, its values kept on the device."""
        if isinstance(member.theta0, BlobTheta0 | ExternalTheta0):
            values = self.f.context.theta0.values(member.theta0, member.shape, 0, member.numel,
                                          self.device, label)
            check = self.f.context.theta0.pending_check(member.theta0)
            if check is not None:
                check.result()  # R75: the base this factor starts from has its pinned bytes
            assert values is not None
            return values
        return member.theta0

    def check_lora(self, entry: LoRATensor) -> None:
        """The adapted module exists in the base as an ``nn.Linear`` of the tensor's shape,
        and the base weight the adapter was trained on is the base's."""
        name = entry.name
        module = name.removesuffix(".weight")
        try:
            linear = self.base.get_submodule(module) if module != name else None
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise self.refuse(
                f"adapts {name!r}, which is not the weight of an nn.Linear of the base model "
                "(the adapter was made for another base, or for other module names)", name)
        if any(isinstance(parent, nn.MultiheadAttention) and parent.out_proj is linear
               for parent in self.base.modules()):
            raise self.refuse(
                f"adapts {name!r}, the output projection of an nn.MultiheadAttention, which "
                "reads that weight directly without calling the Linear: the bank's hooks would "
                "never run there", name)
        if tuple(linear.weight.shape) != entry.shape:
            raise self.refuse(
                f"{name!r} has shape {list(entry.shape)}, the base's is "
                f"{list(linear.weight.shape)}: the adapter was made for another base", name)
        if not self.check_base:
            return
        theta0 = entry.theta0
        if isinstance(theta0, ExternalTheta0):
            if theta0.sha256 != self.base_sha256(name):
                raise self.refuse(
                    f"{name!r}: the base weight this adapter was trained on (sha256 "
                    f"{theta0.sha256[:12]}... of {theta0.uri}) is not the base model's: the "
                    "adapter was trained on another base (pass check_base=False if the base "
                    "is the same in another dtype)", name)
        elif isinstance(theta0, BlobTheta0):
            stored = self.f.context.theta0.values(theta0, entry.shape, 0, math.prod(entry.shape),
                                          torch.device("cpu"), f"{name}.theta0")
            assert stored is not None
            self.check_equal(name, stored.view(entry.shape), linear.weight)

    def check_stored(self, name: str) -> None:
        """A tensor stored whole (a ``save_model`` file carries the base) is the base's."""
        mine = self.base_state.get(name)
        if mine is None:
            raise self.refuse(f"holds {name!r}, which the base model does not have: the "
                              "adapter was made for another base", name)
        info = self.f.tensor_info(name)
        if info.shape != tuple(mine.shape):
            raise self.refuse(f"{name!r} has shape {list(info.shape)}, the base's is "
                              f"{list(mine.shape)}: the adapter was made for another base", name)
        if self.check_base:
            self.check_equal(name, self.f.get_tensor(name), mine)

    def check_equal(self, name: str, stored: torch.Tensor, mine: torch.Tensor) -> None:
        if not torch.equal(stored.to(torch.float32), mine.detach().to("cpu", torch.float32)):
            raise self.refuse(
                f"{name!r} differs from the base model's: the adapter was trained on another "
                "base (a bank serves adapters of one base; pass check_base=False if the base "
                "is the same in another dtype)", name)


def base_sha256(base: nn.Module, name: str) -> str:
    """SHA-256 of a base parameter's bytes, as external theta0 pins it (SPEC.md §7.4): hashed
    again only when the parameter was changed in place or replaced."""
    return cached_tensor_sha256(base.get_parameter(name))
