"""Save then load gives back what was saved (SPEC.md §6, §7, §10, §11).

The expected values come from an independent, straightforward computation: for each segment,
phi of every component of every chunk by the plain float32 generator (the unfused path: no
Gram identity, no stacked output layer), then in float64: times beta, summed over m,
flattened, sliced per member, plus theta0 computed from the Philox functions or the stored
tensors. The reader's fused float32 result must be within §10's per-chunk bound of it; dense
tensors must come back bit for bit. Explicit cases cover each feature one axis at a time; a
hypothesis property covers their combinations.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file
from strategies import (
    DensePlan,
    FilePlan,
    GeneratorPlan,
    LoraPlan,
    McncPlan,
    SegmentPlan,
    Theta0Plan,
    file_plans,
    materialize,
)

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, LoRA, Segment, Theta0, philox
from mcnc_format import constants as C
from mcnc_format.header import (
    ExternalTheta0,
    FanInUniformTheta0,
    NormalTheta0,
    UniformTheta0,
    ZerosTheta0,
)
from mcnc_format.writer import DeclaredTheta0, StoredTheta0

# -- the independent computation ------------------------------------------------------------


def phi_unfused(spec: GeneratorSpec, alpha: torch.Tensor) -> torch.Tensor:
    """phi of §5.1 by the plain float32 path, per chunk and component (no Gram identity, no
    stacked output layer), widened to float64. Its hidden layers round like any float32
    evaluation; how close that is to float64 is ``test_generator``'s subject."""
    weights = spec.weights()
    return torch.stack([weights(alpha[c].float()) for c in range(alpha.shape[0])]).double() \
        if alpha.shape[0] else torch.zeros(0, alpha.shape[1], spec.d, dtype=torch.float64)


def theta0_64(theta0: Theta0, shape: tuple[int, ...], directory: Path) -> torch.Tensor:
    """A member's theta0 (§7) as flat float64, from the Philox functions or stored tensors."""
    numel = math.prod(shape)
    if isinstance(theta0, StoredTheta0):
        return theta0.tensor.reshape(-1).float().double()
    assert isinstance(theta0, DeclaredTheta0)
    entry = theta0.entry
    if isinstance(entry, ZerosTheta0):
        return torch.zeros(numel, dtype=torch.float64)
    if isinstance(entry, ExternalTheta0):
        return load_file(str(directory / entry.uri))[entry.tensor].reshape(-1).float().double()
    if isinstance(entry, NormalTheta0):
        z = philox.normal(entry.seed, entry.stream, 0, numel).double()
        return philox.round_to_f32(entry.mean) + philox.round_to_f32(entry.std) * z
    assert isinstance(entry, UniformTheta0 | FanInUniformTheta0)
    bound = entry.bound if isinstance(entry, UniformTheta0) else 1.0 / math.sqrt(
        math.prod(shape[1:]))
    units = philox.words_to_signed_unit(philox.stream_words(entry.seed, entry.stream, 0, numel))
    return (units.double() * philox.round_to_f32(bound)).float().double()


def half_ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of ``dtype`` at each of ``values`` (float64): the rounding §10 allows."""
    if dtype in (torch.float32, torch.float64):
        return torch.zeros_like(values)
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    _, exponent = torch.frexp(values)
    exponent = torch.clamp(exponent - 1, min=int(math.log2(info.tiny)))
    return torch.ldexp(torch.ones_like(values), exponent - mantissa_bits - 1)


def members_by_segment(inputs: Mapping[str, object]) -> list[tuple[Segment, list]]:
    """Segments in first-use order with their ``(label, MCNC)`` members in order (§11)."""
    groups: dict[int, tuple[Segment, list]] = {}
    for name, source in inputs.items():
        pairs = [(name, source)] if isinstance(source, MCNC) else (
            [(f"{name}:A", source.A), (f"{name}:B", source.B)] if isinstance(source, LoRA)
            else [])
        for label, member in pairs:
            groups.setdefault(id(member.segment), (member.segment, []))[1].append((label, member))
    return list(groups.values())


def output_layer_slack(spec: GeneratorSpec, alpha: torch.Tensor, beta: torch.Tensor
                       ) -> torch.Tensor:
    """Per chunk, how far two float32 evaluations of the output layer may differ.

    Both paths share the hidden activations ``h`` but evaluate ``W h + b`` (and the norm, by
    the Gram identity in the reader) in different orders, which §10.1 allows. Each dot
    product of length ``width`` rounds by up to ``gamma * (|W| |h| + |b|)``; when it cancels
    (tiny generators: d = 1, a few hidden units) that exceeds ``REGEN_RTOL * ||phi||``.
    """
    weights = spec.weights()
    w = weights.out_weight.double()
    bias = weights.out_bias.double() if weights.out_bias is not None else torch.zeros(spec.d)
    h = weights.hidden(alpha.float()).double()  # [chunks, m, width]
    magnitude = h.abs() @ w.abs().T + bias.abs()
    gamma = 2 * (w.shape[1] + 2) * 2.0**-24
    if spec.normalize:
        norm = (h @ w.T + bias).norm(dim=-1, keepdim=True)
        per_element = gamma * (magnitude / norm + (magnitude.norm(dim=-1, keepdim=True) / norm)
                               ** 2 / 2)
    else:
        per_element = gamma * magnitude
    return (beta.double().abs()[..., None] * per_element).sum(1).norm(dim=-1)


def check_segment(segment: Segment, members: list, outputs: dict[str, torch.Tensor],
                  directory: Path) -> dict[str, torch.Tensor]:
    """§10.1: per chunk, ``||v - v64|| <= REGEN_RTOL * (||theta0_c|| + sum |beta| ||phi||)``
    (plus the output layer's rounding slack), after allowing half an ulp per element for
    outputs narrower than float32. Returns each member's per-element bound (for lora)."""
    spec = segment.generator
    chunks, m, _ = segment.alpha.shape
    n = chunks * spec.d
    phi = phi_unfused(spec, segment.alpha)  # [chunks, m, d]
    beta = segment.beta.double()
    delta = (beta[..., None] * phi).sum(1).reshape(-1)
    spread = (beta.abs() * phi.norm(dim=-1)).sum(1)
    theta0 = torch.zeros(n, dtype=torch.float64)
    got = torch.zeros(n, dtype=torch.float64)
    rounding = torch.zeros(n, dtype=torch.float64)
    spans = {}
    position = 0
    for label, member in members:
        numel = math.prod(member.shape)
        out = outputs[label]
        assert out.dtype == member.dtype, (label, out.dtype, member.dtype)
        assert tuple(out.shape) == tuple(member.shape), (label, out.shape, member.shape)
        spans[label] = span = slice(position, position + numel)
        theta0[span] = theta0_64(member.theta0, tuple(member.shape), directory)
        got[span] = out.reshape(-1).double()
        position += numel
    expected = theta0 + delta
    got[position:] = expected[position:]  # the last chunk's surplus is not output
    for label, member in members:
        span = spans[label]
        rounding[span] = torch.maximum(half_ulp(got[span], member.dtype),
                                       half_ulp(expected[span], member.dtype))
    excess = torch.clamp((got - expected).abs() - rounding, min=0).view(chunks, spec.d)
    bound = C.REGEN_RTOL * (theta0.view(chunks, spec.d).norm(dim=1) + spread)
    if chunks:
        bound = bound + output_layer_slack(spec, segment.alpha, segment.beta)
    error = excess.norm(dim=1)
    worst = int(torch.argmax(error / (bound + 1e-300))) if chunks else 0
    assert bool((error <= bound).all()), (
        f"chunk {worst}: error {float(error[worst]):.3e} > bound {float(bound[worst]):.3e} "
        f"(members {[label for label, _ in members]}, m={m}, spec={spec})"
    )
    per_element = bound.repeat_interleave(spec.d) + rounding
    return {label: per_element[span] for label, span in spans.items()}


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (label, got, want)
    assert torch.equal(got.reshape(-1).contiguous().view(torch.uint8),
                       want.reshape(-1).contiguous().view(torch.uint8)), label


def check_lora(name: str, source: LoRA, merged: torch.Tensor,
               factors: tuple[torch.Tensor, torch.Tensor, float],
               bounds: dict[str, torch.Tensor], directory: Path) -> None:
    """§10.1 for lora: merged = theta0 + scale * B @ A, the product in float32 of factors
    that are themselves within their chunks' bounds (``eA``, ``eB``) of ``A``, ``B``."""
    a, b, scale = factors
    assert scale == source.scale
    a64, b64 = a.double(), b.double()
    e_a = bounds[f"{name}:A"].view(a.shape)
    e_b = bounds[f"{name}:B"].view(b.shape)
    shape = (b.shape[0], a.shape[1])
    theta0 = theta0_64(source.theta0, shape, directory).view(shape)
    expected = theta0 + scale * (b64 @ a64)
    u = 2.0**-24
    r = a.shape[0]
    gamma = r * u / (1 - r * u)
    allowed = abs(scale) * (e_b @ a64.abs() + b64.abs() @ e_a + e_b @ e_a
                            + (gamma + 3 * u) * ((b64.abs() + e_b) @ (a64.abs() + e_a)))
    # u |theta0| for the final sum, and u |theta0| more for a normal theta0's own float32
    # rounding (mean + std * z); narrower outputs round once more.
    allowed = allowed + 2 * u * theta0.abs() + half_ulp(expected, source.dtype) * 2
    assert merged.dtype == source.dtype and tuple(merged.shape) == shape
    error = (merged.double() - expected).abs()
    assert bool((error <= allowed).all()), f"{name}: max error {float(error.max()):.3e}"


def check_file(path: Path, inputs: Mapping[str, object], directory: Path) -> dict:
    """Load ``path`` and compare every tensor with the independent computation."""
    with mf.open(path) as f:
        loaded = f.tensors()
        assert list(loaded) == list(inputs)
        outputs = dict(loaded)
        factors = {}
        for name, source in inputs.items():
            if isinstance(source, LoRA):
                factors[name] = f.get_lora_factors(name)
                outputs[f"{name}:A"], outputs[f"{name}:B"] = factors[name][:2]
            elif isinstance(source, Dense | torch.Tensor):
                want = source.tensor if isinstance(source, Dense) else source
                assert_bit_exact(loaded[name], want, name)
        bounds = {}
        for segment, members in members_by_segment(inputs):
            bounds.update(check_segment(segment, members, outputs, directory))
        for name, value in factors.items():
            check_lora(name, inputs[name], loaded[name], value, bounds, directory)
        f.check_padding()
    return loaded


# -- explicit cases, one axis at a time ----------------------------------------------------

DEFAULT_THETA0 = Theta0Plan("uniform", 3, 1, 0.5)
BASE_GENERATOR = GeneratorPlan(k=4, d=24, hidden=(16, 16), L=20.0, seed=0x5EED)


def _plan(seed: int, *, generator: GeneratorPlan = BASE_GENERATOR, m: int = 2,
          alpha_dtype: str = "f32", beta_dtype: str = "f32", codec: str = "raw",
          dtype: str = "f32", theta0: Theta0Plan = DEFAULT_THETA0,
          alignment: int = 64, lora: bool = False) -> FilePlan:
    """Three members of one segment (the last chunk partial) plus dense tensors."""
    members: list = [
        McncPlan("block.weight", 0, (5, 7), dtype, theta0),
        McncPlan("block.scale", 0, (), dtype, Theta0Plan("normal", 9, 2, 0.0, 1.0, 0.1)),
        McncPlan("block.bias", 0, (5,), dtype, replace(theta0, kind="zeros")
                 if theta0.kind == "fan_in_uniform" else theta0),
    ]
    if lora:
        members.append(LoraPlan("attn.q", 1, 1, 6, 5, 2, 0.5, dtype, "f32", theta0))
    return FilePlan(
        generators=(generator,),
        segments=(SegmentPlan(0, m, alpha_dtype, beta_dtype, codec),
                  SegmentPlan(0, m, alpha_dtype, beta_dtype, codec)) if lora else (
            SegmentPlan(0, m, alpha_dtype, beta_dtype, codec),),
        tensors=(*members, DensePlan("norm.weight", (5,), "f32", codec),
                 DensePlan("steps", (), "i64", codec)),
        seed=seed,
        alignment=alignment,
        metadata=(("arch", "test"),),
    )


def _roundtrip(plan: FilePlan, tmp_path: Path) -> dict:
    inputs = materialize(plan, tmp_path)
    path = tmp_path / "model.mcnc"
    mf.save(path, inputs, metadata=dict(plan.metadata), info=dict(plan.info),
            alignment=plan.alignment)
    return check_file(path, inputs, tmp_path)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed so a failure can be replayed with MCNC_TEST_SEED."""
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


THETA0_CASES = {
    "zeros": Theta0Plan("zeros"),
    "uniform": Theta0Plan("uniform", 11, 4, 1.0 / 3.0),
    "fan_in_uniform": Theta0Plan("fan_in_uniform", 12, 5),
    "normal": Theta0Plan("normal", 13, 6, mean=0.25, std=0.02),
    "stored_bf16": Theta0Plan("stored", stored_dtype="bf16"),
    "stored_f64": Theta0Plan("stored", stored_dtype="f64"),
    "external": Theta0Plan("external", stored_dtype="f16"),
}


@pytest.mark.parametrize("lora", [False, True], ids=["mcnc", "lora"])
@pytest.mark.parametrize("theta0", list(THETA0_CASES))
def test_theta0_kinds(theta0: str, lora: bool, seed: int, tmp_path: Path) -> None:
    _roundtrip(_plan(seed, theta0=THETA0_CASES[theta0], lora=lora), tmp_path)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("ab_dtype", ["f32", "f16", "bf16"])
def test_alpha_beta_dtypes_and_codecs(codec: str, ab_dtype: str, seed: int, tmp_path: Path
                                      ) -> None:
    _roundtrip(_plan(seed, alpha_dtype=ab_dtype, beta_dtype=ab_dtype, codec=codec), tmp_path)
    with mf.open(tmp_path / "model.mcnc") as f:
        assert {b.codec for b in f.header.blobs[:2]} == {codec}
        assert {b.dtype for b in f.header.blobs[:2]} == {ab_dtype}


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "f64"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_output_dtypes_and_m(dtype: str, m: int, seed: int, tmp_path: Path) -> None:
    _roundtrip(_plan(seed, dtype=dtype, m=m, lora=True), tmp_path)


GENERATORS = {
    "philox": BASE_GENERATOR,
    "inline": replace(BASE_GENERATOR, seed=None),
    "no_bias": GeneratorPlan(k=3, d=17, hidden=(12, 9), bias=False, seed=1),
    "no_normalize": GeneratorPlan(k=5, d=30, hidden=(16,), normalize=False, seed=2),
    "omega0_deep": GeneratorPlan(k=2, d=11, hidden=(8, 6, 10), L=5.0, omega0=2.5,
                                 seed=0xFFFFFFFF),
    "inline_no_bias": GeneratorPlan(k=6, d=40, hidden=(20,), bias=False, normalize=False,
                                    seed=None),
}


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_generators(generator: str, seed: int, tmp_path: Path) -> None:
    _roundtrip(_plan(seed, generator=GENERATORS[generator], m=4, lora=True), tmp_path)


@pytest.mark.parametrize("alignment", [64, 4096])
def test_alignment(alignment: int, seed: int, tmp_path: Path) -> None:
    _roundtrip(_plan(seed, alignment=alignment, codec="zstd", lora=True), tmp_path)
    path = tmp_path / "model.mcnc"
    with mf.open(path) as f:
        assert f.header.alignment == alignment
        assert all(b.offset % alignment == 0 for b in f.header.blobs)
        last = f.header.blobs[-1]
        assert last.offset + last.length == path.stat().st_size


def test_dense_dtypes_bit_exact(seed: int, tmp_path: Path) -> None:
    """Every dtype of §1, rank 0 and empty, raw and zstd, incl. NaN/inf payloads; plain
    tensors are packed (§6.4), ``Dense`` ones get their own blob (§6.2)."""
    rng = torch.Generator().manual_seed(seed)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40])
    tensors: dict[str, object] = {
        "nan_f32": special.float(),
        "nan_f16": Dense(special.half(), "zstd"),
        "nan_bf16": special.bfloat16(),
        "f64": torch.randn(3, 2, generator=rng, dtype=torch.float64),
        "i64": Dense(torch.randint(-(2**62), 2**62, (4,), generator=rng), "zstd"),
        "i32": torch.randint(-(2**31), 2**31 - 1, (2, 2), generator=rng, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (5,), generator=rng, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (1, 1, 3), generator=rng, dtype=torch.int8),
        "u8": Dense(torch.randint(0, 255, (7,), generator=rng, dtype=torch.uint8), "zstd"),
        "bool": torch.randint(0, 2, (9,), generator=rng).bool(),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "empty_zstd": Dense(torch.empty(2, 0, dtype=torch.int32), "zstd"),
        "zeros_zstd": Dense(torch.zeros(5000), "zstd"),
        "strided": torch.randn(6, 4, generator=rng).T,
    }
    path = tmp_path / "dense.mcnc"
    with pytest.raises(mf.InvalidTensorError, match="not contiguous"):  # as safetensors
        mf.save(path, tensors)
    tensors["strided"] = tensors["strided"].contiguous()  # what the message asks for
    mf.save(path, tensors)
    loaded = mf.load(path)
    for name, source in tensors.items():
        assert_bit_exact(loaded[name], source.tensor if isinstance(source, Dense) else source,
                         name)
    assert loaded["strided"].is_contiguous()
    with mf.open(path) as f:
        for name, source in tensors.items():
            want = "dense" if isinstance(source, Dense) else "packed"
            assert f.tensor_info(name).encoding == want, name


def _random_tensor(shape: tuple[int, ...], dtype: torch.dtype, rng: torch.Generator
                   ) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (every bit pattern: NaN payloads, subnormals, -0);
    bool as 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=rng).bool()
    numel = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), generator=rng, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _stored_header(raw: bytes) -> dict:
    """The header map as stored, decoded independently of the reader (§2, §3)."""
    import msgpack
    import zstandard

    _, _, minor, codec, length, _ = struct.unpack_from("<8sHHIQQ", raw, 0)
    stored = raw[32 : 32 + length]
    if codec == C.HEADER_CODEC_ZSTD:
        stored = zstandard.ZstdDecompressor().decompress(stored)
    return {"minor": minor, **msgpack.unpackb(stored, raw=False)}


def test_packed_tensors_bit_exact_and_sharing_one_blob(seed: int, tmp_path: Path) -> None:
    """§6.4: ``save`` packs every plain tensor under PACK_MAX_TENSOR_BYTES, of any dtype,
    into one raw u8 pack blob at consecutive, unaligned byte ranges in tensor order; they come
    back bit for bit through ``load`` and ``get_tensor``, beside mcnc members whose offsets the
    header leaves implied (§6.1), a ``Dense`` tensor and a plain tensor too big to pack, each
    of those in its own dense blob. The file is version 1.1 (§13)."""
    rng = torch.Generator().manual_seed(seed)
    gen = GeneratorSpec(k=3, d=16, hidden=(8,), seed=seed % 2**32)
    segment = Segment(gen, torch.rand(4, 2, 3, generator=rng) * 8 - 4,
                      torch.randn(4, 2, generator=rng) * 0.1)  # 64 values >= 5*7 + 20
    limit = C.PACK_MAX_TENSOR_BYTES
    packed: dict[str, torch.Tensor] = {  # odd byte sizes first: the rest start unaligned
        "u8": _random_tensor((5,), torch.uint8, rng),
        "f64": _random_tensor((3,), torch.float64, rng),
        "f16": _random_tensor((7,), torch.float16, rng),
        "bool": _random_tensor((3, 4), torch.bool, rng),
        "f32": _random_tensor((2, 3), torch.float32, rng),
        "bf16": _random_tensor((1, 5), torch.bfloat16, rng),
        "i64": _random_tensor((2,), torch.int64, rng),
        "i8": _random_tensor((2,), torch.int8, rng),
        "i32": _random_tensor((3, 1), torch.int32, rng),
        "i16": _random_tensor((2, 2, 1), torch.int16, rng),
        "scalar_f32": _random_tensor((), torch.float32, rng),
        "empty_bf16": _random_tensor((0, 3), torch.bfloat16, rng),
        "scalar_i64": _random_tensor((), torch.int64, rng),
        "largest_packable": _random_tensor((limit - 1,), torch.uint8, rng),
    }
    dense = {
        "big": _random_tensor((limit // 4,), torch.float32, rng),  # exactly the limit: own blob
        "own_blob": Dense(_random_tensor((3,), torch.float16, rng)),
        "own_zstd": Dense(_random_tensor((2, 3), torch.int16, rng), "zstd"),
    }
    tensors: dict[str, object] = {
        "w": MCNC(segment, (5, 7), theta0=Theta0.uniform(0.5, seed % 2**32, 1)),
        **{k: packed[k] for k in list(packed)[:7]},
        "big": dense["big"],
        "v": MCNC(segment, (20,), dtype=torch.float16),
        "own_blob": dense["own_blob"],
        **{k: packed[k] for k in list(packed)[7:]},
        "own_zstd": dense["own_zstd"],
    }
    path = tmp_path / "packed.mcnc"
    mf.save(path, tensors)

    loaded = check_file(path, tensors, tmp_path)  # bit for bit, mcnc within §10
    assert list(loaded) == list(tensors)
    with mf.open(path) as f:
        for name, value in packed.items():
            assert f.tensor_info(name).encoding == "packed", name
            got = f.get_tensor(name)
            assert_bit_exact(got, value, name)
            assert got.is_contiguous()
            if value.numel():  # a copy: writing it leaves the file's next read unchanged
                got.reshape(-1).view(torch.uint8)[0] ^= 1
                assert_bit_exact(f.get_tensor(name), value, name)
        for name in dense:
            assert f.tensor_info(name).encoding == "dense", name
            assert_bit_exact(f.get_tensor(name), loaded[name], name)
        assert [f.tensor_info(n).encoding for n in ("w", "v")] == ["mcnc", "mcnc"]
        s = f.summary()
        assert s["format_version"] == "1.1" and s["compressed_parameters"] == 35 + 20
        assert (f.tensor_info("f64").stored_values, f.tensor_info("f64").stored_bytes) == (3, 24)
    # The pipelined loader (``stream``) reads the same bytes out of the pack (small staging:
    # the pack does not fit at once).
    streamed = dict(mf.stream(path, "cpu", staging_bytes=4096, workspace_bytes=2048))
    for name in [*packed, *dense]:
        assert_bit_exact(streamed[name], loaded[name], name)

    raw = path.read_bytes()
    header = _stored_header(raw)
    assert header["minor"] == 1
    entries = {t["name"]: t for t in header["tensors"]}
    packs = {entries[name]["blob"] for name in packed}
    assert len(packs) == 1, packs
    pack_index = packs.pop()
    pack = header["blobs"][pack_index]
    assert (pack["codec"], pack["dtype"]) == ("raw", "u8")
    # The pack sits where its first tensor is, in blob order: after w's alpha and beta.
    assert pack_index == 2
    # Consecutive, unpadded, in tensor order (not insertion order of the dict above).
    expected = b"".join(packed[name].reshape(-1).view(torch.uint8).numpy().tobytes()
                        for name in tensors if name in packed)
    assert pack["shape"] == [len(expected)] and pack["length"] == len(expected)
    assert raw[pack["offset"] : pack["offset"] + pack["length"]] == expected
    starts, position = {}, 0
    for name in (n for n in tensors if n in packed):
        starts[name] = position
        position += packed[name].numel() * packed[name].element_size()
    misaligned = [n for n in packed if starts[n] % packed[n].element_size()]
    assert {"f64", "f16", "f32", "bf16", "i64", "i32", "i16", "scalar_f32", "scalar_i64"
            } <= set(misaligned), starts
    for name in dense:
        blob = entries[name]["blob"]
        assert entries[name]["encoding"] == "dense" and blob != pack_index
        assert (header["blobs"][blob]["dtype"], header["blobs"][blob]["shape"]) == (
            entries[name]["dtype"], entries[name]["shape"])
    assert header["blobs"][entries["own_zstd"]["blob"]]["codec"] == "zstd"
    # §6.1: members in tensor order leave every offset implied; "v" starts where "w" ends.
    assert all("offset" not in entries[name] for name in ("w", "v"))
    assert entries["w"]["segment"] == entries["v"]["segment"]
    assert all("start" not in entry and "offset" not in entry for entry in entries.values())


def test_lora_factors_and_merge(seed: int, tmp_path: Path) -> None:
    """get_lora_factors gives A [r, in], B [out, r] and scale; merged = theta0 + s B @ A."""
    gen = GeneratorSpec(k=3, d=10, hidden=(8, 8), seed=seed % 2**32)
    rng = torch.Generator().manual_seed(seed)
    seg_a = Segment(gen, torch.rand(2, 1, 3, generator=rng) * 4 - 2, torch.randn(2, 1,
                                                                               generator=rng))
    seg_b = Segment(gen, torch.rand(3, 1, 3, generator=rng) * 4 - 2, torch.randn(3, 1,
                                                                               generator=rng))
    base = torch.randn(7, 6, generator=rng)
    lora = LoRA(A=MCNC(seg_a, (3, 6)), B=MCNC(seg_b, (7, 3)), scale=0.75,
                theta0=Theta0.stored(base))
    path = tmp_path / "lora.mcnc"
    mf.save(path, {"w": lora})
    with mf.open(path) as f:
        a, b, scale = f.get_lora_factors("w")
        assert (a.shape, b.shape, scale) == ((3, 6), (7, 3), 0.75)
        merged = f.get_tensor("w")
        torch.testing.assert_close(merged, base + 0.75 * (b @ a), rtol=1e-6, atol=1e-6)
        info = f.tensor_info("w")
        assert (info.encoding, info.shape, info.theta0) == ("lora", (7, 6), "blob")
    check_file(path, {"w": lora}, tmp_path)


def test_get_lora_factors_rejects_other_encodings(tmp_path: Path) -> None:
    path = tmp_path / "dense.mcnc"
    mf.save(path, {"w": torch.ones(2, 2)})
    with mf.open(path) as f, pytest.raises(mf.MCNCError, match="not lora"):
        f.get_lora_factors("w")


def test_metadata_info_and_dtype_override(seed: int, tmp_path: Path) -> None:
    plan = _plan(seed, lora=True)
    inputs = materialize(plan, tmp_path)
    path = tmp_path / "model.mcnc"
    metadata = {"arch": "mlp", "ü-key": "välue\n", "": "empty key", "long": "x" * 5000}
    info = {"producer": "tests", "base_model": "none", "license": "apache-2.0"}
    mf.save(path, inputs, metadata=metadata, info=info)
    with mf.open(path) as f:
        assert f.metadata == metadata and f.info == info
        assert f.keys() == list(inputs) and len(f) == len(inputs) and "block.bias" in f
        as_f64 = f.tensors(dtype=torch.float64)
        plain = f.tensors()
        for name, value in plain.items():
            if value.is_floating_point():
                assert as_f64[name].dtype == torch.float64
            else:
                assert torch.equal(as_f64[name], value)
        assert torch.equal(f.get_tensor("block.weight", dtype=torch.float64).float(),
                           plain["block.weight"])
        some = f.tensors(["attn.q", "block.bias", "attn.q", "steps"])  # repeats, any order
        assert list(some) == ["attn.q", "block.bias", "steps"]
        for key, value in some.items():  # batches differ, so float32 rounding may too
            torch.testing.assert_close(value, plain[key], rtol=1e-5, atol=1e-6)
        with pytest.raises(mf.MCNCError, match="no tensor named 'nope'"):
            f.get_tensor("nope")


def test_summary_numbers(seed: int, tmp_path: Path) -> None:
    gen = GeneratorSpec(k=4, d=32, hidden=(16, 16), seed=seed % 2**32)
    rng = torch.Generator().manual_seed(seed)
    segment = Segment(gen, torch.randn(4, 2, 4, generator=rng).half(),
                      torch.randn(4, 2, generator=rng).half())  # 4 chunks * 32 >= 100 + 20
    tensors = {
        "w": MCNC(segment, (10, 10)),
        "v": MCNC(segment, (20,), dtype=torch.float16),
        "b": torch.randn(7, generator=rng, dtype=torch.float64),
    }
    path = tmp_path / "s.mcnc"
    mf.save(path, tensors)
    raw = path.read_bytes()
    (header_length,) = struct.unpack_from("<Q", raw, 16)
    with mf.open(path) as f:
        s = f.summary()
        info_w, info_v, info_b = (f.tensor_info(n) for n in ("w", "v", "b"))
    dense_bytes = 100 * 4 + 20 * 2 + 7 * 8
    stored = 4 * 2 * 4 + 4 * 2
    assert s["file_bytes"] == len(raw) and s["header_bytes"] == header_length
    assert s["dense_bytes"] == dense_bytes
    assert s["parameters"] == 127 and s["compressed_parameters"] == 120
    assert s["stored_alpha_beta_values"] == stored
    assert s["file_ratio"] == pytest.approx(dense_bytes / len(raw))
    assert s["weights_ratio"] == pytest.approx(120 / stored)
    assert (s["tensors"], s["segments"], s["generators"]) == (3, 1, 1)
    assert s["format_version"] == "1.1"
    # Each member's share of the segment's storage is proportional to its values.
    assert info_w.stored_values == round(stored * 100 / 128)
    assert info_v.stored_values == round(stored * 20 / 128)
    assert info_w.stored_bytes == round(stored * 2 * 100 / 128)
    assert (info_b.stored_values, info_b.stored_bytes) == (7, 56)
    assert (info_w.segment, info_w.generator, info_w.theta0) == (0, 0, "zeros")
    assert info_b.segment is None and info_w.numel == 100


# -- determinism (§11) ----------------------------------------------------------------------


def test_deterministic_bytes(seed: int, tmp_path: Path) -> None:
    plan = _plan(seed, codec="zstd", lora=True, theta0=THETA0_CASES["external"])
    inputs = materialize(plan, tmp_path)
    metadata = {"b": "2", "a": "1", "c": "3"}
    first, second = tmp_path / "one.mcnc", tmp_path / "two.mcnc"
    mf.save(first, inputs, metadata=metadata, info={"producer": "x", "license": "y"})
    mf.save(second, inputs, metadata=dict(reversed(metadata.items())),
            info={"license": "y", "producer": "x"})
    assert first.read_bytes() == second.read_bytes()
    # A fresh, equal set of inputs (new tensor objects) gives the same bytes too.
    third = tmp_path / "three.mcnc"
    mf.save(third, materialize(plan, tmp_path), metadata=metadata,
            info={"producer": "x", "license": "y"})
    assert third.read_bytes() == first.read_bytes()


def test_header_is_canonical_msgpack(seed: int, tmp_path: Path) -> None:
    """Keys sorted at every level and floats as float64 (§3, §11)."""
    import msgpack

    _roundtrip(_plan(seed, lora=True, theta0=THETA0_CASES["normal"]), tmp_path)
    raw = (tmp_path / "model.mcnc").read_bytes()
    (length,) = struct.unpack_from("<Q", raw, 16)
    header = raw[32 : 32 + length]
    value = msgpack.unpackb(header, raw=False)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            assert list(node) == sorted(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(value)
    # Re-encoding canonically (float64 floats, smallest ints) reproduces the bytes exactly.
    assert msgpack.packb(value, use_bin_type=True, use_single_float=False) == header


# -- property ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=file_plans())
def test_random_files_roundtrip(plan: FilePlan, tmp_path_factory: pytest.TempPathFactory
                                ) -> None:
    directory = tmp_path_factory.mktemp("plan")
    inputs = materialize(plan, directory)
    path = directory / "random.mcnc"
    mf.save(path, inputs, metadata=dict(plan.metadata), info=dict(plan.info),
            alignment=plan.alignment)
    check_file(path, inputs, directory)
    again = directory / "again.mcnc"
    mf.save(again, inputs, metadata=dict(reversed(plan.metadata)), info=dict(plan.info),
            alignment=plan.alignment)
    assert again.read_bytes() == path.read_bytes()
    with mf.open(path) as f:
        assert f.metadata == dict(plan.metadata) and f.info == dict(plan.info)


def test_a_zstd_pack_is_decoded_once_for_all_its_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the tensors of a zstd pack one by one must not decode the pack for each."""
    import mcnc_format.engine.source as reader_module

    path = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "packed-two-blobs.mcnc"
    real = reader_module.decode_blob
    decoded: list[str] = []

    def counting(stored, blob, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(blob.codec)
        return real(stored, blob, *args, **kwargs)

    monkeypatch.setattr(reader_module, "decode_blob", counting)
    with mf.open(path) as f:
        packed = [n for n in f.keys() if f.tensor_info(n).encoding == "packed"]  # noqa: SIM118
        zstd_packs = {f.entry(n).blob for n in packed
                      if f.header.blobs[f.entry(n).blob or 0].codec == C.Codec.ZSTD}
        assert len(zstd_packs) == 1 and len(packed) > 3
        for name in packed:
            f.get_tensor(name)
    assert decoded.count(C.Codec.ZSTD) == 1


def test_saving_a_meta_tensor_is_a_write_error(tmp_path: Path) -> None:
    for value in (torch.empty(3, device="meta"), Dense(torch.empty(3, device="meta"))):
        with pytest.raises(mf.MetaTensorError, match="meta device") as raised:
            mf.save(tmp_path / "meta.mcnc", {"w": value})
        assert isinstance(raised.value, mf.WriteError) and isinstance(raised.value, RuntimeError)
    assert not (tmp_path / "meta.mcnc").exists()


def test_verify_names_every_tensor_of_a_damaged_pack(tmp_path: Path) -> None:
    from mcnc_format.verify import verify_file

    path = mf.save(tmp_path / "packs.mcnc", {"norm.weight": torch.ones(8),
                                             "norm.bias": torch.zeros(8)})
    with mf.open(path) as f:
        blob = f.header.blobs[f.entry("norm.bias").blob or 0]
    raw = bytearray(path.read_bytes())
    raw[blob.offset + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    report = verify_file(path)
    (problem,) = [p for p in report.problems if p.check == "checksum"]
    assert "pack blob" in problem.message
    assert "'norm.weight'" in problem.message and "'norm.bias'" in problem.message


# -- header zstd level (SPEC.md §2, §11) ---------------------------------------------------


def _header_codec_and_bytes(path: Path) -> tuple[int, bytes]:
    data = path.read_bytes()
    _, _, _, codec, length, _ = struct.unpack("<8sHHIQQ", data[:32])
    return codec, data[32 : 32 + length]


def test_header_level_follows_the_written_msgpack_size(tmp_path: Path) -> None:
    """§11: level 19 up to 1 MiB of msgpack. The writer picks the level from the msgpack of
    a provisional plain-header layout, whose blob offsets (past a 1 MiB header) take 5 bytes
    each where the final ones take 3."""
    import zstandard

    tensors = {f"t{i:03d}": Dense(torch.full((4,), float(i))) for i in range(150)}
    path = tmp_path / "h.mcnc"
    pad = 1 << 20
    for _ in range(2):  # aim the final msgpack just under 1 MiB
        mf.save(path, tensors, metadata={"pad": "a" * pad})
        codec, stored = _header_codec_and_bytes(path)
        msg = zstandard.ZstdDecompressor().decompress(stored)
        pad -= len(msg) - ((1 << 20) - 100)
    assert codec == 1 and len(msg) <= 1 << 20
    level19 = zstandard.ZstdCompressor(level=19, write_content_size=True,
                                       write_checksum=False).compress(msg)
    assert stored == level19, "a header of at most 1 MiB of msgpack is compressed at level 19"


def test_big_header_stays_compressed_when_level_3_does_not_settle(tmp_path: Path
                                                                        ) -> None:
    """§2: headers of >= 4096 bytes SHOULD be compressed when that is smaller. Above 1 MiB
    ``header_levels`` offers only level 3; when its size keeps moving the data start the
    writer falls back to plain msgpack (here 1.1 MB instead of a few KB)."""
    tensors = {f"layer{i}.weight": Dense(torch.arange(i % 7 + 1, dtype=torch.float32))
               for i in range(79)}
    path = tmp_path / "big.mcnc"
    mf.save(path, tensors, metadata={"pad": "x" * 600001, "pad2": "y" * 500000})
    codec, stored = _header_codec_and_bytes(path)
    assert codec == C.HEADER_CODEC_ZSTD, f"a {len(stored)}-byte header was left uncompressed"


def test_lora_factors_on_the_meta_device_are_shapes_and_dtypes(seed: int,
                                                               tmp_path: Path) -> None:
    """``get_lora_factors(name, "meta")`` gives the factors' shapes and dtypes, as every other
    read onto the meta device does (it failed inside the engine: "unsupported scalarType")."""
    plan = _plan(seed, lora=True)
    path = tmp_path / "lora.mcnc"
    mf.save(path, materialize(plan, tmp_path))
    with mf.open(path) as f:
        names = [n for n in f.keys() if f.tensor_info(n).encoding == "lora"]  # noqa: SIM118
        assert names
        for name in names:
            for dtype in (None, torch.float64):
                a, b, scale = f.get_lora_factors(name, dtype=dtype)
                meta_a, meta_b, meta_scale = f.get_lora_factors(name, "meta", dtype)
                for meta, value in ((meta_a, a), (meta_b, b)):
                    assert meta.is_meta and (meta.shape, meta.dtype) == (value.shape,
                                                                        value.dtype)
                assert meta_scale == scale
