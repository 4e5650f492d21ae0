"""Hub integration through the real ``huggingface_hub`` client and the local test Hub.

What is pinned down: push/pull round trips byte for byte, ``hf://`` paths load like local
files, base-model references are pinned and hash-checked, damaged downloads (on the server
or in the cache) are fetched again once and never used when still wrong, offline mode, the
errors a user sees, the model card, and the ``push``/``pull`` commands.
"""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hub_server import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN, HubServer
from huggingface_hub import HfApi, constants
from safetensors.torch import save as safetensors_bytes

import mcnc_format
from mcnc_format import hub as mhub
from mcnc_format.cli.hub_cmd import pull_command, push_command
from mcnc_format.errors import (
    ChecksumError,
    ExternalReferenceDamaged,
    ExternalReferenceError,
    FormatError,
    HubError,
    HubFileNotFoundError,
    HubOfflineError,
    HubPermissionError,
    UnsupportedVersionError,
    WriteError,
)
from mcnc_format.model_card import (
    SAVE_PRETRAINED_WRITER,
    SECTION_BEGIN,
    SECTION_END,
    SECTION_MARK,
    FileFacts,
    render_card,
    section_begin,
)
from mcnc_format.reader import tensor_sha256

REPO = "alice/model"
BASE_REPO = "alice/base"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def seed() -> int:
    value = random.SystemRandom().randrange(2**31)
    print(f"test_hub seed: {value}")
    return value


def _segment(gen: torch.Generator, k: int = 4, d: int = 16, chunks: int = 4,
             ) -> mcnc_format.Segment:
    spec = mcnc_format.GeneratorSpec(k=k, d=d, hidden=(8, 8),
                                     seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    alpha = torch.randn(chunks, 1, k, generator=gen)
    beta = torch.randn(chunks, 1, generator=gen)
    return mcnc_format.Segment(spec, alpha, beta)


def _make_mcnc(path: Path, seed: int, theta0: mcnc_format.Theta0 | None = None,
               info: dict[str, str] | None = None) -> Path:
    """A small file: one mcnc tensor (8x8, given theta0) and one bias (packed, §6.4)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "layer.weight": mcnc_format.MCNC(_segment(gen), (8, 8),
                                         theta0=theta0 or mcnc_format.Theta0.zeros()),
        "layer.bias": torch.randn(8, generator=gen),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return mcnc_format.save(path, tensors, info=info)


def _base_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return {"layer.weight": torch.randn(8, 8, generator=gen),
            "other": torch.randn(3, generator=gen)}


def _gets(server: HubServer, path: str) -> int:
    """How many times the bytes of ``path`` were downloaded."""
    return sum(1 for r in server.requests if r.method == "GET" and r.path.endswith("/" + path)
               and "/resolve/" in r.path)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _flip_byte(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x5A
    return bytes(out)


def _go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# --------------------------------------------------------------------------- URIs


def test_parse_uri_forms_and_errors() -> None:
    assert mhub.parse_uri("hf://org/repo@main/dir/model.mcnc") == mhub.HubURI(
        "org/repo", "main", "dir/model.mcnc")
    assert mhub.parse_uri("org/repo/model.mcnc").revision is None
    encoded = mhub.parse_uri("hf://org/repo@refs%2Fpr%2F3/a.mcnc")
    assert encoded.revision == "refs/pr/3"
    assert str(encoded) == "hf://org/repo@refs%2Fpr%2F3/a.mcnc"
    assert mhub.parse_uri("hf://org/repo@" + "ab" * 20 + "/a.safetensors").pinned
    assert mhub.parse_uri("hf://org/repo", require_path=False).path == ""
    for bad in ("hf://repo", "hf://org/repo@/a", "hf://org/repo/../a", "hf://org/repo",
                "hf://org/repo/a//b", "hf://o r/repo/a"):
        with pytest.raises(ValueError, match="not a Hub reference"):
            mhub.parse_uri(bad)
        with pytest.raises(HubError, match="not a Hub reference"):
            mhub.parse_uri(bad, error=HubError)


def test_unpinned_hub_reference_is_refused(tmp_path: Path, seed: int) -> None:
    """R74 uses the same parser: a branch is not enough for a theta0 reference."""
    theta0 = mcnc_format.Theta0.external("hf://org/base@main/model.safetensors",
                                         "layer.weight", "0" * 64)
    with pytest.raises(WriteError, match="R74"):
        _make_mcnc(tmp_path / "branch.mcnc", seed, theta0)


# --------------------------------------------------------------------------- push / pull / load


def test_push_then_pull_and_load_give_identical_bytes_and_weights(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    result = mhub.push(local, REPO, token=WRITE_TOKEN, endpoint=hub.endpoint)
    assert result.commit == hub.head(REPO)
    assert result.paths == ("model.mcnc", "README.md")
    assert result.uris[0] == f"hf://{REPO}@{result.commit}/model.mcnc"
    assert hub.file_bytes(REPO, "model.mcnc") == local.read_bytes()

    pulled = mhub.pull(REPO, "model.mcnc", endpoint=hub.endpoint)
    assert pulled.read_bytes() == local.read_bytes()
    expected = mcnc_format.load(local)
    _assert_same(mcnc_format.load(f"hf://{REPO}/model.mcnc"), expected)
    _assert_same(mcnc_format.load(result.uris[0]), expected)
    with mcnc_format.open(f"hf://{REPO}@main/model.mcnc") as f:
        assert f.label == f"hf://{REPO}@main/model.mcnc"
        assert f.keys() == ["layer.weight", "layer.bias"]

    module = torch.nn.Linear(8, 8)
    state = {"weight": expected["layer.weight"], "bias": expected["layer.bias"]}
    renamed = tmp_path / "linear.mcnc"
    mcnc_format.save(renamed, state)
    mhub.push(renamed, REPO, token=WRITE_TOKEN)
    mcnc_format.load_into(module, f"hf://{REPO}/linear.mcnc")
    assert torch.equal(module.weight.detach(), expected["layer.weight"])

    into = mhub.pull(REPO, "model.mcnc", local_dir=tmp_path / "copy")
    assert into == tmp_path / "copy" / "model.mcnc"
    assert into.read_bytes() == local.read_bytes()


def test_push_to_a_new_branch_leaves_main_alone(hub: HubServer, tmp_path: Path,
                                                seed: int) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    main_before = hub.create_repo(REPO)
    result = mhub.push(local, REPO, revision="dev", token=WRITE_TOKEN, model_card=False)
    assert result.paths == ("model.mcnc",)
    assert (result.revision, result.commit) == ("dev", hub.head(REPO, "dev"))
    assert hub.head(REPO) == main_before
    assert mhub.pull(REPO, "model.mcnc", revision="dev").read_bytes() == local.read_bytes()
    with pytest.raises(HubFileNotFoundError, match="no such file"):
        mhub.pull(REPO, "model.mcnc")


def test_push_folder_with_relative_base_and_card_from_folder(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    folder = tmp_path / "release"
    base = _base_tensors(seed)
    folder.mkdir()
    (folder / "base.safetensors").write_bytes(safetensors_bytes(base))
    theta0 = mcnc_format.Theta0.external("base.safetensors", "layer.weight",
                                         tensor_sha256(base["layer.weight"]))
    _make_mcnc(folder / "model.mcnc", seed, theta0)
    _make_mcnc(folder / "adapters" / "a.mcnc", seed + 7)
    (folder / "config.json").write_text('{"hidden": 8}')
    (folder / ".secret").write_text("not for upload")
    (folder / "README.md").write_text("# Release\n\nHand-written notes.\n")

    result = mhub.push(folder, REPO, token=WRITE_TOKEN, private=True)
    files = set(HfApi(token=WRITE_TOKEN).list_repo_files(REPO))
    assert files == {".gitattributes", "README.md", "base.safetensors", "config.json",
                     "model.mcnc", "adapters/a.mcnc"}
    assert set(result.paths) == files - {".gitattributes"}
    card = hub.file_bytes(REPO, "README.md").decode()
    assert "Hand-written notes." in card
    assert "| `adapters/a.mcnc` |" in card and "| `model.mcnc` |" in card

    snapshot = mhub.pull(REPO, token=WRITE_TOKEN)
    for name in ("base.safetensors", "config.json", "model.mcnc", "adapters/a.mcnc"):
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes(), name
    # A relative reference in a file from the Hub is fetched from the same repo & revision.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", READ_TOKEN)
        shutil.rmtree(constants.HF_HUB_CACHE)
        _assert_same(mcnc_format.load(f"hf://{REPO}/model.mcnc"),
                     mcnc_format.load(folder / "model.mcnc"))


def test_a_relative_base_comes_from_the_commit_of_the_file_that_names_it(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file opened by branch names its base relatively; a push of a new base and file
    landing while the first is being read must not pair the old file with the new base (its
    hash differs: that was reported as a damaged download, and the good new base evicted).
    The base is fetched at the commit the file came from, not by the branch's name."""
    from mcnc_format.hub import download

    def release(offset: int) -> dict[str, bytes]:
        folder = tmp_path / f"release{offset}"
        folder.mkdir()
        base = _base_tensors(seed + offset)
        (folder / "base.safetensors").write_bytes(safetensors_bytes(base))
        theta0 = mcnc_format.Theta0.external("base.safetensors", "layer.weight",
                                             tensor_sha256(base["layer.weight"]))
        _make_mcnc(folder / "sub" / "model.mcnc", seed + offset, theta0)
        (folder / "sub" / "base.safetensors").write_bytes(safetensors_bytes(base))
        return {path.relative_to(folder).as_posix(): path.read_bytes()
                for path in folder.rglob("*") if path.is_file()}

    first, second = release(0), release(1)
    hub.create_repo(REPO, files=first)
    expected = mcnc_format.load(tmp_path / "release0" / "sub" / "model.mcnc")
    checked = download.check_mcnc_bytes

    def push_meanwhile(path: Path) -> Path:
        monkeypatch.setattr(download, "check_mcnc_bytes", checked)
        hub.commit(REPO, second)
        return checked(path)

    monkeypatch.setattr(download, "check_mcnc_bytes", push_meanwhile)
    hub.clear_requests()
    _assert_same(mcnc_format.load(f"hf://{REPO}/sub/model.mcnc"), expected)
    assert not any(r.path.endswith("/resolve/main/sub/base.safetensors") for r in hub.requests)
    _assert_same(mcnc_format.load(f"hf://{REPO}@main/sub/model.mcnc"),
                 mcnc_format.load(tmp_path / "release1" / "sub" / "model.mcnc"))


def test_whole_repo_pull_into_a_folder_checks_only_the_repos_files(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _make_mcnc(tmp_path / "src" / "model.mcnc", seed)
    (tmp_path / "src" / "config.json").write_text("{}")
    commit = mhub.push(tmp_path / "src", REPO, token=WRITE_TOKEN).commit
    dest = tmp_path / "weights"
    (dest / "sub").mkdir(parents=True)
    users = {dest / "mine.mcnc": b"MCNC" + bytes(100), dest / "sub" / "old.mcnc": bytes(64)}
    for path, data in users.items():
        path.write_bytes(data)

    assert mhub.pull(REPO, local_dir=dest) == dest
    assert (dest / "model.mcnc").read_bytes() == local.read_bytes()
    for path, data in users.items():  # damaged, but not the repo's: untouched
        assert path.read_bytes() == data, path

    # The repo's own file, damaged in the folder, is fetched again.
    (dest / "model.mcnc").write_bytes(_flip_byte(local.read_bytes(), 40))
    hub.clear_requests()
    mhub.pull(REPO, local_dir=dest)
    assert (dest / "model.mcnc").read_bytes() == local.read_bytes()
    assert _gets(hub, "model.mcnc") == 1

    _go_offline(monkeypatch)  # the cached listing and ref still tell the files apart
    for revision in (commit, None):
        assert mhub.pull(REPO, revision=revision, local_dir=dest) == dest
    for path, data in users.items():
        assert path.read_bytes() == data, path


# --------------------------------------------------------------------------- base references


def test_base_model_reference_is_pinned_fetched_and_verified(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    base = _base_tensors(seed)
    pinned_commit = hub.create_repo(BASE_REPO,
                                    files={"model.safetensors": safetensors_bytes(base)})
    theta0 = mhub.theta0_reference(f"{BASE_REPO}/model.safetensors", "layer.weight",
                                   endpoint=hub.endpoint)
    uri = f"hf://{BASE_REPO}@{pinned_commit}/model.safetensors"
    assert theta0.entry.uri == uri
    assert theta0.entry.sha256 == tensor_sha256(base["layer.weight"])
    assert mhub.resolve_reference(uri).read_bytes() == safetensors_bytes(base)
    with pytest.raises(ExternalReferenceError, match="no tensor named 'missing'"):
        mhub.theta0_reference(f"hf://{BASE_REPO}@main/model.safetensors", "missing")

    # The branch moves on: the reference stays on the commit it was made against.
    moved = dict(base, **{"layer.weight": torch.zeros(8, 8)})
    hub.commit(BASE_REPO, {"model.safetensors": safetensors_bytes(moved)})
    with_base = _make_mcnc(tmp_path / "with_base.mcnc", seed, theta0)
    without_base = mcnc_format.load(_make_mcnc(tmp_path / "zeros.mcnc", seed))
    shutil.rmtree(constants.HF_HUB_CACHE)
    hub.clear_requests()
    loaded = mcnc_format.load(with_base)
    assert _gets(hub, f"{pinned_commit}/model.safetensors") == 1
    torch.testing.assert_close(loaded["layer.weight"],
                               without_base["layer.weight"] + base["layer.weight"])

    mhub.push(with_base, REPO, token=WRITE_TOKEN)
    card = hub.file_bytes(REPO, "README.md").decode()
    assert f"base_model: {BASE_REPO}" in card


def test_tampered_base_on_the_hub_is_refetched_once_then_refused(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _base_tensors(seed)
    commit = hub.create_repo(BASE_REPO, files={"model.safetensors": safetensors_bytes(base)})
    theta0 = mhub.theta0_reference(f"{BASE_REPO}/model.safetensors", "layer.weight")
    path = _make_mcnc(tmp_path / "model.mcnc", seed, theta0)
    forged = dict(base, **{"layer.weight": base["layer.weight"] * 1.001})
    hub.tamper(BASE_REPO, "model.safetensors", safetensors_bytes(forged))
    shutil.rmtree(constants.HF_HUB_CACHE)
    hub.clear_requests()

    with pytest.raises(ExternalReferenceError, match="sha256") as excinfo:
        mcnc_format.load(path)
    assert "downloaded twice" in str(excinfo.value)
    assert _gets(hub, f"{commit}/model.safetensors") == 2
    _go_offline(monkeypatch)  # the bad copy was deleted: nothing left to (mis)use
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        mcnc_format.load(path)


def test_damaged_cached_base_is_downloaded_again(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    base = _base_tensors(seed)
    commit = hub.create_repo(BASE_REPO, files={"model.safetensors": safetensors_bytes(base)})
    theta0 = mhub.theta0_reference(f"{BASE_REPO}/model.safetensors", "layer.weight")
    path = _make_mcnc(tmp_path / "model.mcnc", seed, theta0)
    expected = mcnc_format.load(path)
    cached = mhub.resolve_reference(theta0.entry.uri or "")
    cached.resolve().write_bytes(safetensors_bytes(
        dict(base, **{"layer.weight": base["layer.weight"] * 1.001})))
    hub.clear_requests()
    _assert_same(mcnc_format.load(path), expected)
    assert _gets(hub, f"{commit}/model.safetensors") == 1


# --------------------------------------------------------------------------- damaged .mcnc


@pytest.mark.parametrize("where", ["header", "blob"])
def test_tampered_mcnc_on_the_hub_is_detected_and_not_cached(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    mhub.push(local, REPO, token=WRITE_TOKEN)
    with mcnc_format.open(local) as f:
        offset = 40 if where == "header" else f.header.blobs[0].offset
    hub.tamper(REPO, "model.mcnc", _flip_byte(local.read_bytes(), offset))
    hub.clear_requests()

    with pytest.raises(ChecksumError, match="downloaded twice") as excinfo:
        mcnc_format.load(f"hf://{REPO}/model.mcnc")
    assert f"hf://{REPO}/model.mcnc" in str(excinfo.value)
    assert _gets(hub, "model.mcnc") == 2
    with pytest.raises(ChecksumError):
        mhub.pull(REPO, "model.mcnc")
    _go_offline(monkeypatch)
    with pytest.raises(HubOfflineError):
        mcnc_format.open(f"hf://{REPO}/model.mcnc")


def test_damaged_cached_mcnc_is_downloaded_again(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    mhub.push(local, REPO, token=WRITE_TOKEN)
    cached = mhub.pull(REPO, "model.mcnc")
    blob = cached.resolve()
    blob.write_bytes(_flip_byte(local.read_bytes(), len(local.read_bytes()) - 1))
    hub.clear_requests()
    _assert_same(mcnc_format.load(f"hf://{REPO}/model.mcnc"), mcnc_format.load(local))
    assert _gets(hub, "model.mcnc") == 1
    assert blob.read_bytes() == local.read_bytes()

    blob.write_bytes(b"MCNC" + bytes(60))  # damaged again, and now offline: no refetch
    _go_offline(monkeypatch)
    with pytest.raises(mcnc_format.FormatError, match="cannot be downloaded again while "
                                                      "offline"):
        mcnc_format.load(f"hf://{REPO}/model.mcnc")
    assert not cached.exists()


def test_a_file_of_another_format_is_refused_without_eviction_or_refetch(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    base = safetensors_bytes(_base_tensors(seed))
    hub.create_repo(REPO, files={"base.safetensors": base})
    cached = mhub.pull(REPO, "base.safetensors")
    hub.clear_requests()
    for reader in (mcnc_format.open, mcnc_format.load):
        with pytest.raises(FormatError, match=r"not an \.mcnc file") as excinfo:
            reader(f"hf://{REPO}/base.safetensors")
        assert f"hf://{REPO}/base.safetensors" in str(excinfo.value)
        assert "downloaded twice" not in str(excinfo.value)
    assert _gets(hub, "base.safetensors") == 0
    assert cached.read_bytes() == base  # the shared cache keeps it for other libraries


@pytest.mark.parametrize(("tensor", "message"), [("missing", "no tensor named 'missing'"),
                                                 ("other", "has shape")])
def test_a_wrong_reference_is_not_treated_as_damage(
        hub: HubServer, tmp_path: Path, seed: int, tensor: str, message: str) -> None:
    base = _base_tensors(seed)
    commit = hub.create_repo(BASE_REPO, files={"model.safetensors": safetensors_bytes(base)})
    uri = f"hf://{BASE_REPO}@{commit}/model.safetensors"
    theta0 = mcnc_format.Theta0.external(uri, tensor, tensor_sha256(base["other"]))
    path = _make_mcnc(tmp_path / "model.mcnc", seed, theta0)
    hub.clear_requests()
    with pytest.raises(ExternalReferenceError, match=message) as excinfo:
        mcnc_format.load(path)
    assert not isinstance(excinfo.value, ExternalReferenceDamaged)
    assert _gets(hub, f"{commit}/model.safetensors") == 1
    assert mhub.resolve_reference(uri).read_bytes() == safetensors_bytes(base)  # still cached


def test_a_damaged_version_byte_is_refetched_and_a_newer_file_reported(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    uri = mhub.push(local, REPO, token=WRITE_TOKEN).uris[0]
    newer = bytearray(local.read_bytes())
    newer[8] += 1  # the preamble's major version byte
    mhub.pull(REPO, "model.mcnc").resolve().write_bytes(bytes(newer))  # damaged in the cache
    hub.clear_requests()
    _assert_same(mcnc_format.load(uri), mcnc_format.load(local))
    assert _gets(hub, "model.mcnc") == 1

    hub.tamper(REPO, "model.mcnc", bytes(newer), revision=uri.split("@")[1].split("/")[0])
    shutil.rmtree(constants.HF_HUB_CACHE)
    hub.clear_requests()
    with pytest.raises(UnsupportedVersionError, match="newer mcnc-format") as excinfo:
        mcnc_format.load(uri)
    assert uri in str(excinfo.value)
    assert _gets(hub, "model.mcnc") == 2


# --------------------------------------------------------------------------- offline & errors


def test_offline_uses_the_cache_and_explains_a_miss(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    result = mhub.push(local, REPO, token=WRITE_TOKEN)
    _make_mcnc(tmp_path / "other.mcnc", seed + 1)
    mhub.push(tmp_path / "other.mcnc", REPO, token=WRITE_TOKEN)
    mhub.pull(REPO, "model.mcnc", revision=result.commit)
    mhub.pull(REPO, "model.mcnc")
    _go_offline(monkeypatch)
    hub.clear_requests()
    expected = mcnc_format.load(local)
    _assert_same(mcnc_format.load(f"hf://{REPO}/model.mcnc"), expected)
    _assert_same(mcnc_format.load(result.uris[0]), expected)
    assert hub.requests == []
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE") as excinfo:
        mcnc_format.load(f"hf://{REPO}/other.mcnc")
    assert f"hf://{REPO}/other.mcnc" in str(excinfo.value)
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        mhub.theta0_reference(f"{REPO}@main/model.mcnc", "x")


def test_missing_and_forbidden_give_actionable_errors(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    mhub.push(local, REPO, token=WRITE_TOKEN)
    hub.create_repo("alice/private", private=True, files={"model.mcnc": local.read_bytes()})

    for uri in ("hf://alice/nope/model.mcnc", "hf://alice/private/model.mcnc"):
        with pytest.raises(HubPermissionError, match="HF_TOKEN") as excinfo:
            mcnc_format.load(uri)
        assert uri.split("/")[3] in str(excinfo.value) and "check the name" in str(excinfo.value)
    with pytest.raises(HubFileNotFoundError, match="no such file") as excinfo:
        mcnc_format.load(f"hf://{REPO}/missing.mcnc")
    assert "missing.mcnc" in str(excinfo.value) and REPO in str(excinfo.value)
    with pytest.raises(HubFileNotFoundError, match="revision 'nope'"):
        mhub.pull(REPO, "model.mcnc", revision="nope")

    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(HubFileNotFoundError, match="alice/nope does not exist"):
        mhub.pull("alice/nope", "model.mcnc")
    _assert_same(mcnc_format.load("hf://alice/private/model.mcnc"), mcnc_format.load(local))
    with pytest.raises(HubPermissionError, match="write access"):
        mhub.push(local, REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    with pytest.raises(HubPermissionError, match="rejected the token"):
        mhub.pull(REPO, "model.mcnc")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPermissionError, match="log in"):
        mhub.push(local, "alice/new")
    with pytest.raises(HubPermissionError):
        mhub.push(local, REPO, token=OTHER_TOKEN)
    hub.set_gated(REPO)
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    with pytest.raises(HubPermissionError, match="gated repository: request access"):
        mhub.pull(REPO, "model.mcnc", revision=hub.head(REPO), local_dir=tmp_path / "gated")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="ORG/REPO"):
        mcnc_format.load("hf://just-a-name")


def test_io_failures_and_endpoint_credentials_in_errors(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import file_download

    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    hub.create_repo(REPO, files={"model.mcnc": local.read_bytes()})

    def disk_full(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(file_download, "_chmod_and_move", disk_full)
        with pytest.raises(HubError, match="No space left on device") as excinfo:
            mhub.pull(REPO, "model.mcnc")
    assert str(excinfo.value).startswith(f"hf://{REPO}/model.mcnc: ")

    with_password = hub.endpoint.replace("://", "://alice:s3cret@")
    hub.create_repo(BASE_REPO, files={"model.mcnc": local.read_bytes()})
    hub.fail_next(503, path_contains="/api/models/")
    with pytest.raises(HubError, match=f"the Hub at {hub.endpoint} cannot be reached"
                       ) as excinfo:
        mhub.pull(BASE_REPO, endpoint=with_password)
    assert "s3cret" not in str(excinfo.value)
    closed = "http://alice:s3cret@127.0.0.1:9"  # nothing listens on port 9
    with pytest.raises(HubError, match=r"the Hub at http://127\.0\.0\.1:9 cannot be reached"
                       ) as excinfo:
        mhub.pull("alice/unseen", endpoint=closed)
    assert "s3cret" not in str(excinfo.value)


@pytest.mark.parametrize("hostile", ["../escape.mcnc", "/tmp/escape.mcnc", "C:escape.mcnc"])
def test_file_names_that_would_escape_the_folder_are_a_hub_error(
        hub: HubServer, tmp_path: Path, seed: int, hostile: str) -> None:
    """A repository holding a name the client refuses to write (``..``, absolute, a drive) is a
    ``HubError`` naming the file and the fix, not the client's bare ``ValueError`` (a
    traceback from ``mcnc pull``); nothing is written outside the folder."""
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    hub.create_repo(REPO, files={"model.mcnc": local.read_bytes(), hostile: b"\x89MCNC"})
    out = tmp_path / "out" / "in"
    for pull in (lambda: mhub.pull(REPO), lambda: mhub.pull(REPO, local_dir=out)):
        with pytest.raises(HubError, match="rename this file") as excinfo:
            pull()
        assert REPO in str(excinfo.value) and hostile in str(excinfo.value)
    # Asked for by name: refused as an hf:// path would be (before any request), or by
    # the client (a drive-relative name).
    with pytest.raises(HubError, match=r"not a path inside a repository|rename this file"
                       ) as excinfo:
        mhub.pull(REPO, hostile, local_dir=out)
    assert hostile in str(excinfo.value)
    assert not (tmp_path / "out" / "escape.mcnc").exists()
    from mcnc_format.cli.main import cli

    pulled = CliRunner().invoke(cli, ["pull", f"hf://{REPO}"])
    assert pulled.exit_code == 2, (pulled.output, pulled.exception)
    assert pulled.stderr.strip().splitlines()[-1].startswith(f"error: hf://{REPO}")
    assert mhub.pull(REPO, "model.mcnc").read_bytes() == local.read_bytes()


def test_push_refuses_a_damaged_file(hub: HubServer, tmp_path: Path, seed: int) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    damaged = tmp_path / "damaged.mcnc"
    with mcnc_format.open(local) as f:
        offset = f.header.blobs[0].offset
    damaged.write_bytes(_flip_byte(local.read_bytes(), offset))
    with pytest.raises(ChecksumError):
        mhub.push(damaged, REPO, token=WRITE_TOKEN)
    assert hub.requests == []


# --------------------------------------------------------------------------- model card


def test_model_card_written_then_merged_keeping_user_text(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    first = _make_mcnc(tmp_path / "first.mcnc", seed, info={"base_model": "org/llm"})
    mhub.push(first, REPO, token=WRITE_TOKEN, tags=["vision"])
    card = hub.file_bytes(REPO, "README.md").decode()
    assert card.startswith("---\n")
    for line in ("library_name: mcnc-format", "base_model: org/llm", "- mcnc", "- vision",
                 "| `first.mcnc` | 72 |",
                 "| File | Parameters | file_ratio | weights_ratio | Generator"):
        assert line in card, line

    # The owner edits the card on the Hub: new metadata and text around our section.
    edited = card.replace("---\n\n# model", "license: mit\n---\n\n# model\n\nMy intro.") + (
        "\n## Citation\n\nPlease cite us.\n")
    hub.commit(REPO, {"README.md": edited.encode()})
    second = _make_mcnc(tmp_path / "second.mcnc", seed + 1)
    mhub.push(second, REPO, token=WRITE_TOKEN, tags=["extra"])
    merged = hub.file_bytes(REPO, "README.md").decode()
    for line in ("license: mit", "My intro.", "Please cite us.", "- vision", "- extra",
                 "base_model: org/llm", "| `first.mcnc` |", "| `second.mcnc` |"):
        assert line in merged, line
    assert merged.count(SECTION_BEGIN) == 1
    assert merged.index("My intro.") < merged.index(SECTION_BEGIN) < merged.index("Citation")

    mhub.push(second, REPO, token=WRITE_TOKEN, tags=["extra"])
    assert hub.file_bytes(REPO, "README.md").decode() == merged  # idempotent


def test_card_reports_both_ratios_and_names_its_writer(tmp_path: Path, seed: int) -> None:
    local = _make_mcnc(tmp_path / "m.mcnc", seed)
    facts = FileFacts.read("m.mcnc", local)
    with mcnc_format.open(local) as f:
        summary = f.summary()
        assert FileFacts.of("m.mcnc", f) == facts
    assert (facts.file_ratio, facts.weights_ratio) == (summary["file_ratio"],
                                                       summary["weights_ratio"])
    pushed = render_card(None, "org/r", [facts])
    header = "| File | Parameters | file_ratio | weights_ratio | Generator | File size |"
    assert header in pushed and "Compression" not in pushed
    assert f"| {summary['file_ratio']:.1f}x | {summary['weights_ratio']:.1f}x |" in pushed
    assert SECTION_BEGIN in pushed and "`mcnc push`" in SECTION_BEGIN
    saved = render_card(None, "local/r", [facts], local_folder=str(tmp_path))
    assert section_begin(SAVE_PRETRAINED_WRITER) in saved and SECTION_BEGIN not in saved
    # A card written before the writer was named: its section is replaced, not repeated.
    old = "<!-- mcnc-format:begin (written by `mcnc push`; edits here are replaced) -->"
    again = render_card(saved.replace(section_begin(SAVE_PRETRAINED_WRITER), old), "org/r",
                        [facts])
    assert again.count(SECTION_MARK) == 1 and SECTION_BEGIN in again


def test_card_for_a_push_without_mcnc_files_and_on_a_branch(
        hub: HubServer, tmp_path: Path, seed: int) -> None:
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden": 8}')
    mhub.push(folder, REPO, token=WRITE_TOKEN)
    card = hub.file_bytes(REPO, "README.md").decode()
    assert "library_name: mcnc-format" in card and "no `.mcnc` files yet" in card
    assert "mcnc_format.load" not in card

    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    mhub.push(local, REPO, revision="release/v1", token=WRITE_TOKEN)
    on_branch = hub.file_bytes(REPO, "README.md", revision="release/v1").decode()
    example = f'mcnc_format.load("hf://{REPO}@release%2Fv1/model.mcnc")'
    assert example in on_branch
    _assert_same(mcnc_format.load(f"hf://{REPO}@release%2Fv1/model.mcnc"),
                 mcnc_format.load(local))
    mhub.push(local, REPO, token=WRITE_TOKEN)
    assert f'mcnc_format.load("hf://{REPO}/model.mcnc")' in hub.file_bytes(
        REPO, "README.md").decode()


def test_a_push_racing_another_commit_fails_instead_of_dropping_card_rows(
        hub: HubServer, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    mhub.push(_make_mcnc(tmp_path / "first.mcnc", seed), REPO, token=WRITE_TOKEN)
    card_before = hub.file_bytes(REPO, "README.md")
    racing = _make_mcnc(tmp_path / "racing.mcnc", seed + 1).read_bytes()
    create_commit = HfApi.create_commit

    def another_push_lands_first(self: HfApi, *args: object, **kwargs: object) -> object:
        hub.commit(REPO, {"racing.mcnc": racing}, message="concurrent push")
        return create_commit(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", another_push_lands_first)
    with pytest.raises(HubError, match="push again"):
        mhub.push(_make_mcnc(tmp_path / "second.mcnc", seed + 2), REPO, token=WRITE_TOKEN)
    assert hub.file_bytes(REPO, "README.md") == card_before
    assert hub.file_bytes(REPO, "racing.mcnc") == racing
    with pytest.raises(KeyError):
        hub.file_bytes(REPO, "second.mcnc")


def test_render_card_drops_rows_of_deleted_files_and_parses_plain_readme(seed: int,
                                                                        tmp_path: Path) -> None:
    path = _make_mcnc(tmp_path / "a.mcnc", seed)
    with mcnc_format.open(path) as f:
        facts = FileFacts.of("a.mcnc", f)
        facts_b = FileFacts.of("b.mcnc", f)
        odd = FileFacts.of("odd|name.mcnc", f)
    with_b = render_card("Plain text, no metadata.\n", "org/r", [facts, facts_b, odd])
    assert with_b.startswith("---\nlibrary_name: mcnc-format")
    assert "Plain text, no metadata." in with_b
    assert "| `odd\\|name.mcnc` |" in with_b  # a "|" must not split the table cell
    kept = {"a.mcnc", "odd|name.mcnc"}
    only_a = render_card(with_b, "org/r", [facts], keep_rows_for=kept)
    assert "| `b.mcnc` |" not in only_a and "| `odd\\|name.mcnc` |" in only_a
    assert render_card(only_a, "org/r", [facts], keep_rows_for=kept) == only_a


def test_file_names_cannot_break_the_card(seed: int, tmp_path: Path) -> None:
    """A file named with the section's end marker, a backtick, a newline or a percent sign
    (anyone with write access can push one) stays inside its table cell: the card keeps one
    section, its rows come back on the next push, pushing again changes nothing, and the
    example is valid Python naming a plain file. The end marker in a name used to end the
    section early, so every later push appended the rest again."""
    import ast

    path = _make_mcnc(tmp_path / "a.mcnc", seed)
    names = ["a.mcnc", f"{SECTION_END}.mcnc", "back`tick.mcnc", "new\nline.mcnc",
             "50%7C.mcnc", "pi|pe.mcnc"]
    with mcnc_format.open(path) as f:
        facts = [FileFacts.of(name, f) for name in names]
    card = render_card(None, "org/r", facts)
    again = render_card(card, "org/r", facts[:1], keep_rows_for=set(names))
    assert again == card and render_card(again, "org/r", facts) == card
    assert card.count(SECTION_MARK) == 1 and card.count(SECTION_END) == 1
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(rows) == len(names)
    code = card.split("```python\n")[1].split("```")[0]
    ast.parse(code)
    assert 'load("hf://org/r/a.mcnc")' in code  # the first name with nothing to escape
    dropped = render_card(card, "org/r", facts[:1], keep_rows_for={"a.mcnc", "50%7C.mcnc"})
    assert len([line for line in dropped.splitlines() if line.startswith("| `")]) == 2


# --------------------------------------------------------------------------- CLI


def test_cli_push_and_pull(hub: HubServer, tmp_path: Path, seed: int) -> None:
    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    runner = CliRunner()
    pushed = runner.invoke(push_command, [str(local), REPO, "--tag", "cli", "--base-model",
                                          "org/llm"], env={"HF_TOKEN": WRITE_TOKEN})
    assert pushed.exit_code == 0, pushed.output
    uri = f"hf://{REPO}@{hub.head(REPO)}/model.mcnc"
    assert uri in pushed.stdout.splitlines()
    assert "base_model: org/llm" in hub.file_bytes(REPO, "README.md").decode()

    for args in ([REPO, "model.mcnc"], [uri], [f"hf://{REPO}", "--local-dir",
                                               str(tmp_path / "out")]):
        pulled = runner.invoke(pull_command, args)
        assert pulled.exit_code == 0, pulled.output
        target = Path(pulled.stdout.strip())
        target = target / "model.mcnc" if target.is_dir() else target
        assert target.read_bytes() == local.read_bytes()

    missing = runner.invoke(pull_command, [REPO, "missing.mcnc"])
    assert isinstance(missing.exception, HubFileNotFoundError)
    no_token = runner.invoke(push_command, [str(local), "alice/other"])
    assert isinstance(no_token.exception, HubPermissionError)


def test_paths_outside_the_repository_are_one_line_errors(hub: HubServer, tmp_path: Path,
                                                          seed: int) -> None:
    """A FILENAME or --path-in-repo with '..' (or absolute) is refused as it is in an hf://
    URI, as a HubError naming the path: the client's ValueError gave a traceback (and told a
    user who mistyped a path to ask the repository owner to rename the file)."""
    from mcnc_format.cli.main import cli

    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    head = hub.create_repo(REPO, files={"model.mcnc": local.read_bytes()})
    runner = CliRunner()
    for args in (["pull", REPO, "../../evil.mcnc", "--local-dir", str(tmp_path / "d")],
                 ["pull", REPO, "/etc/passwd"],
                 ["push", str(local), REPO, "--path-in-repo", "../x.mcnc"]):
        result = runner.invoke(cli, args, env={"HF_TOKEN": WRITE_TOKEN})
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "'.' or '..' components" in result.stderr, result.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "evil.mcnc").exists()
    assert hub.head(REPO) == head


def test_cli_inspect_verify_unpack_accept_hf_uris(hub: HubServer, tmp_path: Path,
                                                  seed: int) -> None:
    """``hf://`` URIs work wherever the CLI takes an .mcnc file, not only in Python."""
    from safetensors.torch import load_file

    from mcnc_format.cli.main import cli

    local = _make_mcnc(tmp_path / "model.mcnc", seed)
    hub.create_repo(REPO, files={"model.mcnc": local.read_bytes()})
    uri = f"hf://{REPO}/model.mcnc"
    runner = CliRunner()
    shown = runner.invoke(cli, ["inspect", uri, "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"layer.weight"' in shown.stdout
    verified = runner.invoke(cli, ["verify", uri])
    assert verified.exit_code == 0, verified.output
    out = tmp_path / "dense.safetensors"
    unpacked = runner.invoke(cli, ["unpack", uri, str(out)])
    assert unpacked.exit_code == 0, unpacked.output
    expected = mcnc_format.load(local)
    got = load_file(str(out))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value)
