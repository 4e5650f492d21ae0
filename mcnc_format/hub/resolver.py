"""The Hub's ``Resolver``: ``hf://`` names downloaded through huggingface_hub's cache and
checked before use (``download.py``), for the core reader (``mcnc_format.engine.resolve``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..engine.resolve import relative_to
from ..uri import SCHEME
from .download import opened_at, read_reference, resolve_path

__all__ = ["HubResolver"]

T = TypeVar("T")


class HubResolver:
    """``hf://ORG/REPO[@REV]/FILE`` names and the theta0 references of files from the Hub
    (or ``hf://`` references of local files); local paths go to ``LocalResolver``.

    A reference relative to a file opened by a branch or tag is fetched at the commit the
    file itself came from (``opened_at``), not at wherever the branch points by then: a push
    of a new base and adapter landing during a load would otherwise pair the old adapter
    with the new base and fail its hash check as if the download were damaged."""

    def __init__(self, *, token: str | None = None, endpoint: str | None = None) -> None:
        self.token = token
        self.endpoint = endpoint
        self._opened: dict[str, str] = {}  # hf:// name -> that name at its copy's commit

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        local = resolve_path(name, token=self.token, endpoint=self.endpoint)
        text = os.fspath(name)
        if text.startswith(SCHEME):
            self._opened[text] = opened_at(text, local)
        return local

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        if uri.startswith(SCHEME) or source.startswith(SCHEME):
            return read_reference(uri, self._opened.get(source, source), read,
                                  token=self.token, endpoint=self.endpoint)
        return read(relative_to(uri, source))
