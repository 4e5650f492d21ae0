"""Downloads through ``hf_hub_download`` (its cache, token, endpoint and offline mode), checked
before use.

Why the checks: the client does not compare downloaded bytes with the ETag, so a damaged or
tampered copy lands in the cache and is served again on every later call. Every file read from
the Hub therefore passes a check first (``.mcnc`` checksums, or the sha256 pin of a theta0
reference). A failure is retried once with ``force_download=True``; if the fresh copy fails
too, it is deleted from the cache, so neither a later online call nor offline mode can use
it, and the reader's error is raised with the URI and what to do.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

from .. import __version__
from ..errors import ExternalReferenceError, FormatError, HubError, MCNCError
from .error_map import hub_errors
from .integrity import check_mcnc_bytes
from .uri import SCHEME, HubURI, is_commit_hash, parse_uri

__all__ = ["pull", "read_reference", "resolve_path", "resolve_reference"]

T = TypeVar("T")
PathLike = str | os.PathLike[str]


def resolve_reference(uri: str) -> Path:
    """Local path of the file behind an ``hf://`` theta0 reference, downloaded if needed.

    The caller checks the tensor's sha256; ``read_reference`` adds the re-download on failure.
    """
    return download(_parse(uri))


def read_reference(uri: str, source: str, read: Callable[[Path], T]) -> T:
    """``read(local_path)`` for theta0 reference ``uri`` of the ``.mcnc`` file ``source``.

    ``uri`` is ``hf://...``, or a path relative to ``source`` when ``source`` itself came from
    the Hub (the sibling file is fetched from the same repo and revision). ``read`` raises
    ``ExternalReferenceError`` when the tensor is missing or its sha256 differs: the copy is
    then downloaded again once, and deleted from the cache if it still fails.
    """
    if uri.startswith(SCHEME):
        target = _parse(uri)
    else:
        parent = _parse(source)
        target = parent.with_path(posixpath.join(posixpath.dirname(parent.path),
                                                 uri.replace("\\", "/")))
    return _checked(target, download(target), read, (ExternalReferenceError,), {})


def resolve_path(path_or_uri: PathLike, *, token: str | None = None,
                 endpoint: str | None = None) -> Path:
    """A local path for ``open``/``load``/``load_into``: ``hf://ORG/REPO[@REV]/FILE.mcnc`` is
    downloaded and its checksums verified (re-downloaded once if damaged); other paths are
    returned unchanged."""
    text = os.fspath(path_or_uri)
    if not text.startswith(SCHEME):
        return Path(text)
    target = _parse(text)
    options = {"token": token, "endpoint": endpoint}
    return _checked(target, download(target, **options), check_mcnc_bytes, (FormatError,),
                    options)


def pull(repo_id: str, filename: str | None = None, revision: str | None = None, *,
         local_dir: PathLike | None = None, token: str | None = None,
         endpoint: str | None = None) -> Path:
    """Download one file, or the whole repository when ``filename`` is None; return its local
    path (a file, or the snapshot folder). Every ``.mcnc`` file is checksum-verified and
    re-downloaded once if damaged."""
    options: dict[str, Any] = {"token": token, "endpoint": endpoint, "local_dir": local_dir}
    if filename is not None:
        target = HubURI(repo_id, revision, filename)
        local = download(target, **options)
        if not filename.endswith(".mcnc"):
            return local
        return _checked(target, local, check_mcnc_bytes, (FormatError,), options)
    target = HubURI(repo_id, _commit_of(repo_id, revision, token, endpoint), "")
    with hub_errors(str(target), repo_id, target.revision, endpoint):
        folder = Path(snapshot_download(repo_id, revision=target.revision,
                                        library_name="mcnc-format",
                                        library_version=__version__, **options))
    for local in sorted(folder.rglob("*.mcnc")):
        relative = local.relative_to(folder).as_posix()
        if not relative.startswith("."):
            _checked(target.with_path(relative), local, check_mcnc_bytes, (FormatError,),
                     options)
    return folder


def download(target: HubURI, *, force: bool = False, **options: Any) -> Path:
    """``hf_hub_download`` of ``target`` with errors a user can act on."""
    with hub_errors(str(target), target.repo_id, target.revision, options.get("endpoint")):
        return Path(hf_hub_download(target.repo_id, target.path, revision=target.revision,
                                    force_download=force, library_name="mcnc-format",
                                    library_version=__version__, **options))


def evict(local: Path) -> None:
    """Delete a downloaded copy: the snapshot entry and the cache blob it points to, so that
    the client cannot hand it out again (it would relink an existing blob)."""
    blob = local.resolve()
    local.unlink(missing_ok=True)
    if blob != local:
        blob.unlink(missing_ok=True)


def _checked(target: HubURI, local: Path, check: Callable[[Path], T],
             damage: tuple[type[MCNCError], ...], options: dict[str, Any]) -> T:
    """``check(local)``; on ``damage`` re-download once, and evict a copy that still fails."""
    try:
        return check(local)
    except damage as first:
        evict(local)  # before the retry, which may fail for other reasons (network)
        if constants.HF_HUB_OFFLINE:
            raise type(first)(
                f"{target}: the cached copy fails its check and was deleted; it cannot be "
                f"downloaded again while offline (HF_HUB_OFFLINE=1): {first}") from first
    fresh = download(target, force=True, **options)
    try:
        return check(fresh)
    except damage as second:
        evict(fresh)
        raise type(second)(
            f"{target}: downloaded twice and both copies fail their check, so the file on the "
            "Hub is not the one that was published (or the transfer is corrupted); the copy "
            f"was deleted from the cache. Tell the repository's owner, or use another "
            f"revision: {second}") from second


def _commit_of(repo_id: str, revision: str | None, token: str | None,
               endpoint: str | None) -> str | None:
    """Pin a branch to its current commit, so that a whole-repo pull and any re-download of
    one of its files see the same snapshot. Offline, the cache's own refs are used."""
    if constants.HF_HUB_OFFLINE or is_commit_hash(revision):
        return revision
    with hub_errors(f"{SCHEME}{repo_id}", repo_id, revision, endpoint):
        return HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision).sha


def _parse(uri: str) -> HubURI:
    try:
        return parse_uri(uri)
    except ValueError as exc:
        raise HubError(str(exc)) from exc
