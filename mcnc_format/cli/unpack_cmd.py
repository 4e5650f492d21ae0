"""``mcnc unpack FILE OUT.safetensors``: a dense copy that any safetensors reader loads.

Every tensor is regenerated on the CPU (lora tensors merged: ``theta0 + scale * B @ A``) and
written through ``atomic_path`` (``safetensors_out.py``), so an interrupted export never leaves
a half-written OUT nor a temporary file. The file's metadata goes into the
safetensors ``__metadata__``, with the keys of ``provenance_metadata`` added.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import constants as C
from ..atomic import refuse_overwrite, refuse_same_file
from ..engine.options import Progress as LoadProgress
from ..progress import ProgressBar
from .json_out import emit_json, errors_as_json
from .safe_text import printable

if TYPE_CHECKING:
    import torch

    from ..reader import MCNCFile

__all__ = ["export_safetensors", "provenance_metadata", "unpack"]

#: ``--dtype`` names (``devices.DTYPE_NAMES``).
DTYPES = ("bf16", "f16", "f32")
FORMAT_VERSION_KEY = "mcnc.format_version"
SOURCE_KEY = "mcnc.source"
INFO_PREFIX = "mcnc.info."


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Cast floating-point tensors to this dtype (default: each tensor's own).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (errors too) instead of text.")
def unpack(file: str, out: Path, dtype: str | None, force: bool, as_json: bool) -> None:
    """Write every tensor of FILE, regenerated and dense, to OUT.safetensors.

    Every tensor is rebuilt before the file is written, so the whole dense model is held in
    memory. A progress bar shows on a terminal.
    """
    with errors_as_json(as_json, file, file=file, out=out):
        written = export_safetensors(file, out, dtype=dtype, overwrite=force,
                                     progress=ProgressBar("unpacking"))
    if as_json:
        emit_json({"file": file, "out": str(out), "bytes": written, "dtype": dtype})
        return
    click.echo(f"wrote {printable(out)} ({written:,} bytes)")


def provenance_metadata(f: MCNCFile) -> dict[str, str]:
    """The safetensors ``__metadata__`` for an export of ``f``: the file's metadata, its
    ``info`` under ``mcnc.info.*``, ``mcnc.format_version`` and ``mcnc.source`` (these win
    over metadata keys of the same name; a source name that is not UTF-8 gets U+FFFD for each
    byte that is not), and ``format: pt`` unless the metadata sets it
    (older transformers releases refuse safetensors files without it)."""
    metadata = {"format": "pt", **f.metadata}
    metadata.update({INFO_PREFIX + key: value for key, value in f.info.items()})
    metadata[FORMAT_VERSION_KEY] = f"{C.FORMAT_MAJOR}.{f.minor}"
    # A file name that is not UTF-8 holds lone surrogates, which safetensors cannot read back.
    metadata[SOURCE_KEY] = os.fsencode(f.path.name).decode("utf-8", "replace")
    return metadata


def export_safetensors(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       dtype: torch.dtype | str | None = None, overwrite: bool = False,
                       progress: Callable[[LoadProgress], None] | None = None) -> int:
    """Write the dense tensors of the ``.mcnc`` file ``source`` to the safetensors file
    ``out`` atomically; ``dtype`` casts floating-point tensors (a torch dtype or its name,
    ``f16``); ``progress`` is called after each tensor is regenerated. Returns the bytes
    written."""
    from ..api import open as open_file
    from ..api import stream
    from ..safetensors_out import save_safetensors

    target = Path(out)
    refuse_same_file(source, target)
    refuse_overwrite([target], overwrite)
    with open_file(source) as f:
        metadata = provenance_metadata(f)
    tensors = {name: value.contiguous()
               for name, value in stream(source, "cpu", dtype, progress=progress)}
    return save_safetensors(target, tensors, metadata, overwrite=overwrite)
