"""``load_into`` fills a real ``nn.Module`` with what ``load`` returns.

An MLP and a small CNN with BatchNorm (float buffers and the int64 ``num_batches_tracked``)
are saved with their weights MCNC-compressed, then loaded into modules built normally and on
the meta device (nothing allocated until the file's tensors are assigned). ``strict`` decides
whether keys that do not match are an error naming them or a returned report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, Segment, Theta0


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn}


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


def save_model(model: nn.Module, path: Path, seed: int, skip: tuple[str, ...] = (),
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """Weights of rank >= 2 as members of one segment over PyTorch's default init (theta0 =
    fan_in_uniform), float biases and buffers plain (so packed, §6.4), integer buffers
    (BatchNorm's ``num_batches_tracked``) ``Dense``: every stored encoding reaches the module."""
    rng = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    weights = [k for k, v in state.items() if v.dim() >= 2]
    total = sum(state[k].numel() for k in weights)
    gen = GeneratorSpec(k=4, d=64, hidden=(16, 16), seed=seed % 2**32)
    chunks = math.ceil(total / gen.d)
    segment = Segment(gen, torch.rand(chunks, 2, 4, generator=rng) * 10 - 5,
                      torch.randn(chunks, 2, generator=rng) * 0.1)
    tensors: dict[str, object] = {}
    for i, (name, value) in enumerate(state.items()):
        if name in weights:
            tensors[name] = MCNC(segment, tuple(value.shape),
                                 theta0=Theta0.fan_in_uniform(seed % 2**32, i))
        elif value.is_floating_point():
            tensors[name] = torch.randn(value.shape, generator=rng)
        else:
            tensors[name] = Dense(torch.tensor(17, dtype=value.dtype))
    tensors.update(extra or {})
    mf.save(path, tensors)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("name", list(MODELS))
def test_load_into_matches_load(name: str, meta: bool, seed: int, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.mcnc"
    save_model(MODELS[name](), path, seed)
    expected = mf.load(path)
    with mf.open(path) as f:
        encodings = {f.tensor_info(n).encoding for n in f.keys()}  # noqa: SIM118
    assert encodings == ({"mcnc", "packed", "dense"} if name == "cnn" else {"mcnc", "packed"})
    if meta:
        with torch.device("meta"):
            model = MODELS[name]()
    else:
        model = MODELS[name]()
    assert mf.load_into(model, path) == ([], [])
    state = _state(model)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert not state[key].is_meta, key
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    for parameter in model.parameters():
        assert isinstance(parameter, nn.Parameter) and parameter.requires_grad
    if name == "cnn":
        assert state["1.num_batches_tracked"].dtype == torch.int64
        assert int(state["1.num_batches_tracked"]) == 17
    model(torch.randn(2, 12) if name == "mlp" else torch.randn(2, 3, 8, 8))  # usable


def test_strict_missing_keys_raise_and_leave_module(seed: int, tmp_path: Path) -> None:
    path = tmp_path / "partial.mcnc"
    save_model(cnn(), path, seed, skip=("1.running_var", "4.bias"))
    model = cnn()
    before = {k: v.clone() for k, v in _state(model).items()}
    with pytest.raises(mf.MCNCError, match=r"missing \['1.running_var', '4.bias'\]"):
        mf.load_into(model, path)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "strict failure changed it"


def test_strict_unexpected_keys_raise(seed: int, tmp_path: Path) -> None:
    path = tmp_path / "extra.mcnc"
    save_model(mlp(), path, seed, extra={"head.weight": torch.ones(2, 2)})
    with pytest.raises(mf.MCNCError, match=r"unexpected \['head.weight'\]") as info:
        mf.load_into(mlp(), path)
    assert str(path) in str(info.value) and "strict=False" in str(info.value)


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_non_strict_reports_and_loads_the_rest(meta: bool, seed: int, tmp_path: Path) -> None:
    path = tmp_path / "mixed.mcnc"
    save_model(cnn(), path, seed, skip=("0.bias",), extra={"aux.scale": torch.ones(3)})
    if meta:
        with torch.device("meta"):
            model = cnn()
    else:
        model = cnn()
    missing, unexpected = mf.load_into(model, path, strict=False)
    assert (missing, unexpected) == (["0.bias"], ["aux.scale"])
    expected = mf.load(path)
    state = _state(model)
    for key in state.keys() - {"0.bias"}:
        assert torch.equal(state[key], expected[key]), key
    assert state["0.bias"].is_meta == meta


def test_what_would_not_fill_whole_parameters_is_refused_before_loading(seed: int,
                                                                         tmp_path: Path) -> None:
    """``load_into`` fills whole parameters. A box of a tensor was broadcast into its
    parameter by ``copy_`` (one row copied into every row, no error); ``names`` was ignored
    (every tensor loaded); ``device="meta"`` failed inside torch copying out of a meta
    tensor. Each is a ``UsageError`` naming what to use, and the module is left as it was."""
    path = tmp_path / "mlp.mcnc"
    save_model(mlp(), path, seed)
    model = mlp()
    before = {k: v.clone() for k, v in _state(model).items()}
    refusals = [({"boxes": {"0.weight": (slice(0, 1),)}}, "boxes=.*mcnc_format.load"),
                ({"names": ["0.bias"]}, "names=.*strict=False"),
                ({"device": "meta"}, "meta")]
    for keywords, message in refusals:
        with pytest.raises(mf.UsageError, match=message):
            mf.load_into(model, path, **keywords)  # type: ignore[arg-type]
        after = _state(model)
        assert all(torch.equal(before[k], after[k]) for k in before), keywords
    with torch.device("meta"):
        on_meta = mlp()
    assert mf.load_into(on_meta, path, "meta") == ([], [])  # shapes only: nothing to copy
    assert all(v.is_meta for v in _state(on_meta).values())


@pytest.mark.parametrize("strict", [True, False])
def test_a_shape_that_differs_is_a_runtime_error_as_in_load_state_dict(
        strict: bool, seed: int, tmp_path: Path) -> None:
    """``load_state_dict`` raises ``RuntimeError`` for a size mismatch, strict or not; so does
    ``load_into`` (a ``StateDictMismatchError``; it was a plain ``MCNCError``), naming the
    tensor and both shapes, before anything is loaded."""
    path = tmp_path / "mlp.mcnc"
    save_model(mlp(), path, seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    before = {k: v.clone() for k, v in _state(model).items()}
    with pytest.raises(RuntimeError, match=r"'2.weight' has shape \[4, 16\].*\[5, 16\]") as raised:
        mf.load_into(model, path, strict=strict)
    assert isinstance(raised.value, mf.StateDictMismatchError)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
