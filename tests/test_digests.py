"""The digest cache and the verify modes: a base checkpoint is hashed once per file identity
(CACHED), every load (FULL) or never (NONE); a changed, touched or replaced base is hashed
again; a download from the Hub is fully checked once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hub_fixtures import HubServer
from stream_helpers import mixed_file

import mcnc_format as mf
from mcnc_format.engine.safetensors_source import SafetensorsFile
from mcnc_format.engine.source import BlobStore
from mcnc_format.errors import ExternalReferenceDamaged

#: The tensors of the mixed file with an external theta0.
EXTERNAL = ["m2", "m5"]



def test_cached_hashes_a_base_once_per_file_identity(tmp_path: Path, hashes: list[str]) -> None:
    path = mixed_file(tmp_path)
    want = mf.load(path, names=EXTERNAL)
    assert len(hashes) == 2  # both referenced tensors, once
    for _ in range(2):
        got = mf.load(path, names=EXTERNAL)
        assert all(torch.equal(got[n], want[n]) for n in EXTERNAL)
    assert len(hashes) == 2  # the cache knew the unchanged file
    base = tmp_path / "base.safetensors"
    os.utime(base)  # touched: another mtime and ctime
    mf.load(path, names=EXTERNAL)
    assert len(hashes) == 4
    copy = tmp_path / "copy.safetensors"
    shutil.copy2(base, copy)
    os.replace(copy, base)  # replaced by the same bytes: another inode
    mf.load(path, names=EXTERNAL)
    assert len(hashes) == 6


def test_same_size_other_bytes_with_the_old_mtime_is_caught(tmp_path: Path,
                                                           hashes: list[str]) -> None:
    path = mixed_file(tmp_path)
    mf.load(path, names=EXTERNAL)
    base = tmp_path / "base.safetensors"
    before = base.stat()
    data = bytearray(base.read_bytes())
    data[-1] ^= 0x40  # inside tensor data, same size
    with open(base, "r+b") as f:  # in place: same inode
        f.write(data)
    os.utime(base, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back; ctime moved
    assert base.stat().st_ino == before.st_ino and base.stat().st_size == before.st_size
    with pytest.raises(ExternalReferenceDamaged, match="sha256"):
        mf.load(path, names=EXTERNAL)


def test_full_hashes_every_load_and_none_never(tmp_path: Path, hashes: list[str]) -> None:
    path = mixed_file(tmp_path)
    for _ in range(2):
        mf.load(path, names=EXTERNAL, verify="full")
    assert len(hashes) == 4
    mf.load(path, names=EXTERNAL, verify=mf.Verify.NONE)
    mf.load(path, names=EXTERNAL, verify=False)
    assert len(hashes) == 4


def test_a_whole_base_tensor_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """Loading whole tensors hashes the bytes read for them; only a box of a base reads the
    referenced tensor a second time, to hash all of it."""
    path = mixed_file(tmp_path)
    rereads: list[str] = []
    real = SafetensorsFile.sha256

    def sha256(self: SafetensorsFile, entry) -> str:  # type: ignore[no-untyped-def]
        rereads.append(str(entry))
        return real(self, entry)

    monkeypatch.setattr(SafetensorsFile, "sha256", sha256)
    mf.load(path, names=EXTERNAL, verify="full")
    assert rereads == []
    mf.load(path, names=["m5"], boxes={"m5": (slice(0, 2),)}, verify="full")
    assert len(rereads) == 1


def test_a_hub_download_is_checked_once(hub: HubServer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = mixed_file(tmp_path)
    source = tmp_path / "plain.mcnc"
    with mf.open(path) as f:  # the Hub copy: no external base, so only the file is checked
        names = [n for n in f.keys() if n not in EXTERNAL]  # noqa: SIM118
    mf.save(source, {n: t for n, t in mf.load(path, names=names).items()})
    hub.create_repo("alice/plain", files={"plain.mcnc": source.read_bytes()})
    checks: list[int] = []
    real = BlobStore.check_padding

    def check_padding(self: BlobStore, header_length: int) -> None:
        checks.append(1)
        real(self, header_length)

    monkeypatch.setattr(BlobStore, "check_padding", check_padding)
    first = mf.load("hf://alice/plain/plain.mcnc")
    second = mf.load("hf://alice/plain/plain.mcnc")
    assert checks == [1]
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_check_one_thread_claimed_is_awaited_by_another(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """R75 under threads: while one thread has claimed a base's pin check but not yet
    started it (reading the file's identity), another thread asking for the check gets the
    pending verdict to wait on, never "no check" (it would hand out a tensor built on an
    unverified base)."""
    import threading

    from mcnc_format.engine.safetensors_source import SafetensorsFile
    from mcnc_format.header import ExternalTheta0

    path = mixed_file(tmp_path)
    with mf.open(path, verify="full") as f:
        t = next(t for t in f.header.tensors
                 if any(isinstance(th, ExternalTheta0) for th in t.theta0s()))
        member = t.members()[0]
        entry = member.theta0
        assert isinstance(entry, ExternalTheta0)
        theta0 = f.context.theta0
        theta0.reference(entry, member.shape)
        entered, release = threading.Event(), threading.Event()
        real = SafetensorsFile.identity

        def slow_identity(self: SafetensorsFile):  # type: ignore[no-untyped-def]
            entered.set()
            assert release.wait(10)
            return real(self)

        monkeypatch.setattr(SafetensorsFile, "identity", slow_identity)
        first = threading.Thread(target=theta0.pending_check, args=(entry,))
        first.start()
        assert entered.wait(10)
        check = theta0.pending_check(entry)  # asked while the first thread holds the claim
        assert check is not None and not check.done()
        release.set()
        first.join(10)
        check.result(timeout=60)
