"""Reading training checkpoints without executing anything they contain.

A ``.pt`` file is a pickle, and unpickling can run arbitrary code. This module only ever calls
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which rebuilds tensors
and plain containers and refuses every other global. A refusal of a global (a class or
function the pickle would call) becomes an ``UnsafeCheckpointError`` naming the file and the
way out (re-save as a plain state dict or as safetensors); bytes that are no torch pickle at all
(random, truncated) are a plain ``MCNCError``. ``.safetensors`` files are read with the
safetensors library (no code at all).

Common wrappers are taken off first, and each is reported in ``notes``: a state dict saved
inside a training checkpoint (``{"state_dict": sd, "epoch": 3}``, Lightning's ``{"state_dict":
..., "optimizer_states": ..., ...}``, ``{"model": sd, "optimizer": ...}``) is unwrapped and
the other entries dropped; a prefix every name shares (``module.`` of DDP, ``_orig_mod.`` of
``torch.compile``) is removed. Without that, every name would be packed with the wrapper's
prefix and the rest silently ignored.

What comes back is flat: nested dicts are joined with ``.``; tensors go to ``tensors``, plain
values (str, int, float, bool, None and lists of them) to ``extras``, so a converter can read a
config stored beside the weights.
"""

from __future__ import annotations

import mmap
import os
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import constants as C
from ..errors import MCNCError, UnsafeCheckpointError
from ..torch_compat import safe_globals

__all__ = ["Checkpoint", "read_checkpoint"]

SAFETENSORS_SUFFIXES = (".safetensors",)
PLAIN_VALUE_TYPES = (str, int, float, bool, type(None))
# How the errors of torch's weights-only unpickler begin (torch 2.6 - 2.13), and the phrases of
# those that refuse a global, a class or a call rather than unparseable bytes.
REASON_STARTS = ("Unsupported", "Trying to", "Can only", "``torch", "String is too long",
                 "persistent_load", "Only persistent_load", "unsupported persistent id")
GLOBAL_REFUSALS = ("GLOBAL", "global", "Can only create new object", "Can only build",
                   "Trying to call reduce", "must be imported to load",
                   "Unsupported class")  # torch before 2.4's words for a refused global
# What else torch.load raises on damaged bytes (its unpickler indexes and decodes unchecked).
DAMAGED_PICKLE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError,
                         AssertionError, struct.error, TypeError, AttributeError, OverflowError,
                         MemoryError, RecursionError)
# Pickle opcodes that import or call something: a pickle holding one needs code to rebuild.
CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX",
                          "REDUCE"})
# Keys under which training code stores the model's state dict beside other things.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Entries of a training checkpoint that hold tensors but no model: dropped beside a wrapper.
TRAINING_STATE_MARKS = ("optim", "sched", "scaler")
# What torch.optim.Optimizer.state_dict() holds (optimizer.pt of a Trainer folder, say).
OPTIMIZER_KEYS = frozenset({"state", "param_groups"})
# Prefixes that wrapping modules add to every name: DDP / DataParallel, torch.compile.
SHARED_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """The tensors and plain values of one checkpoint file, under flat dotted names."""

    path: Path
    # a dict, or ``lazy.LazyTensors`` (folder layouts: each tensor read when indexed)
    tensors: Mapping[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # What reading changed so the names fit (a wrapper taken off, entries dropped), for users.
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# A global a weights-only pickle may name beyond tensors and plain containers, and what it
# is rebuilt as (``torch.serialization.safe_globals``' ``(object, "module.name")`` form;
# ``torch_compat.safe_globals``).
AllowedGlobal = tuple[Callable[..., Any], str]


def read_checkpoint(
    path: str | os.PathLike[str],
    on_tensor: Callable[[str, int], None] | None = None,
    *,
    unwrap: bool = True,
    entry: str | None = None,
    allowed_globals: Sequence[AllowedGlobal] = (),
) -> Checkpoint:
    """Read a ``.pt`` / ``.pth`` / ``.bin`` (torch) or ``.safetensors`` checkpoint safely.

    ``unwrap=False`` keeps wrappers and shared prefixes in the names: mapping files name the
    checkpoint's keys as stored (and take prefixes off with their own ``strip_prefix``).
    ``entry`` names the top-level entry of a torch checkpoint that holds the state dict (a
    layout that knows it, such as Lightning's ``state_dict``); the other entries are dropped.
    ``allowed_globals`` extends torch's weights-only allow-list by explicit, harmless
    stand-ins for classes a layout's pickle names (Lightning's ``AttributeDict``).

    ``on_tensor(name, nbytes)`` is called after each tensor is read (progress reporting).
    Raises ``UnsafeCheckpointError`` when a torch file holds anything but tensors and plain
    containers, and ``MCNCError`` when the file cannot be read as a checkpoint at all.
    """
    source = Path(path)
    if not source.is_file():
        raise MCNCError(f"{source}: no such checkpoint file")
    _refuse_mcnc_file(source)
    if source.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(source, on_tensor, unwrap)
    return _read_torch(source, on_tensor, unwrap, entry, allowed_globals)


def _refuse_mcnc_file(source: Path) -> None:
    """An ``.mcnc`` file given as the checkpoint is said to be one, with what to do instead
    (torch would call it a damaged pickle)."""
    with source.open("rb") as file:
        if file.read(len(C.MAGIC)) == C.MAGIC:
            raise MCNCError(f"{source} is already an .mcnc file, not a checkpoint to pack; "
                            f"'mcnc inspect {source}' shows it, 'mcnc unpack {source} "
                            "OUT.safetensors' writes its dense tensors")


def _read_safetensors(source: Path, on_tensor: Callable[[str, int], None] | None,
                      unwrap: bool) -> Checkpoint:
    """A safetensors file's tensors, each read from disk when it is asked for (packing holds
    one at a time, whatever the file's size)."""
    from safetensors import SafetensorError, safe_open

    from .lazy import safetensors_tensors

    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise MCNCError(f"{source}: not a readable safetensors file: {exc}") from exc
    tensors = safetensors_tensors([source])
    if on_tensor is not None:
        tensors = tensors.observed(on_tensor)
    if not unwrap:
        return Checkpoint(source, tensors, {}, metadata)
    stripped, extras, notes = _strip_shared_prefix(tensors, {})
    return Checkpoint(source, stripped, extras, metadata, notes)


def _read_torch(source: Path, on_tensor: Callable[[str, int], None] | None,
                unwrap: bool, entry: str | None = None,
                allowed_globals: Sequence[AllowedGlobal] = ()) -> Checkpoint:
    allowed = safe_globals(allowed_globals)  # refuses what this torch cannot allow
    try:
        with allowed, warnings.catch_warnings():
            # torch warns (several lines) of a pickle protocol it may not read before it fails
            # on it: the failure is reported below as one line
            warnings.filterwarnings("ignore", category=UserWarning,
                                    module=r"torch\._weights_only_unpickler")
            obj = torch.load(source, map_location="cpu", weights_only=True,
                             mmap=_is_zip(source))
    except pickle.UnpicklingError as exc:
        reason = _torch_reason(exc)
        if _refuses_code(reason, source):
            raise UnsafeCheckpointError(
                f"{source}: refusing to load: the checkpoint holds objects that only full "
                f"pickle execution could rebuild ({reason}); mcnc never runs pickled code. "
                "Re-save it as a plain state dict (torch.save(model.state_dict(), path)) or "
                "as safetensors (safetensors.torch.save_file)."
            ) from None
        if _plain_pickle_opcodes(reason, source):
            raise MCNCError(f"{source} is a pickle that torch.save did not write (pickle.dump?), "
                            "which torch's weights-only reader refuses; save the state dict "
                            "with torch.save(state_dict, path) or "
                            "safetensors.torch.save_file") from None
        raise _unreadable(source, reason) from None
    except DAMAGED_PICKLE_ERRORS as exc:
        raise _unreadable(source, str(exc).strip().split("\n")[0] or type(exc).__name__
                          ) from exc
    if not isinstance(obj, Mapping):
        raise MCNCError(
            f"{source}: expected a state dict (a mapping of names to tensors), got "
            f"{type(obj).__name__}; save model.state_dict() rather than the model"
        )
    if set(obj) == OPTIMIZER_KEYS:
        raise MCNCError(f"{source}: holds an optimizer's state (optimizer.state_dict(): "
                        "'state' and 'param_groups'), not a model's; pack the file holding "
                        "model.state_dict()")
    if entry is not None:
        obj, notes = _entry(obj, entry, source)
    else:
        obj, notes = _unwrap(obj, source) if unwrap else (obj, [])
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, Any] = {}
    _flatten(obj, "", tensors, extras, source)
    stripped: list[str] = []
    if unwrap:
        tensors, extras, stripped = _strip_shared_prefix(tensors, extras)
    if on_tensor is not None:
        for name, tensor in tensors.items():
            on_tensor(name, tensor.numel() * tensor.element_size())
    return Checkpoint(source, tensors, extras, {}, notes + stripped)


def _unwrap(obj: Mapping[Any, Any], source: Path) -> tuple[Mapping[Any, Any], list[str]]:
    """Take off wrappers: while the top level holds no tensor itself and exactly one
    ``WRAPPER_KEYS`` entry holds tensors, keep that entry only. Other entries holding tensors
    that are not training state (optimizer, scheduler, scaler) make it ambiguous: refused,
    naming them."""
    notes: list[str] = []
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        found = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)
                 and _holds_tensors(obj[k])]
        if not found:
            break
        others = [str(k) for k in obj if k not in found and _holds_tensors(obj[k])
                  and not any(mark in str(k).lower() for mark in TRAINING_STATE_MARKS)]
        if len(found) > 1 or others:
            raise MCNCError(f"{source}: holds tensors under {', '.join([*found, *others])}, so "
                            f"it is unclear which is the model's state dict; save the one to "
                            f"pack on its own, e.g. torch.save(ckpt[{found[0]!r}], path)")
        notes.append(_packed_note(obj, found[0]))
        obj = obj[found[0]]
    return obj, notes


def _entry(obj: Mapping[Any, Any], entry: str, source: Path
           ) -> tuple[Mapping[Any, Any], list[str]]:
    """The state dict under ``entry``, and the note naming what was dropped."""
    if not isinstance(obj.get(entry), Mapping):
        raise MCNCError(f"{source}: holds no state dict under {entry!r} (top-level entries: "
                        f"{', '.join(map(str, obj))}); is it a checkpoint of this layout?")
    return obj[entry], [_packed_note(obj, entry)]


def _packed_note(obj: Mapping[Any, Any], entry: str) -> str:
    dropped = [str(k) for k in obj if k != entry]
    return (f"packed the state dict under {entry!r}"
            + (f"; dropped the other entries: {', '.join(dropped)}" if dropped else ""))


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, Mapping) and any(_holds_tensors(v) for v in value.values())


def _strip_shared_prefix(tensors: Mapping[str, torch.Tensor], extras: dict[str, Any]
                         ) -> tuple[Mapping[str, torch.Tensor], dict[str, Any], list[str]]:
    """Remove a ``SHARED_PREFIXES`` prefix that every tensor name has (repeatedly: DDP around
    a compiled model gives ``module._orig_mod.``); lazily read tensors stay unread."""
    from .lazy import LazyTensors

    notes: list[str] = []
    while tensors:
        prefix = next((p for p in SHARED_PREFIXES if all(n.startswith(p) for n in tensors)),
                      None)
        if prefix is None:
            break
        if isinstance(tensors, LazyTensors):
            tensors = tensors.renamed(lambda n, p=prefix: n[len(p):])
        else:
            tensors = {n[len(prefix):]: t for n, t in tensors.items()}
        extras = {n.removeprefix(prefix): v for n, v in extras.items()}
        notes.append(f"removed the prefix {prefix!r} that every name had")
    return tensors, extras, notes


def _unreadable(source: Path, reason: str) -> MCNCError:
    return MCNCError(f"{source} is not a readable torch checkpoint ({reason}); is it damaged "
                     "or truncated? mcnc pack reads what torch.save(state_dict, path) writes")


def _is_zip(source: Path) -> bool:
    """torch's zip format can be memory-mapped (big checkpoints are not copied into RAM)."""
    return zipfile.is_zipfile(source)


def _refuses_code(reason: str, source: Path) -> bool:
    """Whether torch refused a global, class or call (an unsafe checkpoint) rather than bytes
    it could not parse. torch's unpickler stops at the first opcode it does not know, so a
    plain ``pickle.dumps`` (protocol 4+: FRAME first) is refused before any global is seen:
    then a pickle that parses up to its STOP and imports or calls something is unsafe;
    random or damaged bytes fail to parse."""
    if any(phrase in reason for phrase in GLOBAL_REFUSALS):
        return True
    return bool(_plain_pickle_opcodes(reason, source) & CODE_OPCODES)


def _plain_pickle_opcodes(reason: str, source: Path) -> frozenset[str]:
    """The opcodes of a whole pickle that torch's unpickler stopped reading at an opcode it
    does not know (one not written by ``torch.save``); nothing for anything else. The
    pickle's opcodes are listed by ``pickletools.genops``, which decodes and never runs
    anything."""
    if not reason.startswith("Unsupported operand") or _is_zip(source):
        return frozenset()
    names: set[str] = set()
    try:
        with source.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ
                                                   ) as stream:
            # mmap's read(n) returns what is there; a file object's would allocate n bytes
            names.update(op.name for op, _arg, _pos in pickletools.genops(stream))
    except (ValueError, EOFError):
        return frozenset()
    return frozenset(names) if "STOP" in names else frozenset()


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
