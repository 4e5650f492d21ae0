"""``--json``: one JSON object on stdout, for success and for failure alike.

Every command with ``--json`` prints exactly one object on stdout: its result, or, when it
fails, the command's arguments that say what it worked on and ``error`` (the fields of the
``MCNCError``: ``error`` its class, ``message``, ``rule``, ``path``, ``field``, ``tensor``).
The failure is then reported as every failure is (``main.py``: one ``error:`` line on stderr,
exit status 2), so scripts read stdout and the exit status, people read stderr.

The object is printed with every character a terminal acts on escaped (``json_text``): names
and metadata come from files, and ``json.dumps(..., ensure_ascii=False)`` escapes only the C0
controls, leaving DEL, C1 controls (``U+009B`` is a one-character CSI) and bidi overrides raw.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..atomic import describe_os_error
from ..errors import MCNCError

__all__ = ["emit_json", "error_fields", "errors_as_json", "json_text"]


def emit_json(facts: dict[str, Any]) -> None:
    """Print ``facts`` as the command's one JSON object."""
    click.echo(json_text(facts))


def json_text(facts: dict[str, Any]) -> str:
    """``facts`` as indented JSON that reads the same on a terminal as it decodes: readable
    text stays as it is (names in any script), and each non-printable character (only ever
    inside a string: the indentation is newlines and spaces) becomes its ``\\uXXXX`` escape,
    which decodes to the same string."""
    text = json.dumps(facts, indent=2, ensure_ascii=False)
    if all(line.isprintable() for line in text.split("\n")):
        return text
    return "".join(ch if ch == "\n" or ch.isprintable() else json.dumps(ch)[1:-1]
                   for ch in text)


def error_fields(exc: MCNCError | OSError) -> dict[str, str | None]:
    """The error's fields as ``MCNCError.to_dict`` gives them; an ``OSError`` that is not an
    ``MCNCError`` is described as ``main.py`` describes it (path and fix)."""
    if isinstance(exc, MCNCError):
        return exc.to_dict()
    path = None if exc.filename is None else str(exc.filename)
    message = describe_os_error(exc).removeprefix(f"{path}: ")
    return {"error": type(exc).__name__, "message": message, "rule": None, "path": path,
            "field": None, "tensor": None}


@contextmanager
def errors_as_json(as_json: bool, subject: object = None, **context: object
                   ) -> Iterator[None]:
    """With ``as_json``, a failure inside the block prints ``{**context, "error": fields}`` on
    stdout before it propagates to ``main.py``'s one-line report and exit status 2. An error
    that names no path gets ``subject``'s, the file the command was given."""
    try:
        yield
    except (MCNCError, OSError) as exc:
        if as_json:
            fields = error_fields(exc)
            if fields["path"] is None and subject is not None:
                fields["path"] = str(subject)
            emit_json({**{key: _plain(value) for key, value in context.items()},
                       "error": fields})
        raise


def _plain(value: object) -> object:
    """Paths and other objects as their text; JSON values as they are."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
