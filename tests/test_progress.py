"""``progress=True`` draws a bar on a terminal and nothing elsewhere; a callable still gets
``Progress``; ``verify_file`` reports the whole file's progress."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console

import mcnc_format as mf
from mcnc_format.errors import UsageError
from mcnc_format.progress import ProgressBar
from mcnc_format.verify import verify_file


def _file(path: Path, tensors: int = 3) -> Path:
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    spec = mf.GeneratorSpec(k=3, d=64, hidden=(8,), seed=int(torch.randint(0, 2**31, (1,),
                                                                             generator=gen)))
    segment = mf.Segment(spec, torch.rand(tensors * 2, 1, 3, generator=gen),
                         torch.rand(tensors * 2, 1, generator=gen))
    entries: dict[str, object] = {f"w{i}": mf.MCNC(segment, (8, 16)) for i in range(tensors)}
    entries["bias"] = torch.randn(7, generator=gen)
    return mf.save(path, entries)


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=160), out


def test_progress_true_loads_and_prints_nothing_off_a_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _file(tmp_path / "m.mcnc")
    expected = mf.load(path)
    for call in (lambda: mf.load(path, progress=True),
                 lambda: dict(mf.stream(path, progress=True))):
        got = call()
        assert set(got) == set(expected)
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    model = torch.nn.Module()
    for name, value in expected.items():
        model.register_buffer(name, torch.zeros_like(value))
    assert mf.load_into(model, path, progress=True) == ([], [])
    with mf.MCNCFile(path, progress=True) as f:
        assert torch.equal(f.get_tensor("w0"), expected["w0"])
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""  # pytest's streams are not terminals


def test_a_callable_still_receives_progress(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.mcnc", tensors=4)
    seen: list[mf.Progress] = []
    mf.load(path, progress=seen.append)
    assert [p.tensors_done for p in seen] == [1, 2, 3, 4, 5]
    assert {p.tensors_total for p in seen} == {5}
    assert seen[-1].bytes_done == seen[-1].bytes_total == 4 * 8 * 16 * 4 + 7 * 4
    assert seen[-1].chunks_regenerated > 0


def test_the_bar_shows_tensors_bytes_chunks_and_rate_on_a_terminal(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.mcnc")
    console, out = _terminal()
    bar = ProgressBar("loading", console)
    mf.load(path, progress=bar)
    drawn = out.getvalue()
    assert "loading" in drawn and "4/4 tensors" in drawn and "chunks" in drawn
    assert "/s" in drawn  # the rate column
    assert not bar.active  # closed after the last tensor: nothing left drawn


def test_an_abandoned_stream_leaves_no_bar_running(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.mcnc")
    console, _ = _terminal()
    bar = ProgressBar("loading", console)
    stream = mf.stream(path, progress=bar)
    next(stream)
    stream.close()
    assert bar.active  # the load ended early: the bar is still up
    mf.load(path, progress=bar)  # the next load starts a bar of its own
    assert not bar.active


def test_progress_refuses_what_is_neither_a_flag_nor_a_callable(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="progress="):
        mf.load(_file(tmp_path / "m.mcnc"), progress="yes")


def test_verify_reports_the_whole_file(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.mcnc", tensors=5)
    seen: list[mf.Progress] = []
    report = verify_file(path, progress=seen.append, batch_values=8 * 16 * 2)
    assert report.ok
    assert [p.tensors_done for p in seen] == list(range(1, 7))
    assert seen[-1].bytes_done == seen[-1].bytes_total
    chunks = [p.chunks_regenerated for p in seen]
    assert chunks == sorted(chunks) and chunks[-1] >= 5  # summed over the batches' streams


def test_verify_takes_progress_as_load_does(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``verify_file(progress=True)`` is a bar (off a terminal: nothing), as for a load; it
    failed with ``TypeError: 'bool' object is not callable`` after the first tensor."""
    path = _file(tmp_path / "m.mcnc")
    for value in (True, False, None):
        assert verify_file(path, progress=value).ok
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="progress="):
        verify_file(path, progress="yes")  # type: ignore[arg-type]
