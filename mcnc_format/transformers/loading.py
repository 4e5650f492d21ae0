"""``from_pretrained``: a transformers model from ``config.json`` and ``model.mcnc``.

The model is built from its config with every parameter on the meta device (nothing is
allocated or initialised for weights the file will replace), then the engine loads the file
straight onto ``device`` and the loaded tensors are assigned (``mcnc_format.load_into``).
Buffers that are not in a state dict (rotary frequencies, position ids) are computed for real
while the model is built, as transformers' own constructors compute them: only parameters are
sent to meta, through PyTorch's public parameter-registration hook.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import STRICT_HINT, load_into
from ..api import open as open_file
from ..devices import check_device, check_dtype
from ..errors import (
    ConfigError,
    HubFileNotFoundError,
    MCNCError,
    StateDictMismatchError,
    UsageError,
)
from ..extras import require
from ..uri import SCHEME, parse_uri

__all__ = ["CONFIG_FILE", "GENERATION_CONFIG_FILE", "MODEL_FILE", "check_config",
           "from_pretrained", "resolve_folder"]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_FILE = "model.mcnc"


def from_pretrained(repo_or_dir: str | os.PathLike[str], *, revision: str | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                    model_class: Any = None, token: str | None = None,
                    endpoint: str | None = None, **config_overrides: Any) -> nn.Module:
    """The transformers model stored in ``repo_or_dir``, in eval mode, weights on ``device``.

    ``repo_or_dir``: a local folder, ``hf://ORG/REPO[@REVISION][/SUBFOLDER]`` or a Hub repo
    id ``ORG/REPO`` (downloaded through huggingface_hub's cache, ``.mcnc`` checksums checked;
    ``token`` and ``endpoint`` as in ``mcnc_format.hub``). The model class is the one
    ``config.json``'s ``architectures`` names, or ``model_class`` (a model class, or an
    ``AutoModel*`` class). ``dtype`` converts floating weights (default: as stored; a floating
    torch dtype or one of ``f32``, ``bf16``, ``f16``, ``f64``); transformers' ``torch_dtype``,
    ``dtype="auto"`` and a ``device_map`` naming one device work as there (``_placement``).
    ``config_overrides`` go to ``AutoConfig.from_pretrained``; one that is no config field is
    a ``UsageError``. The class is looked up only
    among transformers' model classes of the config's model type, and the config is checked
    against the file's tensor names and shapes before the model is built (``ConfigError``).
    Tied weights (``tie_word_embeddings``) are tied; the generation config is loaded when the
    folder has one. Raises ``MCNCError`` naming the file when ``config.json`` or ``model.mcnc`` is
    missing or unreadable, or when the file's tensors do not match the model the config builds.
    """
    require("transformers", "transformers", "mcnc_format.transformers.from_pretrained")
    from transformers import AutoConfig

    device, dtype = _placement(device, dtype, config_overrides)
    folder, source = resolve_folder(repo_or_dir, revision, token=token, endpoint=endpoint)
    config_path, weights = folder / CONFIG_FILE, folder / MODEL_FILE
    for required in (config_path, weights):
        if not required.is_file():
            raise MCNCError(f"{required}: no such file; a model saved by "
                            "mcnc_format.transformers.save_pretrained holds config.json and "
                            "model.mcnc")
    try:
        config, unused = AutoConfig.from_pretrained(folder, return_unused_kwargs=True,
                                                    **config_overrides)
    except Exception as exc:  # transformers raises whatever a broken config.json makes it meet
        raise ConfigError(f"transformers cannot read this config ({exc}); fix config.json",
                          path=str(config_path)) from exc
    if unused:
        raise UsageError(f"from_pretrained got {sorted(unused)}, which are neither its own "
                         f"options nor fields of this config ({type(config).__name__}), where "
                         "other keywords go: check the spelling, or leave them out")
    cls = model_class or _architecture(config, config_path)
    generation = _generation_config(folder / GENERATION_CONFIG_FILE)
    check_config(cls, config, weights)
    with _default_dtype(dtype), _parameters_on_meta():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    try:
        load_into(model, source, device=device, dtype=dtype,
                  resolver=_resolver(source, token, endpoint))
    except StateDictMismatchError as exc:  # its hint names a strict= from_pretrained lacks
        raise StateDictMismatchError(
            f"{exc.message.removesuffix(STRICT_HINT)} model.mcnc must hold every weight of the "
            f"{type(model).__name__} its config builds: a file packed against a base "
            "(mcnc pack --base) holds the adapter alone; attach it to the base with "
            "mcnc_format.peft.load_adapter, or build the base and mcnc_format.load_into it "
            "with strict=False", path=exc.path) from exc
    model.to(device)  # the buffers computed while building (parameters are there already)
    model.tie_weights()
    if dtype is not None:
        model.config.dtype = dtype
    if generation is not None and model.can_generate():
        model.generation_config = generation
    return model.eval()


def _generation_config(path: Path) -> Any:
    """The ``GenerationConfig`` in ``path``, if there is one, read before the model is built:
    a broken one is a ``ConfigError`` at once, not whatever transformers meets after the
    weights were loaded."""
    from transformers import GenerationConfig

    if not path.is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(path.parent, path.name)
    except Exception as exc:  # as for config.json
        raise ConfigError(f"transformers cannot read this generation config ({exc}); fix or "
                          "remove generation_config.json", path=str(path)) from exc


#: transformers' download options: ``AutoConfig.from_pretrained`` would apply them to
#: ``config.json`` alone (``model.mcnc`` comes through ``mcnc_format.hub``).
_DOWNLOAD_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies", "subfolder",
                     "gguf_file")
#: ``device_map`` values that spread a model over several devices.
_SPREAD = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device: torch.device | str, dtype: torch.dtype | str | None,
               overrides: dict[str, Any]) -> tuple[torch.device, torch.dtype | None]:
    """The checked device and dtype, taking transformers' spellings out of ``overrides``:
    ``torch_dtype`` (its deprecated name of ``dtype``), ``dtype="auto"`` (as stored) and a
    ``device_map`` naming one device; ``low_cpu_mem_usage`` is dropped (building on meta is
    what it asks for; transformers 5 ignores it too). Left there, ``AutoConfig`` would drop
    ``device_map`` and record ``torch_dtype`` in the config without converting a weight.
    Download options, which would reach the config only, and a ``device_map`` spreading the
    model are refused."""
    if "torch_dtype" in overrides:
        alias = overrides.pop("torch_dtype")
        if dtype is not None and alias is not None:
            raise UsageError("dtype= and torch_dtype= were both given; give dtype= only "
                             "(torch_dtype is transformers' old name for it)")
        dtype = dtype if alias is None else alias
    if isinstance(dtype, str) and dtype == "auto":  # transformers' "as the weights are"
        dtype = None
    if "device_map" in overrides:
        device = _one_device(overrides.pop("device_map"), check_device(device))
    overrides.pop("low_cpu_mem_usage", None)
    download = [name for name in _DOWNLOAD_OPTIONS if name in overrides]
    if download:
        raise UsageError(
            f"from_pretrained does not take transformers' download options {download}: the "
            "files come through mcnc_format.hub and huggingface_hub's cache. Name a subfolder "
            "in the URI (hf://ORG/REPO/SUBFOLDER), and use HF_HUB_OFFLINE=1 or HF_HUB_CACHE "
            "for the cache")
    return check_device(device), check_dtype(dtype)


def _one_device(device_map: object, device: torch.device) -> torch.device:
    """The one device ``device_map`` names (a device, or ``{"": device}``, accelerate's map
    of the whole model); ``device`` when given too must be the same one."""
    target = device_map
    if isinstance(device_map, Mapping):
        target = device_map[""] if set(device_map) == {""} else None
    if (not isinstance(target, str | int | torch.device) or isinstance(target, bool)
            or target in _SPREAD):
        raise UsageError(
            f"device_map={device_map!r} spreads the model over devices; from_pretrained "
            "loads every weight onto one device: pass device= (or device_map naming one "
            "device)")
    mapped = check_device(target)
    if device not in (torch.device("cpu"), mapped):
        raise UsageError(f"device={str(device)!r} and device_map={device_map!r} name different "
                         "devices; give one")
    return mapped


def resolve_folder(repo_or_dir: str | os.PathLike[str], revision: str | None = None, *,
                   token: str | None = None, endpoint: str | None = None) -> tuple[Path, str]:
    """A local folder holding the model's files: the folder itself, or the Hub snapshot of
    ``config.json``, ``model.mcnc`` and (if present) ``generation_config.json`` at one
    commit (the branch or tag is resolved once, so the files cannot come from two commits);
    and the name to load ``model.mcnc`` by: its path, or its ``hf://`` URI at that commit, so
    that a theta0 reference beside it (``base.safetensors``) is fetched from the repository
    as well, as a local folder's is read from the folder."""
    text = os.fspath(repo_or_dir)
    if os.path.isdir(text):
        return Path(text), str(Path(text) / MODEL_FILE)
    if not text.startswith(SCHEME) and (text.count("/") != 1 or os.path.exists(text)):
        raise MCNCError(f"{text}: no such folder, and not a Hub repo id ORG/REPO or an "
                        "hf://ORG/REPO URI")
    from ..hub import HubURI, pinned, pull

    uri = parse_uri(text, require_path=False, error=UsageError)
    if revision is not None and uri.revision not in (None, revision):
        raise UsageError(f"{text} names revision {uri.revision!r} and revision={revision!r} "
                         "was given too; give one")
    target = pinned(HubURI(uri.repo_id, uri.revision or revision, uri.path), token, endpoint)
    prefix = f"{target.path}/" if target.path else ""
    options = {"token": token, "endpoint": endpoint}
    config = pull(target.repo_id, prefix + CONFIG_FILE, target.revision, **options)
    pull(target.repo_id, prefix + MODEL_FILE, target.revision, **options)
    with suppress(HubFileNotFoundError):  # optional: models that do not generate have none
        pull(target.repo_id, prefix + GENERATION_CONFIG_FILE, target.revision, **options)
    return config.parent, str(target.with_path(prefix + MODEL_FILE))


def _resolver(source: str, token: str | None, endpoint: str | None) -> Any:
    """The Hub resolver with the caller's token and endpoint for an ``hf://`` source (its
    references are fetched with them too); None (the default) for a local file."""
    if not source.startswith(SCHEME):
        return None
    from ..hub import HubResolver

    return HubResolver(token=token, endpoint=endpoint)


def _architecture(config: Any, source: Path) -> Any:
    """The model class ``architectures`` names, looked up only among the classes
    transformers' auto-model registries list for the config's model type: whatever else a
    ``config.json`` says (a function, a submodule, a dunder, another model type's class) is
    refused, never fetched from the package."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if isinstance(names, str):  # one name, not a list of them
        names = [names]
    if not names:
        raise ConfigError("names no architecture; pass model_class= (for example "
                          "transformers.AutoModelForCausalLM)", path=str(source))
    name, model_type = names[0], getattr(config, "model_type", None)
    registered = _registered_classes(model_type)
    if not isinstance(name, str) or name not in registered:
        listed = ", ".join(sorted(registered)[:8]) or "none"
        raise ConfigError(
            f"architecture {name!r} is not a model class of model type {model_type!r} in "
            f"transformers {transformers.__version__} (its classes: {listed}); fix "
            "config.json or pass model_class=", path=str(source))
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(f"architecture {name!r} is not in this transformers "
                          f"({transformers.__version__}); upgrade it or pass model_class=",
                          path=str(source))
    return cls


def _registered_classes(model_type: object) -> set[str]:
    """Names of the model classes transformers' auto-model registries
    (``MODEL_*_MAPPING_NAMES``: model type to class name) list for ``model_type``."""
    from transformers.models.auto import modeling_auto

    found: set[str] = set()
    for attribute, mapping in vars(modeling_auto).items():
        if not (attribute.startswith("MODEL_") and attribute.endswith("_MAPPING_NAMES")
                and isinstance(mapping, Mapping)):
            continue
        value = mapping.get(model_type) if isinstance(model_type, str) else None
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, tuple | list):
            found.update(v for v in value if isinstance(v, str))
    return found


def check_config(cls: Any, config: Any, weights: Path) -> None:
    """Before the model is built: the config's sizes are not negative, and a probe of it
    (one layer, on the meta device: no memory, no time) has every tensor of the file with
    the file's shape, and as many layers as the file holds. A config that does not describe
    the file raises ``ConfigError`` instead of building a model of any size first."""
    label = str(weights)
    for key, value in config.to_dict().items():
        if (isinstance(value, int) and not isinstance(value, bool) and value < 0
                and (key.endswith("_size") or key.startswith(("num_", "n_")))):
            raise ConfigError(f"the config gives {key}={value}; sizes and counts cannot be "
                              "negative. Fix config.json", path=label, field=key)
    with open_file(weights) as f:
        stored = {t.name: t.shape for t in f.header.tensors}
    layers = getattr(config, "num_hidden_layers", None)
    probe_config = copy.deepcopy(config)
    reduced = isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1
    if reduced:
        probe_config.num_hidden_layers = 1
    try:
        probe = _probe(cls, probe_config)
    except Exception as exc:  # transformers' constructors raise what they meet
        raise ConfigError(f"transformers cannot build {getattr(cls, '__name__', cls)} from "
                          f"this config: {exc}. Fix config.json", path=label) from exc
    wanted = {name: tuple(t.shape) for name, t in probe.state_dict().items()}
    want_shapes = {_pattern(name): shape for name, shape in wanted.items()}
    for name, shape in stored.items():
        want = want_shapes.get(_pattern(name))
        if want is None:
            raise ConfigError(f"the file holds {name!r}, which {cls.__name__} built from "
                              "this config does not have: the config is not the one saved "
                              "with the file", path=label, tensor=name)
        if want != tuple(shape):
            raise ConfigError(f"{name!r} has shape {list(shape)} in the file; the config "
                              f"gives it shape {list(want)} (check hidden_size and the other "
                              "sizes of config.json)", path=label, tensor=name)
    if reduced:
        _check_layer_count(wanted, stored, layers, label)


def _probe(cls: Any, config: Any) -> nn.Module:
    """``cls`` built from ``config`` with nothing allocated: everything on the meta device,
    or, for a constructor that computes with its buffers (which meta tensors cannot), real
    buffers and meta parameters."""
    def build() -> nn.Module:
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)

    try:
        with torch.device("meta"):
            return build()
    except Exception:
        with _parameters_on_meta():
            return build()


_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.*)$")


def _pattern(name: str) -> str:
    """``name`` with its first index replaced: one pattern per tensor of every layer."""
    match = _NUMBERED.match(name)
    return name if match is None else f"{match[1]}.#.{match[3]}"


def _check_layer_count(wanted: dict[str, tuple[int, ...]], stored: dict[str, Any],
                       layers: int, label: str) -> None:
    """Each stack the one-layer probe holds once holds ``layers`` layers in the file."""
    indices: dict[str, set[int]] = {}
    for name in stored:
        match = _NUMBERED.match(name)
        if match is not None:
            indices.setdefault(match[1], set()).add(int(match[2]))
    for prefix in {m[1] for m in map(_NUMBERED.match, wanted) if m is not None}:
        probed = {int(m[2]) for m in map(_NUMBERED.match, wanted) if m and m[1] == prefix}
        found = indices.get(prefix, set())
        if probed == {0} and found != set(range(layers)):
            raise ConfigError(f"the config gives num_hidden_layers={layers}; the file holds "
                              f"{len(found)} layers under {prefix!r}: the config is not the "
                              "one saved with the file", path=label, field="num_hidden_layers")


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is replaced by a meta tensor of its shape;
    buffers stay real. ``torch.nn.modules.module.register_module_parameter_registration_hook``
    is PyTorch's public global hook for this (accelerate's ``init_empty_weights`` pattern)."""

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta:
            return None
        return type(param)(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Build in ``dtype`` (as transformers does), so float buffers made by constructors
    follow it; parameters come from the file anyway."""
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
