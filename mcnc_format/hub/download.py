"""Downloads through ``hf_hub_download`` (its cache, token, endpoint and offline mode), checked
before use.

Why the checks: the client does not compare downloaded bytes with the ETag, so a damaged or
tampered copy lands in the cache and is served again on every later call. Every file read from
the Hub therefore passes a check first (``.mcnc`` checksums, or the sha256 pin of a theta0
reference). A failure that damaged bytes can cause is retried once with
``force_download=True``; if the fresh copy fails too, it is deleted from the cache, so neither
a later online call nor offline mode can use it, and the reader's error is raised with the URI
and what to do. Failures that a fresh copy cannot fix (a file that is not an ``.mcnc`` file, a
reference to a tensor the base file does not hold) are raised at once and evict nothing.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    hf_hub_download,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import CachedRepoTreeNotFoundError

from .. import __version__
from ..constants import MAGIC
from ..errors import (
    ExternalReferenceDamaged,
    FormatError,
    HubError,
    HubOfflineError,
    MCNCError,
    UnsupportedVersionError,
)
from ..uri import SCHEME, HubURI, check_repo_path, parse_uri
from .error_map import hub_errors, no_such_file
from .integrity import check_mcnc_bytes

__all__ = ["opened_at", "pinned", "pull", "read_reference", "resolve_path",
           "resolve_reference"]

T = TypeVar("T")
PathLike = str | os.PathLike[str]
# What damaged bytes of an ``.mcnc`` file raise: a damaged major-version byte reads as a newer
# format, so a real newer file is only reported after a fresh copy fails the same way.
MCNC_DAMAGE = (FormatError, UnsupportedVersionError)


def resolve_reference(uri: str) -> Path:
    """Local path of the file behind an ``hf://`` theta0 reference, downloaded if needed.

    The caller checks the tensor's sha256; ``read_reference`` adds the re-download on failure.
    """
    return download(parse_uri(uri, error=HubError))


def read_reference(uri: str, source: str, read: Callable[[Path], T], *,
                   token: str | None = None, endpoint: str | None = None) -> T:
    """``read(local_path)`` for theta0 reference ``uri`` of the ``.mcnc`` file ``source``.

    ``uri`` is ``hf://...``, or a path relative to ``source`` when ``source`` itself came from
    the Hub (the sibling file is fetched from the same repo and revision). When ``read``
    raises ``ExternalReferenceDamaged`` (the file is unreadable or the tensor's sha256
    differs) the copy is downloaded again once, and deleted from the cache if it still fails;
    other ``ExternalReferenceError``s (no such tensor, wrong shape) come from the referencing
    file's header, so they propagate at once and the download stays cached.
    """
    if uri.startswith(SCHEME):
        target = parse_uri(uri, error=HubError)
    else:
        parent = parse_uri(source, error=HubError)
        target = parent.with_path(posixpath.join(posixpath.dirname(parent.path), uri))
    options = {"token": token, "endpoint": endpoint}
    return _checked(target, download(target, **options), read, (ExternalReferenceDamaged,),
                    options)


def resolve_path(path_or_uri: PathLike, *, token: str | None = None,
                 endpoint: str | None = None) -> Path:
    """A local path for ``open``/``load``/``load_into``: ``hf://ORG/REPO[@REV]/FILE.mcnc`` is
    downloaded and its checksums verified (re-downloaded once if damaged); other paths are
    returned unchanged."""
    text = os.fspath(path_or_uri)
    if not text.startswith(SCHEME):
        return Path(text)
    target = parse_uri(text, error=HubError)
    options = {"token": token, "endpoint": endpoint}
    local = download(target, **options)
    _refuse_other_formats(target, local)
    return _checked(target, local, check_mcnc_bytes, MCNC_DAMAGE, options)


def opened_at(name: str, local: Path) -> str:
    """``name`` (an ``hf://`` URI) pinned to the commit its downloaded copy ``local`` came
    from, so that references relative to it are fetched from that same snapshot even if the
    branch moves meanwhile. The client's cache keeps a file of commit ``C`` at
    ``.../snapshots/C/PATH``; a copy found elsewhere leaves ``name`` as it is."""
    target = parse_uri(name, error=HubError)
    if target.pinned:
        return name
    depth = len(PurePosixPath(target.path).parts)
    snapshot = local.parents[depth - 1] if 0 < depth < len(local.parents) else None
    if (snapshot is None or snapshot.parent.name != "snapshots"
            or not HubURI(target.repo_id, snapshot.name, target.path).pinned):
        return name
    return str(target.with_revision(snapshot.name))


def pull(repo_id: str, filename: str | None = None, revision: str | None = None, *,
         local_dir: PathLike | None = None, token: str | None = None,
         endpoint: str | None = None) -> Path:
    """Download one file, or the whole repository when ``filename`` is None; return its local
    path (a file, or the snapshot folder). Every ``.mcnc`` file of the repository is
    checksum-verified and re-downloaded once if damaged; other files already in ``local_dir``
    are left alone."""
    options: dict[str, Any] = {"token": token, "endpoint": endpoint, "local_dir": local_dir}
    if filename is not None:
        target = HubURI(repo_id, revision, check_repo_path(filename, HubError))
        local = download(target, **options)
        if not filename.endswith(".mcnc"):
            return local
        return _checked(target, local, check_mcnc_bytes, MCNC_DAMAGE, options)
    target = pinned(HubURI(repo_id, revision, ""), token, endpoint)
    with hub_errors(str(target), repo_id, target.revision, endpoint):
        folder = Path(snapshot_download(repo_id, revision=target.revision,
                                        library_name="mcnc-format",
                                        library_version=__version__, **options))
    for path in _repo_files(target, folder, local_dir, token, endpoint):
        if path.endswith(".mcnc"):
            _checked(target.with_path(path), folder / path, check_mcnc_bytes, MCNC_DAMAGE,
                     options)
    return folder


def pinned(target: HubURI, token: str | None, endpoint: str | None) -> HubURI:
    """``target`` at the commit its branch or tag points to now (unchanged if it names a
    commit): a whole-repo pull and any re-download of one of its files see one snapshot, and
    a theta0 reference keeps naming the bytes it was made against.

    ``HfApi.resolve_revision`` records the branch's commit in the cache's refs, and uses that
    record when the Hub cannot be reached (offline mode included), so a repository pulled
    once by branch can be pulled again offline.
    """
    if target.pinned:
        return target
    with hub_errors(str(target), target.repo_id, target.revision, endpoint):
        resolved = HfApi(endpoint=endpoint, token=token).resolve_revision(
            target.repo_id, revision=target.revision)
    return target.with_revision(resolved.resolved)


def download(target: HubURI, *, force: bool = False, **options: Any) -> Path:
    """``hf_hub_download`` of ``target`` with errors a user can act on.

    Offline, a file the cache records as absent at that commit (the client leaves a mark
    when the Hub answers 404 for a commit, which never changes) is ``HubFileNotFoundError``,
    as online, not a cache miss: callers that skip an optional file (``from_pretrained``'s
    ``generation_config.json``) then work offline too."""
    with hub_errors(str(target), target.repo_id, target.revision, options.get("endpoint")):
        if (constants.HF_HUB_OFFLINE and options.get("local_dir") is None
                and _recorded_missing(target)):
            raise no_such_file(str(target), target.repo_id, target.revision or "main",
                               options.get("endpoint") or constants.ENDPOINT)
        return Path(hf_hub_download(target.repo_id, target.path, revision=target.revision,
                                    force_download=force, library_name="mcnc-format",
                                    library_version=__version__, **options))


def _recorded_missing(target: HubURI) -> bool:
    """Whether the cache holds the client's mark that ``target`` does not exist at the
    commit its revision names (``try_to_load_from_cache`` returns a path for a cached file,
    None when it knows nothing, and a sentinel for a recorded absence)."""
    found = try_to_load_from_cache(target.repo_id, target.path, revision=target.revision)
    return found is not None and not isinstance(found, str)


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
        if isinstance(second, UnsupportedVersionError):
            raise UnsupportedVersionError(
                f"{target}: a fresh download gives the same format version, so the file on "
                f"the Hub was written by a newer mcnc-format: {second}") from second
        raise type(second)(
            f"{target}: downloaded twice and both copies fail their check, so the file on the "
            "Hub is not the one that was published (or the transfer is corrupted); the copy "
            f"was deleted from the cache. Tell the repository's owner, or use another "
            f"revision: {second}") from second


def _refuse_other_formats(target: HubURI, local: Path) -> None:
    """A file that does not start with the ``.mcnc`` magic is another format, not damage:
    re-downloading would not help, and evicting it would take it from other libraries that
    share the cache. Only a file named ``.mcnc`` is given the benefit of the doubt (a
    truncated or overwritten download), and goes on to the damage checks."""
    if target.path.endswith(".mcnc"):
        return
    try:
        with local.open("rb") as file:
            start = file.read(len(MAGIC))
    except OSError as exc:
        raise HubError(f"{target}: the downloaded copy {local} cannot be read: {exc}") from exc
    if start != MAGIC:
        raise FormatError(
            f"not an .mcnc file: it does not start with the .mcnc magic {MAGIC!r}. Give the "
            "hf:// path of an .mcnc file; other formats are read with their own libraries",
            rule="R1", path=str(target))


def _repo_files(target: HubURI, folder: Path, local_dir: PathLike | None, token: str | None,
                endpoint: str | None) -> list[str]:
    """Paths of the repository's files at ``target.revision``, so that a check never touches
    a file of the user's that only shares ``local_dir``. The listing ``snapshot_download``
    cached is used (no request); online, the API's listing if none is cached. Offline without
    a listing, a cache snapshot folder holds only the repo's files; a ``local_dir`` may not."""
    try:
        tree = get_cached_repo_tree(target.repo_id, revision=target.revision, local_dir=local_dir)
        return sorted(entry.path for entry in tree)
    except CachedRepoTreeNotFoundError:
        pass
    if not constants.HF_HUB_OFFLINE:
        with hub_errors(str(target), target.repo_id, target.revision, endpoint):
            return sorted(HfApi(endpoint=endpoint, token=token).list_repo_files(
                target.repo_id, revision=target.revision))
    if local_dir is None:
        return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                      if path.is_file())
    raise HubOfflineError(
        f"{target}: offline (HF_HUB_OFFLINE=1) and the list of the repository's files at "
        f"this revision is not cached, so the files in {folder} cannot be told from your own "
        "and checked: give the commit hash as the revision, or unset HF_HUB_OFFLINE")
