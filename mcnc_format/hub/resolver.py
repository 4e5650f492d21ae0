"""The Hub's ``Resolver``: ``hf://`` names downloaded through huggingface_hub's cache and
checked before use (``download.py``), for the core reader (``mcnc_format.engine.resolve``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..engine.resolve import relative_to
from ..uri import SCHEME
from .download import read_reference, resolve_path

__all__ = ["HubResolver"]

T = TypeVar("T")


class HubResolver:
    """``hf://ORG/REPO[@REV]/FILE`` names and the theta0 references of files from the Hub
    (or ``hf://`` references of local files); local paths go to ``LocalResolver``."""

    def __init__(self, *, token: str | None = None, endpoint: str | None = None) -> None:
        self.token = token
        self.endpoint = endpoint

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        return resolve_path(name, token=self.token, endpoint=self.endpoint)

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        if uri.startswith(SCHEME) or source.startswith(SCHEME):
            return read_reference(uri, source, read, token=self.token, endpoint=self.endpoint)
        return read(relative_to(uri, source))
