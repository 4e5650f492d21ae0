"""What the layout tests share: a trained reparametrized MLP, the ``mcnc pack`` command run
in-process, and a pickle that would leave a marker file if anything unpickled it."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mcnc_format.cli import pack_cmd
from mcnc_format.torch import MCNCConfig, reparametrize


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 7))


def config(seed: int) -> MCNCConfig:
    return MCNCConfig(k=4, d=64, hidden=(16,), seed=seed % 2**32)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=g), torch.randint(0, 7, (16,), generator=g)


def trained(seed: int, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A reparametrized MLP after a few Adam steps (alpha, beta and the optimizer state are
    not initial)."""
    model = reparametrize(mlp(seed), config(seed))
    x, y = batch(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def run_pack(args: list[str], monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``mcnc-pack ARGS`` in-process: exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["mcnc-pack", *args])
    try:
        pack_cmd.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


class _Marker:
    """Unpickling this creates the file it names: proof that something ran the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.system, (f"touch {self.path}",))


def booby_trapped_pickle(path: Path, marker: Path) -> None:
    """Write a pickle at ``path`` that creates ``marker`` when unpickled."""
    path.write_bytes(pickle.dumps(_Marker(marker)))
