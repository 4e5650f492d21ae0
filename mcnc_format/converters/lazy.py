"""Checkpoints read tensor by tensor: names, shapes and dtypes up front, bytes when asked.

A folder checkpoint of a large model (a safetensors shard set, a distributed checkpoint) does
not fit in memory as a whole, and ``mcnc pack`` does not need it to: ``LazyTensors`` lists the
tensors from the layout's index and reads one each time it is indexed, keeping nothing. A
layout converter (``layout.py``) hands one to the converters as ``Checkpoint.tensors``.

``safetensors_tensors`` is the reader every layout that stores safetensors files shares (a
shard set with its ``model.safetensors.index.json``, a Trainer or Accelerate folder): each
read opens the file with the safetensors library, copies the one tensor out and closes it, so
the memory map of a multi-gigabyte shard never stays resident.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import MCNCError
from ..writer import Dense, LoRA, StoredTheta0, TensorSource, Theta0

__all__ = ["LazyTensors", "TensorInfo", "held_twice", "planned", "read_shard_index",
           "require_indexed", "safetensors_tensors"]

# safetensors' dtype names (its header's "dtype" field)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a layout's index says of one tensor before it is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only state dict whose tensors are read from disk on each access.

    ``read(name)`` returns the tensor; it is checked against the index's shape and dtype, so
    a file that disagrees with its own index is an ``MCNCError``, not a wrong tensor.
    ``ties`` maps a name to an earlier name holding the same tensor (a tied weight the layout
    saved twice, losing the sharing a state dict in memory has): ``planned`` gives both one
    stand-in, so the tensor is stored once, as for tensors sharing memory.
    """

    def __init__(self, infos: Mapping[str, TensorInfo], read: Callable[[str], torch.Tensor],
                 source: str, ties: Mapping[str, str] | None = None) -> None:
        self.infos = dict(infos)
        self._read = read
        self.source = source
        self.ties = dict(ties or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        tensor = self._read(name)
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise MCNCError(f"{self.source}: tensor {name!r} reads as {tensor.dtype} "
                            f"{list(tensor.shape)}, but the checkpoint's index says "
                            f"{info.dtype} {list(info.shape)}; the checkpoint is damaged")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())

    def renamed(self, rename: Callable[[str], str]) -> LazyTensors:
        """The same tensors under ``rename(name)``, still read only when asked for."""
        original = {rename(name): name for name in self.infos}
        return LazyTensors({new: self.infos[old] for new, old in original.items()},
                           lambda name: self._read(original[name]), self.source,
                           {rename(alias): rename(held) for alias, held in self.ties.items()})

    def observed(self, on_read: Callable[[str, int], None]) -> LazyTensors:
        """The same tensors, ``on_read(name, nbytes)`` called after each is read."""

        def read(name: str) -> torch.Tensor:
            tensor = self._read(name)
            on_read(name, tensor.numel() * tensor.element_size())
            return tensor

        return LazyTensors(self.infos, read, self.source, self.ties)


def read_shard_index(index: Path) -> dict[str, Path]:
    """The ``weight_map`` of a ``*.safetensors.index.json`` (``save_pretrained``'s): each
    tensor name and the shard file that holds it, which must lie in the index's folder."""
    try:
        document = json.loads(index.read_text(encoding="utf-8"))
        weight_map = dict(document["weight_map"])
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than Python's decoder recurses
        raise MCNCError(f"{index}: not a shard index (a JSON object with a 'weight_map' of "
                        f"tensor names to shard files): {exc}") from exc
    if not weight_map:
        raise MCNCError(f"{index}: its weight_map lists no tensors; is the checkpoint "
                        "complete?")
    shards = {}
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise MCNCError(f"{index}: weight_map names the shard {name!r}; shards are file "
                            "names in the index's folder")
        shard = index.parent / name
        if not shard.is_file():
            raise MCNCError(f"{index}: names the shard {name!r}, which is missing; copy the "
                            "whole checkpoint folder")
        shards[name] = shard
    return {tensor: shards[name] for tensor, name in weight_map.items()}


def require_indexed(index: Path, weight_map: Mapping[str, Path],
                    tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor the index lists is in its shards: a shard from another save (an older
    or partial upload) that lacks one would otherwise pack a model without it, silently."""
    absent = [name for name in weight_map if name not in tensors]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise MCNCError(f"{index}: lists tensors that no shard holds: {absent[0]!r} (in "
                        f"{weight_map[absent[0]].name}, says the index){more}; the shards are "
                        "from another save, or the checkpoint is incomplete")


def held_twice(path: Path, name: str, other: Path) -> MCNCError:
    """Two shards holding one tensor: which one is the model's cannot be told."""
    return MCNCError(f"{path}: tensor {name!r} is also in {other}; a shard set holds each "
                     "tensor once")


def safetensors_tensors(files: list[Path]) -> LazyTensors:
    """The tensors of one or more safetensors files (a shard set), each read when asked."""
    from safetensors import SafetensorError, safe_open

    infos: dict[str, TensorInfo] = {}
    owner: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    piece = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise MCNCError(f"{path}: tensor {name!r} has the dtype "
                                        f"{piece.get_dtype()}, which mcnc pack cannot store")
                    if name in owner:
                        raise held_twice(path, name, owner[name])
                    infos[name] = TensorInfo(tuple(piece.get_shape()), dtype)
                    owner[name] = path
        except (SafetensorError, OSError) as exc:
            raise MCNCError(f"{path}: not a readable safetensors file: {exc}") from exc

    def read(name: str) -> torch.Tensor:
        try:
            with safe_open(str(owner[name]), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise MCNCError(f"{owner[name]}: cannot read tensor {name!r}: {exc}") from exc

    label = str(files[0].parent if len(files) > 1 else files[0])
    return LazyTensors(infos, read, label)


def planned(tensors: LazyTensors, plan: Callable[[Mapping[str, torch.Tensor]],
                                                  Mapping[str, TensorSource]],
            read_now: Callable[[str], bool]) -> Iterator[tuple[str, TensorSource]]:
    """``plan``'s writer inputs for ``tensors``, each tensor read only when the writer asks.

    ``plan`` (a converter's pure function of a state dict, such as ``export_state_dict``) runs
    now on stand-ins: the tensors ``read_now`` names (what the plan computes with: alpha, beta,
    the manifest) are read, every other one is a shape-and-dtype-only ``meta`` tensor that the
    plan may place but not compute with. The returned iterator yields the plan's entries with
    each stand-in replaced by its tensor, read at that moment; planning errors surface here,
    before anything is written. Tied names (``tensors.ties``) share one stand-in, and a dense
    entry is yielded at the first of its places only: a tie is stored once, under its first
    name in the plan's order, as ``export_state_dict`` stores tensors that share memory.
    """
    stand_ins: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}
    for name, info in tensors.infos.items():
        if name in tensors.ties:
            continue
        if read_now(name):
            stand_ins[name] = tensors[name]
        else:
            stand_ins[name] = torch.empty(info.shape, dtype=info.dtype, device="meta")
            names[id(stand_ins[name])] = name
    stand_ins = {name: stand_ins[tensors.ties.get(name, name)] for name in tensors.infos}
    outputs = plan(stand_ins)

    def read(value: torch.Tensor) -> torch.Tensor:
        if not value.is_meta:
            return value
        if id(value) not in names:
            raise MCNCError(f"{tensors.source}: internal error: the conversion computed with a "
                            "tensor it was to read later; please report this")
        return tensors[names[id(value)]]

    def resolved(source: TensorSource) -> TensorSource:
        if isinstance(source, torch.Tensor):
            return read(source)
        if isinstance(source, Dense):
            return replace(source, tensor=read(source.tensor))
        theta0 = source.theta0
        if isinstance(theta0, StoredTheta0):
            theta0 = Theta0.stored(read(theta0.tensor))
        if isinstance(source, LoRA):
            return replace(source, A=resolved(source.A), B=resolved(source.B), theta0=theta0)
        return replace(source, theta0=theta0)

    def entries() -> Iterator[tuple[str, TensorSource]]:
        placed: set[int] = set()
        for name, source in outputs.items():
            if isinstance(source, torch.Tensor) and source.is_meta:
                if id(source) in placed:
                    continue  # a tie's later name
                placed.add(id(source))
            yield name, resolved(source)

    return entries()
