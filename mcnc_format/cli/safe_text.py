"""Text from files, paths and errors made safe to show on a terminal.

A tensor name, a metadata value, a file name or an error message quoting one can hold control
characters: ``ESC [2J`` clears the screen, ``ESC ]0;...BEL`` retitles the window, ``U+009B``
is a one-character CSI, bidi overrides reorder what the user reads. Rich would also read
``[bold]`` or ``[link=...]`` in such a string as markup. Every human (non ``--json``) output
of the CLI passes such strings through ``printable`` (plain ``click.echo``) or ``markup_safe``
(rich); ``--json`` output escapes them as JSON does (``json_out.json_text``), so it decodes
to the exact strings.
"""

from __future__ import annotations

from rich.markup import escape

__all__ = ["markup_safe", "printable"]


def printable(text: object) -> str:
    """``str(text)`` with every non-printable character (C0, DEL, C1, line breaks, format
    characters such as bidi overrides) shown as a Python-style escape: ``\\x1b``, ``\\u202e``."""
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in str(text))


def markup_safe(text: object) -> str:
    """``printable(text)`` that rich prints as it is, never as markup."""
    return escape(printable(text))


def _escaped(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
