"""``mcnc_format.peft.load_adapter``: an ``.mcnc`` LoRA adapter attached as a PEFT adapter.

A tiny Llama gets MCNC-LoRA adapters, trains a few steps and is saved. The adapter attached
to a fresh copy of the base with ``load_adapter`` (from the file and through ``hf://``)
computes what the file's merged weights compute, ``merge_and_unload()`` gives those weights,
no adapter file is written on the way, and the ``PeftModel`` trains further and saves with
PEFT's own ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_server import READ_TOKEN, WRITE_TOKEN, HubServer
from peft import PeftModel
from torch import nn
from torch_helpers import assert_same_outputs, one_thread  # noqa: F401 (autouse fixture)
from transformers_helpers import llama, output, tokens, train

import mcnc_format
from mcnc_format import hub as mhub
from mcnc_format.errors import HubError, MCNCError
from mcnc_format.hub import HubResolver
from mcnc_format.peft import load_adapter
from mcnc_format.serving import AdapterBank
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, save_model

CONFIG = MCNCConfig(k=4, d=64, hidden=(8,), seed=11)


def base() -> nn.Module:
    """The same base weights on every call."""
    torch.manual_seed(0)
    return llama()


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """The trained adapter's file (holding, as save_model writes it, the whole model)."""
    model = add_mcnc_lora(base(), CONFIG, target_modules=["q_proj", "v_proj"], rank=4,
                          lora_alpha=8)
    (tmp_path / "adapter").mkdir()
    return save_model(train(model), tmp_path / "adapter" / "a.mcnc")


def merged(path: Path) -> nn.Module:
    """The plain model holding the file's merged weights."""
    model = base()
    mcnc_format.load_into(model, path)
    return model.eval()


def test_load_adapter_equals_the_merged_model(adapter: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in adapter.parent.iterdir())
    peft_model = load_adapter(base(), adapter).eval()
    assert isinstance(peft_model, PeftModel)
    assert sorted(p.name for p in adapter.parent.iterdir()) == before  # nothing written
    ids = tokens(1)
    want = output(merged(adapter), ids)
    assert_same_outputs(output(peft_model, ids), want)
    assert_same_outputs(output(peft_model.merge_and_unload(), ids), want)


def test_the_peft_model_trains_further_and_saves_with_peft(adapter: Path,
                                                           tmp_path: Path) -> None:
    peft_model = load_adapter(base(), adapter, adapter_name="mcnc")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".mcnc." in n for n in trainable)
    before = output(peft_model.eval(), tokens(2))
    train(peft_model, steps=2)
    after = output(peft_model, tokens(2))
    assert not torch.equal(before, after)
    peft_model.save_pretrained(tmp_path / "peft")
    saved = tmp_path / "peft" / "mcnc"
    assert (saved / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(base(), saved).eval()
    assert_same_outputs(output(reloaded, tokens(2)), after)


def test_load_adapter_through_the_hub(adapter: Path, hub: HubServer) -> None:
    mhub.push(adapter, "alice/adapter", token=WRITE_TOKEN)
    peft_model = load_adapter(base(), "hf://alice/adapter/a.mcnc").eval()
    ids = tokens(3)
    assert_same_outputs(output(peft_model, ids), output(merged(adapter), ids))


def test_a_second_adapter_is_added_beside_the_first(adapter: Path) -> None:
    peft_model = load_adapter(base(), adapter)
    same = load_adapter(peft_model, adapter, adapter_name="again")
    assert same is peft_model and set(peft_model.peft_config) == {"default", "again"}
    ids = tokens(4)
    assert_same_outputs(output(peft_model.eval(), ids), output(merged(adapter), ids))


def test_files_without_an_adapter_or_for_another_model_are_refused(adapter: Path,
                                                                   tmp_path: Path) -> None:
    dense = mcnc_format.save(tmp_path / "dense.mcnc", {"w": torch.ones(3)})
    with pytest.raises(MCNCError, match="no lora tensors"):
        load_adapter(base(), dense)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(MCNCError, match="does not have"):
        load_adapter(other, adapter)


class _Tiny(nn.Module):
    def __init__(self, out: int = 16, reuse: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(8, out)
        self.k = self.q if reuse else nn.Linear(8, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + self.k(x)


def _tiny_adapter(path: Path) -> Path:
    from mcnc_format import MCNC, GeneratorSpec, LoRA, Segment

    g = torch.Generator().manual_seed(3)
    seg = Segment(GeneratorSpec(k=3, d=16, hidden=(8,), seed=3), torch.randn(3, 2, 3, generator=g),
                  torch.randn(3, 2, generator=g))
    mcnc_format.save(path, {"q.weight": LoRA(MCNC(seg, (2, 8)), MCNC(seg, (16, 2)), 0.5)})
    return path


def test_targets_are_checked_before_peft_touches_the_model(tmp_path: Path) -> None:
    """A wrong shape, a module that is not a Linear, a Linear reused at two paths (PEFT would
    adapt one) and a taken adapter name are refused with the model left as it was."""
    path = _tiny_adapter(tmp_path / "q.mcnc")
    wrong = _Tiny(out=32)
    with pytest.raises(MCNCError, match=r"weight shape \[16, 8\]"):
        load_adapter(wrong, path)
    assert type(wrong.q) is nn.Linear
    with pytest.raises(MCNCError, match="reused at"):
        load_adapter(_Tiny(reuse=True), path)
    embedding = nn.Module()
    embedding.q = nn.Embedding(8, 16)
    with pytest.raises(MCNCError, match="Embedding"):
        load_adapter(embedding, path)
    peft_model = load_adapter(_Tiny(), path)
    from mcnc_format.errors import UsageError

    with pytest.raises(UsageError, match="already has an adapter named 'default'"):
        load_adapter(peft_model, path)
    assert isinstance(load_adapter(peft_model, path, adapter_name="second"), PeftModel)


def test_a_tensor_trained_beside_the_adapter_is_refused_not_dropped(adapter: Path,
                                                                     tmp_path: Path) -> None:
    """A norm unfrozen and trained with the adapter is stored dense beside the lora tensors;
    attaching only the factors gave a model other than the trained one, silently. It is
    refused before PEFT touches the model (``check_base=False`` attaches the factors alone).
    Dense tensors equal to the model's (a ``save_model`` file's base) pass, also compared in
    a bfloat16 model's dtype and under a PEFT wrapper (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    model = add_mcnc_lora(base(), CONFIG, target_modules=["q_proj", "v_proj"], rank=4,
                          lora_alpha=8)
    model.model.norm.weight.requires_grad_(True)
    trained = save_model(train(model), tmp_path / "with_norm.mcnc")
    plain = base()
    with pytest.raises(MCNCError, match=r"'model\.norm\.weight'") as excinfo:
        load_adapter(plain, trained)
    assert excinfo.value.tensor == "model.norm.weight"
    assert not any(isinstance(m, PeftModel) or hasattr(m, "lora_A") for m in plain.modules())
    assert isinstance(load_adapter(base(), trained, check_base=False), PeftModel)
    without_norm = base()
    without_norm.model.norm = nn.Identity()
    with pytest.raises(MCNCError, match="does not have"):
        load_adapter(without_norm, adapter)

    half = load_adapter(base().to(torch.bfloat16), adapter)
    assert half.peft_config["default"].r == 4
    wrapped = get_peft_model(base(), LoraConfig(r=2, target_modules=["k_proj"],
                                                modules_to_save=["norm"]), adapter_name="own")
    ids = tokens(5)
    assert_same_outputs(output(load_adapter(wrapped, adapter).eval(), ids),
                        output(merged(adapter), ids))


def test_a_private_adapter_is_read_with_the_callers_resolver(adapter: Path,
                                                             hub: HubServer) -> None:
    """An adapter in a private repository: without a token it is not found; with
    ``resolver=HubResolver(token=...)`` both ``load_adapter`` and ``AdapterBank.add`` read it
    (they had no way to pass a token but the environment)."""
    mhub.push(adapter, "alice/private-adapter", token=WRITE_TOKEN, private=True)
    uri = "hf://alice/private-adapter/a.mcnc"
    bank = AdapterBank(base(), device="cpu", factor_cache_bytes=1 << 20)
    with pytest.raises(HubError):
        load_adapter(base(), uri)
    with pytest.raises(HubError):
        bank.add("private", uri)
    reader = HubResolver(token=READ_TOKEN)
    peft_model = load_adapter(base(), uri, resolver=reader).eval()
    ids = tokens(5)
    assert_same_outputs(output(peft_model, ids), output(merged(adapter), ids))

    bank.add("private", uri, resolver=reader)
    with mcnc_format.open(adapter) as f:
        name = next(t for t in f.keys() if f.tensor_info(t).encoding == "lora")  # noqa: SIM118
        a, b, scale = f.get_lora_factors(name)
    got_a, got_b, got_scale = bank.factors("private")[name.removesuffix(".weight")]
    assert torch.equal(got_a, a) and torch.equal(got_b, b) and got_scale == scale
