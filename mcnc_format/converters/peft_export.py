r"""``.mcnc`` LoRA adapters out to PEFT's folder layout, for tools that only speak PEFT.

A ``lora`` tensor named ``<module>.weight`` becomes PEFT's ``lora_A`` / ``lora_B`` pair of
``<module>``: the factors are regenerated from alpha and beta, and ``scale`` becomes
``lora_alpha = scale * r``. The folder holds ``adapter_config.json`` and
``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(base, folder)`` loads.
The base weights (each lora tensor's theta0) are not exported: PEFT takes them from the base
model, named by ``base_model_name_or_path``.

PEFT's LoRA on ``nn.Linear`` keeps weights as ``[out, in]``, like the format; layers that store
``[in, out]`` (GPT-2's ``Conv1D``) are not covered.

Module names are written so that PEFT matches exactly the exported modules: PEFT matches a list
entry of ``target_modules`` by suffix (``q`` would also adapt ``blk.q``) and a pattern key by
``re.match(rf"(.*\.)?({key})$", name)``, so ``target_modules`` is one regex that PEFT
full-matches (``q|blk\.q``) and each ``rank_pattern`` / ``alpha_pattern`` key is
``^`` + the escaped name (the ``^`` fails after any ``prefix.``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..api import open as open_file
from ..atomic import atomic_files, refuse_overwrite, refuse_same_file
from ..errors import MCNCError
from ..header import LoRATensor
from ..reader import MCNCFile
from ..safetensors_out import save_safetensors

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PeftAdapter",
    "PeftExport",
    "export_peft",
    "peft_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
WEIGHT_SUFFIX = ".weight"


@dataclass(frozen=True)
class PeftExport:
    """Where the adapter went and what it holds."""

    folder: Path
    modules: tuple[str, ...]
    rank: int
    lora_alpha: float
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class PeftAdapter:
    """The lora tensors of an ``.mcnc`` file in PEFT's terms, in memory: ``weights`` under
    PEFT's saved names (``base_model.model.<module>.lora_A.weight``), ``config`` the
    ``LoraConfig`` fields, ``others`` the names of the file's tensors that are not lora."""

    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    ranks: dict[str, int]
    others: tuple[str, ...]


def peft_adapter(f: MCNCFile, source: str, device: torch.device | str = "cpu") -> PeftAdapter:
    """Regenerate the factors of every lora tensor of ``f`` (opened from ``source``, which
    errors name) and describe them as a PEFT LoRA adapter of the modules they adapt."""
    lora_names = [e.name for e in f.header.tensors if isinstance(e, LoRATensor)]
    others = tuple(e.name for e in f.header.tensors if not isinstance(e, LoRATensor))
    if not lora_names:
        raise MCNCError(f"{source}: holds no lora tensors, so there is no LoRA adapter in it; "
                        "use `mcnc unpack` or mcnc_format.load for dense weights")
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name in lora_names:
        module = _module_of(name, source)
        a, b, scale = f.get_lora_factors(name, device)
        weights[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        weights[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        ranks[module] = int(a.shape[0])
        alphas[module] = _plain_number(scale * a.shape[0])
    rank, lora_alpha = _most_common(ranks), _most_common(alphas)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": lora_alpha,
        "target_modules": "|".join(re.escape(m) for m in sorted(ranks)),
        "rank_pattern": {_exact_pattern(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {_exact_pattern(m): a for m, a in alphas.items() if a != lora_alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    return PeftAdapter(weights, config, ranks, others)


def export_peft(
    mcnc_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    task_type: str | None = None,
    skip_non_lora: bool = False,
    force: bool = False,
) -> PeftExport:
    """Write the lora tensors of ``mcnc_path`` as a PEFT LoRA adapter folder ``out_dir``.

    ``base_model`` defaults to the file's ``info.base_model``. Tensors that are not ``lora``
    cannot be expressed as LoRA: they are an error unless ``skip_non_lora``. An existing
    adapter in ``out_dir`` is replaced only with ``force``.
    """
    folder = Path(out_dir)
    outputs = [folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS]
    for output in outputs:
        refuse_same_file(mcnc_path, output)
    refuse_overwrite(outputs, force)
    with open_file(mcnc_path) as f:
        adapter = peft_adapter(f, str(mcnc_path))
        others = adapter.others
        if others and not skip_non_lora:
            raise MCNCError(f"{mcnc_path}: {len(others)} tensors are not lora (e.g. "
                            f"{list(others[:3])}) and PEFT's LoRA cannot hold them; pass "
                            "--skip-non-lora to export the adapter without them")
        base = base_model if base_model is not None else f.info.get("base_model")
    config = {**adapter.config, "task_type": task_type, "base_model_name_or_path": base,
              "revision": None, "inference_mode": True}
    # Both files are written before either is placed: an interrupted or failed export leaves
    # the old adapter whole, never new weights beside an old config.
    with atomic_files(folder, overwrite=force) as staging:
        save_safetensors(staging / ADAPTER_WEIGHTS, adapter.weights, {"format": "pt"},
                         overwrite=False)
        (staging / ADAPTER_CONFIG).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return PeftExport(folder, tuple(sorted(adapter.ranks)), config["r"], config["lora_alpha"],
                      others if skip_non_lora else ())


def _module_of(name: str, source: str) -> str:
    if not name.endswith(WEIGHT_SUFFIX) or len(name) == len(WEIGHT_SUFFIX):
        raise MCNCError(f"{source}: lora tensor {name!r} does not end in '.weight', so it names "
                        "no module PEFT could attach the adapter to")
    return name[: -len(WEIGHT_SUFFIX)]


def _exact_pattern(module: str) -> str:
    """A pattern key PEFT matches to ``module`` only, not to ``<prefix>.<module>``."""
    return "^" + re.escape(module)


def _plain_number(value: float) -> float:
    """Integral alphas as ints (as PEFT writes them), others as floats."""
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: dict[str, float]) -> float:
    """The config's default ``r`` / ``lora_alpha``: the most frequent value (ties: smallest),
    so the per-module patterns stay short."""
    counts: dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return min(counts, key=lambda v: (-counts[v], v))
