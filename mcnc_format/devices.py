"""The devices and output dtypes a load accepts, checked before anything is read.

Why up front: torch reports a missing device deep inside a kernel (an ``AssertionError`` for
CUDA on a machine without it, a ``RuntimeError`` for ``"cuda:7"``), and an integer dtype would
silently truncate regenerated weights to zeros. ``"meta"`` is accepted: a load onto it returns
tensors of the right shapes and dtypes without reading any data (for planning).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TypeVar

import torch

from . import constants as C
from .dtypes import to_torch
from .errors import UsageError

__all__ = ["DTYPE_NAMES", "check_device", "check_dtype", "host_defaults"]

T = TypeVar("T")

#: The spec's names of the floating dtypes, accepted wherever a torch dtype is.
DTYPE_NAMES = {name: to_torch(name) for name in C.FLOAT_DTYPES}


#: Whether CUDA was initialised in the parent this process was forked from (set in the child).
_FORKED_AFTER_CUDA = [False, False]  # [in the parent at the last fork, in this child]


def _before_fork() -> None:
    _FORKED_AFTER_CUDA[0] = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]


def _after_fork_in_child() -> None:
    _FORKED_AFTER_CUDA[1] = _FORKED_AFTER_CUDA[0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch dtype (or ``None``: keep each tensor's own), from a torch dtype or a
    name in ``DTYPE_NAMES``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype name {dtype!r}; use one of "
                             f"{', '.join(DTYPE_NAMES)} or a floating torch dtype")
        return DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPE_NAMES.values():
        raise UsageError(f"dtype {dtype} is not one weights can be rebuilt in; use "
                         "torch.float32, torch.bfloat16, torch.float16 or torch.float64 (or "
                         "their names f32, bf16, f16, f64)")
    return dtype


def check_device(device: torch.device | str | int) -> torch.device:
    """A device that exists on this machine, with its index resolved for CUDA."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
            raise UsageError(f"{device!r}: an integer device is an accelerator's index "
                             f"(cuda:{device}), and this machine has no CUDA device nor "
                             f"another accelerator; {_available()}") from exc
        raise UsageError(f"{device!r} is not a device name; {_available()}") from exc
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        if _FORKED_AFTER_CUDA[1]:
            raise UsageError(
                f"{device!r}: this process was forked from one that had used CUDA, and CUDA "
                "cannot run in such a child. Start workers with the 'spawn' or 'forkserver' "
                "start method (multiprocessing_context='spawn' for a DataLoader), or load on "
                "the CPU here")
        if not torch.cuda.is_available():
            raise UsageError(f"{device!r}: this machine has no CUDA device; {_available()}")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"{device!r}: there is no CUDA device {index}; {_available()}")
        return torch.device("cuda", index)
    backend = getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and is_available():
        return dev
    raise UsageError(f"{device!r}: no such device on this machine; {_available()}")


def _available() -> str:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return f"available here: {', '.join(names)} (and meta, for shapes only)"


def host_defaults(steps: Iterator[T]) -> Iterator[T]:
    """``steps``, each run with torch's default device set to the CPU, its items handed out
    with the caller's default back in place.

    The engine names the device of every output and device buffer and leaves host buffers to
    torch's default; a caller's ``torch.set_default_device("cuda")`` or ``with
    torch.device(...)`` must not move those (safetensors loads to the CPU under either). The
    default is set around each step, not across a ``yield``: a suspended load does not change
    the caller's default."""
    while True:
        with torch.device("cpu"):
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item
