"""Adapter files that point at their base checkpoint instead of carrying it.

An MCNC-LoRA (or fine-tuned MCNC) state dict holds the base model's weights: as theta0 of
the adapted tensors and as the untouched dense tensors. Given the base checkpoint as a
safetensors file next to the output (or a shard set, by its index: each reference then names
the shard holding its tensor), ``reference_base`` replaces each stored theta0 by a
sha256-pinned reference to the same tensor in that file (SPEC.md §7.4) and drops the dense
tensors the base file already holds unchanged. What is left is the adapter alone; loading
it needs the base file beside it, and the pinned hashes catch a different base.

Tied weights are followed: a base saved with safetensors (``save_pretrained``) keeps one name
of a tie, so it holds ``model.embed_tokens.weight`` but no ``lm_head.weight``, while the
adapter's checkpoint may hold both (each its own copy once the tie is lost, as when saved
with safetensors too). A tensor the base lacks by name but holds under another, with the same
dtype, shape and values, is that tensor: a dense one is left out like any unchanged base
tensor (the model ties it again on loading, and a note says so), and a theta0 references the
base's name, pinned by its SHA-256.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ExternalReferenceError, MCNCError
from ..reader import tensor_sha256
from ..sharing import is_constant
from ..writer import MCNC, LoRA, StoredTheta0, TensorSource, Theta0
from .lazy import held_twice, read_shard_index

__all__ = ["reference_base"]

# How the index of a safetensors shard set is named (model.safetensors.index.json).
SHARD_INDEX_SUFFIX = ".safetensors.index.json"


def reference_base(
    tensors: Mapping[str, TensorSource] | Iterable[tuple[str, TensorSource]],
    base_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
) -> tuple[Iterator[tuple[str, TensorSource]], str, list[str]]:
    """The writer inputs with theta0 referencing ``base_path`` and base-only tensors removed,
    the reference's URI (``base_path`` relative to ``output_dir``), and the notes for users
    (tied tensors followed), filled as the inputs are consumed. ``base_path`` is a
    safetensors file or the ``*.safetensors.index.json`` of a shard set (a large base is
    saved sharded): each theta0 then references the shard holding its tensor."""
    base = _Base(Path(base_path), Path(output_dir))
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    notes: list[str] = []
    return _reference(pairs, base, notes), base.uri, notes


def _readable(base: Path, use: Any) -> Any:
    """``use(safe_open(base))``, a damaged base an ``ExternalReferenceError``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(base), framework="pt") as f:
            return use(f)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, MCNCError):
            raise
        raise ExternalReferenceError(f"{base}: not a readable safetensors file: {exc}") from exc


class _Base:
    """The base checkpoint's tensors (one file, or the shards of an index): each name's
    shape, the file holding it and that file's URI relative to the output's folder."""

    def __init__(self, path: Path, output_dir: Path) -> None:
        self.path = path
        self.uri = _relative_uri(path, output_dir)
        if path.name.endswith(SHARD_INDEX_SUFFIX):
            files = list(dict.fromkeys(read_shard_index(path).values()))
        else:
            files = [path]
        self.file_uri = {file: _relative_uri(file, output_dir) for file in files}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.owner: dict[str, Path] = {}
        for file in files:
            for name, shape in _readable(file, lambda f: {
                    n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}).items():  # noqa: SIM118
                if name in self.owner:
                    raise held_twice(file, name, self.owner[name])
                self.shapes[name], self.owner[name] = shape, file

    def tensor(self, name: str) -> torch.Tensor:
        return _readable(self.owner[name], lambda f: f.get_tensor(name))


def _reference(pairs: Iterable[tuple[str, TensorSource]], base: _Base, notes: list[str]
               ) -> Iterator[tuple[str, TensorSource]]:
    for name, source in pairs:
        if isinstance(source, torch.Tensor):
            held = _held_as(name, source, base)
            if held is None:
                yield name, source
            elif held != name:
                notes.append(_tie_note(name, held, source, base.owner[held]))
        elif isinstance(source, MCNC | LoRA) and isinstance(source.theta0, StoredTheta0):
            yield name, replace(source, theta0=_external(name, source.theta0, base))
        else:
            yield name, source


def _held_as(name: str, tensor: torch.Tensor, base: _Base) -> str | None:
    """The base's name for ``tensor``: its own when the base holds it unchanged there; when
    the base has no such name, another name holding the same values (a tied weight whose
    other name the base was saved under); ``None`` when the base does not hold it."""
    if name in base.shapes:
        return name if _same(tensor, base.tensor(name)) else None
    if is_constant(tensor):
        return None
    return next((other for other, shape in base.shapes.items()
                 if shape == tuple(tensor.shape) and _same(tensor, base.tensor(other))), None)


def _tie_note(name: str, held: str, tensor: torch.Tensor, base: Path) -> str:
    size = tensor.numel() * tensor.element_size()
    return (f"left out {name!r} ({size:,} bytes): {base.name} holds it as {held!r}, tied to "
            f"it; tie {name!r} to {held!r} again after loading (transformers does so for "
            "tie_word_embeddings)")


def _relative_uri(base: Path, output_dir: Path) -> str:
    if not (base.suffix == ".safetensors" or base.name.endswith(SHARD_INDEX_SUFFIX)) or (
            not base.is_file()):
        raise MCNCError(f"{base}: the base checkpoint must be an existing .safetensors file "
                        f"or the {SHARD_INDEX_SUFFIX} of a shard set")
    try:
        relative = base.resolve().relative_to(output_dir.resolve())
    except ValueError:
        raise MCNCError(f"{base}: an .mcnc file references its base by a path relative to its "
                        f"own folder ({output_dir}) without '..' (SPEC.md §7.4); put the base "
                        "checkpoint in that folder or below it") from None
    return relative.as_posix()


def _external(name: str, theta0: StoredTheta0, base: _Base) -> Theta0:
    held = _held_as(name, theta0.tensor, base)
    if held is not None:
        return Theta0.external(base.file_uri[base.owner[held]], held,
                               tensor_sha256(base.tensor(held)))
    if name not in base.shapes:
        raise MCNCError(f"{base.path}: holds no tensor {name!r}, the base weight of the adapted "
                        f"tensor {name!r}, nor its values under another name; pass the base "
                        "checkpoint the adapter was trained on (of a sharded base, its "
                        f"*{SHARD_INDEX_SUFFIX})")
    raise MCNCError(f"{base.path}: tensor {name!r} differs from the base weight stored in the "
                    "checkpoint; the adapter was trained on another base")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
