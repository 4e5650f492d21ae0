"""What the shipped layout converters share: native conversion, weight files, skipped files.

The layouts of the top-level ``converters/`` folder (``mcnc_format.layouts``) differ in how the
tensors lie on disk, not in what they are: a model trained with ``mcnc_format.torch`` inside
any of those stacks has the native state dict (``native.py``). So each layout only reads, and
``LayoutBase`` converts through ``NativeConverter`` (streamed for lazily read checkpoints).

``model_weights`` finds the weights that ``save_pretrained`` (and Trainer, Accelerate) write in
a folder, and ``left_out`` says which files of the folder were not read: optimizer, scheduler,
RNG and training-argument files are pickles of arbitrary objects, so they are never opened.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MCNCError
from .checkpoint import Checkpoint, read_checkpoint
from .lazy import (
    LazyTensors,
    TensorInfo,
    held_twice,
    read_shard_index,
    require_indexed,
    safetensors_tensors,
)
from .native import NativeConverter
from .registry import Conversion

__all__ = ["LayoutBase", "left_out", "model_weights", "require_weights", "tensors_in_memory"]


class LayoutBase:
    """A layout converter whose tensors are in ``mcnc_format.torch``'s naming; subclasses
    set ``name`` and ``description`` and implement ``recognises`` and ``read``."""

    name = ""
    description = ""

    def detect(self, checkpoint: Checkpoint) -> bool:
        return NativeConverter().detect(checkpoint)

    def convert(self, checkpoint: Checkpoint) -> Conversion:
        return NativeConverter().convert(checkpoint)


def model_weights(folder: Path, stem: str = "model") -> tuple[LazyTensors, list[Path]] | None:
    """The tensors of ``{stem}.safetensors``, of the shards ``{stem}.safetensors.index.json``
    names, or of ``pytorch_{stem}.bin`` / its index / ``pytorch_{stem}_fsdp.bin`` (read with
    torch's weights-only unpickler), and the files read; ``None`` when the folder has none of
    them."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_shard_index(index)
        shards = list(dict.fromkeys(weight_map.values()))
        lazy = safetensors_tensors(shards)
        require_indexed(index, weight_map, lazy)
        return lazy, [index, *shards]
    if single.is_file():
        return safetensors_tensors([single]), [single]
    bin_index = folder / f"pytorch_{stem}.bin.index.json"
    bin_map = read_shard_index(bin_index) if bin_index.is_file() else {}
    # pytorch_model_fsdp.bin: accelerate's save_fsdp_model with FULL_STATE_DICT
    bins = list(dict.fromkeys(bin_map.values())) or next(
        ([p] for p in (folder / f"pytorch_{stem}.bin", folder / f"pytorch_{stem}_fsdp.bin")
         if p.is_file()), [])
    if not bins:
        return None
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    for path in bins:
        for name, tensor in read_checkpoint(path, unwrap=False).tensors.items():
            if name in owner:
                raise held_twice(path, name, owner[name])
            tensors[name], owner[name] = tensor, path
    require_indexed(bin_index, bin_map, tensors)
    used = [bin_index, *bins] if bin_map else bins
    return tensors_in_memory(tensors, str(folder)), used


def tensors_in_memory(tensors: dict[str, torch.Tensor], source: str) -> LazyTensors:
    """Tensors already read (memory-mapped by ``torch.load``) behind the lazy interface."""
    infos = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in tensors.items()}
    return LazyTensors(infos, tensors.__getitem__, source)


def left_out(folder: Path, used: list[Path]) -> list[str]:
    """A note naming the files of ``folder`` that were not read, if any. Paths are compared
    by ``os.path.realpath``, which leaves a symlink loop as it is where ``Path.resolve``
    raises ``RuntimeError``."""
    read = {os.path.realpath(p) for p in used}
    skipped = sorted(p.name for p in folder.iterdir() if os.path.realpath(p) not in read)
    if not skipped:
        return []
    return [f"not read: {', '.join(skipped)} (training state, configs and pickles: only the "
            "model's weights are packed, and pickled objects are never unpickled)"]


def require_weights(found: tuple[LazyTensors, list[Path]] | None, folder: Path, layout: str
                    ) -> tuple[LazyTensors, list[Path]]:
    """``found``, or the error saying which weight files the layout was expected to hold."""
    if found is None:
        raise MCNCError(f"{folder}: looks like a {layout} folder but holds no model weights "
                        "(model.safetensors, model.safetensors.index.json with its shards, "
                        "pytorch_model.bin, or FSDP's pytorch_model_fsdp.bin or "
                        "pytorch_model_fsdp_0/); save the model with the checkpoint")
    return found
