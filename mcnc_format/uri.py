"""The one parser of ``hf://ORG/REPO[@REVISION]/PATH`` references.

It lives in the core, not in ``mcnc_format.hub``, and imports nothing heavy: ``header.py``
checks theta0 URIs (R74) with it while parsing a header, and that must not pull in the Hub
client. ``mcnc_format.hub`` re-exports ``HubURI`` and ``parse_uri``.

``REVISION`` is a branch, a tag or a 40-hex commit hash; a revision containing ``/`` is
written percent-encoded (``@refs%2Fpr%2F3``). ``PATH`` may be empty only where a whole
repository is meant (``mcnc pull hf://org/repo``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = ["SCHEME", "HubURI", "check_repo_path", "is_commit_hash", "parse_uri"]

SCHEME = "hf://"
_HEX = frozenset("0123456789abcdef")
#: One part of a Hub repository id (SPEC.md §7.4; huggingface_hub's ``validate_repo_id``).
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")


def is_commit_hash(revision: str | None) -> bool:
    """True for a full 40-hex commit hash: the only revision whose content cannot change."""
    return revision is not None and len(revision) == 40 and set(revision) <= _HEX


@dataclass(frozen=True)
class HubURI:
    """A parsed ``hf://`` reference: repository, optional revision, path inside the repo."""

    repo_id: str
    revision: str | None
    path: str

    @property
    def pinned(self) -> bool:
        """The revision is a commit hash, so the bytes behind this URI are immutable."""
        return is_commit_hash(self.revision)

    def with_path(self, path: str) -> HubURI:
        return HubURI(self.repo_id, self.revision, path)

    def with_revision(self, revision: str | None) -> HubURI:
        return HubURI(self.repo_id, revision, self.path)

    def __str__(self) -> str:
        revision = f"@{quote(self.revision, safe='')}" if self.revision else ""
        path = f"/{self.path}" if self.path else ""
        return f"{SCHEME}{self.repo_id}{revision}{path}"


def parse_uri(uri: str, *, require_path: bool = True,
              error: type[Exception] = ValueError) -> HubURI:
    """Split ``hf://ORG/REPO[@REVISION]/PATH``; ``error`` (``ValueError`` unless the caller
    wants one of its own, e.g. ``HubError``) names what is malformed.

    The ``hf://`` prefix is optional so that ``org/repo@main/file`` is accepted where a user
    types a reference (``mcnc_format.hub.theta0_reference``).
    """
    body = uri[len(SCHEME):] if uri.startswith(SCHEME) else uri
    org, slash, rest = body.partition("/")
    name_and_revision, _, path = rest.partition("/")
    name, at, revision = name_and_revision.partition("@")
    problem = _problem(org, slash, name, at, unquote(revision), path, require_path)
    if problem:
        raise error(f"{uri!r} is not a Hub reference hf://ORG/REPO[@REVISION]/PATH: "
                    f"{problem}")
    return HubURI(f"{org}/{name}", unquote(revision) if at else None, path)


def check_repo_path(path: str, error: type[Exception] = ValueError) -> str:
    """``path`` if a reference may name it as a file in a repository, else ``error``: a
    FILENAME or path in the repository given on its own (``mcnc pull ORG/REPO FILENAME``,
    ``push --path-in-repo``) passes the check an ``hf://`` reference's path passes, so it
    cannot reach outside the repository (``..``, ``/etc/passwd``) and its pushed URI parses."""
    if _path_problem(path):
        raise error(f"{path!r} is not a path inside a repository: {_path_problem(path)}")
    return path


def _path_problem(path: str) -> str | None:
    parts = path.split("/") if path else []
    if any(part in ("", ".", "..") for part in parts):
        return "the path must not have empty, '.' or '..' components"
    return None


def _problem(org: str, slash: str, name: str, at: str, revision: str, path: str,
             require_path: bool) -> str | None:
    """What is wrong with the parts of a reference, or None."""
    if not org or not slash or not name:
        return "the repository must be ORG/REPO"
    if not all(_REPO_PART.fullmatch(part) for part in (org, name)) or \
            any(pair in f"{org}/{name}" for pair in ("--", "..")) or name.endswith(".git"):
        return ("ORG and REPO are each 1 to 96 of A-Z a-z 0-9 _ . -, starting and ending with a "
                "letter, digit or _, without '--' or '..', REPO not ending in .git (the Hub's "
                "repository names)")
    if at and not revision:
        return "'@' must be followed by a revision"
    if require_path and not path:
        return "a file path inside the repository is missing"
    return _path_problem(path)
