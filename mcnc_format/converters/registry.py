"""Converters: turn a checkpoint's tensors into the writer's inputs.

A converter knows one checkpoint layout. It says whether a checkpoint looks like its layout
(``detect``) and turns it into ``mcnc_format.save`` inputs (``convert``). mcnc-format ships the
native layout of ``mcnc_format.torch``; other training code can plug its own layout in through
the entry-point group ``mcnc_format.converters``, without any change here::

    # the plug-in's pyproject.toml
    [project.entry-points."mcnc_format.converters"]
    my-mcnc = "my_package.mcnc_convert:MyConverter"

The entry point names a ``Converter`` instance or a class whose no-argument call makes one.
Layouts that need no code at all are described by a mapping file instead (``mapping.py``).

A converter that also reads its own files (a folder, a Lightning ``.ckpt``) is a
``LayoutConverter``: ``recognises(path)`` and ``read(path)`` besides ``detect`` and
``convert``. The layouts mcnc-format ships (the top-level ``converters/`` folder of the source
tree, imported as ``mcnc_format.layouts``) register this way, through the same entry-point
group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import MCNCError
from ..writer import TensorSource
from .checkpoint import Checkpoint

__all__ = [
    "ENTRY_POINT_GROUP",
    "Conversion",
    "Converter",
    "LayoutConverter",
    "available_converters",
    "find_converter",
    "get_converter",
]

ENTRY_POINT_GROUP = "mcnc_format.converters"
# What the names of mcnc_format.torch's parameters and manifest start with (torch/manifest.py).
MCNC_NAME_MARK = "mcnc_"


@dataclass
class Conversion:
    """What a converter hands to the writer: ``mcnc_format.save(path, tensors, metadata=,
    info=)``, tensors in the order they are to be stored (a mapping, or pairs that read each
    tensor when the writer asks: ``lazy.planned``)."""

    tensors: Mapping[str, TensorSource] | Iterable[tuple[str, TensorSource]]
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Converter(Protocol):
    """One checkpoint layout. ``name`` is what ``mcnc pack --converter NAME`` selects."""

    name: str
    description: str

    def detect(self, checkpoint: Checkpoint) -> bool:
        """True when the checkpoint is in this converter's layout."""
        ...

    def convert(self, checkpoint: Checkpoint) -> Conversion:
        """The writer's inputs; raise an ``MCNCError`` naming the key at fault otherwise."""
        ...


@runtime_checkable
class LayoutConverter(Converter, Protocol):
    """A converter that reads its own layout of files (``mcnc pack PATH``, PATH a folder or a
    file ``read_checkpoint`` does not read)."""

    def recognises(self, path: Path) -> bool:
        """True when ``path`` (a file or folder) is in this layout; looks at names and small
        JSON files only."""
        ...

    def read(self, path: Path) -> Checkpoint:
        """The checkpoint's tensors (``lazy.LazyTensors`` for large layouts) and ``notes``
        saying what was left out; never unpickles anything but tensors."""
        ...


def _builtin_converters() -> dict[str, Callable[[], Converter]]:
    from .native import NativeConverter

    return {NativeConverter.name: NativeConverter}


def available_converters() -> dict[str, Callable[[], Converter]]:
    """Built-in converters, then plug-ins from the entry-point group (a plug-in cannot
    replace a built-in of the same name)."""
    found = dict(_builtin_converters())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = _loader(ep.name, ep.load)
    return found


def _loader(name: str, load: Callable[[], object]) -> Callable[[], Converter]:
    def make() -> Converter:
        try:
            target = load()
        except Exception as exc:
            raise MCNCError(f"converter plug-in {name!r} (entry point group "
                            f"{ENTRY_POINT_GROUP}) failed to import: {exc}") from exc
        converter = target() if isinstance(target, type) else target
        if not isinstance(converter, Converter):
            raise MCNCError(f"converter plug-in {name!r} is a {type(converter).__name__}, not "
                            "a Converter (needs name, description, detect and convert)")
        return converter
    return make


def get_converter(name: str, registry: Mapping[str, Callable[[], Converter]] | None = None
                  ) -> Converter:
    """The converter registered as ``name``."""
    known = available_converters() if registry is None else registry
    if name not in known:
        raise MCNCError(f"no converter named {name!r}; installed: {', '.join(sorted(known))}. "
                        "Plug-ins register under the entry-point group "
                        f"{ENTRY_POINT_GROUP!r}; layouts without code use --mapping FILE")
    return known[name]()


def find_converter(checkpoint: Checkpoint,
                   registry: Mapping[str, Callable[[], Converter]] | None = None) -> Converter:
    """The first converter (built-ins first) whose ``detect`` accepts the checkpoint."""
    known = available_converters() if registry is None else registry
    for make in known.values():
        converter = make()
        if converter.detect(checkpoint):
            return converter
    if not any(MCNC_NAME_MARK in name for name in checkpoint.tensors):
        raise MCNCError(
            f"{checkpoint.path}: holds no MCNC parameters (no {MCNC_NAME_MARK}* tensors): it "
            "looks like a plain dense checkpoint, and mcnc pack stores models trained with "
            "MCNC, it does not compress dense weights. Train the model reparametrized with "
            "mcnc_format.torch.reparametrize (docs/torch.md) and pack that checkpoint; for MCNC "
            "checkpoints of other training code, write a mapping file (docs/converters.md) and "
            "pass --mapping FILE"
        )
    raise MCNCError(
        f"{checkpoint.path}: no converter recognises this checkpoint's layout (tried "
        f"{', '.join(known)}). For MCNC checkpoints trained by other code, write a mapping "
        "file (docs/converters.md) and pass --mapping FILE"
    )
