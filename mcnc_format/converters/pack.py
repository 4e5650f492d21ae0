"""``mcnc pack``: a training checkpoint in, an ``.mcnc`` file out.

A file or folder that a layout converter recognises (a distributed checkpoint, a Trainer or
Accelerate folder, a shard set, a Lightning ``.ckpt``: ``registry.LayoutConverter``) is read by
it, tensor by tensor; any other file is read by ``checkpoint.py``; neither executes pickled
code. The tensors' naming is then recognised by a converter (the native layout of
``mcnc_format.torch`` or a plug-in) or described by a mapping file (``mapping.py``), and
written by ``mcnc_format.save``, which streams. Everything the file needs (generator,
segments, theta0) comes from the checkpoint itself, so packing the same checkpoint twice gives
the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..atomic import refuse_overwrite, refuse_same_file
from ..errors import MCNCError, WriteError
from ..writer import TensorSource, TensorStream, save
from .base_ref import reference_base
from .checkpoint import Checkpoint, read_checkpoint
from .lazy import LazyTensors
from .mapping import load_mapping
from .registry import (
    Converter,
    LayoutConverter,
    available_converters,
    find_converter,
    get_converter,
)

__all__ = ["PackResult", "pack", "recognise_layout"]

# stage name ("read", "convert", "write"), bytes done in this call, total bytes of the stage
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PackResult:
    """What ``pack`` wrote, for the command's summary line."""

    output: Path
    converter: str
    tensors: int
    input_bytes: int
    output_bytes: int
    # how the checkpoint was unwrapped (checkpoint.py), tied tensors followed (base_ref.py)
    notes: tuple[str, ...] = ()


def pack(
    checkpoint_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    mapping: str | os.PathLike[str] | None = None,
    converter: str | None = None,
    base: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> PackResult:
    """Pack a checkpoint file or folder into ``output_path``.

    ``mapping`` names a mapping file (foreign layouts); ``converter`` picks a registered
    converter by name; with neither, the registered converters are asked in turn: a layout
    converter that recognises the path reads it, and a folder none recognises is refused,
    naming the known layouts. ``base`` names the base checkpoint (a safetensors file, or a
    shard set's index, in or below the output's folder) of an adapter: theta0 then
    references it, sha256-pinned, and tensors it holds unchanged are left out
    (``base_ref.py``). An existing ``output_path`` is replaced only with ``force`` (and never
    when it is the checkpoint, the base or the mapping file itself); the write itself is
    atomic.
    """
    output = Path(output_path)
    for read in (checkpoint_path, base, mapping):  # each is an input the output would destroy
        if read is not None:
            refuse_same_file(read, output)
    refuse_overwrite([output], force)
    if mapping is not None and converter is not None:
        raise WriteError("pass either a mapping file or a converter name, not both")
    for read in (checkpoint_path, base):
        _refuse_undecodable(read)
    source = Path(checkpoint_path)
    forced = get_converter(converter) if converter is not None else None
    layout = forced if isinstance(forced, LayoutConverter) else (
        recognise_layout(source) if forced is None else None)
    if layout is not None:
        checkpoint = layout.read(source)
        total = _size(checkpoint)
    elif source.is_dir():
        raise _unrecognised_folder(source)
    else:
        total = source.stat().st_size if source.is_file() else 0

        def on_tensor(_name: str, nbytes: int) -> None:
            if progress is not None:
                progress("read", nbytes, total)

        checkpoint = read_checkpoint(source, on_tensor, unwrap=mapping is None)
    chosen = _choose(checkpoint, mapping, forced, layout, output)
    if progress is not None:
        progress("convert", 0, 0)
    conversion = chosen.convert(checkpoint)
    tensors = conversion.tensors
    notes = list(checkpoint.notes)
    if base is not None:
        tensors, uri, base_notes = reference_base(tensors, base, output.parent)
        conversion.info.setdefault("base_model", uri)
    if progress is not None:
        progress("write", 0, 0)
    counted = _Counted(tensors)
    save(output, TensorStream(counted), metadata=conversion.metadata, info=conversion.info,
         overwrite=force)
    if base is not None:
        notes += base_notes  # filled while the writer consumed the tensors
    return PackResult(output, chosen.name, counted.count, total, output.stat().st_size,
                      tuple(notes))


def _refuse_undecodable(path: str | os.PathLike[str] | None) -> None:
    """torch and safetensors open only paths that are UTF-8 text; a name that is not (a
    Latin-1 file name, say) would fail in them with a message blaming the file's bytes."""
    if path is None:
        return
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise MCNCError(f"{path}: the path is not valid UTF-8, and torch and safetensors open "
                        "only UTF-8 paths; rename it (or link it under a UTF-8 name)") from None


def recognise_layout(path: Path) -> LayoutConverter | None:
    """The first registered layout converter that recognises ``path``, if any."""
    for make in available_converters().values():
        candidate = make()
        if isinstance(candidate, LayoutConverter) and candidate.recognises(path):
            return candidate
    return None


def _unrecognised_folder(path: Path) -> MCNCError:
    converters = [c for c in (make() for make in available_converters().values())
                  if isinstance(c, LayoutConverter)]
    inside = []
    for child in sorted(path.iterdir()):
        found = recognise_layout(child) if child.is_dir() else None
        if found is not None:
            inside.append(f"{child.name} ({found.name})")
    if inside:  # a training run's output folder: point at its checkpoints
        return MCNCError(f"{path}: holds checkpoints rather than being one: "
                         f"{', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}; "
                         "pack one of them")
    layouts = [f"{c.name} ({c.description})" for c in converters]
    return MCNCError(f"{path}: a folder no converter recognises; known layouts: "
                     f"{'; '.join(layouts) or 'none installed'}. Pass a checkpoint file, or "
                     "--converter NAME to read the folder as that layout")


def _size(checkpoint: Checkpoint) -> int:
    """The bytes of the checkpoint's tensors, without reading lazily read ones."""
    if isinstance(checkpoint.tensors, LazyTensors):
        return checkpoint.tensors.nbytes
    return checkpoint.nbytes


def _choose(checkpoint: Checkpoint, mapping: str | os.PathLike[str] | None,
            forced: Converter | None, layout: Converter | None, output: Path) -> Converter:
    if mapping is not None:
        chosen = load_mapping(mapping)
        chosen.output_dir = output.parent
        return chosen
    if forced is not None:
        return forced
    if layout is not None and layout.detect(checkpoint):
        return layout
    return find_converter(checkpoint)


class _Counted:
    """The writer's inputs, passed through one by one (a lazy conversion stays lazy), counted
    for the summary line."""

    def __init__(self, tensors: Mapping[str, TensorSource] | Iterable[tuple[str, TensorSource]]
                 ) -> None:
        self.pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
        self.count = 0

    def __iter__(self) -> Iterator[tuple[str, TensorSource]]:
        for name, source in self.pairs:
            self.count += 1
            yield name, source
