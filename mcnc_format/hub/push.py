"""Publishing ``.mcnc`` files (or a folder) to a Hub repository in one commit, with a card.

Why one commit: the files and the card that describes them appear together or not at all.
Why check before upload: a damaged ``.mcnc`` file is refused here rather than found later by
every user who downloads it. Why ``parent_commit``: the card is merged from the branch head
read at the start; a push that landed in between would otherwise lose its card rows.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import HubError, MCNCError
from ..uri import HubURI, check_repo_path
from .error_map import hub_errors
from .integrity import check_mcnc_bytes

__all__ = ["CARD_NAME", "PushResult", "push", "repo_files"]

CARD_NAME = "README.md"


@dataclass(frozen=True)
class PushResult:
    """Where the files went: ``commit`` pins them (see ``uris``)."""

    repo_id: str
    revision: str
    commit: str
    paths: tuple[str, ...]

    @property
    def uris(self) -> tuple[str, ...]:
        """``hf://ORG/REPO@<commit>/PATH`` of each pushed file: immutable references."""
        return tuple(str(HubURI(self.repo_id, self.commit, path)) for path in self.paths)


def push(path: str | os.PathLike[str], repo_id: str, revision: str | None = None,
         private: bool = False, *, path_in_repo: str | None = None,
         commit_message: str | None = None, base_model: str | None = None,
         tags: Iterable[str] = (), model_card: bool = True, token: str | None = None,
         endpoint: str | None = None) -> PushResult:
    """Upload a file, or every non-hidden file under a folder, to ``repo_id``.

    The repo is created if missing (``private`` applies then), and the branch ``revision``
    too. Each ``.mcnc`` file is checksum-verified first. With ``model_card`` the README.md
    is written or merged (see ``model_card.render_card``); a README.md at the top of a pushed
    folder is the starting text instead of the one on the Hub.
    """
    # model_card imports this package: import it when used
    from ..model_card import CONFIG_FILE, FileFacts, TransformersUsage, render_card

    files = _files_to_push(Path(path), path_in_repo)
    for repo_path in files:
        check_repo_path(repo_path, HubError)
    local_card = files.pop(CARD_NAME) if model_card and CARD_NAME in files else None
    facts = [FileFacts.read(repo_path, check_mcnc_bytes(local))
             for repo_path, local in files.items() if repo_path.endswith(".mcnc")]
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(f"push to {repo_id}", repo_id, revision, endpoint):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.model_info(repo_id, revision=revision).sha
        operations = [CommitOperationAdd(repo_path, str(local))
                      for repo_path, local in files.items()]
        if model_card:
            existing = (local_card.read_text(encoding="utf-8") if local_card is not None
                        else _remote_card(api, repo_id, head or revision))
            remaining = set(api.list_repo_files(repo_id, revision=head or revision)) | set(files)
            card = render_card(existing, repo_id, facts, base_model=base_model, tags=tags,
                               keep_rows_for=remaining, revision=revision,
                               transformers=TransformersUsage.detect(
                                   remaining, files.get(CONFIG_FILE)))
            operations.append(CommitOperationAdd(CARD_NAME, card.encode("utf-8")))
        info = api.create_commit(repo_id, operations, revision=revision, parent_commit=head,
                                 commit_message=commit_message or _message(files))
    paths = (*files, CARD_NAME) if model_card else tuple(files)
    return PushResult(repo_id, revision or "main", info.oid, paths)


def repo_files(repo_id: str, revision: str | None = None, *, token: str | None = None,
               endpoint: str | None = None) -> set[str]:
    """The files a push of ``repo_id`` at ``revision`` lands beside: those of that branch, of
    ``main`` when the branch does not exist yet (``push`` creates it from there), none for a
    repository that does not exist yet."""
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(f"push to {repo_id}", repo_id, revision, endpoint):
        try:
            return set(api.list_repo_files(repo_id, revision=revision))
        except RevisionNotFoundError:
            return set(api.list_repo_files(repo_id))
        except RepositoryNotFoundError:
            return set()


def _files_to_push(source: Path, path_in_repo: str | None) -> dict[str, Path]:
    """``{path in repo: local file}``; hidden files and folders (``.git``...) are skipped."""
    prefix = (path_in_repo or "").strip("/")
    if source.is_file():
        return {prefix or source.name: source}
    if not source.is_dir():
        raise MCNCError(f"{source}: no such file or folder to push")
    files = {}
    for local in sorted(source.rglob("*")):
        relative = local.relative_to(source)
        if local.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[posixpath.join(prefix, relative.as_posix())] = local
    if not files:
        raise MCNCError(f"{source}: the folder holds no files to push (hidden ones are skipped)")
    return files


def _remote_card(api: HfApi, repo_id: str, revision: str | None) -> str | None:
    try:
        local = api.hf_hub_download(repo_id, CARD_NAME, revision=revision)
    except LocalEntryNotFoundError:
        raise  # not reachable: not the same as "no card yet"
    except EntryNotFoundError:
        return None
    return Path(local).read_text(encoding="utf-8")


def _message(files: dict[str, Path]) -> str:
    names = sorted(files)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"Upload {', '.join(names[:3])}{more} with mcnc-format"

