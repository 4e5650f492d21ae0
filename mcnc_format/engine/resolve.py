"""Where the bytes behind a name come from: the file being opened, and the base checkpoints
its theta0 references point to (SPEC.md §7.4).

The core reads local files only. ``hf://`` names are the Hub layer's business: it supplies a
``Resolver`` (``mcnc_format.hub.HubResolver``), and the top-level ``mcnc_format.open``/``load``
and the CLI pass it in, so reading a local file never imports the Hub client.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from ..errors import ExternalReferenceError, MCNCError

__all__ = ["HUB_SCHEME", "LocalResolver", "Resolver"]

T = TypeVar("T")
HUB_SCHEME = "hf://"


class Resolver(Protocol):
    """Turns names into local files."""

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        """The local path of a file to open (checked, if it was fetched)."""

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        """``read(path)`` for theta0 reference ``uri`` of the file ``source``: a path relative
        to ``source``'s folder, or an ``hf://`` URI. A resolver that fetched the file may fetch
        it again when ``read`` raises ``ExternalReferenceDamaged``."""


class LocalResolver:
    """Local files only: ``hf://`` names are refused with what to use instead."""

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        text = os.fspath(name)
        if text.startswith(HUB_SCHEME):
            raise MCNCError(_HUB_NEEDED.format(text))
        return Path(text)

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        if uri.startswith(HUB_SCHEME) or source.startswith(HUB_SCHEME):
            raise MCNCError(_HUB_NEEDED.format(uri))
        _check_exact_names(Path(source).parent, uri, source)
        return read(Path(source).parent / uri)


def _check_exact_names(folder: Path, uri: str, source: str) -> None:
    """§7.4: the names of a relative path match exactly, case included. A file system that
    folds case (macOS, Windows) would open ``Base.safetensors`` for ``base.safetensors``; the
    reference is missing there as it is elsewhere (R75). A name missing in every case is left
    to the read, which reports it."""
    directory = folder
    for name in uri.split("/"):
        try:
            present = name in os.listdir(directory)
        except OSError:
            return
        if not present:
            if (directory / name).exists():
                raise ExternalReferenceError(
                    f"theta0 reference {uri}: {directory / name} exists only under a "
                    "name that differs in case; names match exactly (SPEC.md §7.4). Rename the "
                    "file or re-write the reference", rule="R75", path=source)
            return
        directory = directory / name


_HUB_NEEDED = ("{}: an hf:// name needs the Hub layer: open it with mcnc_format.open or "
               "mcnc_format.load (or pass resolver=mcnc_format.hub.HubResolver())")
