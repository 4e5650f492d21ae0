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
from .errors import MCNCError

__all__ = ["load_adapter"]


def load_adapter(model: nn.Module, path_or_hf_uri: str | os.PathLike[str],
                 adapter_name: str = "default") -> Any:
    """Attach the lora tensors of ``path_or_hf_uri`` to ``model`` as PEFT adapter
    ``adapter_name``; returns the ``PeftModel`` (``model`` itself when it already is one, the
    adapter added beside the others).

    The factors are created on the device of ``model``'s parameters, in float32 (PEFT keeps
    LoRA weights in float32 over a lower-precision base too). Only the adapter is loaded: the
    file's theta0 (the base weight the adapter was trained on) and its tensors that are not
    lora are not compared with ``model``'s. Raises ``MCNCError`` when the file holds no lora
    tensor or names a module ``model`` lacks.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    source = os.fspath(path_or_hf_uri)
    with open_file(source) as f:
        adapter = peft_adapter(f, source, device)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    modules = dict(base.named_modules())
    absent = sorted(m for m in adapter.ranks if m not in modules)
    if absent:
        raise MCNCError(f"{source}: adapts modules {absent[:5]} that "
                        f"{type(base).__name__} does not have; is this the adapter of "
                        "another model?")
    config = LoraConfig(**{k: v for k, v in adapter.config.items() if k != "peft_type"})
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, adapter.weights, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise MCNCError(f"{source}: PEFT did not place {unexpected[:5]} in the model")
    peft_model.set_adapter(adapter_name)
    return peft_model
