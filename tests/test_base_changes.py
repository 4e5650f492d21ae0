"""A base checkpoint changed while a file built on it is open. Every load call (``get_tensor``,
``get_slice(...)[...]``, ``tensors``, ``stream``) checks the base again as ``verify`` says:
``full`` hashes the bytes it reads, ``cached`` reads the base's identity again (a changed
file is a cache miss, so it is hashed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from stream_helpers import mixed_file

import mcnc_format as mf
from mcnc_format.errors import ExternalReferenceDamaged

EXTERNAL = ["m2", "m5"]


def _overwrite_in_place(base: Path) -> None:
    """Other values of the same shapes and dtypes written over the base (same inode, size)."""
    other = base.with_name("other.safetensors")
    save_file({"w": torch.randn(3, 4, 5).to(torch.bfloat16), "v": torch.randn(4, 37)},
              str(other))
    data = other.read_bytes()
    assert len(data) == base.stat().st_size
    with open(base, "r+b") as f:
        f.write(data)


LOADS = {
    "get_tensor": lambda f: f.get_tensor("m2"),
    "get_slice": lambda f: f.get_slice("m5")[1:3, :],
    "tensors": lambda f: f.tensors(EXTERNAL),
    "stream": lambda f: list(f.stream(EXTERNAL)),
}


@pytest.mark.parametrize("verify", ["full", "cached"])
@pytest.mark.parametrize("load", sorted(LOADS))
def test_each_load_checks_a_base_changed_while_open(tmp_path: Path, verify: str,
                                                    load: str) -> None:
    path = mixed_file(tmp_path)
    with mf.open(path, verify=verify) as f:
        for name in LOADS:
            LOADS[name](f)  # every kind of load, on the unchanged base
        _overwrite_in_place(tmp_path / "base.safetensors")
        for _ in range(2):  # and again: a failed check is not remembered as a pass
            with pytest.raises(ExternalReferenceDamaged, match="sha256"):
                LOADS[load](f)
