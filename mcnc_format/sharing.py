"""Tensors that share memory: found, refused by plain saves, deduplicated by model saves.

Two state-dict entries can be one buffer (tied weights) or overlapping views of one. A file
stores each entry on its own, so saving them as they are would store the bytes twice and
load them back untied. Plain saves (``mcnc_format.save``, ``mcnc_format.safetensors.save_file``)
refuse them; ``mcnc_format.safetensors.save_model`` keeps one name per group (one that covers
the whole buffer) and drops the others, as safetensors does. The grouping rules are
safetensors': same device, same storage pointer and size, and overlapping byte ranges;
meta tensors and tensors without storage share nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch

from .errors import SharedTensorError

__all__ = ["end_ptr", "find_shared_tensors", "is_complete", "is_constant",
           "remove_duplicate_names", "storage_ptr", "storage_size", "without_duplicates"]

V = TypeVar("V")


def storage_ptr(tensor: torch.Tensor) -> int:
    """Address of the start of the tensor's storage (0 for tensors without one)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return 0


def storage_size(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's storage (not of the tensor: a view's storage is its base's)."""
    try:
        return tensor.untyped_storage().nbytes()
    except (NotImplementedError, RuntimeError):
        return tensor.nelement() * tensor.element_size()


def end_ptr(tensor: torch.Tensor) -> int:
    """One past the address of the tensor's last element in memory (its start when it is
    empty); any strides (a transpose too, which safetensors' ``view(-1)`` cannot take)."""
    if not tensor.nelement():
        return tensor.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(),
                                                          strict=True))
    return tensor.data_ptr() + (last + 1) * tensor.element_size()


def is_complete(tensor: torch.Tensor) -> bool:
    """Whether the tensor covers its whole storage, from its first byte."""
    return (tensor.data_ptr() == storage_ptr(tensor)
            and tensor.nelement() * tensor.element_size() == storage_size(tensor))


def is_constant(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds one value throughout (or fewer than two values). Where a tie
    has to be told from values (a checkpoint that lost the sharing), such a tensor tells
    nothing: a fresh norm's ones or a zero bias equal others that are not tied to it."""
    flat = tensor.flatten()
    return flat.numel() < 2 or bool((flat == flat[0]).all())


def find_shared_tensors(tensors: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Names grouped by the memory they use: one set per group of overlapping tensors (a
    set of one name for a tensor that shares with none), groups in the order their first
    member appears. Meta tensors and tensors without storage are left out."""
    by_storage: dict[tuple[torch.device, int, int], set[str]] = defaultdict(set)
    for name, tensor in tensors.items():
        if tensor.device.type != "meta" and storage_ptr(tensor) and storage_size(tensor):
            by_storage[(tensor.device, storage_ptr(tensor), storage_size(tensor))].add(name)
    groups: list[set[str]] = []
    for names in by_storage.values():  # in the order of the mapping, as safetensors keeps
        if len(names) < 2:
            groups.append(names)
            continue
        areas = sorted((tensors[n].data_ptr(), end_ptr(tensors[n]), n) for n in names)
        _, last_stop, first = areas[0]
        groups.append({first})
        for start, stop, name in areas[1:]:
            if start >= last_stop:
                groups.append({name})
            else:
                groups[-1].add(name)
            last_stop = stop
    return groups


def refuse_shared(tensors: Mapping[str, torch.Tensor], source: str | None = None) -> None:
    """Raise ``SharedTensorError`` if any two of ``tensors`` overlap in memory."""
    shared = [sorted(names) for names in find_shared_tensors(tensors) if len(names) > 1]
    if shared:
        raise SharedTensorError(
            f"Some tensors share memory, this would store them twice and load them back "
            f"untied (a file has no alias entry, SPEC.md §6): {shared}. Save a model with "
            f"save_model (it stores one name of each tie), or give each its own memory with "
            f".clone()", path=source)


def remove_duplicate_names(tensors: Mapping[str, torch.Tensor], *,
                           preferred_names: Iterable[str] | None = None,
                           discard_names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """For each group of tensors sharing memory, the name to keep mapped to the names to drop.

    The kept name covers the whole storage (so nothing outside the tensors is saved); among
    those, one of ``preferred_names`` first, then one not in ``discard_names``, then the first
    in sorted order. A group where no tensor covers its storage raises ``SharedTensorError``.
    """
    preferred = set(preferred_names or ())
    discard = set(discard_names or ())
    removed: dict[str, list[str]] = defaultdict(list)
    for names in find_shared_tensors(tensors):
        complete = {n for n in names if is_complete(tensors[n])}
        if not complete:
            raise SharedTensorError(
                f"no tensor among {sorted(names)} covers their whole storage, so saving any "
                f"one of them would store memory the others do not use. Save .clone() of "
                f"each (or .contiguous() of the part you need)")
        keep = sorted(complete)[0]
        if complete - discard:
            keep = sorted(complete - discard)[0]
        if preferred & complete:
            keep = sorted(preferred & complete)[0]
        for name in sorted(names):
            if name != keep:
                removed[keep].append(name)
    return removed


def without_duplicates(values: Mapping[str, V], *, keep_first: bool = False
                       ) -> tuple[dict[str, V], dict[str, str]]:
    """``values`` less the tensors ``remove_duplicate_names`` drops (only ``torch.Tensor``
    values are compared; others are kept as they are), in their order, and ``{dropped:
    kept}``. ``keep_first``: keep each group's first name in ``values``' order where it covers
    the storage (safetensors' choice, the first in sorted order, otherwise)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    firsts = ([next(k for k in tensors if k in names) for names in find_shared_tensors(tensors)]
              if keep_first else None)
    dropped = {name: kept for kept, names in
               remove_duplicate_names(tensors, preferred_names=firsts).items() for name in names}
    return {k: v for k, v in values.items() if k not in dropped}, dropped
