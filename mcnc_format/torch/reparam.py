"""``reparametrize``: put a model's weights on the MCNC manifold, in place.

Each selected parameter becomes a ``torch.nn.utils.parametrize`` parametrization
(``MCNCMember``): ``model(x)`` works unchanged and ``fc.weight`` still reads as a tensor of the
original shape and dtype, now computed from alpha and beta. The trainable state lives on the
module passed in, as flat-named parameters (``mcnc_alpha_0``, ``mcnc_beta_0``, ...) and a
``mcnc_config`` buffer. Flat names, not a child module, because a container such as
``nn.Sequential`` runs every child in its forward. docs/torch.md gives the state-dict layout.

``install`` is shared with MCNC-LoRA (``lora.py``): both describe the tensors to compress as
``PlannedMember`` values and let it build the manifest, the parameters and the hooks.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .. import philox
from ..dtypes import from_torch
from ..engine.theta0 import fan_in_bound, prng_values
from ..errors import ReparametrizeError
from ..header import Theta0Entry, ZerosTheta0
from ..torch_compat import is_dtensor, register_load_state_dict_pre_hook
from ..writer import Theta0
from .config import (
    ALPHA_INIT_STREAM_BASE,
    CHUNKING_TENSOR,
    THETA0_MODULE,
    THETA0_STREAM_BASE,
    MCNCConfig,
    require_config,
)
from .manifest import (
    CONFIG_KEY,
    LoRASpec,
    Manifest,
    MemberSpec,
    StateDictTheta0,
    alpha_key,
    beta_key,
)
from .runtime import MCNCMember, MCNCRuntime

__all__ = [
    "Place",
    "PlannedMember",
    "check_installable",
    "install",
    "places_by_tensor",
    "refuse_sharded",
    "reparametrize",
    "runtime_of",
]

RUNTIME_ATTRIBUTE = "_mcnc_runtime"
_FAN_IN_MODULES = (nn.Linear, _ConvNd)
_NORMAL_MODULES = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class PlannedMember:
    """A tensor about to be compressed: where it lives and where its theta0 comes from.

    ``stored`` holds theta0's values when ``theta0.kind`` is ``blob`` (fine-tuning).
    ``aliases``: the other places of a tied parameter, ``(name, module, attribute)``; each
    gets the same parametrization, so every name computes the one tensor that is stored."""

    name: str
    module: nn.Module
    attribute: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    theta0: Theta0Entry
    stored: torch.Tensor | None = None
    aliases: tuple[Place, ...] = ()


@dataclass(frozen=True)
class Place:
    """Where a parameter sits: its state-dict name, the module holding it, the attribute."""

    name: str
    module: nn.Module
    attribute: str


def reparametrize(model: nn.Module, config: MCNCConfig | None = None) -> nn.Module:
    """Reparametrize ``model`` in place with MCNC and return it.

    The weights selected by ``config`` (by default those of Linear, Conv and Embedding
    layers) become ``theta0 + sum_j beta_j phi(alpha_j)`` per chunk of ``d`` values. Only
    alpha and beta are trainable (unless ``config.train_dense``). Alpha starts uniform on
    ``[-L, L]`` and beta at ``config.beta_init`` (0: the model starts exactly at theta0);
    alpha is projected onto ``[-L, L]`` at the start of every forward (or weight read outside
    one: a ``nn.ModuleList`` has no forward of its own). ``torch.save(
    model.state_dict())`` keeps everything ``mcnc_format.torch.export_state_dict`` needs.

    A parameter tied to several names (``lm_head.weight`` and ``embed_tokens.weight``) is
    selected when one of its names is selected and none excluded; it gets one parametrization,
    shared by every name, so it stays tied, and the file stores it once, under its first name
    in state-dict order (``load_into`` and ``mcnc_format.transformers.from_pretrained`` tie
    the others to it again).

    Raises ``ReparametrizeError`` when nothing is selected, a parameter is not yet
    materialised (lazy modules), the model is a ``torch.compile`` wrapper, or it is already
    reparametrized.
    """
    config = MCNCConfig() if config is None else require_config(config, "reparametrize")
    check_installable(model)
    order = tuple(model.state_dict().keys())
    selected = _select(model, config)
    planned = [
        _plan(places, param, config, THETA0_STREAM_BASE + i)
        for i, (places, param) in enumerate(selected)
    ]
    install(model, config, planned, (), order)
    return model


def check_installable(model: nn.Module) -> None:
    """Refuse, before anything changes, a model that already holds MCNC state; a
    ``torch.compile`` wrapper (it forwards attribute reads to the module it compiled, so
    alpha registered on it could not be read back, and the state-dict names would carry its
    ``_orig_mod.``); a model with a lazy parameter anywhere, selected or not (its name
    and shape are not known yet, and it cannot be frozen); and one on the meta device: a
    seeded theta0 is drawn here and is not in the state dict, so ``to_empty`` afterwards
    would leave it uninitialised memory that no checkpoint load overwrites."""
    if "_orig_mod" in dict(model.named_children()):
        raise ReparametrizeError(
            f"{type(model).__name__} is a torch.compile wrapper; reparametrize (or "
            "add_mcnc_lora to) the plain model first, then compile it: model = "
            "torch.compile(reparametrize(model, config)). The module it wraps is "
            "model._orig_mod.")
    for name, param in model.named_parameters():
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ReparametrizeError(f"parameter {name!r} is not materialised yet (lazy "
                                     "module); run one forward pass before reparametrize or "
                                     "add_mcnc_lora")
        if param.is_meta:
            raise ReparametrizeError(
                f"parameter {name!r} is on the meta device; MCNC draws theta0 from its seed "
                "now and keeps it out of the state dict, so it needs real memory. Call "
                "model.to_empty(device=...) first, then reparametrize (or add_mcnc_lora), "
                "then load the checkpoint")
    for module in model.modules():
        if hasattr(module, RUNTIME_ATTRIBUTE) or isinstance(module, MCNCMember):
            raise ReparametrizeError(
                f"{type(model).__name__} already holds MCNC-reparametrized weights; a model is "
                "reparametrized (or given MCNC-LoRA adapters) once. Start from a plain model.")


def refuse_sharded(name: str, param: torch.Tensor) -> None:
    """Refuse a parameter that is already sharded: a ``DTensor`` of ``fully_shard`` or
    ``parallelize_module``. MCNC replaces it by a plain tensor computed from alpha and beta,
    which its sharding does not cover, so the model's first forward would fail inside torch.
    """
    if is_dtensor(param):
        raise ReparametrizeError(
            f"parameter {name!r} is sharded (a DTensor placed {list(param.placements)}); MCNC "
            "computes the weights it compresses from alpha and beta, which that sharding "
            "cannot split. Reparametrize (or add_mcnc_lora to) the plain model and shard it "
            "then: fully_shard after reparametrize; parallelize_module only the layers MCNC "
            "leaves dense (docs/torch.md, Limits)")


def runtime_of(model: nn.Module) -> MCNCRuntime:
    """The runtime of a reparametrized ``model`` (the module ``reparametrize`` was given)."""
    runtime = getattr(model, RUNTIME_ATTRIBUTE, None)
    if runtime is None:
        raise ReparametrizeError(f"{type(model).__name__} is not reparametrized; call "
                                 "mcnc_format.torch.reparametrize(model, config) first")
    return runtime


# -- selection -----------------------------------------------------------------------------
def places_by_tensor(model: nn.Module) -> list[list[Place]]:
    """Every parameter of ``model`` with all the places it sits at, in state-dict order: one
    place for most, several for a tied parameter or one of a module reused under two names."""
    groups: dict[int, list[Place]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, param in module._parameters.items():
            if param is not None:
                name = f"{module_name}.{attribute}" if module_name else attribute
                groups.setdefault(id(param), []).append(Place(name, module, attribute))
    return list(groups.values())


def _select(model: nn.Module, config: MCNCConfig
            ) -> list[tuple[tuple[Place, ...], nn.Parameter]]:
    out = []
    for places in places_by_tensor(model):
        first = places[0]
        param = first.module._parameters[first.attribute]
        assert param is not None
        if any(fnmatch.fnmatchcase(p.name, pattern) for p in places for pattern in config.exclude):
            continue
        if not any(_wanted(config, p.name, p.module, p.attribute) for p in places):
            continue
        if not param.is_floating_point() or param.numel() == 0:
            continue
        refuse_sharded(first.name, param)
        out.append((tuple(places), param))
    if not out:
        raise ReparametrizeError(
            f"MCNCConfig selected no parameter of {type(model).__name__} (include="
            f"{config.include}, exclude={config.exclude}); parameter names look like "
            f"{[n for n, _ in model.named_parameters()][:5]}")
    return out


def _wanted(config: MCNCConfig, name: str, module: nn.Module, attribute: str) -> bool:
    if config.include is not None:
        return any(fnmatch.fnmatchcase(name, p) for p in config.include)
    return attribute == "weight" and isinstance(module, _FAN_IN_MODULES + _NORMAL_MODULES)


def _plan(places: tuple[Place, ...], param: nn.Parameter, config: MCNCConfig,
          stream: int) -> PlannedMember:
    """theta0 for a selected parameter. ``prng``: PyTorch's default init of the layer, drawn
    from the spec's Philox (fan_in_uniform for Linear/Conv weights, uniform with the same bound
    for their biases, normal for Embedding); anything else, or ``theta0="module"``: the
    current values, stored. A tied parameter takes the scheme of its first place."""
    name, module, attribute = places[0].name, places[0].module, places[0].attribute
    shape = tuple(param.shape)
    theta0: Theta0Entry = StateDictTheta0()
    weight = getattr(module, "weight", None)
    if config.theta0 != THETA0_MODULE:
        if isinstance(module, _FAN_IN_MODULES) and attribute == "weight" and len(shape) >= 2:
            theta0 = Theta0.fan_in_uniform(config.seed, stream).entry
        elif isinstance(module, _NORMAL_MODULES) and attribute == "weight":
            theta0 = Theta0.normal(config.seed, stream).entry
        elif (isinstance(module, _FAN_IN_MODULES) and attribute == "bias"
              and isinstance(weight, torch.Tensor) and weight.dim() >= 2):
            theta0 = Theta0.uniform(fan_in_bound(tuple(weight.shape)), config.seed, stream).entry
    stored = param.detach() if isinstance(theta0, StateDictTheta0) else None
    return PlannedMember(name, module, attribute, shape, param.dtype, param.device, theta0,
                         stored, places[1:])


# -- installation --------------------------------------------------------------------------
def install(model: nn.Module, config: MCNCConfig, planned: Sequence[PlannedMember],
            loras: Sequence[LoRASpec], order: Sequence[str]) -> MCNCRuntime:
    """Swap each planned parameter for an ``MCNCMember`` parametrization of its theta0 and
    register alpha, beta, the manifest buffer and the forward hooks on ``model``."""
    members, chunks = _layout(config, planned)
    manifest = Manifest(config, tuple(members), tuple(chunks), tuple(loras), tuple(order))
    for key in [CONFIG_KEY] + [f(s) for s in range(len(chunks)) for f in (alpha_key, beta_key)]:
        if hasattr(model, key):
            raise ReparametrizeError(f"{type(model).__name__} already has an attribute {key!r};"
                                     " MCNC needs that name for its state")
    devices: dict[int, torch.device] = {}
    for member, plan in zip(members, planned, strict=True):
        devices.setdefault(member.segment, plan.device)
    model.register_buffer(CONFIG_KEY, manifest.to_tensor().to(planned[0].device))
    for s, n_chunks in enumerate(chunks):
        size = n_chunks * config.m * config.k
        alpha = philox.uniform_signed(config.seed, ALPHA_INIT_STREAM_BASE + s, 0, size,
                                      config.L, devices[s])
        model.register_parameter(alpha_key(s), nn.Parameter(alpha.view(n_chunks, config.m,
                                                                       config.k)))
        beta = torch.full((n_chunks, config.m), config.beta_init, device=devices[s])
        model.register_parameter(beta_key(s), nn.Parameter(beta))
    runtime = MCNCRuntime(model, manifest)
    for index, (member, plan) in enumerate(zip(members, planned, strict=True)):
        theta0 = _theta0_tensor(member, plan)
        stored = isinstance(member.theta0, StateDictTheta0)
        done: set[tuple[int, str]] = set()
        for place in (Place(plan.name, plan.module, plan.attribute), *plan.aliases):
            if (id(place.module), place.attribute) in done:
                continue  # a module reused under another name: parametrized once
            # a stored theta0 is saved once, by the first place (tied places share the tensor)
            # an Embedding(Bag) with max_norm renormalises its weight in place
            renorms = isinstance(place.module, _NORMAL_MODULES) and \
                place.module.max_norm is not None
            _parametrize(place, theta0, MCNCMember(runtime, index, own_copy=renorms),
                         stored and not done)
            done.add((id(place.module), place.attribute))
    object.__setattr__(model, RUNTIME_ATTRIBUTE, runtime)
    model.register_forward_pre_hook(runtime.enter)
    model.register_forward_hook(runtime.leave, always_call=True)
    register_load_state_dict_pre_hook(model, runtime.check_incoming)
    trained = {id(getattr(model, f(s))) for s in range(len(chunks)) for f in (alpha_key, beta_key)}
    for param in model.parameters():
        if id(param) not in trained and not config.train_dense:
            param.requires_grad_(False)
    return runtime


def _parametrize(place: Place, theta0: torch.Tensor, member: MCNCMember,
                 persistent: bool) -> None:
    """Swap ``place``'s parameter for ``member``'s parametrization of ``theta0``."""
    del place.module._parameters[place.attribute]
    place.module.register_buffer(place.attribute, theta0)
    parametrize.register_parametrization(place.module, place.attribute, member, unsafe=True)
    holder = place.module.parametrizations[place.attribute]
    holder.register_buffer("original", holder.original, persistent=persistent)


def _layout(config: MCNCConfig, planned: Sequence[PlannedMember]
            ) -> tuple[list[MemberSpec], list[int]]:
    """Segment and offset of every member: one segment each, or all in one (``model``)."""
    members: list[MemberSpec] = []
    filled: list[int] = []
    for plan in planned:
        numel = math.prod(plan.shape)
        if config.chunking == CHUNKING_TENSOR or not filled:
            filled.append(0)
        segment = len(filled) - 1
        members.append(MemberSpec(plan.shape, from_torch(plan.dtype), segment,
                                  filled[segment], plan.theta0, plan.name,
                                  tuple(a.name for a in plan.aliases)))
        filled[segment] += numel
    return members, [-(-n // config.d) for n in filled]


def _theta0_tensor(member: MemberSpec, plan: PlannedMember) -> torch.Tensor:
    if isinstance(member.theta0, StateDictTheta0):
        assert plan.stored is not None
        return plan.stored
    if isinstance(member.theta0, ZerosTheta0):
        return torch.empty(0, device=plan.device)
    values = prng_values(member.theta0, member.shape, 0, member.numel, plan.device,
                         member.name)
    assert values is not None
    return values.view(member.shape)
