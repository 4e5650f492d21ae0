"""``import mcnc_format`` is cheap: no torch, no integration, until a name needs them.

Each check runs in a fresh interpreter (``sys.modules`` of this one already holds torch).
Header-level work (the preamble, the header and its validation, names, shapes, sizes) needs
no torch either: ``mcnc inspect`` and the Hub's listing live on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mcnc_format as mf

HEAVY = ("torch", "huggingface_hub", "transformers", "peft", "triton", "torch.distributed",
         "safetensors.torch", "mcnc_format.torch", "mcnc_format.hub", "mcnc_format.cli")


def _modules_after(code: str) -> list[str]:
    """The heavy modules loaded after running ``code`` in a fresh interpreter."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    return list(json.loads(run.stdout.strip().splitlines()[-1]))


def test_import_loads_no_torch_and_no_integration() -> None:
    assert _modules_after("import mcnc_format") == []
    assert _modules_after("import mcnc_format as m; m.MCNCError; m.UsageError") == []


def test_header_level_work_needs_no_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.mcnc"
    spec = mf.GeneratorSpec(k=2, d=16, hidden=(4,), seed=1)
    segment = mf.Segment(spec, torch.zeros(2, 1, 2), torch.zeros(2, 1))
    mf.save(path, {"w": mf.MCNC(segment, (4, 8)), "b": torch.ones(3)},
               metadata={"task": "t"})
    loaded = _modules_after(f"""
        from mcnc_format.engine.source import FileSource, read_header
        from mcnc_format.summary import file_summary, tensor_info
        source = FileSource({str(path)!r}, "m.mcnc")
        opened = read_header(source, "m.mcnc")
        summary = file_summary(opened.header, opened.file_size,
                               opened.preamble.header_length, opened.preamble.minor)
        assert summary["tensors"] == 2 and opened.header.metadata == {{"task": "t"}}
        assert tensor_info(opened.header, opened.header.tensors[0]).shape == (4, 8)
        source.close()
    """)
    assert loaded == []


def test_public_names_resolve_lazily() -> None:
    for name in mf.__all__:
        assert getattr(mf, name) is not None
    assert sorted(dir(mf)) == sorted(mf.__all__)


@pytest.mark.parametrize(("call", "extra"), [
    ("from mcnc_format.transformers import from_pretrained; from_pretrained(folder)",
     "transformers"),
    ("import torch; from mcnc_format.peft import load_adapter; "
     "load_adapter(torch.nn.Linear(2, 2), folder)", "peft"),
])
def test_a_missing_integration_names_its_extra(tmp_path: Path, call: str, extra: str) -> None:
    """Without the library (simulated: ``sys.modules[name] = None`` makes its import fail as
    an absent package's does), the call says which extra installs it."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules[{extra!r}] = None
        folder = {str(tmp_path)!r}
        from mcnc_format.errors import UsageError
        try:
            {call}
        except UsageError as exc:
            print(exc)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    assert f"pip install 'mcnc-format[{extra}]'" in run.stdout, run.stdout + run.stderr


def test_removed_names_warn_for_one_release(tmp_path: Path) -> None:
    """Names moved by the engine refactor keep working for one release with a
    DeprecationWarning naming the new spelling (CHANGELOG.md)."""
    import pytest

    path = tmp_path / "m.mcnc"
    spec = mf.GeneratorSpec(k=2, d=16, hidden=(4,), seed=1)
    mf.save(path, {"w": mf.MCNC(mf.Segment(spec, torch.zeros(2, 1, 2), torch.zeros(2, 1)),
                                (4, 8))})
    with mf.open(path) as f:
        for old, new in (("blobs", f.context.blobs), ("theta0", f.context.theta0)):
            with pytest.warns(DeprecationWarning, match=f"context.{old}"):
                assert getattr(f, old) is new
        with pytest.warns(DeprecationWarning, match="context.generators.fused"):
            assert f.fused_generator(0, 1, torch.device("cpu")) is not None
        with pytest.warns(DeprecationWarning, match="label"):
            assert f.source == f.label
        with pytest.warns(DeprecationWarning, match="stream"):
            assert dict(f.iter_tensors()).keys() == {"w"}
    with pytest.warns(DeprecationWarning, match="keyword"):
        assert mf.LoadOptions is not None
