"""The ``mcnc`` command: wires the subcommands and turns library errors into one clear line.

Each subcommand lives in its own module and calls library functions; this module only
registers them and owns the error-to-exit-code policy: an ``MCNCError`` or an ``OSError`` (a
missing file, a full or read-only disk, a name too long, a path through a file) prints
``error: <message>`` as one line on stderr and exits with status 2, no traceback unless
``--debug``.
"""

from __future__ import annotations

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


def exit_with_error(exc: BaseException) -> NoReturn:
    """Print ``exc`` as the one ``error:`` line on stderr and exit with status 2."""
    message = describe_os_error(exc) if isinstance(exc, OSError) and not isinstance(
        exc, MCNCError) else str(exc)
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(EXIT_ERROR)


class _Group(click.Group):
    """A click group that reports library errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except REPORTED as exc:
            if ctx.meta.get("mcnc.debug"):
                raise
            exit_with_error(exc)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="mcnc-format")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Store, inspect, verify and convert MCNC-compressed neural networks (.mcnc files)."""
    ctx.meta["mcnc.debug"] = debug


def _register() -> None:
    from . import (
        demo_cmd,
        export_peft_cmd,
        hub_cmd,
        inspect_cmd,
        pack_cmd,
        unpack_cmd,
        verify_cmd,
    )

    cli.add_command(demo_cmd.demo)
    cli.add_command(inspect_cmd.inspect)
    cli.add_command(verify_cmd.verify)
    cli.add_command(unpack_cmd.unpack)
    cli.add_command(pack_cmd.pack_command)
    cli.add_command(export_peft_cmd.export_peft_command)
    cli.add_command(hub_cmd.push_command)
    cli.add_command(hub_cmd.pull_command)


_register()


def main() -> None:
    cli()
