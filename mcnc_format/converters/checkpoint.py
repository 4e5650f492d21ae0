"""Reading training checkpoints without executing anything they contain.

A ``.pt`` file is a pickle, and unpickling can run arbitrary code. This module only ever calls
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which rebuilds tensors
and plain containers and refuses every other global. A refusal of a global (a class or
function the pickle would call) becomes an ``UnsafeCheckpointError`` naming the file and the
way out (re-save as a plain state dict or as safetensors); bytes that are no torch pickle at all
(random, truncated) are a plain ``MCNCError``. ``.safetensors`` files are read with the
safetensors library (no code at all).

What comes back is flat: nested dicts (``{"state_dict": {...}, "epoch": 3}``) are joined with
``.``; tensors go to ``tensors``, plain values (str, int, float, bool, None and lists of them)
to ``extras``, so a converter can read a config stored beside the weights.
"""

from __future__ import annotations

import mmap
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MCNCError, UnsafeCheckpointError

__all__ = ["Checkpoint", "read_checkpoint"]

SAFETENSORS_SUFFIXES = (".safetensors",)
PLAIN_VALUE_TYPES = (str, int, float, bool, type(None))
# How the errors of torch's weights-only unpickler begin (torch 2.6 - 2.13), and the phrases of
# those that refuse a global, a class or a call rather than unparseable bytes.
REASON_STARTS = ("Unsupported", "Trying to", "Can only", "``torch", "String is too long",
                 "persistent_load", "Only persistent_load", "unsupported persistent id")
GLOBAL_REFUSALS = ("GLOBAL", "global", "Can only create new object", "Can only build",
                   "Trying to call reduce", "must be imported to load")
# What else torch.load raises on damaged bytes (its unpickler indexes and decodes unchecked).
DAMAGED_PICKLE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError,
                         AssertionError, struct.error, TypeError, AttributeError, OverflowError,
                         MemoryError, RecursionError)
# Pickle opcodes that import or call something: a pickle holding one needs code to rebuild.
CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX",
                          "REDUCE"})


@dataclass
class Checkpoint:
    """The tensors and plain values of one checkpoint file, under flat dotted names."""

    path: Path
    tensors: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_checkpoint(
    path: str | os.PathLike[str],
    on_tensor: Callable[[str, int], None] | None = None,
) -> Checkpoint:
    """Read a ``.pt`` / ``.pth`` / ``.bin`` (torch) or ``.safetensors`` checkpoint safely.

    ``on_tensor(name, nbytes)`` is called after each tensor is read (progress reporting).
    Raises ``UnsafeCheckpointError`` when a torch file holds anything but tensors and plain
    containers, and ``MCNCError`` when the file cannot be read as a checkpoint at all.
    """
    source = Path(path)
    if not source.is_file():
        raise MCNCError(f"{source}: no such checkpoint file")
    if source.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(source, on_tensor)
    return _read_torch(source, on_tensor)


def _read_safetensors(source: Path, on_tensor: Callable[[str, int], None] | None) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(name)
                tensors[name] = tensor
                if on_tensor is not None:
                    on_tensor(name, tensor.numel() * tensor.element_size())
    except (SafetensorError, OSError) as exc:
        raise MCNCError(f"{source}: not a readable safetensors file: {exc}") from exc
    return Checkpoint(source, tensors, {}, metadata)


def _read_torch(source: Path, on_tensor: Callable[[str, int], None] | None) -> Checkpoint:
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True, mmap=_is_zip(source))
    except pickle.UnpicklingError as exc:
        reason = _torch_reason(exc)
        if _refuses_code(reason, source):
            raise UnsafeCheckpointError(
                f"{source}: refusing to load: the checkpoint holds objects that only full "
                f"pickle execution could rebuild ({reason}); mcnc never runs pickled code. "
                "Re-save it as a plain state dict (torch.save(model.state_dict(), path)) or "
                "as safetensors (safetensors.torch.save_file)."
            ) from None
        raise _unreadable(source, reason) from None
    except DAMAGED_PICKLE_ERRORS as exc:
        raise _unreadable(source, str(exc).strip().split("\n")[0] or type(exc).__name__
                          ) from exc
    if not isinstance(obj, Mapping):
        raise MCNCError(
            f"{source}: expected a state dict (a mapping of names to tensors), got "
            f"{type(obj).__name__}; save model.state_dict() rather than the model"
        )
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, Any] = {}
    _flatten(obj, "", tensors, extras, source)
    if on_tensor is not None:
        for name, tensor in tensors.items():
            on_tensor(name, tensor.numel() * tensor.element_size())
    return Checkpoint(source, tensors, extras, {})


def _unreadable(source: Path, reason: str) -> MCNCError:
    return MCNCError(f"{source} is not a readable torch checkpoint ({reason}); is it damaged "
                     "or truncated? mcnc pack reads what torch.save(state_dict, path) writes")


def _is_zip(source: Path) -> bool:
    """torch's zip format can be memory-mapped (big checkpoints are not copied into RAM)."""
    return zipfile.is_zipfile(source)


def _refuses_code(reason: str, source: Path) -> bool:
    """Whether torch refused a global, class or call (an unsafe checkpoint) rather than bytes
    it could not parse. torch's unpickler stops at the first opcode it does not know, so a
    plain ``pickle.dumps`` (protocol 4+: FRAME first) is refused before any global is seen.
    Then the pickle's opcodes are listed (``pickletools.genops`` decodes, it never runs
    anything): a pickle that parses up to its STOP and imports or calls something is unsafe;
    random or damaged bytes fail to parse."""
    if any(phrase in reason for phrase in GLOBAL_REFUSALS):
        return True
    if not reason.startswith("Unsupported operand") or _is_zip(source):
        return False
    names: set[str] = set()
    try:
        with source.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ
                                                   ) as stream:
            # mmap's read(n) returns what is there; a file object's would allocate n bytes
            names.update(op.name for op, _arg, _pos in pickletools.genops(stream))
    except (ValueError, EOFError):
        return False
    return "STOP" in names and bool(names & CODE_OPCODES)


def _torch_reason(exc: pickle.UnpicklingError) -> str:
    """The one informative line of torch's long weights-only refusal message."""
    for line in str(exc).splitlines():
        line = line.split("WeightsUnpickler error:")[-1].split("Weights only load failed.")[-1]
        if line.strip().startswith(REASON_STARTS):
            return line.strip().split(". Please use")[0].rstrip(".")
    return "not a weights-only pickle"


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor],
             extras: dict[str, Any], source: Path) -> None:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MCNCError(f"{source}: key {key!r} under {prefix or 'the top level'!r} is "
                                "not a string; state dicts map names to tensors")
            _flatten(item, f"{prefix}.{key}" if prefix else key, tensors, extras, source)
    elif isinstance(value, PLAIN_VALUE_TYPES) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, PLAIN_VALUE_TYPES)
                                                     for v in value)):
        extras[prefix] = list(value) if isinstance(value, tuple) else value
    else:
        raise MCNCError(f"{source}: entry {prefix!r} is a {type(value).__name__}; a checkpoint "
                        "for mcnc pack holds tensors, nested dicts and plain values only")
