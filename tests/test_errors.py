"""``MCNCError`` carries its rule, file, field and tensor as attributes; ``str`` is built from
them, and they survive pickling (errors cross process boundaries in data loaders). The
preamble's messages tell a truncated file from a foreign one, and damage from a newer
version."""

from __future__ import annotations

import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mcnc_format as mf
from mcnc_format import constants as C
from mcnc_format import errors
from mcnc_format.cli.main import cli
from mcnc_format.header import Header


@pytest.mark.parametrize("cls", [errors.MCNCError, errors.HeaderError, errors.DeviceMemoryError,
                                 errors.HubFileNotFoundError, errors.MappingError])
def test_fields_format_the_message_and_survive_pickling(cls: type[errors.MCNCError]) -> None:
    exc = cls("expected a uint32", rule="R71", path="m.mcnc", field="tensors[3].theta0.seed",
              tensor="w")
    assert str(exc) == "m.mcnc: tensors[3].theta0.seed: expected a uint32 (R71)"
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == str(exc)
    assert (back.rule, back.path, back.field, back.tensor) == ("R71", "m.mcnc",
                                                                "tensors[3].theta0.seed", "w")
    assert str(cls("plain")) == "plain" and str(pickle.loads(pickle.dumps(cls("plain")))) == "plain"


def test_absent_parts_are_left_out() -> None:
    assert str(errors.FormatError("bad", rule="R1", path="f.mcnc")) == "f.mcnc: bad (R1)"
    assert str(errors.WriteError("bad", field="metadata")) == "metadata: bad"


def test_header_errors_name_the_field_and_rule() -> None:
    value = {"alignment": 64, "blobs": [], "generators": [], "segments": [], "metadata": {},
             "tensors": [{"name": "t", "encoding": "mcnc", "shape": [2], "dtype": "f32",
                          "segment": 0, "theta0": {"kind": "prng", "scheme": "uniform",
                                                   "seed": -1, "stream": 0, "bound": 1.0}}]}
    with pytest.raises(mf.HeaderError) as caught:
        Header.parse(value, "x.mcnc", 1)
    exc = caught.value
    assert (exc.rule, exc.path, exc.field) == ("R71", "x.mcnc", "tensors[0].theta0.seed")
    assert str(exc).startswith("x.mcnc: tensors[0].theta0.seed: expected an integer")


# -- the preamble's messages (R1, R2) ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("preamble") / "small.mcnc"
    mf.save(path, {"w": torch.randn(3)})
    return path.read_bytes()


def _open_error(path: Path, data: bytes) -> mf.MCNCError:
    path.write_bytes(data)
    with pytest.raises(mf.MCNCError) as caught:
        mf.open(path)
    return caught.value


def test_a_file_cut_inside_the_preamble_is_called_truncated(small_file: bytes,
                                                            tmp_path: Path) -> None:
    """Cut after 1 to 31 bytes, the file starts like an .mcnc file (or is the magic): it is
    truncated, not "not an .mcnc file"."""
    for size in range(1, C.PREAMBLE_SIZE):
        exc = _open_error(tmp_path / "cut.mcnc", small_file[:size])
        assert isinstance(exc, mf.FormatError) and exc.rule == "R1", (size, exc)
        assert "truncated" in exc.message and f"has {size} bytes" in exc.message, (size, exc)
        assert "does not start with" not in exc.message, (size, exc)
    for data in (b"", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n" + bytes(40)):
        exc = _open_error(tmp_path / "other.mcnc", data)
        assert exc.rule == "R1" and "does not start with the 8-byte magic" in exc.message, exc


def test_random_bytes_after_the_magic_are_damage_not_a_newer_version(small_file: bytes,
                                                                      tmp_path: Path) -> None:
    """An implausible version (0, or random bytes' 37780) is damage; only a plausible newer
    major version asks for a newer release."""
    rest = small_file[12:]
    cases = [(2, 0, True), (3, 7, True), (0, 1, False), (37780, 5, False), (2, 51234, False)]
    rng = random.Random(os.urandom(8))
    major, minor = rng.randrange(100, 1 << 16), rng.randrange(1 << 16)
    cases.append((major, minor, False))
    for major, minor, newer in cases:
        data = C.MAGIC + struct.pack("<HH", major, minor) + rest
        exc = _open_error(tmp_path / "version.mcnc", data)
        assert isinstance(exc, mf.UnsupportedVersionError) and exc.rule == "R2", exc
        assert f"{major}.{minor}" in exc.message, exc
        if newer:
            assert f"release that reads version {major}" in exc.message, exc
        else:
            assert "damaged" in exc.message and "release that reads" not in exc.message, exc


def test_the_cli_says_truncated_in_one_line(small_file: bytes, tmp_path: Path) -> None:
    path = tmp_path / "cut.mcnc"
    path.write_bytes(small_file[:20])
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "truncated" in lines[0] and "(R1)" in lines[0], lines
