"""In-process fake of the Hugging Face Hub HTTP protocol, for tests only.

Why: the test machines cannot reach huggingface.co, yet the library's hub integration must be
exercised through the *real* ``huggingface_hub`` client (URL layout, headers, error mapping,
cache layout). This module serves the subset of the Hub protocol that the client uses for model
repositories, from memory, on ``127.0.0.1`` and a random free port. It lives in ``tests/`` on
purpose and must never be imported by the library.

Implemented endpoints (checked against huggingface_hub 2.4.0; repo ids are ``ns/name`` or
``name``; revisions are branch names or full 40-hex commit hashes)::

    GET    /api/whoami-v2
    POST   /api/repos/create                       create_repo (409 + {"url"} on conflict)
    DELETE /api/repos/delete                       delete_repo
    POST   /api/validate-yaml                      README.md metadata check (always valid)
    GET    /api/models/{repo}                      model_info / repo_info / repo_exists
    GET    /api/models/{repo}/revision/{rev}       model_info(revision=...), revision_exists
    GET    /api/models/{repo}/tree/{rev}[/{path}]  list_repo_tree / list_repo_files (paginated)
    POST   /api/models/{repo}/preupload/{rev}      always answers uploadMode "regular" (no LFS/Xet)
    POST   /api/models/{repo}/commit/{rev}         NDJSON: header, file (base64), deletedFile,
                                                   deletedFolder; parentCommit -> 412 if stale
    POST   /api/models/{repo}/branch/{branch}      create_branch (409 if it exists)
    HEAD   /{repo}/resolve/{rev}/{path}            hf_hub_download metadata, file_exists
    GET    /{repo}/resolve/{rev}/{path}            file bytes, single-range ``Range`` support

Errors mimic the Hub: status code, ``X-Error-Code`` / ``X-Error-Message`` headers and a JSON
body ``{"error": ...}``, so that ``hf_raise_for_status`` raises the client's own classes. Since
the client only maps a bare 401 to ``RepositoryNotFoundError`` for ``https://`` URLs, every
repo-not-visible answer carries ``X-Error-Code: RepoNotFound`` explicitly (as the Hub does).

Pointing the client at the server (what ``hub_fixtures.configure_hf_client`` does): the client
reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``... once, at import time,
into ``huggingface_hub.constants``. Setting the environment variables in a test is therefore not
enough. The robust recipe is:

1. pass ``endpoint=server.endpoint`` explicitly to ``HfApi(...)``, ``hf_hub_download(...)`` and
   ``snapshot_download(...)`` (library code should accept and forward an endpoint);
2. additionally monkeypatch ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``
   and the module-level ``huggingface_hub.hf_api.api.endpoint`` (used by the top-level
   ``huggingface_hub.model_info`` & co.), so that code which forgets ``endpoint=`` still never
   reaches the internet;
3. monkeypatch the cache / token paths in ``constants`` to a temporary directory, clear
   ``HF_TOKEN`` and set ``constants.HF_HUB_OFFLINE`` (not the env var) to toggle offline mode;
4. call ``huggingface_hub.close_session()`` so the shared HTTP client is rebuilt (fresh proxy
   environment, no pooled connections to a previous server).

Tokens: ``HubServer`` knows a few tokens by default (see ``WRITE_TOKEN`` & co.). A request without
``Authorization`` is anonymous; an unknown bearer token gets 401 "Invalid credentials in
Authorization header" (mapped by the client to a plain ``HfHubHTTPError``). Private repos are
visible to tokens whose user (or orgs) own the namespace; others get ``RepoNotFound`` (401 when
anonymous, 404 when authenticated), like the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

DEFAULT_BRANCH = "main"
USER = "alice"
OTHER_USER = "bob"
WRITE_TOKEN = "hf_test_alice_write"
READ_TOKEN = "hf_test_alice_read"
OTHER_TOKEN = "hf_test_bob_write"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_REPO_ACTIONS = frozenset({"revision", "tree", "preupload", "commit", "branch"})
_OTHER_REPO_TYPES = frozenset({"datasets", "spaces", "kernels"})
# A short version of the .gitattributes the Hub writes in the initial commit of every repo.
_DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.zst filter=lfs diff=lfs merge=lfs -text\n"
)


# --------------------------------------------------------------------------- helpers


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data``: what the Hub advertises as ETag / blobId for non-LFS files.

    Why: the client compares it with its own ``sha.git_hash`` to skip unchanged uploads.
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(moment: datetime) -> str:
    """Format a datetime the way the Hub does (the client's ``parse_datetime`` expects it)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _is_true(value: str | None) -> bool:
    """Query-string booleans: httpx sends ``true``/``false``, humans send ``1``."""
    return value is not None and value.lower() in {"1", "true", "yes"}


# --------------------------------------------------------------------------- storage model


@dataclass(frozen=True)
class FileEntry:
    """One file in a snapshot.

    ``oid`` and ``size`` are the git metadata the Hub advertises (ETag, siblings, tree);
    ``data`` is what storage actually serves. They only disagree after ``HubServer.tamper``.
    ``head_length`` is the Content-Length announced by HEAD (normally ``len(data)``).
    """

    oid: str
    size: int
    data: bytes
    head_length: int

    @classmethod
    def from_bytes(cls, data: bytes) -> FileEntry:
        return cls(oid=git_blob_sha1(data), size=len(data), data=data, head_length=len(data))


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot: every file of the repo at that commit."""

    oid: str
    parent: str | None
    title: str
    description: str
    date: datetime
    files: Mapping[str, FileEntry]


@dataclass
class Repo:
    """A model repository: branches pointing into a set of commits."""

    repo_id: str
    private: bool
    created_at: datetime
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    gated: bool | str = False
    gate_allowed: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str | None:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else None


@dataclass(frozen=True)
class TokenInfo:
    """Who a bearer token belongs to and whether it may write."""

    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()

    def owns(self, namespace: str | None) -> bool:
        return namespace is not None and namespace in (self.user, *self.orgs)


@dataclass(frozen=True)
class RequestRecord:
    """What tests can assert on: one line per request received."""

    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None
    range: str | None


@dataclass
class _Failure:
    """An injected failure (see ``HubServer.fail_next``)."""

    status: int
    remaining: int
    method: str | None
    path_contains: str | None
    error_code: str | None
    message: str

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_contains is None or self.path_contains in path


# --------------------------------------------------------------------------- HTTP plumbing


@dataclass(frozen=True)
class Request:
    """A parsed HTTP request; ``segments`` are already percent-decoded one by one.

    Why per segment: the client quotes revisions and tree paths with ``safe=""`` so a ``/``
    inside them arrives as ``%2F`` and must not split the path.
    """

    method: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, None, f"Invalid JSON body: {err}") from err


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(payload).encode()
    all_headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
    return Response(status=status, headers=all_headers, body=body)


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, X-Error-* headers, JSON body)."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def to_response(self) -> Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _json_response({"error": self.message, **self.extra}, self.status, headers)


def _repo_not_found(authenticated: bool) -> HubError:
    """Missing and invisible repos look the same: 401 anonymous, 404 authenticated."""
    status = 404 if authenticated else 401
    return HubError(status, "RepoNotFound", "Repository not found")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


def _entry_not_found(commit: Commit | None, message: str = "Entry not found") -> HubError:
    """EntryNotFound carries X-Repo-Commit so the client can cache the file's absence."""
    headers = {"X-Repo-Commit": commit.oid} if commit is not None else {}
    return HubError(404, "EntryNotFound", message, headers=headers)


def _parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=`` range into inclusive (start, end); None means whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].strip().partition("-")
    if first == "":
        if not last.isdigit() or int(last) == 0:
            raise _range_not_satisfiable(total)
        return max(total - int(last), 0), total - 1
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = min(int(last), total - 1) if last else total - 1
    if start >= total or start > end:
        raise _range_not_satisfiable(total)
    return start, end


def _range_not_satisfiable(total: int) -> HubError:
    return HubError(
        416, None, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{total}"}
    )


# --------------------------------------------------------------------------- the Hub itself


class HubState:
    """All repositories plus the request router; every request runs under one lock.

    Why one lock: tests need determinism, not throughput, and the client issues concurrent
    requests (uploads, snapshot downloads) from thread pools.
    """

    def __init__(self, endpoint_getter: Callable[[], str], initial_gitattributes: bool) -> None:
        self._endpoint = endpoint_getter
        self._initial_gitattributes = initial_gitattributes
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, TokenInfo] = {
            WRITE_TOKEN: TokenInfo(USER, write=True),
            READ_TOKEN: TokenInfo(USER, write=False),
            OTHER_TOKEN: TokenInfo(OTHER_USER, write=True),
        }
        self.requests: list[RequestRecord] = []
        self.failures: list[_Failure] = []
        self.errors: list[Exception] = []
        self.tree_page_size = 1000
        self._commit_counter = 0

    # ---------------------------------------------------------------- storage operations

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        """Create a repo with the Hub's initial commit (a ``.gitattributes`` file)."""
        repo = Repo(repo_id=repo_id, private=private, created_at=_now())
        self.repos[repo_id] = repo
        initial = {".gitattributes": _DEFAULT_GITATTRIBUTES} if self._initial_gitattributes else {}
        self.commit(repo, DEFAULT_BRANCH, initial, (), "initial commit", create_branch=True)
        return repo

    def commit(
        self,
        repo: Repo,
        branch: str,
        additions: Mapping[str, bytes],
        deletions: Iterable[str],
        title: str,
        description: str = "",
        *,
        create_branch: bool = False,
    ) -> Commit:
        """Apply deletions then additions on top of ``branch`` and move the branch.

        Deletions first, because ``upload_folder`` sends ``delete_patterns`` before additions.
        """
        parent = self._branch_head(repo, branch, allow_missing=create_branch)
        files = dict(parent.files) if parent is not None else {}
        for path in deletions:
            self._delete_path(files, path, parent)
        for path, data in additions.items():
            files[path] = FileEntry.from_bytes(data)
        commit = self._new_commit(parent, title, description, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _branch_head(self, repo: Repo, branch: str, allow_missing: bool) -> Commit | None:
        if branch in repo.branches:
            return repo.commits[repo.branches[branch]]
        if allow_missing:
            return None
        raise _revision_not_found(branch)

    @staticmethod
    def _delete_path(files: dict[str, FileEntry], path: str, parent: Commit | None) -> None:
        """Delete a file, or a folder when ``path`` ends with ``/`` (client convention)."""
        if not path.endswith("/"):
            if files.pop(path, None) is None:
                raise _entry_not_found(parent, "A file with this name doesn't exist")
            return
        doomed = [name for name in files if name.startswith(path)]
        if not doomed:
            raise _entry_not_found(parent, "A folder with this name doesn't exist")
        for name in doomed:
            del files[name]

    def _new_commit(
        self, parent: Commit | None, title: str, description: str, files: dict[str, FileEntry]
    ) -> Commit:
        """Commit ids are sha1 of parent, counter and content: unique and deterministic."""
        self._commit_counter += 1
        digest = hashlib.sha1()
        digest.update(f"{parent.oid if parent else ''}\n{self._commit_counter}\n{title}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\n".encode())
        return Commit(
            oid=digest.hexdigest(),
            parent=parent.oid if parent else None,
            title=title,
            description=description,
            date=_now(),
            files=files,
        )

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """Branch name or full commit hash -> commit, else RevisionNotFound."""
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if _COMMIT_HASH.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise _revision_not_found(revision)

    def tamper(
        self, repo_id: str, path: str, new_bytes: bytes, revision: str, keep_head_length: bool
    ) -> None:
        """Swap served bytes in one snapshot, keeping the advertised git metadata."""
        repo = self._repo_or_key_error(repo_id)
        commit = self.resolve(repo, revision)
        entry = commit.files[path]
        head_length = entry.head_length if keep_head_length else len(new_bytes)
        files = dict(commit.files)
        files[path] = replace(entry, data=bytes(new_bytes), head_length=head_length)
        repo.commits[commit.oid] = replace(commit, files=files)

    def _repo_or_key_error(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise KeyError(f"no such repo on the test hub: {repo_id}")
        return self.repos[repo_id]

    # ---------------------------------------------------------------- request entry point

    def handle(self, request: Request) -> Response:
        with self.lock:
            self._record(request)
            try:
                self._inject_failure(request)
                return self._route(request)
            except HubError as err:
                return err.to_response()
            except Exception as err:  # a bug in this fake: surface it, never hang the client
                self.errors.append(err)
                return HubError(500, None, f"test hub bug: {err!r}").to_response()

    def _record(self, request: Request) -> None:
        self.requests.append(
            RequestRecord(
                method=request.method,
                path=request.path,
                query=request.query,
                token=self._bearer(request),
                range=request.headers.get("range"),
            )
        )

    def _inject_failure(self, request: Request) -> None:
        for failure in self.failures:
            if failure.matches(request.method, request.path):
                failure.remaining -= 1
                raise HubError(failure.status, failure.error_code, failure.message)

    def _route(self, request: Request) -> Response:
        segments = request.segments
        if segments[:1] == ["api"]:
            return self._route_api(request, segments[1:])
        if "resolve" in segments:
            return self._route_resolve(request)
        raise HubError(404, None, "Not Found")

    def _route_api(self, request: Request, rest: list[str]) -> Response:
        simple: dict[tuple[str, tuple[str, ...]], Callable[[Request], Response]] = {
            ("GET", ("whoami-v2",)): self._whoami,
            ("POST", ("repos", "create")): self._create_repo_api,
            ("DELETE", ("repos", "delete")): self._delete_repo_api,
            ("POST", ("validate-yaml",)): lambda _req: _json_response(
                {"errors": [], "warnings": []}
            ),
        }
        handler = simple.get((request.method, tuple(rest)))
        if handler is not None:
            return handler(request)
        if rest[:1] == ["models"] and len(rest) >= 2:
            return self._route_model(request, rest[1:])
        if rest[:1] and rest[0] in _OTHER_REPO_TYPES:
            raise _repo_not_found(self._caller(request) is not None)
        raise HubError(404, None, "Not Found")

    def _route_model(self, request: Request, rest: list[str]) -> Response:
        repo_id, action, args = _split_repo_path(rest)
        routes: dict[tuple[str, str | None], Callable[[Request, str, list[str]], Response]] = {
            ("GET", None): self._model_info,
            ("GET", "revision"): self._model_info,
            ("GET", "tree"): self._tree,
            ("POST", "preupload"): self._preupload,
            ("POST", "commit"): self._commit_api,
            ("POST", "branch"): self._create_branch,
        }
        handler = routes.get((request.method, action))
        if handler is None:
            raise HubError(404, None, f"Not Found: {request.method} {request.path}")
        return handler(request, repo_id, args)

    # ---------------------------------------------------------------- auth

    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else header

    def _caller(self, request: Request) -> TokenInfo | None:
        """Anonymous -> None; a token the Hub does not know -> 401 (like the real Hub)."""
        token = self._bearer(request)
        if token is None:
            return None
        if token not in self.tokens:
            raise HubError(401, None, INVALID_CREDENTIALS)
        return self.tokens[token]

    def _readable_repo(self, request: Request, repo_id: str) -> tuple[Repo, TokenInfo | None]:
        caller = self._caller(request)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not (caller and caller.owns(repo.namespace))):
            raise _repo_not_found(caller is not None)
        return repo, caller

    def _writable_repo(self, request: Request, repo_id: str) -> Repo:
        repo, caller = self._readable_repo(request, repo_id)
        _require_write(caller, repo.namespace, f"You don't have the rights to write to {repo_id}")
        return repo

    def _check_gate(self, repo: Repo, caller: TokenInfo | None) -> None:
        """Gated repos: metadata is public, file downloads need an approved user."""
        if not repo.gated or (
            caller and (caller.owns(repo.namespace) or caller.user in repo.gate_allowed)
        ):
            return
        if caller is None:
            message = f"Access to model {repo.repo_id} is restricted. You must have access to it "
            raise HubError(401, "GatedRepo", message + "and be authenticated to access it.")
        message = (
            f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
        )
        raise HubError(403, "GatedRepo", message)

    # ---------------------------------------------------------------- account / repo endpoints

    def _whoami(self, request: Request) -> Response:
        caller = self._caller(request)
        if caller is None:
            raise HubError(401, None, "Invalid username or password.")
        role = "write" if caller.write else "read"
        return _json_response(
            {
                "type": "user",
                "name": caller.user,
                "fullname": caller.user,
                "orgs": [{"type": "org", "name": org} for org in caller.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": role},
                },
            }
        )

    def _create_repo_api(self, request: Request) -> Response:
        payload = request.json()
        caller = self._caller(request)
        if caller is None:
            raise HubError(401, None, "Invalid username or password.")
        if payload.get("type", "model") != "model":
            raise HubError(400, None, "This test hub only hosts model repositories")
        namespace = payload.get("organization") or caller.user
        if not payload.get("name"):
            raise HubError(400, None, "Missing repository name")
        repo_id = f"{namespace}/{payload['name']}"
        _require_write(
            caller, namespace, f"You don't have the rights to create a model under {namespace}"
        )
        url = f"{self._endpoint()}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, None, "You already created this model repo", extra={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.create_repo(repo_id, private=private)
        return _json_response({"url": url, "name": repo_id, "id": _object_id(repo_id)})

    def _delete_repo_api(self, request: Request) -> Response:
        payload = request.json()
        caller = self._caller(request)
        namespace = payload.get("organization") or (caller.user if caller else None)
        name = str(payload.get("name"))
        repo_id = f"{namespace}/{name}" if namespace else name
        self._writable_repo(request, repo_id)
        del self.repos[repo_id]
        return _json_response({})

    def _model_info(self, request: Request, repo_id: str, args: list[str]) -> Response:
        repo, _caller = self._readable_repo(request, repo_id)
        commit = self.resolve(repo, args[0] if args else DEFAULT_BRANCH)
        info = _model_info_payload(repo, commit, with_blobs=_is_true(request.param("blobs")))
        expand = request.query.get("expand")
        if expand:
            info = {key: value for key, value in info.items() if key in {"_id", "id", *expand}}
        return _json_response(info)

    def _create_branch(self, request: Request, repo_id: str, args: list[str]) -> Response:
        repo = self._writable_repo(request, repo_id)
        if not args:
            raise HubError(400, None, "Missing branch name")
        branch = args[0]
        if branch in repo.branches:
            raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
        starting_point = request.json().get("startingPoint") or DEFAULT_BRANCH
        repo.branches[branch] = self.resolve(repo, starting_point).oid
        return _json_response({})

    # ---------------------------------------------------------------- tree listing

    def _tree(self, request: Request, repo_id: str, args: list[str]) -> Response:
        repo, _caller = self._readable_repo(request, repo_id)
        if not args:
            raise _revision_not_found("")
        commit = self.resolve(repo, args[0])
        base = "/".join(args[1:]).strip("/")
        entries = _tree_entries(commit, base, recursive=_is_true(request.param("recursive")))
        cursor = int(request.param("cursor") or 0)
        page = entries[cursor : cursor + self.tree_page_size]
        headers = {}
        if cursor + self.tree_page_size < len(entries):
            headers["Link"] = f'<{self._next_page_url(request, cursor)}>; rel="next"'
        return _json_response(page, headers=headers)

    def _next_page_url(self, request: Request, cursor: int) -> str:
        query = {key: values[0] for key, values in request.query.items() if key != "cursor"}
        query["cursor"] = str(cursor + self.tree_page_size)
        return f"{self._endpoint()}{request.path}?{urlencode(query)}"

    # ---------------------------------------------------------------- upload

    def _preupload(self, request: Request, repo_id: str, args: list[str]) -> Response:
        repo = self._writable_repo(request, repo_id)
        _reject_pull_requests(request)
        commit = self.resolve(repo, args[0] if args else DEFAULT_BRANCH)
        files = []
        for item in request.json().get("files", []):
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing else None,
                }
            )
        return _json_response({"files": files, "commitOid": commit.oid})

    def _commit_api(self, request: Request, repo_id: str, args: list[str]) -> Response:
        repo = self._writable_repo(request, repo_id)
        _reject_pull_requests(request)
        branch = args[0] if args else DEFAULT_BRANCH
        if branch not in repo.branches:
            raise _revision_not_found(branch)
        header, additions, deletions = _parse_commit_payload(request.body)
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != repo.branches[branch]:
            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
        title = header.get("summary") or "Commit"
        commit = self.commit(
            repo, branch, additions, deletions, title, header.get("description", "")
        )
        return _json_response(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._endpoint()}/{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    # ---------------------------------------------------------------- download

    def _route_resolve(self, request: Request) -> Response:
        segments = request.segments
        index = segments.index("resolve")
        if segments[0] in _OTHER_REPO_TYPES:
            raise _repo_not_found(self._caller(request) is not None)
        if index not in (1, 2) or len(segments) < index + 3:
            raise HubError(404, None, "Not Found")
        if request.method not in ("GET", "HEAD"):
            raise HubError(405, None, "Method Not Allowed")
        repo_id = "/".join(segments[:index])
        revision, path = segments[index + 1], "/".join(segments[index + 2 :])
        repo, caller = self._readable_repo(request, repo_id)
        commit = self.resolve(repo, revision)
        self._check_gate(repo, caller)
        entry = commit.files.get(path)
        if entry is None:
            raise _entry_not_found(commit)
        return _file_response(request, commit, path, entry)


def _require_write(caller: TokenInfo | None, namespace: str | None, message: str) -> None:
    """401 when anonymous, 403 when the token may not write into ``namespace``."""
    if caller is None:
        raise HubError(401, None, "Invalid username or password.")
    if not (caller.write and caller.owns(namespace)):
        raise HubError(403, None, message)


def _reject_pull_requests(request: Request) -> None:
    if _is_true(request.param("create_pr")):
        raise HubError(400, None, "Pull requests are not supported by this test hub")


def _split_repo_path(rest: list[str]) -> tuple[str, str | None, list[str]]:
    """Split ``ns/name/action/args...`` or ``name/action/args...`` (repo ids are unquoted)."""
    if len(rest) >= 3 and rest[2] in _REPO_ACTIONS:
        return f"{rest[0]}/{rest[1]}", rest[2], rest[3:]
    if len(rest) >= 2 and rest[1] in _REPO_ACTIONS:
        return rest[0], rest[1], rest[2:]
    if len(rest) <= 2:
        return "/".join(rest), None, []
    raise HubError(404, None, "Not Found")


def _object_id(repo_id: str) -> str:
    """A stable 24-hex id, like the Hub's MongoDB ``_id``."""
    return hashlib.sha1(repo_id.encode()).hexdigest()[:24]


def _model_info_payload(repo: Repo, commit: Commit, with_blobs: bool) -> dict[str, Any]:
    """Same keys as GET /api/models/{repo}; sizes/blob ids only with ``blobs=true``."""
    siblings: list[dict[str, Any]] = []
    for path in sorted(commit.files):
        sibling: dict[str, Any] = {"rfilename": path}
        if with_blobs:
            sibling.update(blobId=commit.files[path].oid, size=commit.files[path].size)
        siblings.append(sibling)
    return {
        "_id": _object_id(repo.repo_id),
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.namespace,
        "sha": commit.oid,
        "lastModified": _iso(commit.date),
        "createdAt": _iso(repo.created_at),
        "private": repo.private,
        "gated": repo.gated,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "spaces": [],
        "usedStorage": sum(entry.size for entry in commit.files.values()),
    }


def _tree_entries(commit: Commit, base: str, recursive: bool) -> list[dict[str, Any]]:
    """Files and folders under ``base`` (direct children unless ``recursive``)."""
    prefix = f"{base}/" if base else ""
    under = {path: entry for path, entry in commit.files.items() if path.startswith(prefix)}
    if base and not under:
        raise _entry_not_found(commit, f"{base} does not exist on this revision")
    folders: dict[str, list[str]] = {}
    files: list[dict[str, Any]] = []
    for path, entry in under.items():
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                folders.setdefault(folder, []).append(f"{path}:{entry.oid}")
        if recursive or len(parts) == 1:
            files.append({"type": "file", "oid": entry.oid, "size": entry.size, "path": path})
    dirs = [_folder_entry(path, members) for path, members in folders.items()]
    return sorted(dirs + files, key=lambda item: item["path"])


def _folder_entry(path: str, members: list[str]) -> dict[str, Any]:
    """A tree entry for a folder; its oid is derived from its content, like a git tree id."""
    oid = hashlib.sha1("\n".join(sorted(members)).encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def _parse_commit_payload(body: bytes) -> tuple[dict[str, Any], dict[str, bytes], list[str]]:
    """Split the NDJSON commit body into (header, additions, deletions)."""
    header: dict[str, Any] = {}
    additions: dict[str, bytes] = {}
    deletions: list[str] = []
    for raw_line in body.splitlines():
        if not raw_line.strip():
            continue
        item = json.loads(raw_line)
        key, value = item.get("key"), item.get("value", {})
        if key == "header":
            header = value
        elif key == "file":
            additions[value["path"]] = _decode_file_content(value)
        elif key in ("deletedFile", "deletedFolder"):
            path = value["path"].rstrip("/")
            deletions.append(path + "/" if key == "deletedFolder" else path)
        else:
            raise HubError(400, None, f"Unsupported commit operation on this test hub: {key}")
    return header, additions, deletions


def _decode_file_content(value: Mapping[str, Any]) -> bytes:
    if value.get("encoding", "base64") == "base64":
        return base64.b64decode(value["content"])
    return str(value["content"]).encode()


def _file_response(request: Request, commit: Commit, path: str, entry: FileEntry) -> Response:
    """HEAD/GET on /resolve: git ETag, X-Repo-Commit, Content-Length, optional 206 range."""
    name = quote(path.rsplit("/", 1)[-1])
    headers = {
        "Content-Type": "application/octet-stream",
        "ETag": f'"{entry.oid}"',
        "X-Repo-Commit": commit.oid,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\";",
    }
    if request.method == "HEAD":
        headers["Content-Length"] = str(entry.head_length)
        return Response(200, headers, b"")
    data = entry.data
    byte_range = _parse_range(request.headers.get("range"), len(data))
    if byte_range is None:
        return Response(200, headers, data)
    start, end = byte_range
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return Response(206, headers, data[start : end + 1])


# --------------------------------------------------------------------------- HTTP server


class _Handler(BaseHTTPRequestHandler):
    """Turns raw HTTP into ``Request`` objects and ``Response`` objects back into bytes."""

    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging: tests assert on ``HubServer.requests`` instead."""

    def _handle(self) -> None:
        request = self._parse_request()
        response = self.server.state.handle(request)
        self._write(response)

    def _parse_request(self) -> Request:
        split = urlsplit(self.path)
        raw_segments = [segment for segment in split.path.split("/") if segment]
        return Request(
            method=self.command,
            path=split.path,
            segments=[unquote(segment) for segment in raw_segments],
            query=parse_qs(split.query, keep_blank_values=True),
            headers={key.lower(): value for key, value in self.headers.items()},
            body=self._read_body(),
        )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _write(self, response: Response) -> None:
        """One request per connection: no pooled sockets outlive a stopped server."""
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        for key, value in headers.items():
            # http.server encodes headers as latin-1: keep odd file names from crashing it.
            self.send_header(key, value.encode("ascii", "backslashreplace").decode())
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


# --------------------------------------------------------------------------- public facade


class HubServer:
    """A fake Hub on 127.0.0.1:<random port>; use as a context manager or start()/stop().

    Test helpers seed repos directly (``create_repo``, ``commit``), corrupt storage
    (``tamper``), inject failures (``fail_next``) and expose the request log (``requests``).
    """

    def __init__(self, *, initial_gitattributes: bool = True) -> None:
        self.state = HubState(lambda: self.endpoint, initial_gitattributes)
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> HubServer:
        if self._httpd is None:
            self._httpd = _HubHTTPServer(self.state)
            # A short poll interval keeps stop() fast (serve_forever polls for shutdown).
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.02},
                name="test-hub-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = None
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash, like ``constants.ENDPOINT``)."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ---------------------------------------------------------------- test helpers

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far (a copy)."""
        with self.state.lock:
            return list(self.state.requests)

    @property
    def errors(self) -> list[Exception]:
        """Unexpected exceptions raised by the fake itself (should stay empty)."""
        with self.state.lock:
            return list(self.state.errors)

    def clear_requests(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def add_token(
        self, token: str, user: str, *, write: bool = True, orgs: Iterable[str] = ()
    ) -> None:
        with self.state.lock:
            self.state.tokens[token] = TokenInfo(user=user, write=write, orgs=tuple(orgs))

    def create_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        files: Mapping[str, bytes] | None = None,
    ) -> str:
        """Create a repo server-side (no HTTP) and return the head commit of ``main``."""
        with self.state.lock:
            if repo_id in self.state.repos:
                raise ValueError(f"repo already exists: {repo_id}")
            repo = self.state.create_repo(repo_id, private=private)
            if files:
                return self.commit(repo_id, files)
            return repo.branches[DEFAULT_BRANCH]

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        *,
        delete: Iterable[str] = (),
        branch: str = DEFAULT_BRANCH,
        message: str = "test commit",
    ) -> str:
        """Commit server-side (no HTTP); returns the new commit hash."""
        with self.state.lock:
            repo = self.state._repo_or_key_error(repo_id)
            create = branch not in repo.branches
            commit = self.state.commit(
                repo, branch, files or {}, delete, message, create_branch=create
            )
            return commit.oid

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH) -> str:
        with self.state.lock:
            return self.state._repo_or_key_error(repo_id).branches[branch]

    def file_bytes(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> bytes:
        """The bytes the server would serve for ``path`` at ``revision``."""
        with self.state.lock:
            repo = self.state._repo_or_key_error(repo_id)
            return self.state.resolve(repo, revision).files[path].data

    def set_private(self, repo_id: str, private: bool = True) -> None:
        with self.state.lock:
            self.state._repo_or_key_error(repo_id).private = private

    def set_gated(
        self, repo_id: str, mode: str | bool = "manual", allowed: Iterable[str] = ()
    ) -> None:
        """Gate file downloads; owners and ``allowed`` users pass, others get GatedRepo."""
        with self.state.lock:
            repo = self.state._repo_or_key_error(repo_id)
            repo.gated = mode
            repo.gate_allowed = set(allowed)

    def tamper(
        self,
        repo_id: str,
        path: str,
        new_bytes: bytes,
        *,
        revision: str = DEFAULT_BRANCH,
        keep_head_length: bool = False,
    ) -> None:
        """Corrupt storage: serve ``new_bytes`` for ``path`` with the *old* ETag / sha metadata.

        Affects the snapshot ``revision`` resolves to (and commits made on top of it later).
        By default HEAD announces ``len(new_bytes)`` so the client accepts the bytes silently;
        with ``keep_head_length=True`` HEAD keeps the original size, and the client's size
        check fails when the lengths differ.
        """
        with self.state.lock:
            self.state.tamper(repo_id, path, new_bytes, revision, keep_head_length)

    def fail_next(
        self,
        status: int = 500,
        *,
        count: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        error_code: str | None = None,
        message: str = "Injected failure",
    ) -> None:
        """Answer the next ``count`` matching requests with ``status``.

        Note: the client retries 5xx/429 with backoff on some calls (preupload, tree listing,
        download retries) but not on ``model_info`` or the first HEAD of ``hf_hub_download``.
        """
        with self.state.lock:
            self.state.failures.append(
                _Failure(status, count, method, path_contains, error_code, message)
            )

    def set_tree_page_size(self, size: int) -> None:
        """Shrink tree pages to exercise the client's ``Link: rel="next"`` pagination."""
        with self.state.lock:
            self.state.tree_page_size = size
