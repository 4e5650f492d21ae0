"""What SPEC.md 1.1 revision 4 settles that the invalid vectors cannot show on their own: the
forms a reader accepts (float fields given as integers or float32), where a rule reaches
(bin values inside arrays, lone skippable frames, overlaps beside unknown entries), the
portable names of §7.4 one by one, exact-case resolution on a file system that folds case,
and the writer's refusal of tensors that share memory (§6)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zstandard

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, Segment, Theta0
from mcnc_format import constants as C
from mcnc_format.container import Preamble, checksum, decode_header, read_preamble
from mcnc_format.engine import resolve
from mcnc_format.header import ExternalTheta0, Header, Theta0Entry
from mcnc_format.uri import parse_uri
from mcnc_format.validate import validate_header

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"


def _header_of(path: Path) -> tuple[dict[str, Any], int]:
    """The header map of a file the reference writer made (plain msgpack), and its minor."""
    data = path.read_bytes()
    preamble = read_preamble(data, len(data), str(path))
    assert preamble.header_codec == C.HEADER_CODEC_MSGPACK
    raw = data[C.PREAMBLE_SIZE:C.PREAMBLE_SIZE + preamble.header_length]
    return msgpack.unpackb(raw, raw=False), preamble.minor


def _decode(raw: bytes, codec: int = C.HEADER_CODEC_MSGPACK, minor: int = 1) -> Header:
    return decode_header(raw, Preamble(minor, len(raw), checksum(raw), codec), "x.mcnc")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    gen = GeneratorSpec(k=2, d=8, hidden=(8,), L=20.0, seed=3)
    segment = Segment(gen, torch.rand(2, 1, 2) - 0.5, torch.randn(2, 1))
    path = tmp_path / "f.mcnc"
    mf.save(path, {"w": MCNC(segment, (3, 4), theta0=Theta0.uniform(0.25, 1, 0)),
                   "b": Dense(torch.randn(4))})
    return path


# -- §3: float fields ------------------------------------------------------------------------


def test_an_integer_or_a_float32_where_a_float_is_due_means_that_number(saved: Path) -> None:
    value, minor = _header_of(saved)
    expected = Header.parse(value, "x.mcnc", minor)
    value["generators"][0]["L"] = 20  # an int
    as_float32 = msgpack.packb(value, use_bin_type=True, use_single_float=True)
    assert b"\xca" in as_float32  # omega0 and the theta0 bound are msgpack float32 now
    header = _decode(as_float32, minor=minor)
    gen = header.generators[0]
    assert (gen.L, gen.omega0) == (20.0, 1.0) and isinstance(gen.L, float)
    assert header.tensors == expected.tensors and header.generators == expected.generators


@pytest.mark.parametrize("field", ["k", "alignment"])
def test_a_float_is_never_an_int(saved: Path, field: str) -> None:
    value, minor = _header_of(saved)
    where = value["generators"][0] if field == "k" else value
    where[field] = float(where[field])
    with pytest.raises(mf.HeaderError) as caught:
        Header.parse(value, "x.mcnc", minor)
    assert caught.value.rule == "R10"


# -- R6: the msgpack data model --------------------------------------------------------------


@pytest.mark.parametrize("where", ["array", "nested-key", "empty-bin"])
def test_bin_and_non_string_keys_are_r6_anywhere(saved: Path, where: str) -> None:
    value, minor = _header_of(saved)
    if where == "array":
        value["tensors"][0]["shape"] = [3, b"\x04"]
    elif where == "nested-key":
        value["tensors"][0]["theta0"] = {b"kind": "zeros"}
    else:
        value["metadata"] = {"note": b""}
    raw = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(mf.HeaderError) as caught:
        _decode(raw, minor=minor + 1)  # also where unknown keys are ignored
    assert caught.value.rule == "R6"


@pytest.mark.parametrize("frames", ["lone", "before"])
def test_a_skippable_frame_is_not_the_zstd_header(saved: Path, frames: str) -> None:
    value, minor = _header_of(saved)
    skippable = struct.pack("<II", 0x184D2A50, 0)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(value))
    stored = skippable if frames == "lone" else skippable + frame
    with pytest.raises(mf.HeaderError, match="skippable") as caught:
        _decode(stored, C.HEADER_CODEC_ZSTD, minor)
    assert caught.value.rule == "R6"


def test_an_empty_tensor_reads_its_blob(tmp_path: Path) -> None:
    """R24 and R25 hold for the blob of a dense tensor without elements (§12): a real frame
    reads, and a damaged checksum is found when the tensor is read."""
    path = tmp_path / "empty.mcnc"
    mf.save(path, {"e": Dense(torch.empty(0, 3), C.Codec.ZSTD), "f": Dense(torch.empty(0))})
    assert mf.load(path)["e"].shape == (0, 3)
    data = bytearray(path.read_bytes())
    value, _ = _header_of(path)
    for blob in value["blobs"]:
        blob["xxh3"] ^= 1
    raw = msgpack.packb(value, use_bin_type=True)
    assert len(raw) == struct.unpack_from("<Q", data, 16)[0]
    data[24:32] = struct.pack("<Q", checksum(raw))
    data[C.PREAMBLE_SIZE:C.PREAMBLE_SIZE + len(raw)] = raw
    path.write_bytes(bytes(data))
    with mf.open(path) as f:
        for name in ("e", "f"):
            with pytest.raises(mf.ChecksumError):
                f.get_tensor(name)


# -- R41 beside unknown entries --------------------------------------------------------------


def _shared_segment(tmp_path: Path) -> dict[str, Any]:
    gen = GeneratorSpec(k=2, d=8, hidden=(8,), seed=1)
    segment = Segment(gen, torch.rand(3, 1, 2), torch.randn(3, 1))
    path = tmp_path / "shared.mcnc"
    mf.save(path, {"w": MCNC(segment, (3, 4)), "v": MCNC(segment, (5,)),
                   "u": MCNC(segment, (2,))})
    return _header_of(path)[0]


@pytest.mark.parametrize(("offset", "rule"), [(10, "R41"), (14, None)])
def test_known_members_beside_an_unknown_encoding_never_overlap(tmp_path: Path, offset: int,
                                                                rule: str | None) -> None:
    """'u' has an unknown encoding, so R41 cannot see every member: a gap (v at 14) may be
    the unknown member's, an overlap (v at 10, inside w) is an error in any file."""
    value = _shared_segment(tmp_path)
    tensors = {t["name"]: t for t in value["tensors"]}
    tensors["u"]["encoding"] = "mcnc-q8"
    tensors["v"]["offset"] = offset
    header = Header.parse(value, "x.mcnc", 1)
    length = value["blobs"][0]["offset"] - C.PREAMBLE_SIZE  # the blobs stay where they are
    size = max(b["offset"] + b["length"] for b in value["blobs"])
    if rule is None:
        validate_header(header, length, size, "x.mcnc")
        return
    with pytest.raises(mf.HeaderError) as caught:
        validate_header(header, length, size, "x.mcnc")
    assert caught.value.rule == rule and "overlaps" in caught.value.message


# -- §7.4: portable names, Hub names, exact case ---------------------------------------------

_SHA = "0" * 64
_COMMIT = "0123456789abcdef" * 2 + "01234567"


@pytest.mark.parametrize("uri", [
    "base.safetensors", "sub dir/base-1_2.safetensors", "con1.safetensors", "CONSOLE",
    "a.b.c", "~tilde", ".hidden", f"hf://org/repo@{_COMMIT}/base.safetensors",
    f"hf://Org_1/re.po-2@{_COMMIT}/a/b.safetensors", f"hf://o/{'r' * 96}@{_COMMIT}/x",
])
def test_portable_references_parse(uri: str) -> None:
    entry = Theta0Entry.from_dict({"kind": "external", "uri": uri, "tensor": "w",
                                   "sha256": _SHA})
    assert entry.uri == uri  # type: ignore[attr-defined]


@pytest.mark.parametrize("uri", [
    "base.safetensors.", "base.safetensors ", "dir./base", "CON", "nul.txt", "Aux .txt",
    "com7.safetensors", "LPT0", "conin$", "b?se", "b*se", 'b"se', "b<se", "b>se", "b|se",
    "tab\there", "bell\x07", "del\x7f", "caf\u00e9", "e\u0301", "", "a//b", "./a",
    f"hf://org/repo@{_COMMIT.upper()}/base", f"hf://org/re--po@{_COMMIT}/base",
    f"hf://org/re..po@{_COMMIT}/base", f"hf://-org/repo@{_COMMIT}/base",
    f"hf://org/repo.@{_COMMIT}/base", f"hf://org/repo.git@{_COMMIT}/base",
    f"hf://org/{'r' * 97}@{_COMMIT}/base", f"hf://org/caf\u00e9@{_COMMIT}/base",
    f"hf://org/repo@{_COMMIT}/CON", f"hf://org/repo@{_COMMIT}/base.",
])
def test_references_that_resolve_differently_are_r74(uri: str) -> None:
    with pytest.raises(mf.HeaderError) as caught:
        Theta0Entry.from_dict({"kind": "external", "uri": uri, "tensor": "w", "sha256": _SHA})
    assert caught.value.rule == "R74"


def test_hub_repository_names_follow_the_hub() -> None:
    assert parse_uri("hf://Org_1/re.po-2@main/x").repo_id == "Org_1/re.po-2"
    for bad in ("hf://or g/repo/x", "hf://org/-repo/x", "hf://org/re--po/x", "hf://org/r.git/x"):
        with pytest.raises(ValueError, match="ORG and REPO"):
            parse_uri(bad)


def test_a_name_that_matches_only_up_to_case_is_missing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system that folds case, ``Base.safetensors`` would open
    ``base.safetensors``: the reader refuses it there as it is refused everywhere (R75). The
    folding is simulated: the listing holds the other case, the path exists."""
    for name in ("theta0-sources.mcnc", "theta0-sources.base.safetensors"):
        shutil.copy(VECTORS / name, tmp_path / name)
    path = tmp_path / "theta0-sources.mcnc"
    with mf.open(path) as f:
        external = [t.name for t in f.header.tensors
                    if any(isinstance(th, ExternalTheta0) for th in t.theta0s())]
        assert external
        f.tensors(external)
    listdir = os.listdir
    monkeypatch.setattr(resolve.os, "listdir", lambda directory: [
        name.upper() for name in listdir(directory)])
    with mf.open(path) as f, pytest.raises(mf.ExternalReferenceError, match="case") as caught:
        f.get_tensor(external[0])
    assert caught.value.rule == "R75"


# -- §6: no aliases --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", ["same", "view", "transposed", "dense"])
def test_the_writer_refuses_tensors_that_share_memory(tmp_path: Path, tie: str) -> None:
    w = torch.randn(4, 3)
    other = {"same": w, "view": w[1:3], "transposed": w.t(), "dense": Dense(w[2])}[tie]
    with pytest.raises(mf.errors.WriteError, match="share memory"):
        mf.save(tmp_path / "tied.mcnc", {"lm_head.weight": w, "embed.weight": other})
    assert not (tmp_path / "tied.mcnc").exists()


def test_disjoint_views_and_copies_are_separate_tensors(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    path = mf.save(tmp_path / "ok.mcnc", {"a": w[:2], "b": w[2:], "c": w.clone(),
                                          "e": torch.empty(0)})
    loaded = mf.load(path)
    assert torch.equal(loaded["a"], w[:2]) and torch.equal(loaded["c"], w)
