"""Regenerating compressed weights during training: differentiable, fp32, once per forward.

A reparametrized module holds an ``MCNCRuntime`` (a plain object, not a submodule, so it
adds no state-dict keys) and one ``MCNCMember`` parametrization per compressed tensor. Reading
``fc.weight`` asks the runtime for the member's value:

``theta0 + sum_j beta_j phi(alpha_j)`` for the member's chunks, computed with the reader's
own ``FusedGenerator`` (``regenerate.py``: hidden sine layers in IEEE float32, the row norm
from the Gram identity, the output layer, the normalisation and the beta sum fused into one
matrix product). Autograd flows through it to alpha and beta. Using the reader's arithmetic
keeps training and loading within float32 rounding of the same operations, and the backward
pass saves only the ``[chunks, m * width]`` activations instead of ``[chunks, m, d]``.

Inside a forward of the reparametrized module (opened and closed by hooks on it), a segment
is generated once, for all its chunks, and split among its members (``torch.split``: one
backward node, not one full-size gradient per member); outside a forward, reading a weight
generates just that member's chunks.

With autograd recording, every segment is generated when the forward starts (the root's
pre-hook), before any activation-checkpointed region, and the values are kept after the
forward until the segment's gradient has been computed. A non-reentrant checkpoint
(``use_reentrant=False``, transformers' gradient checkpointing) re-runs a region during the
backward and requires it to save the same tensors as the first run: generated inside the first
region, a segment's activations would be saved there and not again in the recomputation, and a
weight read in the recomputation, outside the forward, would generate other chunks. Generated
before the regions and read from the kept values in both runs, no region saves a generator
tensor. The values are dropped by the segment's gradient hook, by the next forward, or when
alpha or beta change (an optimizer step) before a read; a forward with autograd recording and
no backward keeps them until the next forward.

Alpha is projected onto ``[-L, L]`` when a forward starts, or its segment's when a weight is
read outside one (projected gradient descent), and clamped in the computation as well, so the
function always equals the file, whose alpha is ``clamp(alpha, -L, L)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dtypes import to_torch
from ..engine.fused import FusedGenerator
from ..errors import ReparametrizeError
from ..header import ZerosTheta0
from .manifest import CONFIG_KEY, Manifest, alpha_key, beta_key

__all__ = ["MCNCMember", "MCNCRuntime", "stored_values"]


class _RoundThrough(torch.autograd.Function):
    """Round to a storage dtype in the forward, pass the gradient straight through."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def stored_values(param: torch.Tensor, dtype_name: str, bound: float | None = None
                  ) -> torch.Tensor:
    """What the file stores for ``param``, as float32: clamped to ``[-bound, bound]`` (alpha)
    and rounded to the storage dtype; differentiable (straight-through rounding)."""
    x = param.to(torch.float32)
    if bound is not None:
        x = x.clamp(-bound, bound)
    dtype = to_torch(dtype_name)
    return x if dtype == torch.float32 else _RoundThrough.apply(x, dtype)


class MCNCRuntime:
    """The live side of a manifest: parameters on ``root``, caches, and forward hooks."""

    def __init__(self, root: nn.Module, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.spec = manifest.config.generator()
        self.segment_members = [manifest.segment_members(s) for s in range(len(manifest.chunks))]
        self._fused: dict[str, FusedGenerator] = {}
        self._depth = 0
        self._cache_grad: bool | None = None
        self._pieces: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        # Segments generated for the backward (their values kept after the forward), with the
        # versions of alpha and beta they were generated from; the generation count tells a
        # late gradient hook of an earlier forward from the current one.
        self._kept: dict[int, tuple[int, int]] = {}
        self._generation = 0

    # -- forward scope -----------------------------------------------------------------------
    def enter(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: project alpha once per outermost forward and open the cache."""
        if self._depth == 0:
            self._check_float32()
            self.project_alpha_()
            self._clear()
            if torch.is_grad_enabled():
                self._generate_for_backward()
        self._depth += 1

    def _generate_for_backward(self) -> None:
        """Generate every segment now, outside any checkpointed region, and keep the values of
        those autograd records until their gradient is computed (module docstring)."""
        self._cache_grad = True
        generation = self._generation
        for segment, order in enumerate(self.segment_members):
            if not order:
                continue
            flat = self._generate(segment)
            if flat.requires_grad:
                self._kept[segment] = self._versions(segment)
                flat.register_hook(lambda grad, segment=segment: self._release(segment,
                                                                               generation))

    def _versions(self, segment: int) -> tuple[int, int]:
        return self.alpha(segment)._version, self.beta(segment)._version

    def _release(self, segment: int, generation: int) -> None:
        """Gradient hook: the segment's gradient is computed, so no recomputation reads it
        again; drop its values (unless a later forward has replaced them)."""
        if generation == self._generation:
            self._drop(segment)

    def _drop(self, segment: int) -> None:
        self._kept.pop(segment, None)
        for index in self.segment_members[segment]:
            self._pieces.pop(index, None)
            self._values.pop(index, None)

    def _check_float32(self) -> None:
        """Refuse alpha or beta converted away from float32 (``model.half()``, ``.to(dtype)``,
        ``.double()``): the forward would otherwise fail inside a layer on mixed dtypes, since
        the compressed weights keep the dtype recorded in the manifest. MCNC-LoRA is left alone:
        its adapter casts the input to the factors' dtype, so a converted model still runs."""
        if self.manifest.loras:
            return
        for s in range(len(self.manifest.chunks)):
            for param in (self.alpha(s), self.beta(s)):
                if param.dtype != torch.float32:
                    raise ReparametrizeError(
                        f"{type(self.root).__name__}: MCNC's alpha and beta are {param.dtype}, "
                        "not float32: model.half(), .to(dtype) or .double() converted them "
                        "(half and bfloat16 round them) and the dense tensors, while the "
                        "compressed weights keep their recorded dtype. Call model.float() to go "
                        "back, and compute in reduced precision with torch.autocast "
                        "(docs/torch.md, Limits).")

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook (also on exceptions): drop cached tensors when the forward ends."""
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            for segment in range(len(self.segment_members)):
                if segment not in self._kept:
                    self._drop(segment)

    def _clear(self) -> None:
        self._pieces.clear()
        self._values.clear()
        self._kept.clear()
        self._generation += 1
        self._cache_grad = None

    def project_alpha_(self, segments: range | tuple[int, ...] | None = None) -> None:
        """Clamp the alpha of ``segments`` (default: all) into ``[-L, L]`` in place (through
        ``.data``: a projection step of the optimizer, invisible to autograd)."""
        bound = self.manifest.config.L
        with torch.no_grad():
            for s in range(len(self.manifest.chunks)) if segments is None else segments:
                self.alpha(s).data.clamp_(-bound, bound)

    def check_incoming(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                       *args: Any) -> None:
        """Load-state-dict pre-hook: refuse a state dict made with another manifest, whose
        alpha and beta would silently mean something else here (other seed, shapes, order)."""
        key = prefix + CONFIG_KEY
        if key not in state_dict:
            return
        incoming = Manifest.from_tensor(state_dict[key], f"state dict key {key!r}")
        if incoming == self.manifest:
            return
        ours, theirs = self.manifest.config.to_dict(), incoming.config.to_dict()
        fields = [f for f in ours if ours[f] != theirs[f]]
        what = f"config fields {fields}" if fields else "compressed tensors or their order"
        raise ReparametrizeError(
            f"state dict key {key!r}: the state dict was saved from a model reparametrized "
            f"differently ({what} differ). Reparametrize the model with the same MCNCConfig "
            "before loading, or export the state dict directly with export_state_dict.")

    # -- values ----------------------------------------------------------------------------
    def alpha(self, segment: int) -> torch.Tensor:
        return getattr(self.root, alpha_key(segment))

    def beta(self, segment: int) -> torch.Tensor:
        return getattr(self.root, beta_key(segment))

    def member_value(self, index: int, theta0: torch.Tensor) -> torch.Tensor:
        """The current value of member ``index`` (shape and dtype of the original tensor):
        ``theta0 + sum_j beta_j phi(alpha_j)`` computed as a load computes it
        (``FusedGenerator.value``: theta0 laid into the chunks' rows, one ``addmm``), so the
        trained weight equals the loaded one bit for bit."""
        member = self.manifest.members[index]
        caching = (self._depth > 0 or self._kept_valid(member.segment)) and \
            self._cache_grad in (None, torch.is_grad_enabled())
        if caching and index in self._values:
            return self._values[index]
        if self._depth == 0:
            # read outside a forward of the root: a root whose own forward never runs (an
            # nn.ModuleList whose layers its parent calls) is projected here, or an alpha
            # pushed out of the box would stay there with zero gradient
            self.project_alpha_((member.segment,))
        flat = self._piece(index) if caching else self._member_flat(index, theta0)
        value = flat.view(member.shape).to(to_torch(member.dtype))
        if caching:
            self._cache_grad = torch.is_grad_enabled()
            self._values[index] = value
        return value

    def _kept_valid(self, segment: int) -> bool:
        """Whether the segment's values kept for the backward may be read outside a forward:
        alpha and beta unchanged since (else they are dropped)."""
        if segment not in self._kept:
            return False
        if self._kept[segment] == self._versions(segment):
            return True
        self._drop(segment)
        return False

    def _piece(self, index: int) -> torch.Tensor:
        """Member ``index``'s share of its whole segment, generated once per forward with
        every member's theta0 in place."""
        if index not in self._pieces:
            self._generate(self.manifest.members[index].segment)
        return self._pieces[index]

    def _generate(self, segment: int) -> torch.Tensor:
        """The whole segment, flat, split among its members' pieces."""
        order = self.segment_members[segment]
        placed = [(self.manifest.members[i].offset, self.theta0_of(i)) for i in order]
        flat = self.segment_value(segment, 0, self.manifest.chunks[segment], placed)
        sizes = [self.manifest.members[i].numel for i in order]
        pieces = torch.split(flat, [*sizes, flat.numel() - sum(sizes)])
        self._pieces.update(zip(order, pieces, strict=False))
        return flat

    def _member_flat(self, index: int, theta0: torch.Tensor) -> torch.Tensor:
        """Member ``index`` alone: its chunks only."""
        member = self.manifest.members[index]
        d = self.spec.d
        first = member.offset // d
        last = -(-(member.offset + member.numel) // d)
        start = member.offset - first * d
        placed = [(start, None if isinstance(member.theta0, ZerosTheta0) else theta0)]
        flat = self.segment_value(member.segment, first, last, placed)
        return flat[start : start + member.numel]

    def theta0_of(self, index: int) -> torch.Tensor | None:
        """Member ``index``'s theta0 (its parametrization's ``original``), ``None`` for
        zeros."""
        member = self.manifest.members[index]
        if isinstance(member.theta0, ZerosTheta0):
            return None
        owner, _, attribute = member.name.rpartition(".")
        holders = self.root.get_submodule(owner).parametrizations
        original: torch.Tensor = holders[attribute].original
        return original

    def segment_value(self, segment: int, first: int, last: int,
                      placed: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
        """``theta0 + sum_j beta_j phi(alpha_j)`` of chunks ``first .. last - 1``, flat
        float32, each ``(offset, theta0)`` of ``placed`` laid at its offset from the first
        chunk's first value (zeros elsewhere)."""
        config = self.manifest.config
        alpha = stored_values(self.alpha(segment)[first:last], config.alpha_dtype, config.L)
        beta = stored_values(self.beta(segment)[first:last], config.beta_dtype)
        fused = self.fused(alpha.device)
        left = fused.coefficients(alpha, beta)
        base = torch.zeros(left.shape[0] * self.spec.d, dtype=torch.float32,
                           device=alpha.device)
        for offset, theta0 in placed:
            if theta0 is not None:
                base[offset : offset + theta0.numel()] = theta0.reshape(-1).to(torch.float32)
        value = fused.value(left, base.view(left.shape[0], self.spec.d))
        return value[: last - first].reshape(-1)

    def fused(self, device: torch.device) -> FusedGenerator:
        """The generator on ``device``, drawn from the seed on first use. Kept out of the
        module's buffers on purpose: ``model.half()`` or ``.to(dtype)`` cannot round it.
        Drawn outside inference mode: a first forward under ``torch.inference_mode()`` would
        otherwise cache inference tensors, which autograd refuses to save in every later
        training forward."""
        key = str(device)
        if key not in self._fused:
            with torch.inference_mode(False):
                self._fused[key] = FusedGenerator(self.spec.weights(device),
                                                  self.manifest.config.m)
        return self._fused[key]


class MCNCMember(nn.Module):
    """The parametrization of one compressed tensor: ``theta0`` in, current weight out.

    ``torch.nn.utils.parametrize`` keeps theta0 as ``parametrizations.<name>.original``
    (a buffer: persistent when theta0 is stored, rebuilt from the seed otherwise).
    ``own_copy``: hand the module a copy it may modify in place, for an ``Embedding`` with
    ``max_norm``, whose forward renormalises the looked-up rows of its weight in place; the
    value itself is a view of its segment (or cached for the forward), which autograd does
    not let it change.
    """

    def __init__(self, runtime: MCNCRuntime, index: int, own_copy: bool = False) -> None:
        super().__init__()
        self.runtime = runtime
        self.index = index
        self.own_copy = own_copy

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        value = self.runtime.member_value(self.index, theta0)
        return value.clone() if self.own_copy else value

    def extra_repr(self) -> str:
        member = self.runtime.manifest.members[self.index]
        return (f"segment={member.segment}, offset={member.offset}, "
                f"theta0={member.theta0.kind}")
