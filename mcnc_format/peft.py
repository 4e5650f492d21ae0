"""``load_adapter``: the LoRA adapter of an ``.mcnc`` file attached to a model as a PEFT adapter.

The factors are regenerated in memory from alpha and beta (``MCNCFile.get_lora_factors``) and
handed to PEFT through its public API (``LoraConfig``, ``get_peft_model`` or
``PeftModel.add_adapter``, ``set_peft_model_state_dict``): no dense adapter file is written,
and what comes back is an ordinary ``PeftModel`` (train it further, ``merge_and_unload()``,
``save_pretrained``). The names and the config are those ``mcnc export-peft`` writes
(``converters/peft_export.peft_adapter``), so the two paths give one adapter.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .api import open as open_file
from .converters.peft_export import peft_adapter
from .engine.resolve import Resolver
from .errors import ExternalReferenceError, MCNCError, UsageError
from .extras import require
from .header import ExternalTheta0, LoRATensor
from .reader import MCNCFile, cached_tensor_sha256

__all__ = ["load_adapter"]


def load_adapter(model: nn.Module, path_or_hf_uri: str | os.PathLike[str],
                 adapter_name: str = "default", *, check_base: bool = True,
                 resolver: Resolver | None = None) -> Any:
    """Attach the lora tensors of ``path_or_hf_uri`` to ``model`` as PEFT adapter
    ``adapter_name``; returns the ``PeftModel`` (``model`` itself when it already is one, the
    adapter added beside the others).

    The factors are created on the device of ``model``'s parameters, in float32 (PEFT keeps
    LoRA weights in float32 over a lower-precision base too). Only the adapter is loaded; with
    ``check_base`` (the default) the rest of the file is checked against ``model`` before PEFT
    touches it: each adapted weight against the SHA-256 pin the file records of the base
    weight the adapter was trained on (external theta0, SPEC.md §7.4; another base raises
    ``ExternalReferenceError``), and each tensor that is not lora against ``model``'s, in its
    dtype (one trained beside the adapter, or one ``model`` lacks, raises ``MCNCError``: the
    factors alone would not give the model trained). Pass ``check_base=False`` for the same
    base in another dtype (its bytes differ). Each weight is hashed once per
    version (an in-place change is hashed again). Raises ``MCNCError`` when the file holds
    no lora tensor or names a module ``model`` lacks. ``resolver`` reads the file, as in
    ``mcnc_format.open`` (``HubResolver(token=...)`` for a private repository).
    """
    require("peft", "peft", "mcnc_format.peft.load_adapter")
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    source = os.fspath(path_or_hf_uri)
    if device.type == "meta":
        raise UsageError(f"{source}: the model's parameters are on the meta device; load its "
                         "base weights first (the adapter is built on their device)",
                         path=source)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    with open_file(source, resolver=resolver) as f:
        adapter = peft_adapter(f, source, device)
        shapes = {t.name.removesuffix(".weight"): t.shape for t in f.header.tensors
                  if isinstance(t, LoRATensor)}
        pins = {t.name: t.theta0 for t in f.header.tensors
                if isinstance(t, LoRATensor) and isinstance(t.theta0, ExternalTheta0)}
        _check_targets(base, shapes, source)
        if check_base:
            _check_pins(base, pins, source)
            _check_others(base, f, adapter.others, source)
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise UsageError(f"{source}: the model already has an adapter named {adapter_name!r}; "
                         "pass another adapter_name")
    config = LoraConfig(**{k: v for k, v in adapter.config.items() if k != "peft_type"})
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
            peft_model = model
        else:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(peft_model, adapter.weights,
                                           adapter_name=adapter_name)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MCNCError(f"{source}: PEFT refused the adapter: {exc}") from exc
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise MCNCError(f"{source}: PEFT did not place {unexpected[:5]} in the model")
    peft_model.set_adapter(adapter_name)
    return peft_model


def _check_targets(base: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str
                   ) -> None:
    """Before PEFT touches the model: every adapted module exists, is a Linear of the lora
    tensor's shape, and sits at one path only (PEFT wraps a module once, so a Linear reused
    under two names would keep its adapter at one of them only)."""
    paths: dict[int, list[str]] = {}
    for path, module in base.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    modules = dict(base.named_modules(remove_duplicate=False))
    absent = sorted(m for m in shapes if m not in modules)
    if absent:
        raise MCNCError(f"{source}: adapts modules {absent[:5]} that "
                        f"{type(base).__name__} does not have; is this the adapter of "
                        "another model?")
    for name, shape in shapes.items():
        module = modules[name]
        if hasattr(module, "get_base_layer"):  # already adapted: PEFT's layer wraps the Linear
            module = module.get_base_layer()
        if not isinstance(module, torch.nn.Linear) or tuple(module.weight.shape) != shape:
            found = (f"a Linear of weight shape {list(module.weight.shape)}"
                     if isinstance(module, torch.nn.Linear) else type(module).__name__)
            raise MCNCError(f"{source}: the adapter of {name!r} needs a Linear of weight shape "
                            f"{list(shape)}; the model has {found} there")
        if len(paths[id(module)]) > 1:
            raise MCNCError(f"{source}: {name!r} is one Linear reused at "
                            f"{paths[id(module)]}; PEFT would adapt it at one path only. Use "
                            "mcnc_format.load_into (the merged weights) for such a model")


def _check_others(base: torch.nn.Module, f: MCNCFile, names: tuple[str, ...], source: str
                  ) -> None:
    """Each tensor of the file that is not lora holds the model's values (compared in the
    model's dtype): a ``save_model`` file carries the whole base, which is fine; a tensor
    trained beside the adapter (an unfrozen norm or head) or another base's is not, since
    attaching only the LoRA factors would give a model other than the one trained."""
    absent, differ = [], []
    for name in names:
        mine = _model_tensor(base, name)
        if mine is None:
            absent.append(name)
        elif mine.is_meta or tuple(mine.shape) != f.tensor_info(name).shape or not torch.equal(
                f.get_tensor(name, mine.device).to(mine.dtype), mine.detach()):
            differ.append(name)
    if absent or differ:
        what = (f"holds {absent[:5]}, which {type(base).__name__} does not have" if absent
                else f"holds {differ[:5]} with values other than the model's")
        raise MCNCError(
            f"{what} (tensors that are not lora: {len(absent) + len(differ)}): the "
            "file changes weights besides its LoRA adapter (trained beside it, or the "
            "adapter's base is another model), which a PEFT LoRA adapter cannot carry. Load "
            "the whole model with mcnc_format.load_into, or pass check_base=False to attach "
            "the LoRA factors alone", path=source, tensor=(absent or differ)[0])


def _model_tensor(base: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer of ``base`` that the plain model names ``name`` (through
    PEFT's wrapper of an adapted layer), or None."""
    owner, _, attribute = name.rpartition(".")
    try:
        module = base.get_submodule(owner)
    except AttributeError:
        return None
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    found = getattr(module, attribute, None)
    return found if isinstance(found, torch.Tensor) else None


def _check_pins(base: torch.nn.Module, pins: dict[str, ExternalTheta0], source: str) -> None:
    """Each adapted Linear's weight has the bytes the adapter's base reference pins."""
    for name, pin in pins.items():
        module = base.get_submodule(name.removesuffix(".weight"))
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        if module.weight.is_meta:
            raise UsageError(f"{source}: the model's {name!r} is on the meta device, so it "
                             "cannot be checked against the adapter's base: load the base "
                             "weights first, or pass check_base=False", path=source,
                             tensor=name)
        digest = cached_tensor_sha256(module.weight)
        if digest != pin.sha256:
            raise ExternalReferenceError(
                f"{source}: the model's {name!r} has sha256 {digest[:12]}..., the adapter "
                f"was trained on a base whose {pin.tensor!r} ({pin.uri}) has sha256 "
                f"{pin.sha256[:12]}...: attach it to that base (pass check_base=False if it "
                "is the same base in another dtype)", rule="R75", path=source, tensor=name)


