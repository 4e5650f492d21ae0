"""``mcnc pack checkpoint-N/``: Hugging Face Trainer checkpoints of a tiny Llama (built from a
local config) trained in the manifold by ``transformers.Trainer`` itself.

A reparametrized model's checkpoint (one ``model.safetensors``, or shards with their index)
packs to the bytes ``save_model`` writes; an MCNC-LoRA fine-tune packs with ``--base`` to the
file a plain state dict gives with ``--base``. Optimizer, scheduler, RNG and training-argument
pickles are dropped, said, and never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from layout_helpers import booby_trapped_pickle, run_pack
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import mcnc_format as mf
from mcnc_format.converters.pack import pack
from mcnc_format.errors import MCNCError
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, reparametrize, save_model

VOCAB = 64
STEPS = 2
TRAINING_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


class ShardedLlama(LlamaForCausalLM):
    """A Llama whose ``save_pretrained`` shards at 2 KB, as a large model's does at 5 GB."""

    def save_pretrained(self, *args: object, **kwargs: object) -> None:
        super().save_pretrained(*args, **{**kwargs, "max_shard_size": "2KB"})


def _llama(seed: int, sharded: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=32, tie_word_embeddings=False)
    return (ShardedLlama if sharded else LlamaForCausalLM)(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (8, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model: torch.nn.Module, seed: int, output: Path) -> Path:
    """``Trainer`` for ``STEPS`` steps with a checkpoint at the last; its folder."""
    args = TrainingArguments(str(output), max_steps=STEPS, save_steps=STEPS, use_cpu=True,
                             per_device_train_batch_size=4, learning_rate=0.05,
                             report_to=[], logging_strategy="no", disable_tqdm=True,
                             seed=seed % 2**31)
    Trainer(model=model, args=args, train_dataset=_Tokens(seed)).train()
    return output / f"checkpoint-{STEPS}"


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "shards"])
def test_reparametrized_trainer_checkpoint(sharded: bool, seed: int, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = reparametrize(_llama(seed, sharded), MCNCConfig(k=4, d=300, hidden=(16,),
                                                           seed=seed % 2**32))
    checkpoint = _train(model, seed, tmp_path / "run")
    assert (checkpoint / "model.safetensors.index.json").is_file() == sharded
    marker = tmp_path / "ran"
    for name in TRAINING_PICKLES:
        assert (checkpoint / name).is_file(), name
        booby_trapped_pickle(checkpoint / name, marker)
    capsys.readouterr()
    code, out, err = run_pack([str(checkpoint), str(tmp_path / "out.mcnc")], monkeypatch,
                              capsys)
    assert code == 0, err
    assert "converter hf-trainer" in out
    assert f"global step {STEPS}" in err
    assert all(name in err for name in TRAINING_PICKLES)
    assert not marker.exists()
    save_model(model, tmp_path / "direct.mcnc")
    assert (tmp_path / "out.mcnc").read_bytes() == (tmp_path / "direct.mcnc").read_bytes()


def test_mcnc_lora_trainer_checkpoint_with_base(seed: int, tmp_path: Path) -> None:
    base = _llama(seed, sharded=False)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()},
              tmp_path / "base.safetensors")
    model = add_mcnc_lora(base, MCNCConfig(k=4, d=200, hidden=(16,), seed=seed % 2**32),
                          target_modules=["q_proj", "v_proj"], rank=4, lora_alpha=8)
    checkpoint = _train(model, seed, tmp_path / "run")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    pack(tmp_path / "plain.pt", tmp_path / "plain.mcnc", base=tmp_path / "base.safetensors")
    with pytest.raises(MCNCError, match=f"holds checkpoints rather than being one: "
                       f"checkpoint-{STEPS} \\(hf-trainer\\)"):
        pack(tmp_path / "run", tmp_path / "adapter.mcnc")
    result = pack(checkpoint, tmp_path / "adapter.mcnc", base=tmp_path / "base.safetensors")
    assert result.converter == "hf-trainer"
    assert (tmp_path / "adapter.mcnc").read_bytes() == (tmp_path / "plain.mcnc").read_bytes()
    with mf.open(tmp_path / "adapter.mcnc") as f:
        assert f.info["base_model"] == "base.safetensors"
    base_bytes = (tmp_path / "base.safetensors").stat().st_size
    assert (tmp_path / "adapter.mcnc").stat().st_size < base_bytes / 4  # the adapter alone
