"""huggingface_hub's exceptions turned into ``MCNCError``s that say what to do.

Why: the client's exceptions describe HTTP; a user needs to know whether to log in, fix a
name, go online or retry. Order matters: ``GatedRepoError`` is a ``RepositoryNotFoundError``,
and ``LocalEntryNotFoundError`` (offline, nothing cached) is also an ``EntryNotFoundError``.
Anything else the client's I/O raises (a full disk, an HTTP-library error outside its
``HTTPError``), and the ``ValueError`` its own checks raise (a repository file named
``../x``), still becomes a ``HubError`` naming the file, so the command-line policy of
one-line ``MCNCError`` messages holds. Endpoints are printed without ``user:password@``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    HTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)

from ..errors import (
    HubError,
    HubFileNotFoundError,
    HubOfflineError,
    HubPermissionError,
    MCNCError,
)

__all__ = ["LOGIN_HINT", "hub_errors", "no_such_file", "without_userinfo"]

LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
# The client's HTTP library (``httpx``, or its fork ``httpx2``): some of its errors, such as
# ``InvalidURL`` and ``StreamError``, are not subclasses of its ``HTTPError``.
_HTTP_LIBRARIES = frozenset({"httpx", "httpx2"})


def without_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed: an endpoint such as
    ``https://user:secret@hub.example`` must not be printed in an error message."""
    return _USERINFO.sub("", text)


@contextmanager
def hub_errors(where: str, repo_id: str, revision: str | None = None,
               endpoint: str | None = None) -> Iterator[None]:
    """Re-raise Hub client failures inside the block as ``HubError`` subclasses.

    ``where`` starts every message (an ``hf://`` URI or "push to ORG/REPO").
    """
    try:
        yield
    except MCNCError:
        raise
    except Exception as exc:
        error = _translate(exc, where, repo_id, revision or "main",
                           without_userinfo(endpoint or constants.ENDPOINT))
        if error is None:
            raise
        raise error from exc


def _translate(exc: BaseException, where: str, repo_id: str, revision: str,
               endpoint: str) -> MCNCError | None:
    """The ``MCNCError`` for ``exc``, or None for an exception that is a bug, not a Hub or
    I/O failure (re-raised unchanged). ``endpoint`` is already free of userinfo."""
    if isinstance(exc, GatedRepoError):
        return HubPermissionError(
            f"{where}: {repo_id} is a gated repository: request access at "
            f"{endpoint}/{repo_id}, then {LOGIN_HINT}")
    if isinstance(exc, RepositoryNotFoundError):
        if _status(exc) == 401:
            return HubPermissionError(
                f"{where}: repository {repo_id} was not found, or it is private and you are "
                f"not logged in: check the name (ORG/REPO), or {LOGIN_HINT}")
        return HubFileNotFoundError(
            f"{where}: repository {repo_id} does not exist or your token cannot see it: "
            "check the name (ORG/REPO) and that your account has access")
    if isinstance(exc, RevisionNotFoundError):
        return HubFileNotFoundError(
            f"{where}: revision {revision!r} does not exist in {repo_id}: check the branch, "
            "tag or commit hash")
    if isinstance(exc, (LocalEntryNotFoundError, RevisionResolutionError)):
        return _not_cached(where, endpoint)
    if isinstance(exc, EntryNotFoundError):
        return no_such_file(where, repo_id, revision, endpoint)
    if isinstance(exc, OfflineModeIsEnabled):
        return HubOfflineError(
            f"{where}: this needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1): unset "
            "HF_HUB_OFFLINE and retry")
    if isinstance(exc, HfHubHTTPError):
        return _http_error(exc, where, repo_id, endpoint)
    if isinstance(exc, HFValidationError):
        return HubError(f"{where}: {_text(exc)}")
    if isinstance(exc, HTTPError):
        return HubError(f"{where}: cannot reach the Hub at {endpoint} ({_text(exc)}): check "
                        "the network connection, proxy settings and HF_ENDPOINT")
    if isinstance(exc, ValueError) and exc.__cause__ is not None:
        # hf_hub_download(force_download=True) wraps the failed metadata request this way.
        return _translate(exc.__cause__, where, repo_id, revision, endpoint)
    if isinstance(exc, ValueError) and _raised_by_client(exc):
        # Its checks of names, e.g. of a repository file named '../x' it will not write.
        return HubError(f"{where}: {_text(exc)}")
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _HTTP_LIBRARIES:
        return HubError(f"{where}: {_text(exc)}")
    return None


def _raised_by_client(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in huggingface_hub's own code (its innermost frame), not
    in code of this package that runs inside ``hub_errors``."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    module = frame.tb_frame.f_globals.get("__name__", "") if frame is not None else ""
    return str(module).split(".")[0] == "huggingface_hub"


def no_such_file(where: str, repo_id: str, revision: str, endpoint: str
                 ) -> HubFileNotFoundError:
    """The error for a file the repository does not hold at ``revision``."""
    endpoint = without_userinfo(endpoint)
    return HubFileNotFoundError(
        f"{where}: no such file in {repo_id} at revision {revision!r}: check the path; "
        f"the files are listed at {endpoint}/{repo_id}/tree/{revision}")


def _text(exc: BaseException) -> str:
    """The exception's message, without credentials embedded in a URL."""
    return without_userinfo(str(exc))


def _not_cached(where: str, endpoint: str) -> MCNCError:
    if constants.HF_HUB_OFFLINE:
        return HubOfflineError(
            f"{where}: not in the local cache ({constants.HF_HUB_CACHE}) and offline mode is on "
            "(HF_HUB_OFFLINE=1): download it once while online (`mcnc pull`), or unset "
            "HF_HUB_OFFLINE")
    return HubError(
        f"{where}: the Hub at {endpoint} cannot be reached and the file is not in the local "
        "cache: check the network connection, proxy settings and HF_ENDPOINT")


def _http_error(exc: HfHubHTTPError, where: str, repo_id: str, endpoint: str) -> MCNCError:
    status = _status(exc)
    detail = without_userinfo(exc.server_message or str(exc).splitlines()[0])
    if status == 401:
        return HubPermissionError(
            f"{where}: the Hub rejected the token ({detail}): {LOGIN_HINT} with a valid token")
    if status == 403:
        return HubPermissionError(
            f"{where}: your token may not do this on {repo_id} ({detail}): use a token with "
            f"write access to its namespace; {LOGIN_HINT}")
    if status == 412:
        return HubError(
            f"{where}: {repo_id} changed while this push was being prepared (another commit "
            f"landed first), so nothing was committed: push again ({detail})")
    return HubError(f"{where}: the Hub at {endpoint} answered HTTP {status} ({detail}); retry "
                    "later")


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
