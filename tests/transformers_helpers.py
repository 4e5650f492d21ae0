"""Tiny transformers models built locally (no downloads), trained a few steps in the manifold.

Shared by the transformers and PEFT tests: a Llama with tied embeddings, a GPT-2 (tied, its
attention in ``Conv1D`` layers), a BERT encoder, and a WordLevel tokenizer over their vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch_helpers import SEED
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB = 64


def llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                      n_positions=64, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=True))


def bert() -> nn.Module:
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, vocab_size=VOCAB,
                                max_position_embeddings=64, pad_token_id=0))


MODELS: dict[str, Callable[[], nn.Module]] = {"llama": llama, "gpt2": gpt2, "bert": bert}


def tokens(offset: int = 0, batch: int = 2, length: int = 10) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + offset)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, the last hidden state of an encoder."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def train(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few Adam steps on random tokens (next-token loss, or the encoder output's norm);
    returns the model in eval mode."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        ids = tokens(100 + step)
        out = model(input_ids=ids, labels=ids) if model.can_generate() else model(input_ids=ids)
        loss = out.loss if model.can_generate() else out.last_hidden_state.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the models' vocabulary: ``w3 .. w63`` and four specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "<s>", "</s>", "[UNK]"]
    vocab = {name: i for i, name in enumerate(specials[:3])}
    vocab.update({f"w{i}": i for i in range(3, VOCAB - 1)})
    vocab["[UNK]"] = VOCAB - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>", unk_token="[UNK]")
