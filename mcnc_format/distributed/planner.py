"""``MCNCLoadPlanner`` (DCP's default planner with the state dict checked against the file)
and ``load``, the one call that uses it with ``MCNCStorageReader``.

Why a planner: DCP hands a storage reader the state dict only as read items, after its planner
has matched names and shapes, so a state dict that does not fit the file is the planner's to
report. DCP's own planner raises a ``RuntimeError`` for a missing key and a ``ValueError`` for
a size; this one raises ``UsageError`` naming the tensor and what to do. Inside DCP every
rank's error comes back to every rank wrapped in a ``CheckpointException``; ``load`` unwraps
it, so each rank raises the ``MCNCError`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed import ProcessGroup
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, LoadPlan
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ..engine.options import LoadOptions
from ..engine.resolve import Resolver
from ..errors import MCNCError, UsageError
from .storage import MCNCStorageReader, ReadStats

__all__ = ["MCNCLoadPlanner", "load", "tied_aliases"]


class MCNCLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, after a check that every tensor of the state dict is in the file
    with the same shape (``allow_partial_load``: tensors missing from the file are skipped)."""

    def __init__(self, *, allow_partial_load: bool = False) -> None:
        super().__init__(allow_partial_load=allow_partial_load)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        """Refuses a tensor on the meta device without a process group first: DCP would
        allocate it on the group's device and fails asking for a group, which reads as if
        ``no_dist`` were ignored, when the model only lacks ``to_empty``."""
        if not torch.distributed.is_initialized():
            name = _on_meta(state_dict)
            if name is not None:
                meta = metadata.storage_meta if metadata is not None else None
                raise UsageError(
                    f"the state dict's {name!r} is on the meta device, which has no storage "
                    "to load into; give the model storage first (model.to_empty(device=...))",
                    path=os.fspath(meta.checkpoint_id) if meta and meta.checkpoint_id
                    is not None else None, tensor=name)
        super().set_up_planner(state_dict, metadata, is_coordinator)

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        declared = self.metadata.state_dict_metadata
        for alias in tied_aliases(self.state_dict, declared):
            del self.state_dict[alias]  # filled through the name the file holds
        check_state_dict(self.state_dict, self.metadata, self.allow_partial_load)
        return super().create_local_plan()


def tied_aliases(state_dict: dict[str, Any], declared: Any) -> list[str]:
    """Names of ``state_dict`` absent from the file whose tensor is one the file holds under
    another name: ``save_model`` stores a tied weight once (embeddings tied to the output
    layer), and loading that name fills every name that shares it."""
    def key(value: Any) -> tuple[int, tuple[int, ...]] | None:
        local = value.to_local() if hasattr(value, "to_local") else value
        if not isinstance(local, torch.Tensor) or local.device.type == "meta":
            return None
        return local.untyped_storage().data_ptr() + local.storage_offset(), tuple(value.shape)

    held = {key(v) for n, v in state_dict.items() if n in declared} - {None}
    return [n for n, v in state_dict.items() if n not in declared and key(v) in held]


def _on_meta(state_dict: Mapping[str, Any], prefix: str = "") -> str | None:
    """The dotted name of the first plain tensor on the meta device in ``state_dict``."""
    for name, value in state_dict.items():
        if isinstance(value, Mapping):
            found = _on_meta(value, f"{prefix}{name}.")
            if found is not None:
                return found
        elif isinstance(value, torch.Tensor) and value.is_meta:
            return prefix + str(name)
    return None


def check_state_dict(state_dict: dict[str, Any], metadata: Metadata, partial: bool) -> None:
    """Every tensor of ``state_dict`` is declared by ``metadata`` with the same shape."""
    meta = metadata.storage_meta
    label = os.fspath(meta.checkpoint_id) if meta and meta.checkpoint_id is not None else None
    declared = metadata.state_dict_metadata
    for name, value in state_dict.items():
        stored = declared.get(name)
        if stored is None:
            if partial:
                continue
            raise UsageError(
                f"the state dict's {name!r} is not in the file (it holds {len(declared)} "
                "tensors; `mcnc inspect` lists them). Build the model from the file's config, "
                "or pass strict=False to load the tensors both hold", path=label, tensor=name)
        if not isinstance(stored, TensorStorageMetadata) or not isinstance(value, torch.Tensor):
            raise UsageError(f"the state dict's {name!r} is a {type(value).__name__}, the file "
                             "holds a tensor", path=label, tensor=name)
        if tuple(value.shape) != tuple(stored.size):
            raise UsageError(
                f"tensor {name!r} has shape {list(stored.size)} in the file, the state dict "
                f"holds {list(value.shape)}. Build the model from the file's config",
                path=label, tensor=name)


def load(state_dict: dict[str, Any], path: str | os.PathLike[str], *, strict: bool = True,
         cast: bool = False, options: LoadOptions | None = None,
         resolver: Resolver | None = None, process_group: ProcessGroup | None = None,
         no_dist: bool = False) -> ReadStats:
    """Fill ``state_dict`` (plain tensors or DTensors, in place) from a ``.mcnc`` file, each
    rank rebuilding only the boxes it holds; returns this rank's ``ReadStats``.

    ``torch.distributed.checkpoint.load`` with ``MCNCStorageReader`` and ``MCNCLoadPlanner``;
    ``strict``, ``cast``, ``options`` and ``resolver`` as ``MCNCStorageReader`` takes them
    (``strict=False`` also lets the state dict hold tensors the file lacks). A state dict that
    does not fit the file raises ``UsageError`` on every rank; a file that cannot be read on
    some rank (missing, damaged) raises that rank's ``MCNCError`` on every rank.
    """
    reader = MCNCStorageReader(path, strict=strict, cast=cast, options=options,
                               resolver=resolver)
    try:
        dcp.load(state_dict, storage_reader=reader,
                 planner=MCNCLoadPlanner(allow_partial_load=not strict),
                 process_group=process_group, no_dist=no_dist)
    except CheckpointException as exc:
        ours = [failure[0] for _, failure in sorted(exc.failures.items())
                if isinstance(failure[0], MCNCError)]
        if ours:
            raise ours[0] from exc
        raise
    return reader.stats
