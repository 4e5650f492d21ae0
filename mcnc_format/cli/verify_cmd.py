"""``mcnc verify FILE``: check every byte and rebuild every tensor; the exit code says.

Exit status 0: the file is valid. 1: it breaks a rule (each problem is printed on one line
with its rule number). 2: the check could not run (bad usage, unreadable path, or a feature
this reader does not implement). 3: the file's own bytes hold, but a base checkpoint it
references cannot be opened here, so the tensors built on it were not checked. The work is
``mcnc_format.verify.verify_file``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.console import Console

from ..engine.resolve import DefaultResolver
from ..progress import ProgressBar
from .json_out import emit_json, errors_as_json
from .safe_text import markup_safe

if TYPE_CHECKING:
    from ..verify import Problem, VerifyReport

__all__ = ["verify"]

EXIT_INVALID = 1
EXIT_UNVERIFIABLE = 2
EXIT_INCOMPLETE = 3
#: The exit status of each report status.
EXIT_STATUS = {"valid": 0, "invalid": EXIT_INVALID, "unverifiable": EXIT_UNVERIFIABLE,
               "incomplete": EXIT_INCOMPLETE}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_context
def verify(ctx: click.Context, file: str, as_json: bool) -> None:
    """Verify an .mcnc FILE: checksums of the header and every blob, structure, padding,
    a full regeneration of every tensor on the CPU, and external references.

    Exits 0 when the file is valid, 1 when it is not, 2 when it could not be checked, 3 when
    a base checkpoint it references is not available here.
    """
    from ..verify import verify_file  # torch: tensors are rebuilt

    bar = ProgressBar("verifying")
    try:
        with errors_as_json(as_json, file, path=file):
            report = verify_file(file, resolver=DefaultResolver(), progress=bar)
    finally:
        bar.close()
    if as_json:
        emit_json(report.to_dict())
    else:
        _print(report)
    if report.status != "valid":
        ctx.exit(EXIT_STATUS[report.status])


def _print(report: VerifyReport) -> None:
    console = Console(highlight=False)
    c = report.counts
    checked = (f"{c['blobs']:,} blobs ({c['blob_bytes']:,} bytes) checksummed, "
               f"{c['tensors']:,} tensors ({c['values']:,} values) rebuilt, "
               f"{c['external_references']:,} external references checked, "
               f"in {report.seconds:.2f} s")
    if report.ok:
        console.print(f"[green]valid[/green]: {markup_safe(report.path)}: header, blobs, padding "
                      f"and regeneration OK; {checked}", soft_wrap=True)
    else:
        status = {"invalid": "invalid", "incomplete": "not fully checked"}.get(
            report.status, "could not be verified")
        console.print(f"[red]{status}[/red]: {markup_safe(report.path)}: "
                      f"{len(report.problems)} problem(s); {checked}", soft_wrap=True)
        for p in report.problems:
            console.print(f"  [red]x[/red] {markup_safe(_problem_line(p))}", soft_wrap=True)
    if c["skipped_tensors"]:
        console.print(f"  {c['skipped_tensors']:,} tensor(s) not rebuilt: a blob they need is "
                      "damaged", soft_wrap=True)
    for note in report.notes:
        console.print(f"  note: {markup_safe(note)}", soft_wrap=True)


def _problem_line(p: Problem) -> str:
    """``R75 unavailable: <message> (tensors a, b and 2 more)``: the rule once, the tensors
    the problem was found in."""
    rule = f" ({p.rule})"
    message = p.message.removesuffix(rule) if p.rule else p.message
    line = f"{p.rule} {p.check}: {message}" if p.rule else f"{p.check}: {message}"
    if len(p.tensors) > 1:
        shown = ", ".join(p.tensors[:3])
        more = f" and {len(p.tensors) - 3} more" if len(p.tensors) > 3 else ""
        line += f" (tensors {shown}{more})"
    return line
