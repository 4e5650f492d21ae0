"""The torch APIs the package uses that are newer than its oldest supported torch
(``torch>=2.3`` in pyproject.toml), each beside what older releases offer in its place.
Nothing else in the package looks at torch's version; `.ci/floor` runs the suite on the
oldest release."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import UsageError

__all__ = [
    "OUT_OF_MEMORY",
    "is_dtensor",
    "register_load_state_dict_pre_hook",
    "require_checkpoint_api",
    "safe_globals",
]

#: What torch raises when an accelerator's memory runs out: ``torch.OutOfMemoryError`` where
#: torch has it (the base of every device's), ``torch.cuda.OutOfMemoryError`` before.
OUT_OF_MEMORY: type[Exception] = getattr(torch, "OutOfMemoryError",
                                         torch.cuda.OutOfMemoryError)


#: Where ``DTensor`` is defined: ``torch.distributed.tensor`` where torch has it public,
#: ``torch.distributed._tensor`` before.
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``DTensor`` (sharded by ``fully_shard`` or
    ``parallelize_module``), without importing torch.distributed: no tensor is one before its
    module is imported."""
    for name in _DTENSOR_MODULES:
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if isinstance(cls, type) and isinstance(value, cls):
            return True
    return False


def register_load_state_dict_pre_hook(module: nn.Module, hook: Callable[..., None]
                                      ) -> RemovableHandle:
    """``module.register_load_state_dict_pre_hook(hook)``: ``hook(module, state_dict, prefix,
    local_metadata, strict, missing_keys, unexpected_keys, error_msgs)`` before every
    ``load_state_dict``. Older torch has the same hook under its underscored name only."""
    public = getattr(module, "register_load_state_dict_pre_hook", None)
    if public is not None:
        return public(hook)  # type: ignore[no-any-return]
    older: Callable[..., RemovableHandle] = module._register_load_state_dict_pre_hook
    return older(hook, with_module=True)


def safe_globals(allowed: Sequence[Any]) -> contextlib.AbstractContextManager[object]:
    """``torch.serialization.safe_globals(allowed)``: more globals a weights-only load may
    rebuild, for the enclosed loads. Older torch has a fixed list: with nothing to add it
    needs nothing; what needs more (a Lightning checkpoint's hyperparameters) is refused."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(list(allowed))  # type: ignore[no-any-return]
    if not allowed:
        return contextlib.nullcontext()
    raise UsageError(f"reading this checkpoint needs a newer torch than {torch.__version__} "
                     "(torch.serialization.safe_globals, for the objects its pickle names "
                     "beyond tensors): upgrade torch, or save the state dict alone with "
                     "torch.save(model.state_dict(), path)")


def require_checkpoint_api(what: str) -> None:
    """Refuse ``what`` on a torch whose ``torch.distributed.checkpoint`` predates what the
    package's DCP integration is written against (``StorageMeta`` in its metadata, a
    ``no_dist`` load: torch 2.4)."""
    import inspect

    from torch.distributed.checkpoint import metadata, state_dict_loader

    if not hasattr(metadata, "StorageMeta") or (
            "no_dist" not in inspect.signature(state_dict_loader.load).parameters):
        raise UsageError(f"{what} needs torch 2.4 or newer (torch.distributed.checkpoint's "
                         f"StorageMeta and single-process loads); this is torch "
                         f"{torch.__version__}: upgrade torch")
