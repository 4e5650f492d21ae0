"""``--json``: one JSON object on stdout, for success and for failure alike.

Every command with ``--json`` prints exactly one object on stdout: its result, or, when it
fails, the command's arguments that say what it worked on and ``error`` (the fields of the
``MCNCError``: ``error`` its class, ``message``, ``rule``, ``path``, ``field``, ``tensor``).
The failure is then reported as every failure is (``main.py``: one ``error:`` line on stderr,
exit status 2), so scripts read stdout and the exit status, people read stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..atomic import describe_os_error
from ..errors import MCNCError

__all__ = ["emit_json", "error_fields", "errors_as_json"]


def emit_json(facts: dict[str, Any]) -> None:
    """Print ``facts`` as the command's one JSON object."""
    click.echo(json.dumps(facts, indent=2, ensure_ascii=False))


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
