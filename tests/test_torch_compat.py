"""torch_compat's fallbacks, run on this torch by taking away what an older torch lacks.

pyproject promises torch 2.3 or newer; CI installs a newer one, so each fallback is checked
here with the newer API removed for the test (``.ci/floor`` runs the whole suite on 2.3).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from mcnc_format import torch_compat
from mcnc_format.errors import ReparametrizeError, UsageError
from mcnc_format.torch import MCNCConfig, reparametrize

CONFIG = MCNCConfig(k=4, d=64, hidden=(8,), seed=3)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("older", [False, True], ids=["this-torch", "older-torch"])
def test_a_state_dict_of_another_config_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                   older: bool) -> None:
    """The manifest check runs as a load-state-dict pre-hook under either registration."""
    if older:
        monkeypatch.delattr(nn.Module, "register_load_state_dict_pre_hook", raising=False)
    model = reparametrize(_mlp(), CONFIG)
    other = reparametrize(_mlp(), MCNCConfig(**{**CONFIG.to_dict(), "seed": 4}))
    with pytest.raises(ReparametrizeError, match=r"config fields \['seed'\]"):
        other.load_state_dict(model.state_dict())
    fresh = reparametrize(_mlp(), CONFIG)
    fresh.load_state_dict(model.state_dict())


def test_weights_only_loads_without_scoped_globals(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path) -> None:
    """Where torch cannot be told to allow more globals, a load that needs none goes on and
    one that needs some is refused, naming torch."""
    monkeypatch.delattr(torch.serialization, "safe_globals", raising=False)
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, path)
    with torch_compat.safe_globals([]):
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    with pytest.raises(UsageError, match="needs a newer torch"):
        torch_compat.safe_globals([(dict, "builtins.dict")])


def test_out_of_memory_is_the_accelerators_error() -> None:
    assert issubclass(torch.cuda.OutOfMemoryError, torch_compat.OUT_OF_MEMORY)
    assert issubclass(torch_compat.OUT_OF_MEMORY, RuntimeError)


def test_a_dtensor_is_known_under_either_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """``is_dtensor`` finds ``DTensor`` where torch defines it, and imports nothing."""
    assert not torch_compat.is_dtensor(torch.ones(1))

    class DTensor(torch.Tensor):
        pass

    older = types.ModuleType("torch.distributed._tensor")
    older.DTensor = DTensor  # type: ignore[attr-defined]
    monkeypatch.delitem(sys.modules, "torch.distributed.tensor", raising=False)
    monkeypatch.setitem(sys.modules, "torch.distributed._tensor", older)
    assert torch_compat.is_dtensor(torch.ones(1).as_subclass(DTensor))
    assert not torch_compat.is_dtensor(torch.ones(1))


def test_the_distributed_integration_names_the_torch_it_needs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint import metadata

    if hasattr(metadata, "StorageMeta"):
        torch_compat.require_checkpoint_api("x")  # this torch has it
    monkeypatch.delattr(metadata, "StorageMeta", raising=False)
    with pytest.raises(UsageError, match=r"x needs torch 2\.4 or newer"):
        torch_compat.require_checkpoint_api("x")
