"""MCNC-LoRA, the paper's LLM setting: LoRA adapters whose factors live on the MCNC manifold.

``add_mcnc_lora`` wraps target ``nn.Linear`` layers in ``MCNCLoRALinear``: the base layer is
frozen and ``W x + scale * B (A x)`` is computed with ``A = lora_A.weight`` (``[r, in]``) and
``B = lora_B.weight`` (``[out, r]``) MCNC-reparametrized, each factor its own segment by
default (``MCNCConfig.chunking="model"`` puts them all in one). PEFT's names and init are kept
(``base_layer``, ``lora_A``, ``lora_B``, ``scale = lora_alpha / r``; A starts at
Kaiming-uniform with ``a = sqrt(5)``, here the spec's ``fan_in_uniform`` theta0; B starts at
zero), so the adapter starts as the identity and maps onto PEFT's layout. The export writes
``{target}.weight`` as one ``lora`` tensor: base + scale * B @ A.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import constants as C
from ..engine.fused import lora_product
from ..errors import ReparametrizeError
from ..header import ZerosTheta0
from ..writer import Theta0
from .budget import LORA_RECIPE, choose_d, payload_values
from .config import (
    CHUNKING_MODEL,
    CHUNKING_TENSOR,
    THETA0_STREAM_BASE,
    MCNCConfig,
    require_config,
)
from .manifest import LoRASpec
from .reparam import PlannedMember, check_installable, install, refuse_sharded

__all__ = [
    "MCNCLoRALinear",
    "add_mcnc_lora",
    "lora_factor_sizes",
    "mcnc_lora_config",
    "merge_mcnc_lora",
    "unmerge_mcnc_lora",
]


class MCNCLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus an MCNC-LoRA adapter (PEFT's ``LoraLayer`` layout).

    Built by ``add_mcnc_lora``, which also gives ``lora_A`` and ``lora_B`` their MCNC
    parametrizations (until then their weights are placeholders on the meta device).

    ``lora_merged`` (a state-dict buffer) records whether the adapter has been added into
    the base weight; the export refuses merged adapters, whose base weight is no longer theta0.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device="meta")
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device="meta")
        self.scale = float(scale)
        self.merged = False
        self.register_buffer("lora_merged", torch.tensor(False, device=weight.device))

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (callers that inspect ``layer.weight.dtype`` keep working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        a = self.lora_A.weight
        delta = F.linear(F.linear(x.to(a.dtype), a), self.lora_B.weight) * self.scale
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in IEEE float32, the reader's arithmetic for ``lora`` tensors."""
        return lora_product(self.lora_B.weight, self.lora_A.weight) * self.scale

    def set_merged(self, merged: bool) -> None:
        self.merged = merged
        self.lora_merged.fill_(merged)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.merged = bool(self.lora_merged)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.out_features}, scale={self.scale}, merged={self.merged}"


def add_mcnc_lora(model: nn.Module, config: MCNCConfig | None = None, *,
                  target_modules: Sequence[str], rank: int = LORA_RECIPE.rank,
                  lora_alpha: float | None = None) -> nn.Module:
    """Attach MCNC-LoRA adapters to the ``nn.Linear`` layers named by ``target_modules``.

    A pattern matches a module name by ``fnmatch``, whole or as a dotted suffix (``"q_proj"``
    matches ``"layers.0.attn.q_proj"`` as in PEFT, ``"mlp.*"`` matches ``"layers.0.mlp.fc1"``);
    matching modules that are not ``nn.Linear`` (activations, norms) are left alone.
    ``scale = lora_alpha / rank`` (``lora_alpha`` defaults to ``rank``). ``config`` supplies
    the generator, ``m``, the seed, the storage dtypes, ``beta_init`` and ``chunking``; its
    ``include``, ``exclude``, ``theta0`` and ``train_dense`` do not apply: everything but alpha
    and beta is frozen. Without a config, ``mcnc_lora_config(model, target_modules, rank=
    rank)``: the measured recipe (``LORA_RECIPE``; train with Adam at its ``learning_rate``).
    Modifies ``model`` in place and returns it.
    """
    check_installable(model)
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    _check_rank(rank)
    scale = (rank if lora_alpha is None else _lora_alpha(lora_alpha)) / rank
    config = (mcnc_lora_config(model, target_modules, rank=rank) if config is None
              else require_config(config, "add_mcnc_lora"))
    order = tuple(model.state_dict().keys())
    targets = _targets(model, target_modules)
    for name, linear, _ in targets:
        refuse_sharded(f"{name}.weight", linear.weight)
    for param in model.parameters():
        param.requires_grad_(False)
    planned: list[PlannedMember] = []
    loras: list[LoRASpec] = []
    for name, linear, aliases in targets:
        wrapper = MCNCLoRALinear(linear, rank, scale)
        for path in (name, *aliases):  # a reused Linear: one adapter, at every path
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, wrapper)
        device = linear.weight.device
        stream = THETA0_STREAM_BASE + len(planned)
        loras.append(LoRASpec(name, len(planned), len(planned) + 1, scale, aliases))
        planned.append(PlannedMember(f"{name}.lora_A.weight", wrapper.lora_A, "weight",
                                     (rank, linear.in_features), torch.float32, device,
                                     Theta0.fan_in_uniform(config.seed, stream).entry))
        planned.append(PlannedMember(f"{name}.lora_B.weight", wrapper.lora_B, "weight",
                                     (linear.out_features, rank), torch.float32, device,
                                     ZerosTheta0()))
    install(model, config, planned, loras, order)
    return model


def mcnc_lora_config(model: nn.Module, target_modules: Sequence[str], *,
                     rank: int = LORA_RECIPE.rank, budget_bytes: int | None = None,
                     ratio: float | None = None, chunking: str = CHUNKING_TENSOR,
                     seed: int = 0) -> MCNCConfig:
    """``LORA_RECIPE``'s config for these adapters, with ``d`` chosen for a budget.

    ``budget_bytes`` caps the stored alpha/beta (float32; the file's header comes on top);
    ``ratio`` asks for at least that many adapter values per stored number. ``choose_d`` picks
    the smallest ``d`` that fits, per factor segment (or over all factors with
    ``chunking="model"``), and raises if nothing fits. With neither, the recipe's ratio where
    the layers allow it, else one chunk per segment (factors too small for that ratio), so the
    default always works. Pass the result to ``add_mcnc_lora`` with the same
    ``target_modules`` and ``rank``.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    _check_rank(rank)
    sizes = lora_factor_sizes(model, target_modules, rank)
    if chunking == CHUNKING_MODEL:
        sizes = [sum(sizes)]
    k = LORA_RECIPE.k
    if budget_bytes is None and ratio is None:
        whole = min(max(sizes), C.MAX_D)  # one chunk per segment: the fewest numbers
        fits = payload_values(sizes, k, whole) <= sum(sizes) // LORA_RECIPE.ratio
        d = choose_d(sizes, k, ratio=LORA_RECIPE.ratio) if fits else whole
    else:
        d = choose_d(sizes, k, budget_bytes=budget_bytes, ratio=ratio)
    return MCNCConfig(k=k, d=d, hidden=LORA_RECIPE.hidden, L=LORA_RECIPE.L,
                      beta_init=LORA_RECIPE.beta_init, chunking=chunking, seed=seed)


def lora_factor_sizes(model: nn.Module, target_modules: Sequence[str], rank: int) -> list[int]:
    """The values of each factor ``add_mcnc_lora`` would create (A then B, per target, in
    module order): the segment sizes of ``chunking="tensor"``."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    return [n for _, linear, _ in _targets(model, target_modules)
            for n in (rank * linear.in_features, linear.out_features * rank)]


def _check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ReparametrizeError(f"add_mcnc_lora: rank must be a positive integer, got {rank!r}")


def _lora_alpha(value: object) -> float:
    """``lora_alpha`` as a float, checked before the model is touched: a non-finite scale
    cannot go into the JSON manifest, and failing there left the layers already wrapped."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ReparametrizeError(f"add_mcnc_lora: lora_alpha must be a finite number, got "
                                 f"{value!r}")
    return float(value)


# Owners whose forward may read a child Linear's ``weight`` without calling the child.
_WEIGHT_READERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _targets(model: nn.Module, patterns: Sequence[str]
             ) -> list[tuple[str, nn.Linear, tuple[str, ...]]]:
    """The ``nn.Linear`` modules (exactly that type: subclasses such as MultiheadAttention's
    ``out_proj`` are read by their owner without calling their forward) whose names match,
    each with the other paths it is reused under."""
    found = []
    module_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
    weight_names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        weight_names.setdefault(id(param), []).append(name)
    for name, module in model.named_modules():
        matches = any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p)
                      for p in patterns)
        if name and matches and type(module) is nn.Linear:
            paths = module_names[id(module)]
            # A weight also used outside this Linear (a lm_head tied to an Embedding) would be
            # adapted in one place only: what trains would not be what loads.
            outside = [n for n in weight_names[id(module.weight)]
                       if n.rpartition(".")[0] not in paths]
            if outside:
                raise ReparametrizeError(
                    f"add_mcnc_lora: the weight of {name!r} is shared with {outside}, outside "
                    "this Linear; adapting it here would save a model different from the one "
                    "trained. Leave this module out of target_modules, or reparametrize the "
                    "tied weight with mcnc_format.torch.reparametrize instead.")
            for path in paths:
                parent = model.get_submodule(path.rpartition(".")[0])
                if isinstance(parent, _WEIGHT_READERS):
                    raise ReparametrizeError(
                        f"add_mcnc_lora: {path!r} belongs to a {type(parent).__name__}, whose "
                        "inference fast path reads its Linear weights directly, bypassing an "
                        "adapter: the evaluated model would not be the trained one. Leave it "
                        "out of target_modules, or use mcnc_format.torch.reparametrize for it.")
            found.append((name, module, tuple(paths[1:])))
    if not found:
        linear = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise ReparametrizeError(
            f"add_mcnc_lora: target_modules {list(patterns)} match no nn.Linear module "
            f"(MCNC-LoRA wraps nn.Linear layers only); they are named like {linear[:5]}")
    return found


def _lora_layers(model: nn.Module) -> Iterator[MCNCLoRALinear]:
    return (m for m in model.modules() if isinstance(m, MCNCLoRALinear))


@torch.no_grad()
def merge_mcnc_lora(model: nn.Module) -> nn.Module:
    """Add every adapter into its base weight (``W += scale * B @ A``); the forward then
    skips the adapters. Undo with ``unmerge_mcnc_lora`` before training or saving."""
    for layer in _lora_layers(model):
        if not layer.merged:
            weight = layer.base_layer.weight
            weight.copy_(weight.to(torch.float32) + layer.delta_weight())
            layer.set_merged(True)
    return model


@torch.no_grad()
def unmerge_mcnc_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight (exact up to float rounding)."""
    for layer in _lora_layers(model):
        if layer.merged:
            weight = layer.base_layer.weight
            weight.copy_(weight.to(torch.float32) - layer.delta_weight())
            layer.set_merged(False)
    return model
