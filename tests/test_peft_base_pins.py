"""``load_adapter`` checks the model it attaches to against the adapter's SHA-256 pins of
its base tensors (external theta0, SPEC.md §7.4) by default: an adapter packed against
another base is refused before PEFT touches the model; ``check_base=False`` skips the check.
A tensor is hashed once per version: an in-place change is seen, an unchanged tensor is not
hashed again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from torch_helpers import one_thread  # noqa: F401 (autouse fixture)
from transformers_helpers import llama, train

import mcnc_format
from mcnc_format import Theta0, reader
from mcnc_format.errors import ExternalReferenceError, UsageError
from mcnc_format.header import LoRATensor
from mcnc_format.peft import load_adapter
from mcnc_format.reader import tensor_sha256
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, save_model

CONFIG = MCNCConfig(k=4, d=64, hidden=(8,), seed=11)


def base() -> nn.Module:
    torch.manual_seed(0)
    return llama()


@pytest.fixture
def pinned(tmp_path: Path) -> tuple[Path, list[str]]:
    """An adapter whose lora tensors pin their base weights (external theta0)."""
    model = train(add_mcnc_lora(base(), CONFIG, target_modules=["q_proj"], rank=4,
                                lora_alpha=8), steps=1)
    plain = save_model(model, tmp_path / "plain.mcnc")
    with mcnc_format.open(plain) as f:
        names = [t.name for t in f.header.tensors if isinstance(t, LoRATensor)]
    weights = {n: base().get_parameter(n).detach().contiguous() for n in names}
    save_file(weights, str(tmp_path / "base.safetensors"))
    theta0 = {n: Theta0.external("base.safetensors", n, tensor_sha256(w))
              for n, w in weights.items()}
    return save_model(model, tmp_path / "a.mcnc", theta0=theta0), names


def test_the_base_it_was_packed_against_is_accepted(pinned: tuple[Path, list[str]]) -> None:
    path, _ = pinned
    assert isinstance(load_adapter(base(), path), PeftModel)


def test_another_base_is_refused_before_peft_touches_it(pinned: tuple[Path, list[str]]
                                                         ) -> None:
    path, names = pinned
    other = base()
    with torch.no_grad():
        other.get_parameter(names[1]).add_(0.01)
    with pytest.raises(ExternalReferenceError, match="sha256") as caught:
        load_adapter(other, path)
    assert caught.value.tensor == names[1]
    assert not isinstance(other, PeftModel) and not any(
        "lora" in n for n, _ in other.named_modules())
    assert isinstance(load_adapter(other, path, check_base=False), PeftModel)


def test_a_tensor_is_hashed_once_per_version(pinned: tuple[Path, list[str]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path, names = pinned
    hashed: list[int] = []
    real = reader.tensor_sha256

    def counting(tensor: torch.Tensor) -> str:
        hashed.append(1)
        return real(tensor)

    monkeypatch.setattr(reader, "tensor_sha256", counting)
    model = load_adapter(base(), path, adapter_name="one")
    assert len(hashed) == len(names)
    load_adapter(model, path, adapter_name="two")
    assert len(hashed) == len(names)  # unchanged tensors: not hashed again
    weight = model.get_base_model().get_parameter(names[0].replace(
        ".weight", ".base_layer.weight"))
    with torch.no_grad():
        weight.mul_(1.0001)  # changed in place: a new version
    with pytest.raises(ExternalReferenceError, match="sha256"):
        load_adapter(model, path, adapter_name="three")


def test_a_base_on_the_meta_device_cannot_be_checked(pinned: tuple[Path, list[str]]) -> None:
    path, _ = pinned
    empty = base().to("meta")
    with pytest.raises(UsageError, match="meta"):
        load_adapter(empty, path)
