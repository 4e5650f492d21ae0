"""Where the bytes behind a name come from: the file being opened, and the base checkpoints
its theta0 references point to (SPEC.md §7.4).

The core reads local files. A name with a scheme (``hf://``) is read by the resolver that an
installed package registers for it under the entry-point group ``mcnc_format.resolvers``
(mcnc-format registers ``mcnc_format.hub:HubResolver`` for ``hf``): the core never imports
the Hub client, and it is loaded only when such a name is met. A relative theta0 reference
is always a path beside the file that holds it (``relative_to``), whichever resolver reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, TypeVar

from ..errors import ExternalReferenceError, UsageError
from ..uri import SCHEME as HUB_SCHEME

__all__ = [
    "HUB_SCHEME",
    "RESOLVER_GROUP",
    "DefaultResolver",
    "LocalResolver",
    "Resolver",
    "relative_to",
]

T = TypeVar("T")
#: The entry-point group of scheme resolvers: name ``hf`` serves ``hf://`` names.
RESOLVER_GROUP = "mcnc_format.resolvers"


class Resolver(Protocol):
    """Turns names into local files."""

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        """The local path of a file to open (checked, if it was fetched)."""

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        """``read(path)`` for theta0 reference ``uri`` of the file ``source``: a path relative
        to ``source``'s folder, or an ``hf://`` URI. A resolver that fetched the file may fetch
        it again when ``read`` raises ``ExternalReferenceDamaged``."""


def relative_to(uri: str, source: str) -> Path:
    """§7.4: a relative reference names a file beside the file that holds it, its names
    matching exactly, case included. A file system that folds case (macOS, Windows) would
    open ``Base.safetensors`` for ``base.safetensors``; the reference is missing there as it
    is elsewhere (R75). A name missing in every case is left to the read, which reports it."""
    folder = Path(source).parent
    directory = folder
    for name in uri.split("/"):
        try:
            present = name in os.listdir(directory)
        except OSError:
            break
        if not present:
            if (directory / name).exists():
                raise ExternalReferenceError(
                    f"theta0 reference {uri}: {directory / name} exists only under a "
                    "name that differs in case; names match exactly (SPEC.md §7.4). Rename the "
                    "file or re-write the reference", rule="R75", path=source)
            break
        directory = directory / name
    return folder / uri


def _scheme(name: str) -> str | None:
    """The scheme of ``name`` (``"hf"`` for ``hf://...``), ``None`` for a local path."""
    head, sep, _ = name.partition("://")
    return head if sep and head.isalnum() else None


class LocalResolver:
    """Local files only: a name with a scheme is refused with what to use instead."""

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        text = os.fspath(name)
        if _scheme(text) is not None:
            raise UsageError(f"{text}: this resolver reads local files only; open it with "
                             "mcnc_format.open (which resolves hf:// names)")
        return Path(text)

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        if _scheme(uri) is not None or _scheme(source) is not None:
            raise UsageError(f"{uri}: this resolver reads local files only; open the file "
                             "with mcnc_format.open (which resolves hf:// names)")
        return read(relative_to(uri, source))


class DefaultResolver:
    """Local paths as they are; names with a scheme through the resolver registered for it
    (``mcnc_format.resolvers`` entry points), created on first use."""

    def __init__(self) -> None:
        self._by_scheme: dict[str, Resolver] = {}

    def for_scheme(self, scheme: str) -> Resolver:
        """The registered resolver of ``scheme``."""
        if scheme not in self._by_scheme:
            found = entry_points(group=RESOLVER_GROUP, name=scheme)
            if not found:
                raise UsageError(
                    f"no resolver is installed for {scheme}:// names (entry-point group "
                    f"{RESOLVER_GROUP!r}); install mcnc-format as a package (pip install "
                    "mcnc-format) to read hf:// names")
            self._by_scheme[scheme] = next(iter(found)).load()()
        return self._by_scheme[scheme]

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        text = os.fspath(name)
        scheme = _scheme(text)
        return Path(text) if scheme is None else self.for_scheme(scheme).local_path(text)

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        scheme = _scheme(uri) or _scheme(source)
        if scheme is None:
            return read(relative_to(uri, source))
        return self.for_scheme(scheme).reference(uri, source, read)
