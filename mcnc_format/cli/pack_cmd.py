"""``mcnc pack CHECKPOINT OUT.mcnc`` (also the ``mcnc-pack`` command).

Reads a checkpoint file or folder of a reparametrized model or MCNC-LoRA adapter (a state
dict, a distributed checkpoint, a Trainer / Accelerate folder, a shard set, a Lightning
``.ckpt``; never executing pickled code), says which converter recognised it and writes an
``.mcnc`` file. ``--list-converters`` lists the installed converters. The summary line gives
``file_ratio`` and ``weights_ratio`` as ``mcnc inspect`` does (``summary.file_summary``): the
checkpoint holds the same alpha and beta as the file, so its size says nothing of the
compression. ``--json`` prints the result as one object (``json_out.py``). Inputs larger than
``PROGRESS_MIN_BYTES`` get a progress display on stderr; an existing OUT is kept unless
``--force``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn

from ..summary import opened_summary, read_file_header
from .json_out import emit_json, errors_as_json
from .main import REPORTED, escaped, exit_with_error, version_option
from .safe_text import printable

if TYPE_CHECKING:
    from ..converters.pack import ProgressCallback

__all__ = ["PROGRESS_MIN_BYTES", "main", "pack_command"]

PROGRESS_MIN_BYTES = 64 * 1024 * 1024
_STAGES = {"read": "reading checkpoint", "convert": "converting", "write": "writing .mcnc"}


@click.command("pack", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--mapping", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON mapping file for MCNC checkpoints trained by other code "
                   "(docs/converters.md).")
@click.option("--converter", default=None,
              help="Use this registered converter instead of detecting the layout.")
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Base checkpoint (.safetensors, or a shard set's .safetensors.index.json, "
                   "beside OUT) of an adapter: theta0 references it, sha256-pinned, and its "
                   "unchanged tensors are left out.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--progress/--no-progress", default=None,
              help="Show progress (default: for inputs over 64 MiB on a terminal).")
@click.option("--list-converters", "list_converters", is_flag=True,
              help="List the installed converters and the layouts they read, then exit.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (errors too) instead of text.")
@version_option
def pack_command(checkpoint: Path | None, out: Path | None, mapping: Path | None,
                 converter: str | None, base: Path | None, force: bool, progress: bool | None,
                 list_converters: bool, as_json: bool) -> None:
    """Pack CHECKPOINT (a state dict file, or a checkpoint folder or file that a converter
    recognises: see --list-converters) into the .mcnc file OUT."""
    from ..converters.pack import pack  # torch: checkpoints are read (--help, --version: not)

    if list_converters:
        _list_converters()
        return
    if checkpoint is None or out is None:
        raise click.UsageError("pass CHECKPOINT and OUT (or --list-converters)")
    with errors_as_json(as_json, checkpoint, checkpoint=checkpoint, out=out):
        size = _input_size(checkpoint)
        show = progress if progress is not None else (
            size >= PROGRESS_MIN_BYTES and sys.stderr.isatty())
        with _progress(show) as report:
            result = pack(checkpoint, out, mapping=mapping, converter=converter, base=base,
                          force=force, progress=report)
        summary = opened_summary(read_file_header(result.output, str(result.output)))
    for note in result.notes:
        click.echo(f"note: {printable(note)}", err=True)
    if as_json:
        emit_json({"checkpoint": str(checkpoint), "out": str(result.output),
                   "converter": result.converter, "tensors": result.tensors,
                   "checkpoint_bytes": result.input_bytes, "file_bytes": result.output_bytes,
                   "dense_bytes": summary["dense_bytes"],
                   "file_ratio": summary["file_ratio"],
                   "weights_ratio": summary["weights_ratio"], "notes": list(result.notes)})
        return
    click.echo(f"wrote {printable(result.output)} ({result.output_bytes:,} bytes, "
               f"{result.tensors} tensors, converter {printable(result.converter)}); "
               f"file_ratio {summary['file_ratio']:,.1f}x (dense bytes / file bytes), "
               f"weights_ratio {summary['weights_ratio']:,.1f}x (compressed parameters / "
               "stored alpha-beta values)")


def _list_converters() -> None:
    from ..converters.registry import LayoutConverter, available_converters

    for name, make in available_converters().items():
        converter = make()
        kind = "files/folders" if isinstance(converter, LayoutConverter) else "state dicts"
        click.echo(f"{printable(name)}\t{kind}\t{printable(converter.description)}")


def _input_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size if path.is_file() else 0


@contextmanager
def _progress(show: bool) -> Iterator[ProgressCallback | None]:
    """A rich progress display fed by ``pack``'s stage callbacks, or nothing."""
    if not show:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as display:
        tasks: dict[str, int] = {}

        def report(stage: str, advance: int, total: int) -> None:
            if stage not in tasks:
                for earlier in tasks.values():
                    display.update(earlier, completed=display.tasks[earlier].total or 0)
                tasks[stage] = display.add_task(_STAGES.get(stage, stage), total=total or None)
            display.advance(tasks[stage], advance)

        yield report


def main() -> None:
    """Entry point of the ``mcnc-pack`` console script: ``mcnc pack`` with the same error
    policy as ``mcnc`` (one line on stderr, exit status 2)."""
    try:
        pack_command(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        escaped(exc).show()
        sys.exit(exc.exit_code)
    except REPORTED as exc:
        exit_with_error(exc)
