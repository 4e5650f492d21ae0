"""The fake Hub in ``hub_server`` speaks the protocol of the real ``huggingface_hub`` client.

Why: later hub tests of the library trust this server; these tests pin down, through the real
client over real HTTP, that uploads, metadata, downloads, revisions, errors, offline mode and
tampering behave like the Hub (as seen by huggingface_hub 2.4.0).
"""

from __future__ import annotations

from pathlib import Path

import hub_fixtures
import huggingface_hub
import pytest
from hub_server import (
    OTHER_TOKEN,
    READ_TOKEN,
    USER,
    WRITE_TOKEN,
    HubServer,
    git_blob_sha1,
)
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

# Make the fixture visible here without an import that parameters named ``hub`` would shadow.
hub = hub_fixtures.hub

REPO = f"{USER}/tiny"
PAYLOAD = bytes(range(256)) * 4


def _api(server: HubServer, token: str | bool | None = WRITE_TOKEN) -> HfApi:
    """Always pass ``endpoint=`` explicitly: the robust way, see hub_server's docstring."""
    return HfApi(endpoint=server.endpoint, token=token)


def _download(server: HubServer, filename: str, **kwargs: object) -> Path:
    kwargs.setdefault("repo_id", REPO)
    return Path(hf_hub_download(filename=filename, endpoint=server.endpoint, **kwargs))  # type: ignore[arg-type]


def _upload(server: HubServer, path: str, data: bytes, **kwargs: object) -> str:
    api = _api(server)
    return api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=REPO, **kwargs).oid


# --------------------------------------------------------------------------- repos & metadata


def test_create_repo_has_initial_commit_and_conflicts(hub: HubServer) -> None:
    api = _api(hub)
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    assert str(url) == f"{hub.endpoint}/{REPO}"

    info = api.model_info(REPO)
    assert info.sha == hub.head(REPO)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert info.private is False

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO)
    assert excinfo.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO


def test_create_repo_without_namespace_uses_token_user(hub: HubServer) -> None:
    assert _api(hub).create_repo("bare", private=True).repo_id == f"{USER}/bare"
    assert _api(hub).model_info(f"{USER}/bare").private is True


def test_upload_file_then_model_info_and_download(hub: HubServer) -> None:
    api = _api(hub)
    api.create_repo(REPO)
    commit_oid = _upload(hub, "weights/model.bin", PAYLOAD)

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == commit_oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "weights/model.bin"}
    assert siblings["weights/model.bin"].size == len(PAYLOAD)
    assert siblings["weights/model.bin"].blob_id == git_blob_sha1(PAYLOAD)
    # Without files_metadata the Hub (and this server) send names only.
    assert api.model_info(REPO).siblings[1].size is None

    local = _download(hub, "weights/model.bin")
    assert local.read_bytes() == PAYLOAD
    assert f"snapshots/{commit_oid}/weights/model.bin" in local.as_posix()
    assert local.resolve().name == git_blob_sha1(PAYLOAD)  # blob is named after the ETag


def test_upload_folder_and_tree_listing(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"a")
    (folder / "sub" / "b.txt").write_bytes(b"bb")
    (folder / "sub" / "deep" / "c.txt").write_bytes(b"ccc")
    api = _api(hub)
    api.create_repo(REPO)
    api.upload_folder(folder_path=folder, repo_id=REPO, path_in_repo="data")

    expected = {".gitattributes", "data/a.txt", "data/sub/b.txt", "data/sub/deep/c.txt"}
    assert set(api.list_repo_files(REPO)) == expected
    top = {entry.path for entry in api.list_repo_tree(REPO, path_in_repo="data")}
    assert top == {"data/a.txt", "data/sub"}
    hub.set_tree_page_size(2)  # force Link-header pagination through the client
    hub.clear_requests()
    assert set(api.list_repo_files(REPO)) == expected
    assert any("cursor" in record.query for record in hub.requests)
    assert _download(hub, "data/sub/deep/c.txt").read_bytes() == b"ccc"
    _upload(hub, "odd dir/naïve #1.bin", b"odd")  # URL quoting of unusual names
    assert _download(hub, "odd dir/naïve #1.bin").read_bytes() == b"odd"


def test_reupload_of_identical_bytes_is_skipped_by_client(hub: HubServer) -> None:
    """Preupload's ``oid`` is the git blob sha1 the client computes: no empty commit."""
    hub.create_repo(REPO)
    first = _upload(hub, "model.bin", PAYLOAD)
    hub.clear_requests()
    assert _upload(hub, "model.bin", PAYLOAD) == first
    assert not any(record.path.endswith("/commit/main") for record in hub.requests)


def test_create_commit_with_deletions_and_stale_parent(hub: HubServer) -> None:
    api = _api(hub)
    api.create_repo(REPO)
    first = _upload(hub, "a.bin", b"one")
    _upload(hub, "b.bin", b"two")
    ops = [CommitOperationDelete("a.bin"), CommitOperationAdd("c.bin", b"three")]
    api.create_commit(REPO, operations=ops, commit_message="swap")
    assert set(api.list_repo_files(REPO)) == {".gitattributes", "b.bin", "c.bin"}

    stale = [CommitOperationAdd("d.bin", b"four")]
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(REPO, operations=stale, commit_message="late", parent_commit=first)
    assert excinfo.value.response.status_code == 412


def test_snapshot_download_and_existence_checks(hub: HubServer) -> None:
    hub.create_repo(REPO, files={"x.bin": b"x", "dir/y.bin": b"yy"})
    folder = Path(snapshot_download(REPO, endpoint=hub.endpoint))
    assert (folder / "dir" / "y.bin").read_bytes() == b"yy"

    api = _api(hub)
    assert api.repo_exists(REPO) and not api.repo_exists(f"{USER}/nope")
    assert api.file_exists(REPO, "x.bin") and not api.file_exists(REPO, "nope.bin")
    assert api.revision_exists(REPO, hub.head(REPO))
    assert not api.revision_exists(REPO, "0" * 40)


# --------------------------------------------------------------------------- revisions


def test_revision_pinning_and_branch_moves(hub: HubServer) -> None:
    api = _api(hub)
    api.create_repo(REPO)
    first = _upload(hub, "model.bin", b"version one")
    second = _upload(hub, "model.bin", b"version two!")
    assert first != second

    assert _download(hub, "model.bin", revision=first).read_bytes() == b"version one"
    assert _download(hub, "model.bin").read_bytes() == b"version two!"
    assert api.model_info(REPO, revision=first).sha == first

    api.create_branch(REPO, branch="stable", revision=first)
    _upload(hub, "model.bin", b"version three", revision="stable")
    assert _download(hub, "model.bin", revision="stable").read_bytes() == b"version three"
    assert _download(hub, "model.bin", revision="main").read_bytes() == b"version two!"


def test_unknown_revision_raises_revision_not_found(hub: HubServer) -> None:
    hub.create_repo(REPO, files={"model.bin": b"m"})
    with pytest.raises(RevisionNotFoundError):
        _download(hub, "model.bin", revision="f" * 40)
    with pytest.raises(RevisionNotFoundError):
        _api(hub).model_info(REPO, revision="no-such-branch")


# --------------------------------------------------------------------------- errors & auth


def test_missing_repo_and_missing_file(hub: HubServer) -> None:
    with pytest.raises(RepositoryNotFoundError) as excinfo:
        _api(hub, token=False).model_info(f"{USER}/ghost")
    assert excinfo.value.response.status_code == 401  # anonymous: 401, like the Hub
    with pytest.raises(RepositoryNotFoundError) as excinfo:
        _api(hub).model_info(f"{USER}/ghost")
    assert excinfo.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, "model.bin", repo_id=f"{USER}/ghost")

    hub.create_repo(REPO, files={"model.bin": b"m"})
    with pytest.raises(RemoteEntryNotFoundError) as entry_error:
        _download(hub, "missing.bin")
    assert isinstance(entry_error.value, EntryNotFoundError)


def test_private_repo_needs_owner_token(hub: HubServer) -> None:
    hub.create_repo(REPO, private=True, files={"model.bin": b"secret"})

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        _download(hub, "model.bin")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as stranger:
        _download(hub, "model.bin", token=OTHER_TOKEN)
    assert stranger.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError) as invalid:
        _download(hub, "model.bin", token="hf_not_a_real_token")
    assert invalid.value.response.status_code == 401
    assert not isinstance(invalid.value, RepositoryNotFoundError)

    assert _download(hub, "model.bin", token=READ_TOKEN).read_bytes() == b"secret"


def test_write_permissions(hub: HubServer) -> None:
    hub.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as read_only:
        _api(hub, token=READ_TOKEN).upload_file(
            path_or_fileobj=b"x", path_in_repo="x.bin", repo_id=REPO
        )
    assert read_only.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as anonymous:
        _api(hub, token=False).create_repo(f"{USER}/other")
    assert anonymous.value.response.status_code == 401


def test_gated_repo_blocks_downloads_not_metadata(hub: HubServer) -> None:
    hub.create_repo(REPO, files={"model.bin": b"gated"})
    hub.set_gated(REPO, allowed=["bob"])
    assert _api(hub, token=False).model_info(REPO).gated == "manual"
    with pytest.raises(GatedRepoError):
        _download(hub, "model.bin")
    hub.add_token("hf_carol", user="carol")
    with pytest.raises(GatedRepoError) as not_allowed:
        _download(hub, "model.bin", token="hf_carol")
    assert not_allowed.value.response.status_code == 403
    assert _download(hub, "model.bin", token=OTHER_TOKEN).read_bytes() == b"gated"


def test_injected_failure(hub: HubServer) -> None:
    hub.create_repo(REPO)
    hub.fail_next(503, path_contains="/api/models/")
    with pytest.raises(HfHubHTTPError) as excinfo:
        _api(hub).model_info(REPO)
    assert excinfo.value.response.status_code == 503
    assert _api(hub).model_info(REPO).id == REPO


# --------------------------------------------------------------------------- offline & cache


def test_offline_mode_uses_cache_only(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.create_repo(REPO, files={"cached.bin": b"cached", "other.bin": b"other"})
    cached = _download(hub, "cached.bin")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.clear_requests()
    assert _download(hub, "cached.bin") == cached
    with pytest.raises(LocalEntryNotFoundError):
        _download(hub, "other.bin")
    assert hub.requests == []  # offline mode never touches the network


def test_cached_file_is_not_downloaded_again(hub: HubServer) -> None:
    hub.create_repo(REPO, files={"model.bin": PAYLOAD})
    _download(hub, "model.bin")
    hub.clear_requests()
    _download(hub, "model.bin")
    assert [r.method for r in hub.requests] == ["HEAD"]  # metadata re-checked, no GET
    commit = hub.head(REPO)
    hub.clear_requests()
    _download(hub, "model.bin", revision=commit)
    assert hub.requests == []  # pinned commit + cached pointer: no request at all


# --------------------------------------------------------------------------- tampering & ranges


def test_tampered_file_is_served_with_original_metadata(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo(REPO, files={"model.bin": PAYLOAD})
    corrupted = bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:]
    hub.tamper(REPO, "model.bin", corrupted)

    assert hub.file_bytes(REPO, "model.bin") == corrupted
    info = _api(hub).model_info(REPO, files_metadata=True)
    sibling = next(s for s in info.siblings if s.rfilename == "model.bin")
    assert sibling.blob_id == git_blob_sha1(PAYLOAD)  # metadata still claims the original

    # The client does NOT verify content against the ETag: corruption goes through silently.
    local = _download(hub, "model.bin")
    assert local.read_bytes() == corrupted
    assert local.resolve().name == git_blob_sha1(PAYLOAD)
    # ...but the advertised tree metadata still exposes it (what a verifier can rely on).
    report = _api(hub).verify_repo_checksums(REPO, cache_dir=constants.HF_HUB_CACHE)
    assert [m["path"] for m in report.mismatches] == ["model.bin"]

    # With the original size still advertised, a length change trips the client's size check.
    hub.tamper(REPO, "model.bin", PAYLOAD[:-1], keep_head_length=True)
    with pytest.raises(OSError, match="Consistency check failed"):
        _download(hub, "model.bin", cache_dir=tmp_path / "fresh_cache")


def test_range_requests(hub: HubServer) -> None:
    hub.create_repo(REPO, files={"model.bin": PAYLOAD})
    url = huggingface_hub.hf_hub_url(REPO, "model.bin", endpoint=hub.endpoint)
    partial = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206
    assert partial.content == PAYLOAD[10:20]
    assert partial.headers["Content-Range"] == f"bytes 10-19/{len(PAYLOAD)}"
    suffix = get_session().get(url, headers={"Range": "bytes=-5"})
    assert suffix.content == PAYLOAD[-5:]
    head = get_session().head(url)
    assert head.headers["ETag"] == f'"{git_blob_sha1(PAYLOAD)}"'
    assert head.headers["X-Repo-Commit"] == hub.head(REPO)
    assert not any(key.lower().startswith("x-xet") for key in head.headers)


def test_context_manager_and_isolation(hub: HubServer) -> None:
    """A second server is independent; the fixture's cache lives under a temp dir."""
    assert "hf_home" in constants.HF_HUB_CACHE
    assert huggingface_hub.get_token() is None  # no real token leaks into tests
    with HubServer() as other:
        other.create_repo(REPO, files={"model.bin": b"elsewhere"})
        path = _download(other, "model.bin", cache_dir=Path(constants.HF_HOME) / "other")
        assert path.read_bytes() == b"elsewhere"
    with pytest.raises(RuntimeError):
        _ = other.endpoint
