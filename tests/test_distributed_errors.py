"""A file that cannot be read on one rank, on real gloo process groups (two ranks).

DCP calls ``read_metadata`` on every rank, retries it when it raises, and then reports an
``AssertionError`` ("metadata is None") wrapped in a ``CheckpointException`` (a
``BaseException``). ``MCNCStorageReader`` hands the error to DCP where it travels intact
instead, so ``mcnc_format.distributed.load`` raises the ``MCNCError`` itself on every rank,
and a direct ``dcp.load`` caller finds it in the exception's ``failures``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import dist_api  # noqa: F401 (skips this module on an older torch)
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import TinyLM, init_gloo, leave_gloo, write_model_file
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from mcnc_format.distributed import MCNCStorageReader, load
from mcnc_format.errors import MCNCError

WORLD = 2


def _outcome(call: Callable[[], object]) -> dict[str, str]:
    try:
        call()
    except MCNCError as exc:
        return {"raised": type(exc).__name__, "message": str(exc), "mcnc": "yes"}
    except CheckpointException as exc:
        inner = [type(f[0]).__name__ for _, f in sorted(exc.failures.items())]
        return {"raised": "CheckpointException", "failures": ",".join(inner),
                "message": str(exc)[-2000:]}
    except BaseException as exc:
        return {"raised": type(exc).__name__, "message": str(exc)[-2000:]}
    return {"raised": ""}


def _rank_main(rank: int, paths: list[str], store: str, out: str) -> None:
    init_gloo(rank, WORLD, store)
    try:
        path = paths[rank]
        results = {
            "load": _outcome(lambda: load(TinyLM().state_dict(), path)),
            "dcp": _outcome(lambda: dcp.load(TinyLM().state_dict(),
                                             storage_reader=MCNCStorageReader(path))),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        leave_gloo()
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, paths: list[Path]) -> list[dict[str, dict[str, str]]]:
    mp.start_processes(_rank_main, args=([str(p) for p in paths], str(tmp_path / "store"),
                                         str(tmp_path)),
                       nprocs=WORLD, join=True, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _corrupt(path: Path, target: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the header: its checksum no longer holds
    target.write_bytes(data)
    return target


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_one_ranks_unreadable_file_reaches_every_rank_as_the_mcnc_error(
        tmp_path: Path, fault: str) -> None:
    good = write_model_file(tmp_path, seed=5)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "base.safetensors", other)
    bad = (other / "model.mcnc" if fault == "missing"
           else _corrupt(good, other / "model.mcnc"))
    results = _run(tmp_path, [good, bad])
    expected = results[1]["load"]["raised"]  # the failing rank's own error
    assert expected == ("MCNCFileNotFoundError" if fault == "missing" else "ChecksumError")
    for rank in range(WORLD):
        got = results[rank]["load"]
        assert got["raised"] == expected and got.get("mcnc") == "yes", (rank, got)
        assert str(bad) in got["message"]
        direct = results[rank]["dcp"]
        assert direct["raised"] == "CheckpointException", (rank, direct)
        assert direct["failures"] == expected, (rank, direct)  # not "metadata is None"


def test_another_file_on_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Each rank opens its own path (a node-local copy): a copy of another model there, with
    the same names and shapes, filled that rank's tensors from it without a word. The
    coordinator compares what each rank opened (size, header checksum) before any reads."""
    good = write_model_file(tmp_path, seed=5)
    other = tmp_path / "other"
    other.mkdir()
    write_model_file(other, seed=6)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "base.safetensors", copy)
    shutil.copy(good, copy / "model.mcnc")
    results = _run(tmp_path, [good, other / "model.mcnc"])
    for rank in range(WORLD):
        got = results[rank]["load"]
        assert got["raised"] == "MCNCError" and got.get("mcnc") == "yes", (rank, got)
        assert "rank 1 opened another file than rank 0" in got["message"], (rank, got)
        direct = results[rank]["dcp"]
        assert direct["raised"] == "CheckpointException" and direct["failures"] == "MCNCError"
    for rank, outcome in enumerate(_run(tmp_path, [good, copy / "model.mcnc"])):
        assert outcome["load"]["raised"] == "" == outcome["dcp"]["raised"], (rank, outcome)
