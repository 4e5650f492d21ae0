"""The generator phi (SPEC.md §5) against the float64 oracle in ``mcnc_format.reference``.

Two promises are checked. Weights drawn from a seed are exact: the same bits as the oracle's
independent draw, inside the §5.2 bounds. And phi evaluated in float32 is within
``REGEN_RTOL`` of phi evaluated in float64 on the same weights, per chunk, for fresh random
inputs across ``[-L, L]^k`` (the sine layers amplify rounding, so this is where a reader that
slips into bf16 or TF32 would show).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from mcnc_format import reference
from mcnc_format.constants import REGEN_RTOL
from mcnc_format.generator import GeneratorSpec, GeneratorWeights, ieee_fp32, layer_bounds

# name -> spec: the paper's LLaMA generator, a vision one, and the odd corners of §5.1.
SPECS = {
    "llama": GeneratorSpec(k=5, d=5000, hidden=(32, 32), L=20.0, seed=0x5EED),
    "vision": GeneratorSpec(k=16, d=1600, hidden=(256, 256), L=20.0, seed=7),
    "no_bias": GeneratorSpec(k=7, d=300, hidden=(48, 40), bias=False, seed=11),
    "omega0": GeneratorSpec(k=4, d=257, hidden=(64, 64), omega0=2.5, seed=12),
    "no_normalize": GeneratorSpec(k=8, d=500, hidden=(64, 64), normalize=False, seed=13),
    "one_hidden": GeneratorSpec(k=3, d=129, hidden=(24,), L=5.0, seed=0xFFFFFFFF),
    "deep_odd": GeneratorSpec(
        k=2, d=33, hidden=(17, 5, 31), omega0=0.75, bias=False, normalize=False, seed=3
    ),
}
N_ALPHA = 512  # chunks per check: enough to find the worst ones, small enough to stay fast


@functools.cache
def _weights(name: str) -> GeneratorWeights:
    """Each spec's weights, drawn once per session to keep the tests fast (the vision
    generator alone has 480k values)."""
    return SPECS[name].weights()


def _fresh_generator() -> tuple[torch.Generator, int]:
    """A torch generator seeded from the OS, with the seed for replaying a failure."""
    seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed), seed


def _fresh_alpha(spec: GeneratorSpec, n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform alpha in [-L, L]^k, with a few rows pinned to the corners (largest |alpha|)."""
    alpha = (torch.rand(n, spec.k, generator=gen, dtype=torch.float64) * 2 - 1) * spec.L
    corners = min(8, n)
    signs = torch.randint(0, 2, (corners, spec.k), generator=gen, dtype=torch.float64) * 2 - 1
    alpha[:corners] = signs * spec.L
    return alpha.to(torch.float32)


def _flat_numpy(weights: GeneratorWeights) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in weights.flat()]


@pytest.mark.parametrize("name", SPECS)
def test_weights_are_exact(name: str) -> None:
    """The torch draw equals the oracle's independent draw bit for bit (so it is also
    deterministic: the oracle is a pure function of the spec)."""
    spec = SPECS[name]
    flat = _weights(name).flat()
    assert [tuple(t.shape) for t in flat] == spec.parameter_shapes()
    assert all(t.dtype == torch.float32 for t in flat)
    oracle = reference.generator_weights_ref(spec)
    for got, want in zip(flat, oracle, strict=True):
        assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def test_weights_are_deterministic() -> None:
    spec = SPECS["llama"]
    first, second = spec.weights().flat(), spec.weights().flat()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_seed_changes_weights() -> None:
    a = GeneratorSpec(k=5, d=64, seed=1).weights().flat()
    b = GeneratorSpec(k=5, d=64, seed=2).weights().flat()
    assert not any(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", SPECS)
def test_layer_bounds_follow_the_table(name: str) -> None:
    """§5.2: 1/k, then sqrt(6 / fan_in); biases 1 / sqrt(fan_in); float32-rounded."""
    spec = SPECS[name]
    for t in range(spec.n_layers):
        fan_in = spec.widths[t]
        w_bound, b_bound = layer_bounds(spec, t)
        assert (w_bound, b_bound) == reference.layer_bounds_ref(spec, t)
        want_w = 1.0 / spec.k if t == 0 else (6.0 / fan_in) ** 0.5
        assert w_bound == float(np.float32(want_w))
        assert b_bound == float(np.float32(1.0 / fan_in**0.5))


@pytest.mark.parametrize("name", ["llama", "vision", "deep_odd"])
def test_weights_respect_bounds(name: str) -> None:
    """Every value is ``bound * j * 2**-23`` for an integer j in [-2**23, 2**23), rounded
    once to float32, so it lies in [-bound, bound) and the draw covers the interval."""
    spec = SPECS[name]
    flat = _weights(name).flat()
    step = 2 if spec.bias else 1
    for t in range(spec.n_layers):
        w_bound, b_bound = layer_bounds(spec, t)
        pairs = [(flat[step * t], w_bound)]
        if spec.bias:
            pairs.append((flat[step * t + 1], b_bound))
        for tensor, bound in pairs:
            v = tensor.numpy().astype(np.float64)
            assert v.min() >= -bound and v.max() < bound
            j = np.rint(v / bound * 2.0**23)
            assert j.min() >= -(2**23) and j.max() <= 2**23 - 1
            rebuilt = (np.float64(bound) * j * 2.0**-23).astype(np.float32)
            assert np.array_equal(rebuilt, tensor.numpy())
            if v.size >= 4096:  # large draws span the interval
                assert v.min() < -0.99 * bound and v.max() > 0.99 * bound
                assert abs(v.mean()) < 0.05 * bound


def test_inline_weights() -> None:
    """Inline weights (§5.3) are used as given (widened to float32), and refused if misshapen."""
    gen, seed = _fresh_generator()
    shape_spec = GeneratorSpec(k=6, d=90, hidden=(20, 30), seed=0)
    # Drawn with torch's RNG at the §5.2 scales (REGEN_RTOL assumes well-scaled weights).
    bounds = [b for t in range(shape_spec.n_layers) for b in layer_bounds(shape_spec, t)]
    tensors = [
        (torch.rand(s, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        for s, bound in zip(shape_spec.parameter_shapes(), bounds, strict=True)
    ]
    spec = GeneratorSpec(k=6, d=90, hidden=(20, 30), seed=None, inline=tuple(tensors))
    flat = spec.weights().flat()
    assert all(t.dtype == torch.float32 for t in flat)
    for got, given in zip(flat, tensors, strict=True):
        assert torch.equal(got, given.to(torch.float32)), seed
    alpha = _fresh_alpha(spec, 64, gen)
    y = spec.weights()(alpha).double().numpy()
    y64 = reference.phi_ref(_flat_numpy(spec.weights()), spec, alpha.double().numpy())
    rel = np.linalg.norm(y - y64, axis=-1) / np.linalg.norm(y64, axis=-1)
    assert rel.max() <= REGEN_RTOL, (seed, rel.max())

    # Inline copies of a seeded generator's weights give the identical function.
    seeded = SPECS["llama"]
    copy = GeneratorSpec(
        k=5, d=5000, hidden=(32, 32), seed=None, inline=tuple(_weights("llama").flat())
    )
    alpha = _fresh_alpha(seeded, 32, gen)
    assert torch.equal(copy.weights()(alpha), _weights("llama")(alpha))

    with pytest.raises(ValueError):
        GeneratorSpec(k=6, d=90, hidden=(20, 30), seed=None, inline=tuple(tensors[:-1])).weights()
    bad = [*tensors[:-1], torch.zeros(91)]
    with pytest.raises(ValueError):
        GeneratorSpec(k=6, d=90, hidden=(20, 30), seed=None, inline=tuple(bad)).weights()
    with pytest.raises(ValueError):
        GeneratorSpec(k=6, d=90, seed=1, inline=tuple(tensors))
    with pytest.raises(ValueError):
        GeneratorSpec(k=6, d=90, seed=None)


@pytest.mark.parametrize("name", SPECS)
def test_phi_matches_float64_reference(name: str) -> None:
    """Per chunk, ``||phi32 - phi64|| / ||phi64|| <= REGEN_RTOL`` on fresh alpha (§10.1)."""
    spec = SPECS[name]
    gen, seed = _fresh_generator()
    weights = _weights(name)
    alpha = _fresh_alpha(spec, N_ALPHA, gen)
    y = weights(alpha)
    assert y.dtype == torch.float32 and y.shape == (N_ALPHA, spec.d)
    y64 = reference.phi_ref(_flat_numpy(weights), spec, alpha.double().numpy())
    err = np.linalg.norm(y.double().numpy() - y64, axis=-1) / np.linalg.norm(y64, axis=-1)
    print(f"{name}: max rel err {err.max():.3e}, mean {err.mean():.3e} (torch seed {seed})")
    assert err.max() <= REGEN_RTOL, (seed, float(err.max()))
    if spec.normalize:
        norms = torch.linalg.vector_norm(y.double(), dim=-1)
        assert torch.all((norms - 1).abs() <= 1e-6), (seed, float((norms - 1).abs().max()))


def test_phi_batch_shapes() -> None:
    """Leading dimensions pass through: phi maps [..., k] to [..., d], row by row."""
    spec = SPECS["one_hidden"]
    gen, _ = _fresh_generator()
    weights = _weights("one_hidden")
    alpha = _fresh_alpha(spec, 24, gen)
    flat_out = weights(alpha)
    assert torch.equal(weights(alpha.reshape(2, 3, 4, spec.k)), flat_out.reshape(2, 3, 4, spec.d))
    assert weights(alpha[0]).shape == (spec.d,)


def test_phi_is_differentiable() -> None:
    """Training backpropagates into alpha: the gradient matches a float64 finite difference."""
    spec = SPECS["llama"]
    gen, seed = _fresh_generator()
    weights = _weights("llama")
    alpha = _fresh_alpha(spec, 12, gen)[8:].clone().requires_grad_(True)  # interior points
    target = torch.randn(alpha.shape[0], spec.d, generator=gen)
    (weights(alpha) * target).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad).all()

    flat, a64, t64 = _flat_numpy(weights), alpha.detach().double().numpy(), target.double().numpy()
    direction = torch.randn(alpha.shape, generator=gen, dtype=torch.float64).numpy()
    h = 1e-6

    def loss(a: np.ndarray) -> float:
        return float((reference.phi_ref(flat, spec, a) * t64).sum())

    numeric = (loss(a64 + h * direction) - loss(a64 - h * direction)) / (2 * h)
    analytic = float((alpha.grad.double().numpy() * direction).sum())
    # float32 backprop vs float64 central difference: measured ~4e-7 relative.
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric)), (seed, analytic, numeric)


@pytest.mark.parametrize("name", ["llama", "vision", "no_bias"])
def test_gram_identity(name: str) -> None:
    """§10.2: ``||W h + b||^2 = h'(W'W)h + 2 h'(W'b) + b'b``, to float32 rounding."""
    spec = SPECS[name]
    gen, seed = _fresh_generator()
    weights = _weights(name)
    gram, wb, bb = weights.gram()
    w64 = weights.out_weight.double()
    assert torch.equal(gram, (w64.T @ w64).float())
    h = weights.hidden(_fresh_alpha(spec, 256, gen))
    y = h.double() @ w64.T
    if spec.bias:
        y = y + weights.out_bias.double()
        assert torch.equal(wb, (w64.T @ weights.out_bias.double()).float())
    else:
        assert wb is None and bb is None
    direct = (y * y).sum(-1)
    via_gram = ((h @ gram) * h).sum(-1)
    if spec.bias:
        via_gram = via_gram + 2 * (h @ wb) + bb
    rel = ((via_gram.double() - direct).abs() / direct).max()
    assert rel <= 1e-5, (seed, float(rel))


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # older torch asks each device type through a function of its own
        return torch.is_autocast_cpu_enabled()


def test_ieee_fp32_sets_and_restores_flags() -> None:
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16), ieee_fp32(torch.device("cpu")):
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
            assert not _autocast_on_cpu()
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(RuntimeError), ieee_fp32(torch.device("cpu")):
            raise RuntimeError("restored even on error")
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.backends.cudnn.allow_tf32 = saved[1]
        torch.set_float32_matmul_precision(saved[2])


def test_hidden_layers_ignore_outer_autocast() -> None:
    """A caller's bf16 autocast must not reach the sine layers (§10.1)."""
    spec = SPECS["vision"]
    gen, _ = _fresh_generator()
    weights = _weights("vision")
    alpha = _fresh_alpha(spec, 64, gen)
    plain = weights.hidden(alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = weights.hidden(alpha)
    assert under.dtype == torch.float32
    assert torch.equal(under, plain)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch's fp32_precision switches are newer than this torch")
def test_regeneration_under_the_new_precision_api(tmp_path) -> None:
    """Once a process used torch's ``fp32_precision`` switches, the legacy ones raise when read;
    ``ieee_fp32`` must then use the new ones (run in a child: the switch is process-wide)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch, mcnc_format as mf
        spec = mf.GeneratorSpec(k=3, d=16, hidden=(8,), seed=1)
        seg = mf.Segment(spec, torch.rand(2, 1, 3) * 40 - 20, torch.randn(2, 1))
        path = {str(tmp_path / "x.mcnc")!r}
        mf.save(path, {{"w": mf.MCNC(seg, (4, 8))}})
        before = mf.load(path)["w"]
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        after = mf.load(path)["w"]
        assert torch.equal(before, after)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
