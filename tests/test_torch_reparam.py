"""Training in the manifold (``mcnc_format.torch``) and packing what was trained.

The central promise: a reparametrized model, trained a few Adam steps, computes the same
function as a fresh plain model of the same architecture loaded from ``save_model``'s file
(``load_state_dict(strict=True)``). Both sides regenerate the weights with the same fused
float32 arithmetic, so outputs agree to ``OUTPUT_RTOL`` of the output scale (float32 rounding
of the same operations in a different batching; on one CPU they are usually bit-identical).
Also: only alpha and beta get gradients, state dicts round-trip, packing is byte-identical
whichever path (model or saved state dict) it takes, autocast leaves the generator in fp32.

Inputs are fresh each run, seeded from ``MCNC_TEST_SEED`` or a random seed printed on failure.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dist_helpers import requires_current_distributed
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch_helpers import (  # noqa: F401 (one_thread: autouse fixture)
    SEED,
    assert_same_outputs,
    assert_state_dict_packs_like_the_model,
    one_thread,
)

import mcnc_format
from mcnc_format import Theta0
from mcnc_format.errors import ReparametrizeError
from mcnc_format.header import PackedTensor
from mcnc_format.torch import MCNCConfig, export_state_dict, reparametrize, save_model
from mcnc_format.torch.reparam import runtime_of
from mcnc_format.torch.runtime import MCNCRuntime


def _seeded(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 32), nn.Tanh(),
                         nn.Linear(32, 5))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.encoder = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(32, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def _inputs(name: str, offset: int = 0) -> torch.Tensor:
    g = _seeded(offset)
    if name == "mlp":
        return torch.randn(6, 12, generator=g)
    if name == "cnn":
        return torch.randn(4, 3, 8, 8, generator=g)
    return torch.randint(0, 50, (3, 9), generator=g)


BUILDERS = {"mlp": mlp, "cnn": SmallCNN, "transformer": TinyTransformer}
# The transformer also compresses MultiheadAttention's in_proj_weight: no PyTorch default
# scheme is a spec PRNG scheme, so its theta0 is stored (kind "blob").
CONFIGS = {
    "mlp": MCNCConfig(k=4, d=100, hidden=(16, 16), seed=SEED & 0xFFFF),
    "cnn": MCNCConfig(k=5, d=128, hidden=(24, 24), m=2, seed=SEED & 0xFFFF),
    "transformer": MCNCConfig(k=4, d=256, hidden=(16, 16), seed=SEED & 0xFFFF,
                              include=("*weight",), exclude=("*norm*",)),
}


def _train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("chunking", ["tensor", "model"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_trained_model_equals_plain_model_loaded_from_file(tmp_path, name, chunking):
    torch.manual_seed(SEED)
    config = MCNCConfig(**{**CONFIGS[name].to_dict(), "chunking": chunking})
    model = reparametrize(BUILDERS[name](), config)
    x = _inputs(name)
    _train(model, x)
    path = save_model(model, tmp_path / "model.mcnc", metadata={"arch": name})
    plain = BUILDERS[name]()
    plain.load_state_dict(mcnc_format.load(path), strict=True)
    plain.eval()
    with torch.no_grad():
        assert_same_outputs(plain(_inputs(name, 1)), model(_inputs(name, 1)))
    with mcnc_format.open(path) as f:
        assert f.metadata == {"arch": name}
        encodings = [f.tensor_info(n).encoding for n in f.keys()]  # noqa: SIM118
        # The uncompressed parameters and buffers are small: packed together in one blob.
        assert set(encodings) == {"mcnc", "packed"}
        assert len({t.blob for t in f.header.tensors if isinstance(t, PackedTensor)}) == 1
        compressed = encodings.count("mcnc")
        assert len(f.header.segments) == (1 if chunking == "model" else compressed)


def test_packing_is_byte_identical_from_model_or_saved_state_dict(tmp_path):
    torch.manual_seed(SEED)
    model = reparametrize(TinyTransformer(), CONFIGS["transformer"])
    _train(model, _inputs("transformer"))
    first = assert_state_dict_packs_like_the_model(model, tmp_path)
    assert save_model(model, tmp_path / "c.mcnc").read_bytes() == first


def test_state_dict_round_trips_into_a_fresh_reparametrized_model():
    torch.manual_seed(SEED)
    config = CONFIGS["cnn"]
    model = reparametrize(SmallCNN(), config)
    x = _inputs("cnn")
    _train(model, x)
    fresh = reparametrize(SmallCNN(), config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_load_refuses_a_state_dict_made_with_another_config():
    model = reparametrize(mlp(), CONFIGS["mlp"])
    other = reparametrize(mlp(), MCNCConfig(**{**CONFIGS["mlp"].to_dict(), "seed": 1 + (
        SEED & 0xFFFF)}))
    with pytest.raises(ReparametrizeError, match=r"config fields \['seed'\]"):
        other.load_state_dict(model.state_dict())


def test_gradients_reach_alpha_and_beta_only():
    torch.manual_seed(SEED)
    model = reparametrize(SmallCNN(), CONFIGS["cnn"])
    x = _inputs("cnn")
    _train(model, x, steps=1)  # beta starts at 0: alpha's gradient is zero until beta moves
    model.train()
    model.zero_grad()
    model(x).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.startswith("mcnc_")}
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)
    assert not any(b.requires_grad for b in model.buffers())
    frozen = [n for n, p in model.named_parameters() if not n.startswith("mcnc_")]
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters()
                              if n in frozen)


def test_train_dense_leaves_the_uncompressed_parameters_trainable():
    model = reparametrize(SmallCNN(), MCNCConfig(**{**CONFIGS["cnn"].to_dict(),
                                                    "train_dense": True}))
    model(_inputs("cnn")).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {"conv1.bias", "bn1.weight", "bn2.bias", "head.bias"} <= with_grad
    assert "mcnc_beta_0" in with_grad


def test_beta_starts_at_zero_so_the_model_starts_at_theta0():
    config = CONFIGS["mlp"]
    model = reparametrize(mlp(), config)
    layer = model[0]
    theta0 = layer.parametrizations.weight.original
    assert torch.equal(layer.weight, theta0)
    bound = 1 / math.sqrt(12)  # PyTorch's default Linear init: U(-1/sqrt(fan_in), ...)
    assert theta0.abs().max() <= bound and theta0.abs().max() > 0.9 * bound
    alpha = model.mcnc_alpha_0  # 24 values uniform on [-L, L): all below L/2 has p = 2**-24
    assert alpha.abs().max() <= config.L and alpha.abs().max() > 0.5 * config.L


def test_theta0_from_module_weights_keeps_the_pretrained_function(tmp_path):
    torch.manual_seed(SEED)
    pretrained = TinyTransformer().eval()
    x = _inputs("transformer")
    with torch.no_grad():
        before = pretrained(x)
    config = MCNCConfig(**{**CONFIGS["transformer"].to_dict(), "theta0": "module"})
    model = reparametrize(pretrained, config)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert "embed.parametrizations.weight.original" in model.state_dict()
    _train(model, x)
    path = save_model(model, tmp_path / "ft.mcnc")
    with mcnc_format.open(path) as f:
        assert f.tensor_info("embed.weight").theta0 == "blob"
    plain = TinyTransformer().eval()
    plain.load_state_dict(mcnc_format.load(path), strict=True)
    with torch.no_grad():
        assert_same_outputs(plain(x), model(x))


def test_theta0_override_replaces_the_stored_base(tmp_path):
    model = reparametrize(mlp(), MCNCConfig(**{**CONFIGS["mlp"].to_dict(), "theta0": "module"}))
    state = model.state_dict()
    base = state["0.parametrizations.weight.original"]
    tensors = export_state_dict(state, {"0.weight": Theta0.zeros()})
    path = mcnc_format.save(tmp_path / "o.mcnc", tensors)
    with torch.no_grad():
        delta = model[0].weight - base
    assert torch.allclose(mcnc_format.load(path)["0.weight"], delta, atol=1e-6)
    with pytest.raises(ReparametrizeError, match="name no compressed"):
        export_state_dict(state, {"0.bias": Theta0.zeros()})


def test_alpha_is_projected_onto_the_box_and_the_file_matches(tmp_path):
    config = CONFIGS["mlp"]
    model = reparametrize(mlp(), MCNCConfig(**{**config.to_dict(), "beta_init": 0.5}))
    x = _inputs("mlp")
    with torch.no_grad():
        model.mcnc_alpha_0.mul_(3.0)  # as if an optimizer step left the box
    state = model.state_dict()
    out = model(x)
    assert model.mcnc_alpha_0.abs().max() <= config.L
    path = mcnc_format.save(tmp_path / "p.mcnc", export_state_dict(state))  # unprojected dict
    plain = mlp()
    plain.load_state_dict(mcnc_format.load(path), strict=True)
    with torch.no_grad():
        assert_same_outputs(plain(x), out)
    out.square().mean().backward()
    at_bound = model.mcnc_alpha_0.detach().abs() == config.L
    assert at_bound.any() and model.mcnc_alpha_0.grad[at_bound].abs().sum() > 0


@pytest.mark.parametrize("chunking", ["tensor", "model"])
def test_alpha_is_projected_when_the_reparametrized_module_never_runs_a_forward(
        chunking: str) -> None:
    """``reparametrize(model.layers)`` of an ``nn.ModuleList`` (the blocks of most
    transformers) has no forward of its own, so the projection in the forward pre-hook never
    ran: alpha pushed out of ``[-L, L]`` stayed there with zero gradient through the clamp
    (after 20 Adam steps at lr 0.5, 92% of alpha outside the box for L = 1)."""

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(12, 12) for _ in range(3)])
            self.head = nn.Linear(12, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.head(x)

    config = MCNCConfig(**{**CONFIGS["mlp"].to_dict(), "beta_init": 0.5, "chunking": chunking})
    model = Blocks()
    reparametrize(model.layers, config)
    alphas = [p for n, p in model.layers.named_parameters() if n.startswith("mcnc_alpha")]
    with torch.no_grad():
        for alpha in alphas:
            alpha.mul_(3.0)  # as if an optimizer step left the box
    model(_inputs("mlp")).square().mean().backward()
    for alpha in alphas:
        assert alpha.abs().max() <= config.L
        at_bound = alpha.detach().abs() == config.L
        assert at_bound.any() and alpha.grad[at_bound].abs().sum() > 0


def test_low_precision_alpha_beta_are_what_the_forward_uses(tmp_path):
    config = MCNCConfig(**{**CONFIGS["mlp"].to_dict(), "alpha_dtype": torch.bfloat16,
                           "beta_dtype": "f16"})
    model = reparametrize(mlp(), config)
    x = _inputs("mlp")
    _train(model, x)
    assert model.mcnc_alpha_0.dtype == torch.float32  # float32 masters for the optimizer
    path = save_model(model, tmp_path / "bf16.mcnc")
    with mcnc_format.open(path) as f:
        segment = f.header.segments[0]
        assert f.header.blobs[segment.alpha].dtype == "bf16"
        assert f.header.blobs[segment.beta].dtype == "f16"
    plain = mlp()
    plain.load_state_dict(mcnc_format.load(path), strict=True)
    with torch.no_grad():
        assert_same_outputs(plain(x), model(x))


def test_autocast_runs_the_generator_in_float32():
    torch.manual_seed(SEED)
    model = reparametrize(TinyTransformer(), CONFIGS["transformer"])
    _train(model, _inputs("transformer"), steps=1)
    x = _inputs("transformer")
    reference = model.head.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        inside = model.head.weight
    assert out.dtype == torch.bfloat16
    assert inside.dtype == torch.float32 and torch.equal(inside, reference)
    out.float().square().mean().backward()
    assert model.mcnc_beta_0.grad is not None


@pytest.mark.parametrize("outer_path", ["", "0"])
def test_a_module_reparametrized_inside_a_reparametrized_one_saves(tmp_path,
                                                                    outer_path: str) -> None:
    """Reparametrizing a layer that an earlier ``reparametrize`` left dense (here
    ``exclude``d) trains, but ``save_model`` failed: the outer manifest still lists the inner
    layer's plain names and the export looked for ``...sub.0.weight``, which the inner
    reparametrization had turned into alpha and beta ("the state dict lacks ...")."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 16)
            self.sub = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sub(self.fc(x))

    def build() -> nn.Module:
        return nn.Sequential(Block(), nn.Linear(8, 3))

    torch.manual_seed(SEED)
    model = build()
    outer = model.get_submodule(outer_path)
    reparametrize(outer, MCNCConfig(k=3, d=20, hidden=(8,), exclude=("*sub.*",)))
    inner = outer.get_submodule("0.sub" if outer_path == "" else "sub")
    reparametrize(inner, MCNCConfig(k=4, d=30, hidden=(8,), seed=7, chunking="model"))
    x = torch.randn(5, 8)
    _train(model, x)
    save_model(model, tmp_path / "nested.mcnc")
    plain = build()
    assert list(export_state_dict(model.state_dict())) == list(plain.state_dict())
    plain.load_state_dict(mcnc_format.load(tmp_path / "nested.mcnc"), strict=True)
    for name in ("0.fc.weight", "0.sub.0.weight", "0.sub.2.weight"):
        assert torch.equal(plain.get_parameter(name), model.get_submodule(name[:-7]).weight)
    assert torch.equal(plain(x), model(x))


def test_a_compiled_model_is_refused_before_anything_changes() -> None:
    """``reparametrize(torch.compile(model))`` replaced the weights, then failed with
    ``AttributeError: 'Sequential' object has no attribute 'mcnc_alpha_0'`` (the wrapper
    forwards attribute reads to the module it compiled), leaving the model half-converted;
    the same for ``add_mcnc_lora``. Both refuse the wrapper up front and name the order."""
    from mcnc_format.torch import add_mcnc_lora

    plain = mlp()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    compiled = torch.compile(plain)
    with pytest.raises(ReparametrizeError, match=r"torch\.compile\(reparametrize\(model"):
        reparametrize(compiled, CONFIGS["mlp"])
    with pytest.raises(ReparametrizeError, match=r"torch\.compile wrapper"):
        add_mcnc_lora(compiled, CONFIGS["mlp"], target_modules=["0"])
    after = plain.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    reparametrize(plain, CONFIGS["mlp"])  # the plain model is still usable


@pytest.mark.parametrize("selected", [True, False])
def test_a_lazy_parameter_anywhere_is_refused_before_anything_changes(selected: bool) -> None:
    """A lazy layer that the config does not select made ``reparametrize`` fail at its last
    step (freezing the dense parameters) with torch's bare ValueError "Attempted to use an
    uninitialized parameter", after the selected weights were already replaced."""
    from mcnc_format.torch import add_mcnc_lora

    model = nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(4))
    config = MCNCConfig(k=3, d=20, hidden=(8,), include=("*",) if selected else ("0.*",))
    for attach in (lambda: reparametrize(model, config),
                   lambda: add_mcnc_lora(model, config, target_modules=["0"])):
        with pytest.raises(ReparametrizeError, match=r"'1\.weight' is not materialised"):
            attach()
        assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad
    model(torch.randn(2, 8))
    reparametrize(model, config)


@pytest.mark.parametrize("config", [{"k": 4}, MCNCConfig], ids=["dict", "class"])
def test_a_config_that_is_not_an_mcncconfig_is_refused_up_front(config: object) -> None:
    """A dict or the class itself failed on a missing attribute (``'dict' object has no
    attribute 'exclude'``, ``to_dict() missing 1 required positional argument``), and
    ``add_mcnc_lora`` failed only after wrapping the target layers."""
    from mcnc_format.torch import add_mcnc_lora

    model = mlp()
    with pytest.raises(ReparametrizeError, match="config must be an MCNCConfig"):
        reparametrize(model, config)
    with pytest.raises(ReparametrizeError, match="config must be an MCNCConfig"):
        add_mcnc_lora(model, config, target_modules=["0"])
    assert isinstance(model[0], nn.Linear) and isinstance(model[0].weight, nn.Parameter)


def test_a_model_on_the_meta_device_is_refused_and_to_empty_first_works() -> None:
    """Reparametrizing on the meta device drew theta0 on meta; ``to_empty`` then left the
    seeded theta0 (a buffer outside the state dict, so no checkpoint load fixes it) as
    uninitialised memory, and the model trained around garbage while the file stored the
    seed. It is refused; ``to_empty`` first, reparametrize, then load gives the model."""
    from mcnc_format.torch import add_mcnc_lora

    torch.manual_seed(SEED)
    trained = reparametrize(mlp(), CONFIGS["mlp"])
    _train(trained, _inputs("mlp"))
    with torch.device("meta"):
        model = mlp()
    for attach in (lambda: reparametrize(model, CONFIGS["mlp"]),
                   lambda: add_mcnc_lora(model, CONFIGS["mlp"], target_modules=["0"])):
        with pytest.raises(ReparametrizeError, match=r"meta device.*to_empty"):
            attach()
    model.to_empty(device="cpu")
    reparametrize(model, CONFIGS["mlp"])
    model.load_state_dict(trained.state_dict())
    x = _inputs("mlp", offset=1)
    assert torch.equal(model(x), trained(x))


@pytest.mark.parametrize("chunking", ["tensor", "model"])
@pytest.mark.parametrize("layer", [nn.Embedding, nn.EmbeddingBag])
def test_an_embedding_with_max_norm_trains_and_matches_the_file(tmp_path, layer: type,
                                                                 chunking: str) -> None:
    """``Embedding(max_norm=...)`` renormalises the looked-up rows of its weight in place;
    the compressed weight is a view of its segment, so the first forward failed with "Output
    0 of View is a view and its base ... has been modified inplace"."""

    def build() -> nn.Module:
        return nn.Sequential(layer(10, 8, max_norm=1.0), nn.Linear(8, 2))

    torch.manual_seed(SEED)
    config = MCNCConfig(**{**CONFIGS["mlp"].to_dict(), "beta_init": 0.5, "chunking": chunking})
    model = reparametrize(build(), config)
    tokens = torch.randint(0, 10, (3, 5), generator=_seeded(0))
    _train(model, tokens)
    out = model(tokens)
    assert torch.equal(model(tokens), out)  # the renorm did not touch what is trained
    plain = build()
    plain.load_state_dict(mcnc_format.load(save_model(model, tmp_path / "e.mcnc")), strict=True)
    assert torch.equal(plain(tokens), out)


def test_a_first_forward_in_inference_mode_leaves_training_possible() -> None:
    """Evaluating before training under ``torch.inference_mode()`` drew the generator's
    weights as inference tensors and cached them, so every later training forward failed
    ("Inference tensors cannot be saved for backward")."""
    torch.manual_seed(SEED)
    model, fresh = reparametrize(mlp(), CONFIGS["mlp"]), reparametrize(mlp(), CONFIGS["mlp"])
    fresh.load_state_dict(model.state_dict())
    x = _inputs("mlp")
    with torch.inference_mode():
        evaluated = model(x)
    for m in (model, fresh):
        m(x).square().mean().backward()
    assert torch.equal(evaluated, fresh(x).detach())
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            assert torch.equal(model.get_parameter(name).grad, param.grad), name


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double"])
def test_a_dtype_conversion_of_the_model_is_refused_with_the_fix(convert: str) -> None:
    """``model.half()`` converts alpha, beta and the dense tensors but not the compressed
    weights, so the forward failed inside a layer ("self and mat2 must have the same dtype");
    it is a ReparametrizeError pointing at autocast, and ``model.float()`` undoes it."""
    torch.manual_seed(SEED)
    model = reparametrize(mlp(), CONFIGS["mlp"])
    _train(model, _inputs("mlp"), steps=2)
    x = _inputs("mlp")
    reference = model(x).detach()
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[convert]
    model.to(dtype)
    with pytest.raises(ReparametrizeError, match=r"model\.float\(\).*autocast"):
        model(x.to(dtype))
    model.float()
    out = model(x)
    if convert == "double":  # float32 -> float64 -> float32 is exact
        assert torch.equal(out, reference)
    out.square().mean().backward()
    assert model.mcnc_alpha_0.grad is not None


def test_model_chunking_generates_each_segment_once_per_forward(monkeypatch):
    calls = []
    original = MCNCRuntime.segment_value

    def counting(self, segment, first, last, placed):
        calls.append((segment, first, last))
        return original(self, segment, first, last, placed)

    monkeypatch.setattr(MCNCRuntime, "segment_value", counting)
    config = MCNCConfig(**{**CONFIGS["transformer"].to_dict(), "chunking": "model"})
    model = reparametrize(TinyTransformer(), config)
    model(_inputs("transformer")).sum().backward()
    assert calls == [(0, 0, model.mcnc_alpha_0.shape[0])]
    calls.clear()
    _ = model.head.weight  # outside a forward: only the member's own chunks
    assert len(calls) == 1 and calls[0][2] - calls[0][1] <= -(-7 * 32 // 256) + 1


class Checkpointed(nn.Module):
    """Three layers, each run in a non-reentrant activation-checkpointed region (what
    transformers' gradient checkpointing does), and optionally a weight also read outside
    the regions (a penalty on it)."""

    def __init__(self, checkpointed: bool, penalty: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(12, 40), nn.Linear(40, 24), nn.Linear(24, 5)])
        self.checkpointed, self.penalty = checkpointed, penalty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(checkpoint(layer, x, use_reentrant=False) if self.checkpointed
                           else layer(x))
        return x.square().mean() + (self.layers[1].weight.square().mean() if self.penalty
                                    else 0.0)


@pytest.mark.parametrize("chunking", ["model", "tensor"])
@pytest.mark.parametrize("penalty", [False, True])
def test_non_reentrant_checkpointing_gives_the_gradients_of_a_plain_forward(
        chunking: str, penalty: bool) -> None:
    """The recomputation of a checkpointed region must save what its first run saved: every
    segment is generated before the regions and kept for the backward, so with
    ``chunking="model"`` (one segment read by every region) or a weight also read outside the
    regions, training steps equal those of the same model without checkpointing. It raised
    ``CheckpointError`` before."""
    config = MCNCConfig(k=4, d=64, hidden=(16,), seed=SEED & 0xFFFF, chunking=chunking)
    models = []
    for checkpointed in (False, True):
        torch.manual_seed(SEED)
        models.append(reparametrize(Checkpointed(checkpointed, penalty), config))
    with torch.no_grad():
        for plain, ckpt in zip(models[0].parameters(), models[1].parameters(), strict=True):
            ckpt.copy_(plain.normal_(generator=_seeded(7)) if plain.requires_grad else plain)
    optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
                  for m in models]
    for step in range(3):
        for model, opt in zip(models, optimizers, strict=True):
            opt.zero_grad()
            model(torch.randn(6, 12, generator=_seeded(step))).backward()
            opt.step()
    for plain, ckpt in zip(models[0].named_parameters(), models[1].named_parameters(),
                           strict=True):
        torch.testing.assert_close(ckpt[1], plain[1], rtol=1e-5, atol=1e-6, msg=plain[0])


def test_weights_kept_for_the_backward_follow_a_change_of_alpha(tmp_path) -> None:
    """A forward with autograd recording keeps the generated weights for its backward; alpha
    changed in place before that backward (an optimizer step of another loss) makes a weight
    read afterwards the new one, as the saved file has it, not the kept one."""
    config = MCNCConfig(k=4, d=64, hidden=(16,), seed=SEED & 0xFFFF, chunking="model")
    model = reparametrize(mlp(), config)
    with torch.no_grad():
        model.mcnc_beta_0.normal_(generator=_seeded(1))
    model(_inputs("mlp")).sum()  # recorded, no backward
    with torch.no_grad():
        model.mcnc_alpha_0.add_(0.25)
    read = model[2].weight.detach().clone()
    assert torch.equal(read, mcnc_format.load(save_model(model, tmp_path / "m.mcnc"))["2.weight"])


def test_refusals_name_the_problem_and_the_fix():
    with pytest.raises(ReparametrizeError, match="selected no parameter"):
        reparametrize(mlp(), MCNCConfig(include=("nothing.*",)))
    model = reparametrize(mlp(), CONFIGS["mlp"])
    with pytest.raises(ReparametrizeError, match="already"):
        reparametrize(model, CONFIGS["mlp"])
    with pytest.raises(ReparametrizeError, match=r"MCNCConfig\.k"):
        MCNCConfig(k=0)
    with pytest.raises(ReparametrizeError, match="chunking"):
        MCNCConfig(chunking="layer")
    with pytest.raises(ReparametrizeError, match="no 'mcnc_config'"):
        export_state_dict(mlp().state_dict())


@pytest.mark.parametrize("field, value", [
    ("hidden", "32"), ("hidden", 32), ("hidden", (16.5,)), ("hidden", (True, 8)),
    ("L", None), ("L", "20"), ("omega0", True), ("beta_init", "0"), ("include", 5),
    ("exclude", None), ("train_dense", "no"),
])
def test_config_refuses_values_of_the_wrong_type(field: str, value: object) -> None:
    """A value of the wrong type is a ReparametrizeError naming the field, not a TypeError
    from deep inside, nor a silent conversion: ``hidden="32"`` used to give widths (3, 2),
    ``(16.5,)`` the width 16, and ``train_dense="no"`` trained the dense parameters."""
    with pytest.raises(ReparametrizeError, match=rf"MCNCConfig\.{field}"):
        MCNCConfig(**{field: value})


def test_config_takes_numpy_widths_as_ints() -> None:
    config = MCNCConfig(hidden=np.array([8, 4]), L=np.float32(5.0))
    assert config.hidden == (8, 4) and all(type(w) is int for w in config.hidden)
    assert MCNCConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("damage", ["not-an-object", "segment-out-of-range", "bad-dtype",
                                    "lora-out-of-range"])
def test_damaged_manifest_is_reported(damage: str) -> None:
    """A hand-edited or damaged manifest gives ReparametrizeError, never an IndexError."""
    import json

    model = reparametrize(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)),
                          MCNCConfig(k=4, d=64, hidden=(8,)))
    state = model.state_dict()
    body = json.loads(bytes(state["mcnc_config"].tolist()).decode())
    if damage == "not-an-object":
        body = [1]
    elif damage == "segment-out-of-range":
        body["members"][0]["segment"] = 7
    elif damage == "bad-dtype":
        body["members"][0]["dtype"] = "zz"
    else:
        body["lora"] = [{"module": "0", "A": 5, "B": 6, "scale": 1.0}]
    state["mcnc_config"] = torch.frombuffer(bytearray(json.dumps(body).encode()),
                                            dtype=torch.uint8)
    with pytest.raises(ReparametrizeError, match="manifest is damaged"):
        export_state_dict(state)


class TiedHead(nn.Module):
    """An embedding whose transpose is the output layer (GPT-2, small Llamas), plus a Linear
    reused under two names: both kinds of shared parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.mix = nn.Linear(16, 16)
        self.again = self.mix
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.again(torch.tanh(self.mix(self.embed(tokens))))))


@pytest.mark.parametrize("theta0", ["prng", "module"])
def test_tied_parameters_stay_tied_and_are_stored_once(theta0: str, tmp_path) -> None:
    """One parametrization for every name of a tied parameter: the names compute one tensor
    while training, the file stores it once under its first name (compressed or dense), and
    ``load_into`` (meta or built module) ties the other names to it again."""
    torch.manual_seed(SEED)
    model = reparametrize(TiedHead(), MCNCConfig(k=4, d=64, hidden=(8,), seed=SEED & 0xFFFF,
                                                 theta0=theta0))
    tokens = torch.randint(0, 40, (3, 7), generator=_seeded(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(tokens).square().mean().backward()
        opt.step()
    assert torch.equal(model.head.weight, model.embed.weight)
    assert_state_dict_packs_like_the_model(model, tmp_path)
    path = tmp_path / "a.mcnc"
    with mcnc_format.open(path) as f:  # compressed and dense: once (no alias entry, SPEC §6)
        assert list(f.keys()) == ["embed.weight", "mix.weight", "mix.bias"]
    with torch.no_grad():
        want = model(tokens)
    for device in ("cpu", "meta"):
        with torch.device(device):
            plain = TiedHead()
        missing, unexpected = mcnc_format.load_into(plain, path)
        assert (missing, unexpected) == ([], [])
        assert plain.head.weight is plain.embed.weight and plain.again is plain.mix
        with torch.no_grad():
            assert_same_outputs(plain(tokens), want)


@pytest.mark.parametrize("name", ["transformer", "cnn", "mlp"])
def test_trained_weights_equal_the_loaded_ones_bit_for_bit(tmp_path, name):
    """Training and loading share one compute path (``FusedGenerator.value`` is the
    out-of-place form of the loader's ``accumulate``): a trained weight read inside a forward
    (whole segments at once) and outside (the member's own chunks) equals the tensor ``load``
    rebuilds from the saved file, bit for bit, for theta0 of every kind the configs use."""
    model = reparametrize(BUILDERS[name](), CONFIGS[name])
    _train(model, _inputs(name))
    path = tmp_path / "m.mcnc"
    save_model(model, path)
    loaded = mcnc_format.load(path)
    compressed = [m.name for m in runtime_of(model).manifest.members]
    assert compressed

    def weights() -> dict[str, torch.Tensor]:
        out = {}
        for n in compressed:
            owner, _, attribute = n.rpartition(".")
            out[n] = getattr(model.get_submodule(owner), attribute).detach().clone()
        return out

    inside: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: object) -> None:
        if not inside:
            inside.update(weights())

    hook = model.register_forward_pre_hook(capture)  # runs after the runtime's own hook
    with torch.no_grad():
        model(_inputs(name))
    hook.remove()
    outside = weights()
    for n in compressed:
        assert torch.equal(outside[n], loaded[n]), n
        assert torch.equal(inside[n], loaded[n]), n


@requires_current_distributed
def test_sharded_weights_are_refused_and_dense_sharded_layers_left_alone(tmp_path) -> None:
    """On two gloo ranks: a weight already sharded (a DTensor of ``fully_shard`` or of
    ``parallelize_module``) cannot become one computed from alpha and beta, so reparametrize
    and add_mcnc_lora refuse it, naming it and the order that works, where they accepted it
    before and the first forward failed inside torch (mixed Tensor and DTensor, or FSDP's
    missing ``_local_tensor``). Layers tensor-parallelized before reparametrize are fine when
    MCNC compresses others: the model runs as the unsharded one does."""
    import torch.multiprocessing as mp

    mp.start_processes(_sharded_rank, args=(SEED, str(tmp_path / "store")), nprocs=2,
                       join=True, start_method="spawn")


def _sharded_rank(rank: int, seed: int, store: str) -> None:
    from dist_helpers import VOCAB, TinyLM, init_gloo, leave_gloo
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from mcnc_format.torch import add_mcnc_lora

    init_gloo(rank, 2, store)
    try:
        mesh = init_device_mesh("cpu", (2,))
        plan = {"up": ColwiseParallel(), "gate": ColwiseParallel(), "down": RowwiseParallel()}
        config = MCNCConfig(k=4, d=64, hidden=(16,), include=["embed.weight", "head.weight"])
        sharded = fully_shard(TinyLM())
        with pytest.raises(ReparametrizeError, match=r"'embed\.weight' is sharded.*Shard\(dim=0\)"
                                                     r".*fully_shard after reparametrize"):
            reparametrize(sharded, config)
        torch.manual_seed(seed)
        model = TinyLM()
        for layer in model.layers:
            parallelize_module(layer, mesh, plan)
        with pytest.raises(ReparametrizeError, match=r"'layers\.0\.up\.weight' is sharded"):
            reparametrize(model, MCNCConfig(k=4, d=64, hidden=(16,)))
        with pytest.raises(ReparametrizeError, match=r"'layers\.0\.up\.weight' is sharded"):
            add_mcnc_lora(model, config, target_modules=["up"], rank=2)

        reparametrize(model, config)  # the sharded layers stay dense
        torch.manual_seed(seed)
        whole = reparametrize(TinyLM(), config)
        tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.allclose(model(tokens), whole(tokens), atol=1e-5)
        leave_gloo()
    finally:
        torch.distributed.destroy_process_group()
