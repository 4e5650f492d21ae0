"""``save_pretrained`` is atomic for every file of a save: each is written to a temporary
folder first and moved into place only when all were written, so a failure (a full disk, a
tokenizer that cannot save) raises ``WriteError`` and leaves the folder exactly as it was:
the old ``model.mcnc``, the user's README, nothing half-written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn
from torch_helpers import one_thread  # noqa: F401 (autouse fixture)
from transformers_helpers import llama, train

from mcnc_format.errors import WriteError
from mcnc_format.torch import MCNCConfig, reparametrize
from mcnc_format.transformers import save_pretrained

CONFIG = MCNCConfig(k=4, d=64, hidden=(8,), seed=7)
README = "# My model\n\n" + "Notes the user wrote by hand. " * 14_000  # about 420 KB


def _model() -> nn.Module:
    model = llama()
    reparametrize(model, CONFIG)
    return train(model, steps=1)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder saved once, with a long README of the user's."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text(README, encoding="utf-8")
    save_pretrained(_model(), folder)
    return folder, _snapshot(folder)


class _FailingTokenizer:
    """A tokenizer whose save runs out of space half-way through its file."""

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        path = Path(folder) / "tokenizer.json"
        path.write_text('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_failing_tokenizer_save_changes_nothing(saved: tuple[Path, dict[str, bytes]]
                                                  ) -> None:
    folder, before = saved
    with pytest.raises(WriteError, match="No space left"):
        save_pretrained(_model(), folder, _FailingTokenizer())
    assert _snapshot(folder) == before


_CHILD = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_transformers_faults import _model
    from mcnc_format.errors import WriteError
    from mcnc_format.transformers import save_pretrained
    model = _model()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    try:
        save_pretrained(model, sys.argv[1])
    except WriteError as exc:
        print("WriteError", exc)
""")


def test_a_full_disk_while_writing_the_card_keeps_the_readme(
        saved: tuple[Path, dict[str, bytes]]) -> None:
    """Files past 300 KB cannot be written (RLIMIT_FSIZE): the weights fit, the card with the
    user's long README does not."""
    folder, before = saved
    assert len(before["model.mcnc"]) < 300_000 < len(before["README.md"])
    child = subprocess.run([sys.executable, "-c", _CHILD, str(folder),
                            str(Path(__file__).parent)],
                           capture_output=True, text=True, timeout=300)
    assert child.stdout.startswith("WriteError"), (child.stdout, child.stderr[-3000:])
    assert _snapshot(folder) == before
