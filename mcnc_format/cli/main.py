"""The ``mcnc`` command: wires the subcommands and turns library errors into one clear line.

Each subcommand lives in its own module and calls library functions; this module only
registers them and owns the error-to-exit-code policy: an ``MCNCError`` or an ``OSError`` (a
missing file, a full or read-only disk, a name too long, a path through a file) prints
``error: <message>`` as one line on stderr and exits with status 2, no traceback unless
``--debug``.

Why commands are loaded by name: ``mcnc --version``, ``--help`` and the header-level commands
(``inspect``, ``push``, ``pull``) must start at once, without importing torch (seconds). The
group lists each command with its one-line summary from ``COMMANDS`` and imports a command's
module only when that command runs; each module imports its heavy dependencies inside the
command.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import click

from ..atomic import describe_os_error
from ..errors import MCNCError
from .safe_text import printable

EXIT_ERROR = 2
# What a command reports as one line: the library's errors, and the OS's (an OSError that is
# not an MCNCError has no message for users yet: describe_os_error adds path and fix).
REPORTED = (MCNCError, OSError)
#: ``--version`` of ``mcnc`` and of the ``mcnc-pack`` script: the installed distribution's.
version_option = click.version_option(package_name="mcnc-format")


def exit_with_error(exc: BaseException) -> NoReturn:
    """Print ``exc`` as the one ``error:`` line on stderr and exit with status 2."""
    message = describe_os_error(exc) if isinstance(exc, OSError) and not isinstance(
        exc, MCNCError) else str(exc)
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(EXIT_ERROR)


#: Each command: its module (in this package), the click command's name there, and the one-line
#: summary ``mcnc --help`` shows (the command's own short help: a test keeps them equal).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("demo_cmd", "demo",
             "Train a digits MLP densely and with MCNC, pack it, inspect it, load it back."),
    "export-peft": ("export_peft_cmd", "export_peft_command",
                    "Export the lora tensors of FILE as a PEFT LoRA adapter folder OUT_DIR."),
    "inspect": ("inspect_cmd", "inspect",
                "Show the tensors, sizes, generators and segments of an .mcnc FILE (header "
                "only)."),
    "pack": ("pack_cmd", "pack_command",
             "Pack CHECKPOINT (a state dict file, or a checkpoint folder or file that a "
             "converter recognises: see --list-converters) into the .mcnc file OUT."),
    "pull": ("hub_cmd", "pull_command",
             "Download FILENAME (or the whole repository) from REPO_ID and print its local "
             "path."),
    "push": ("hub_cmd", "push_command",
             "Upload PATH (an .mcnc file, or a folder) to the Hub repository REPO_ID in one "
             "commit, with a model card, and print the pinned hf:// URI of each file."),
    "unpack": ("unpack_cmd", "unpack",
               "Write every tensor of FILE, regenerated and dense, to OUT.safetensors."),
    "verify": ("verify_cmd", "verify",
               "Verify an .mcnc FILE: checksums of the header and every blob, structure, "
               "padding, a full regeneration of every tensor on the CPU, and external "
               "references."),
}


class _Group(click.Group):
    """A click group that loads each command when it runs and reports library errors as one
    line instead of a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, name, _ = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, click.utils.make_default_short_help(COMMANDS[name][2], limit))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """``mcnc --help`` and ``--version`` print while the group's options are parsed,
        before ``invoke``: an ``OSError`` there (a full stdout) is one line too (click itself
        handles only a closed pipe)."""
        try:
            return super().parse_args(ctx, args)
        except OSError as exc:
            exit_with_error(exc)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except REPORTED as exc:
            if ctx.meta.get("mcnc.debug"):
                raise
            exit_with_error(exc)
        except click.UsageError as exc:
            escaped(exc)
            raise


def escaped(exc: click.ClickException) -> click.ClickException:
    """``exc`` with its message made safe to print: click quotes most values it names with
    escapes, but not extra arguments (``mcnc inspect *.mcnc`` over hostile file names)."""
    exc.message = printable(exc.message)
    return exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@version_option
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Store, inspect, verify and convert MCNC-compressed neural networks (.mcnc files)."""
    ctx.meta["mcnc.debug"] = debug


def main() -> None:
    cli()
