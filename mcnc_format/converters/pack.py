"""``mcnc pack``: a training checkpoint in, an ``.mcnc`` file out.

The checkpoint is read without pickle execution (``checkpoint.py``), its layout recognised by
a converter (``registry.py``: the native layout of ``mcnc_format.torch`` or a plug-in) or
described by a mapping file (``mapping.py``), and written by ``mcnc_format.save``. Everything
the file needs (generator, segments, theta0) comes from the checkpoint itself, so packing the
same checkpoint twice gives the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import refuse_overwrite, refuse_same_file
from ..errors import WriteError
from ..writer import save
from .base_ref import reference_base
from .checkpoint import Checkpoint, read_checkpoint
from .mapping import load_mapping
from .registry import Converter, find_converter, get_converter

__all__ = ["PackResult", "pack"]

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
    notes: tuple[str, ...] = ()  # how the checkpoint was unwrapped (checkpoint.py)


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
    """Pack a ``.pt`` / ``.safetensors`` checkpoint into ``output_path``.

    ``mapping`` names a mapping file (foreign layouts); ``converter`` picks a registered
    converter by name; with neither, the registered converters are asked in turn. ``base``
    names the base checkpoint (a safetensors file in or below the output's folder) of an
    adapter: theta0 then references it, sha256-pinned, and tensors it holds unchanged are left
    out (``base_ref.py``). An existing ``output_path`` is replaced only with ``force`` (and
    never when it is the checkpoint itself); the write itself is atomic.
    """
    output = Path(output_path)
    refuse_same_file(checkpoint_path, output)
    refuse_overwrite([output], force)
    if mapping is not None and converter is not None:
        raise WriteError("pass either a mapping file or a converter name, not both")
    total = Path(checkpoint_path).stat().st_size if Path(checkpoint_path).is_file() else 0

    def on_tensor(_name: str, nbytes: int) -> None:
        if progress is not None:
            progress("read", nbytes, total)

    checkpoint = read_checkpoint(checkpoint_path, on_tensor, unwrap=mapping is None)
    chosen = _choose(checkpoint, mapping, converter, output)
    if progress is not None:
        progress("convert", 0, 0)
    conversion = chosen.convert(checkpoint)
    if base is not None:
        conversion.tensors, uri = reference_base(conversion.tensors, base, output.parent)
        conversion.info.setdefault("base_model", uri)
    if progress is not None:
        progress("write", 0, 0)
    save(output, conversion.tensors, metadata=conversion.metadata, info=conversion.info,
         overwrite=force)
    return PackResult(output, chosen.name, len(conversion.tensors), total,
                      output.stat().st_size, tuple(checkpoint.notes))


def _choose(checkpoint: Checkpoint, mapping: str | os.PathLike[str] | None,
            converter: str | None, output: Path) -> Converter:
    if mapping is not None:
        chosen = load_mapping(mapping)
        chosen.output_dir = output.parent
        return chosen
    if converter is not None:
        return get_converter(converter)
    return find_converter(checkpoint)
