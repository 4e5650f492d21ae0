"""Adapter files that point at their base checkpoint instead of carrying it.

An MCNC-LoRA (or fine-tuned MCNC) state dict holds the base model's weights: as theta0 of
the adapted tensors and as the untouched dense tensors. Given the base checkpoint as a
safetensors file next to the output, ``reference_base`` replaces each stored theta0 by a
sha256-pinned reference to the same tensor in that file (SPEC.md §7.4) and drops the dense
tensors the base file already holds unchanged. What is left is the adapter alone; loading
it needs the base file beside it, and the pinned hashes catch a different base.
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
from ..writer import MCNC, LoRA, StoredTheta0, TensorSource, Theta0

__all__ = ["reference_base"]


def reference_base(
    tensors: Mapping[str, TensorSource] | Iterable[tuple[str, TensorSource]],
    base_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
) -> tuple[Iterator[tuple[str, TensorSource]], str]:
    """The writer inputs with theta0 referencing ``base_path`` and base-only tensors removed,
    and the reference's URI (``base_path`` relative to ``output_dir``)."""
    base = Path(base_path)
    uri = _relative_uri(base, Path(output_dir))
    _readable(base, lambda f: f.keys())
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    return _reference(pairs, base, uri), uri


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


def _reference(pairs: Iterable[tuple[str, TensorSource]], base: Path, uri: str
               ) -> Iterator[tuple[str, TensorSource]]:
    names = set(_readable(base, lambda f: f.keys()))
    for name, source in pairs:
        if isinstance(source, torch.Tensor):
            if name in names and _readable(base, lambda f, n=name, s=source:
                                           _same(s, f.get_tensor(n))):
                continue
            yield name, source
        elif isinstance(source, MCNC | LoRA) and isinstance(source.theta0, StoredTheta0):
            theta0 = _readable(base, lambda f, n=name, t=source.theta0:
                               _external(n, t, names, f, uri, base))
            yield name, replace(source, theta0=theta0)
        else:
            yield name, source


def _relative_uri(base: Path, output_dir: Path) -> str:
    if base.suffix != ".safetensors" or not base.is_file():
        raise MCNCError(f"{base}: the base checkpoint must be an existing .safetensors file")
    try:
        relative = base.resolve().relative_to(output_dir.resolve())
    except ValueError:
        raise MCNCError(f"{base}: an .mcnc file references its base by a path relative to its "
                        f"own folder ({output_dir}) without '..' (SPEC.md §7.4); put the base "
                        "checkpoint in that folder or below it") from None
    return relative.as_posix()


def _external(name: str, theta0: StoredTheta0, names: set[str], f: Any, uri: str, base: Path
              ) -> Theta0:
    if name not in names:
        raise MCNCError(f"{base}: holds no tensor {name!r}, the base weight of the adapted "
                        f"tensor {name!r}; pass the base checkpoint the adapter was trained on")
    value = f.get_tensor(name)
    if not _same(theta0.tensor, value):
        raise MCNCError(f"{base}: tensor {name!r} differs from the base weight stored in the "
                        "checkpoint; the adapter was trained on another base")
    return Theta0.external(uri, name, tensor_sha256(value))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
