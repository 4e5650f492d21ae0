"""Forked children (``multiprocessing`` fork, DataLoader workers) keep reading a file their
parent opened: every pool, lock and cached descriptor is reset after fork
(``os.register_at_fork``), so no child waits on a thread that only existed in its parent.
CUDA cannot be used in a child forked after the parent used it: such a load is a
``UsageError`` up front."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest
import torch
from stream_helpers import mixed_file
from torch.utils.data import DataLoader, Dataset

import mcnc_format as mf
from mcnc_format import devices
from mcnc_format.errors import UsageError

FORK = multiprocessing.get_context("fork")
#: A child that has not answered by then hangs.
PATIENCE = 30


def _child_reads(f: mf.MCNCFile, name: str, out: multiprocessing.Queue) -> None:
    # As DataLoader's workers do: torch's OpenMP/MKL threads used by the parent hang a
    # forked child's first product otherwise (torch's own limit, not this library's).
    torch.set_num_threads(1)
    out.put(f.get_tensor(name).float().tolist())  # plain values: the child exits


def _read_in_child(f: mf.MCNCFile, name: str) -> list:
    """Tensor ``name`` as a forked child of this process reads it from ``f``."""
    out = FORK.Queue()
    child = FORK.Process(target=_child_reads, args=(f, name, out))
    child.start()
    child.join(PATIENCE)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung reading a base tensor")
    assert child.exitcode == 0
    return out.get(timeout=5)


@pytest.mark.parametrize("verify", ["full", "cached"])
def test_a_forked_child_reads_a_base_its_parent_was_hashing(tmp_path: Path,
                                                             verify: str) -> None:
    path = mixed_file(tmp_path)
    want = mf.load(path, verify="none")
    with mf.open(path, verify=verify) as f:
        f.get_tensor("m2")  # the parent's SHA-256 workers exist now
        assert _read_in_child(f, "m5") == want["m5"].float().tolist()


def test_a_child_forked_while_a_parent_thread_reads(tmp_path: Path) -> None:
    """A fork while other threads of the parent hold the file's locks."""
    path = mixed_file(tmp_path)
    want = mf.load(path, verify="none")
    with mf.open(path, verify="full") as f:
        stop = threading.Event()

        def keep_reading() -> None:
            while not stop.is_set():
                f.get_tensor("m2")

        readers = [threading.Thread(target=keep_reading) for _ in range(2)]
        for reader in readers:
            reader.start()
        try:
            for _ in range(5):
                assert _read_in_child(f, "m5") == want["m5"].float().tolist()
        finally:
            stop.set()
            for reader in readers:
                reader.join()


class _Tensors(Dataset):
    """A dataset reading one tensor of an open file per item, as a DataLoader worker would."""

    def __init__(self, f: mf.MCNCFile, names: list[str]) -> None:
        self.f = f
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.f.get_tensor(self.names[index]).reshape(-1)[:4].float()


def test_dataloader_workers_read_an_open_file(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    want = mf.load(path, verify="none")
    names = ["m2", "m5"] * 4
    with mf.open(path, verify="full") as f:
        f.get_tensor("m2")
        loader = DataLoader(_Tensors(f, names), batch_size=None, num_workers=2,
                            multiprocessing_context="fork", timeout=PATIENCE)
        got = list(loader)
    assert all(torch.equal(g, want[n].reshape(-1)[:4].float())
               for g, n in zip(got, names, strict=True))


def _child_asks_cuda(out: multiprocessing.Queue) -> None:
    try:
        devices.check_device("cuda")
    except UsageError as exc:
        out.put(str(exc))
    else:
        out.put(None)


def test_a_child_forked_after_cuda_was_used_gets_a_usage_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA itself cannot run in such a child; the load says so instead of hanging or
    failing inside torch (the parent's CUDA use is simulated: this runs without a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    out = FORK.Queue()
    child = FORK.Process(target=_child_asks_cuda, args=(out,))
    child.start()
    child.join(PATIENCE)
    assert child.exitcode == 0
    message = out.get(timeout=5)
    assert message is not None and "fork" in message and "spawn" in message
