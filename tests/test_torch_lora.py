"""MCNC-LoRA: adapters whose A and B factors live on the MCNC manifold (the paper's LLM setup).

A tiny transformer gets adapters on its attention and MLP projections, trains a few Adam
steps, and is saved: the file's ``lora`` tensors, loaded into a plain model of the same
architecture, give the adapted model's outputs within ``OUTPUT_RTOL`` of the output scale
(the adapter path ``B(Ax)`` and the merged weight round differently in float32). Merging
reproduces the file's merged weights exactly (same arithmetic as the reader), and unmerging
restores the base weights to float32 rounding.

Inputs are fresh each run, seeded from ``MCNC_TEST_SEED`` or a random seed printed on failure.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_helpers import (  # noqa: F401 (one_thread: autouse fixture)
    SEED,
    assert_same_outputs,
    assert_state_dict_packs_like_the_model,
    one_thread,
)

import mcnc_format
from mcnc_format.errors import ReparametrizeError
from mcnc_format.header import PackedTensor
from mcnc_format.torch import (
    MCNCConfig,
    MCNCLoRALinear,
    add_mcnc_lora,
    merge_mcnc_lora,
    save_model,
    unmerge_mcnc_lora,
)

TARGETS = ("q_proj", "v_proj", "mlp.*")
CONFIG = MCNCConfig(k=5, d=200, hidden=(32, 32), seed=SEED & 0xFFFF)


class Block(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 40, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.blocks(self.embed(tokens)))


def _tokens(offset: int = 0) -> torch.Tensor:
    return torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(SEED + offset))


def _pretrained() -> TinyLM:
    torch.manual_seed(SEED)
    return TinyLM().eval()


def _train(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    tokens = _tokens()
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1)).backward()
        opt.step()


def _adapted(chunking: str = "tensor") -> TinyLM:
    config = MCNCConfig(**{**CONFIG.to_dict(), "chunking": chunking})
    return add_mcnc_lora(_pretrained(), config, target_modules=TARGETS, rank=4, lora_alpha=8)


def test_adapters_start_as_the_identity_with_peft_names_and_only_alpha_beta_train():
    base = _pretrained()
    model = _adapted()
    x = _tokens(1)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    layers = [m for m in model.modules() if isinstance(m, MCNCLoRALinear)]
    assert len(layers) == 2 * 4  # per block: q_proj, v_proj, mlp.0, mlp.2
    keys = model.state_dict().keys()
    assert "blocks.0.q_proj.base_layer.weight" in keys
    assert "blocks.0.q_proj.lora_merged" in keys
    assert layers[0].scale == 2.0
    bound = 1 / 32**0.5  # A starts at PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))
    a = layers[0].lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert not layers[0].lora_B.weight.any()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"mcnc_{w}_{s}" for s in range(16) for w in ("alpha", "beta")}


@pytest.mark.parametrize("chunking", ["tensor", "model"])
def test_adapted_model_equals_plain_model_loaded_from_file(tmp_path, chunking):
    model = _adapted(chunking)
    _train(model)
    path = save_model(model, tmp_path / "lora.mcnc")
    with mcnc_format.open(path) as f:
        assert f.tensor_info("blocks.1.v_proj.weight").encoding == "lora"
        # The frozen weights, biases and norms are small: plain tensors packed in one blob.
        assert f.tensor_info("blocks.1.k_proj.weight").encoding == "packed"
        assert len({t.blob for t in f.header.tensors if isinstance(t, PackedTensor)}) == 1
        assert len(f.header.segments) == (1 if chunking == "model" else 16)
        _, _, scale = f.get_lora_factors("blocks.0.mlp.0.weight")
        assert scale == 2.0
    plain = TinyLM().eval()
    plain.load_state_dict(mcnc_format.load(path), strict=True)
    x = _tokens(2)
    with torch.no_grad():
        adapted = model(x)
        assert_same_outputs(plain(x), adapted)
        assert not torch.allclose(adapted, _pretrained()(x))  # training moved the adapters


def test_merge_matches_the_file_and_unmerge_restores_the_base(tmp_path):
    model = _adapted()
    _train(model)
    path = save_model(model, tmp_path / "lora.mcnc")
    loaded = mcnc_format.load(path)
    state = model.state_dict()
    bases = {k: v.clone() for k, v in state.items() if k.endswith("base_layer.weight")}
    x = _tokens(3)
    with torch.no_grad():
        before = model(x)
        merge_mcnc_lora(model)
        assert_same_outputs(model(x), before)
    for key, base in bases.items():
        merged = model.get_parameter(key)
        assert torch.equal(merged, loaded[key.replace(".base_layer", "")]), key
        assert not torch.equal(merged, base)
    with pytest.raises(ReparametrizeError, match="unmerge_mcnc_lora"):
        save_model(model, tmp_path / "merged.mcnc")
    unmerge_mcnc_lora(model)
    for key, base in bases.items():
        torch.testing.assert_close(model.get_parameter(key), base, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert_same_outputs(model(x), before)


def test_state_dict_alone_packs_the_same_bytes(tmp_path):
    model = _adapted()
    _train(model, steps=1)
    assert_state_dict_packs_like_the_model(model, tmp_path)


def test_targets_must_be_linear_layers():
    for patterns in (("norm1",), ("query",)):
        with pytest.raises(ReparametrizeError, match=r"match no nn.Linear module .*q_proj"):
            add_mcnc_lora(_pretrained(), CONFIG, target_modules=patterns)
    with pytest.raises(ReparametrizeError, match="rank"):
        add_mcnc_lora(_pretrained(), CONFIG, target_modules=TARGETS, rank=0)


@pytest.mark.parametrize("lora_alpha", [float("nan"), float("inf"), "16", True])
def test_a_bad_lora_alpha_is_refused_before_the_model_changes(lora_alpha: object) -> None:
    """A non-finite ``lora_alpha`` failed with json's bare ValueError ("Out of range float
    values are not JSON compliant") after the layers were wrapped, so the model could not be
    given adapters again; it is refused up front and the model stays plain."""
    model = _pretrained()
    with pytest.raises(ReparametrizeError, match="lora_alpha must be a finite number"):
        add_mcnc_lora(model, CONFIG, target_modules=TARGETS, lora_alpha=lora_alpha)
    assert not any(isinstance(m, MCNCLoRALinear) for m in model.modules())
    add_mcnc_lora(model, CONFIG, target_modules=TARGETS, lora_alpha=16)


class _TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_weight_tied_outside_the_target_is_refused() -> None:
    """A Linear whose weight an Embedding also uses, adapted in one place, would save another
    model than the one trained."""
    with pytest.raises(ReparametrizeError, match="shared with"):
        add_mcnc_lora(_TiedHead(), MCNCConfig(k=4, d=64, hidden=(8,)), target_modules=["head"],
                      rank=2)


def test_a_reused_linear_gets_one_adapter_stored_once(tmp_path) -> None:
    """A Linear reused under two names gets one adapter at both; the file stores the adapted
    weight and the bias once and ``load_into`` ties the other names to them."""
    torch.manual_seed(SEED)
    model = add_mcnc_lora(_Reused(), MCNCConfig(k=4, d=64, hidden=(8,), seed=SEED & 0xFFFF),
                          target_modules=["a"], rank=2)
    assert model.a is model.b and isinstance(model.a, MCNCLoRALinear)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(SEED))
    _train_steps(model, lambda: model(x).square().mean())
    assert_state_dict_packs_like_the_model(model, tmp_path)
    path = tmp_path / "a.mcnc"
    with mcnc_format.open(path) as f:  # weight and bias once: no alias entries (SPEC §6)
        assert list(f.keys()) == ["a.weight", "a.bias"]
    with torch.device("meta"):
        plain = _Reused()
    assert mcnc_format.load_into(plain, path) == ([], [])
    with torch.no_grad():
        assert plain.a is plain.b
        assert_same_outputs(plain(x), model(x))


def _train_steps(model: nn.Module, loss, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()


def test_linears_read_by_a_transformer_fast_path_are_refused() -> None:
    """nn.TransformerEncoderLayer's eval fast path reads linear1/linear2 weights directly:
    an adapter there would train but be silently skipped at inference."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    with pytest.raises(ReparametrizeError, match="fast path"):
        add_mcnc_lora(nn.Sequential(layer), MCNCConfig(k=4, d=64, hidden=(8,)),
                      target_modules=["linear1"], rank=2)
