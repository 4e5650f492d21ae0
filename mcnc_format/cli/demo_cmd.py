"""``mcnc demo``: train, pack, inspect and reload a small MCNC model (``mcnc_format.demo``).

The human form narrates each step, shows ``mcnc inspect`` of the packed file and ends with a
summary table; ``--json`` prints only the summary, as one JSON object.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from .inspect_cmd import inspect
from .safe_text import markup_safe

if TYPE_CHECKING:
    from ..demo import DemoResult

__all__ = ["demo"]


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Keep the files here (default: a temporary folder, removed).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as one JSON object instead of the walk-through.")
@click.option("--quick", is_flag=True, help="Train for 3 epochs only (lower accuracy).")
@click.pass_context
def demo(ctx: click.Context, out_dir: Path | None, as_json: bool, quick: bool) -> None:
    """Train a digits MLP densely and with MCNC, pack it, inspect it, load it back."""
    from ..demo import DemoSettings, run_demo  # torch: only when the demo runs

    settings = DemoSettings().quick() if quick else DemoSettings()
    folder = out_dir if out_dir is not None else _temporary_folder(ctx)
    if as_json:
        summary = run_demo(settings, folder).to_json()
        if out_dir is None:  # the temporary folder is gone when the command returns
            summary = {k: v for k, v in summary.items() if k not in ("mcnc_file", "dense_file")}
        click.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    console.rule("mcnc demo")
    result = run_demo(settings, folder, log=console.print)
    console.rule(f"mcnc inspect {markup_safe(Path(result.mcnc_file).name)}")
    ctx.invoke(inspect, file=Path(result.mcnc_file), as_json=False)
    console.print(_summary_table(result))
    if out_dir is None:
        console.print("[dim]files removed; pass --out DIR to keep them[/dim]")


def _temporary_folder(ctx: click.Context) -> Path:
    """A temporary folder that lives until the command ends (inspect reads the file)."""
    return Path(ctx.with_resource(tempfile.TemporaryDirectory(prefix="mcnc-demo-")))


def _summary_table(result: DemoResult) -> Table:
    table = Table(title="summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("test accuracy, MCNC", f"{result.mcnc_test_accuracy:.2%}"),
        ("test accuracy, dense", f"{result.dense_test_accuracy:.2%}"),
        ("weights ratio",
         f"{result.weights_ratio:.1f}x ({result.compressed_parameters:,} weights from "
         f"{result.stored_values:,} stored values)"),
        ("file ratio", f"{result.file_ratio:.1f}x ({result.dense_bytes:,} dense bytes / "
         f"{result.file_bytes:,} bytes of .mcnc file)"),
        ("dense safetensors file", f"{result.dense_file_bytes:,} bytes"),
        ("load time", f"{result.load_seconds * 1000:.1f} ms"),
        ("reloaded predictions", "match" if result.predictions_match else "DIFFER"),
        ("training time, MCNC / dense",
         f"{result.train_seconds_mcnc:.1f} s / {result.train_seconds_dense:.1f} s"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table
