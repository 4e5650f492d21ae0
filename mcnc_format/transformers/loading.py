"""``from_pretrained``: a transformers model from ``config.json`` and ``model.mcnc``.

The model is built from its config with every parameter on the meta device (nothing is
allocated or initialised for weights the file will replace), then the engine loads the file
straight onto ``device`` and the loaded tensors are assigned (``mcnc_format.load_into``).
Buffers that are not in a state dict (rotary frequencies, position ids) are computed for real
while the model is built, as transformers' own constructors compute them: only parameters are
sent to meta, through PyTorch's public parameter-registration hook.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import load_into
from ..devices import check_device, check_dtype
from ..errors import HubFileNotFoundError, MCNCError, UsageError
from ..extras import require
from ..uri import SCHEME, parse_uri

__all__ = ["CONFIG_FILE", "GENERATION_CONFIG_FILE", "MODEL_FILE", "from_pretrained",
           "resolve_folder"]

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
    torch dtype or one of ``f32``, ``bf16``, ``f16``, ``f64``).
    ``config_overrides`` go to ``AutoConfig.from_pretrained``. Tied weights
    (``tie_word_embeddings``) are tied; the generation config is loaded when the folder has
    one. Raises ``MCNCError`` naming the file when ``config.json`` or ``model.mcnc`` is
    missing or unreadable, or when the file's tensors do not match the model the config builds.
    """
    require("transformers", "transformers", "mcnc_format.transformers.from_pretrained")
    from transformers import AutoConfig, GenerationConfig

    device = check_device(device)
    dtype = check_dtype(dtype)
    folder = resolve_folder(repo_or_dir, revision, token=token, endpoint=endpoint)
    config_path, weights = folder / CONFIG_FILE, folder / MODEL_FILE
    for required in (config_path, weights):
        if not required.is_file():
            raise MCNCError(f"{required}: no such file; a model saved by "
                            "mcnc_format.transformers.save_pretrained holds config.json and "
                            "model.mcnc")
    try:
        config = AutoConfig.from_pretrained(folder, **config_overrides)
    except (OSError, ValueError, KeyError) as exc:
        raise MCNCError(f"{config_path}: transformers cannot read this config ({exc})") from exc
    cls = model_class or _architecture(config, config_path)
    with _default_dtype(dtype), _parameters_on_meta():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    load_into(model, weights, device=device, dtype=dtype)
    model.to(device)  # the buffers computed while building (parameters are there already)
    model.tie_weights()
    if dtype is not None:
        model.config.dtype = dtype
    if (folder / GENERATION_CONFIG_FILE).is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def resolve_folder(repo_or_dir: str | os.PathLike[str], revision: str | None = None, *,
                   token: str | None = None, endpoint: str | None = None) -> Path:
    """A local folder holding the model's files: the folder itself, or the Hub snapshot of
    ``config.json``, ``model.mcnc`` and (if present) ``generation_config.json`` at one
    commit (the branch or tag is resolved once, so the files cannot come from two commits)."""
    text = os.fspath(repo_or_dir)
    if os.path.isdir(text):
        return Path(text)
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
    return config.parent


def _architecture(config: Any, source: Path) -> Any:
    import transformers

    names = getattr(config, "architectures", None) or []
    if not names:
        raise MCNCError(f"{source}: names no architecture; pass model_class= (for example "
                        "transformers.AutoModelForCausalLM)")
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise MCNCError(f"{source}: architecture {names[0]!r} is not in this transformers "
                        f"({transformers.__version__}); upgrade it or pass model_class=")
    return cls


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
