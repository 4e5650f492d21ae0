"""Hypothesis strategies for random ``.mcnc`` file plans, and their materialisation.

A ``FilePlan`` is a small, printable description of a file: generators, segments (with their
alpha/beta dtype and codec), tensors (mcnc members, lora tensors, dense tensors) and header
extras. ``materialize`` turns a plan into the exact inputs of ``mcnc_format.save`` with data
drawn from the plan's own seed, so a failing example printed by hypothesis is reproducible
on its own. Keep shapes small: the strategies exist to cover combinations, not sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

from mcnc_format import MCNC, Dense, GeneratorSpec, LoRA, Segment, Theta0
from mcnc_format.dtypes import to_torch
from mcnc_format.generator import layer_bounds
from mcnc_format.reader import tensor_sha256

__all__ = [
    "DensePlan",
    "FilePlan",
    "GeneratorPlan",
    "LoraPlan",
    "McncPlan",
    "SegmentPlan",
    "Theta0Plan",
    "file_plans",
    "generator_plans",
    "materialize",
    "theta0_plans",
]

THETA0_KINDS = ("zeros", "uniform", "fan_in_uniform", "normal", "stored", "external")
EXTERNAL_FILE = "base.safetensors"
OUTPUT_DTYPES = ("f32", "f16", "bf16", "f64")
ALPHA_BETA_DTYPES = ("f32", "f16", "bf16")
DENSE_DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool")
CODECS = ("raw", "zstd")
U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class GeneratorPlan:
    """A generator; ``seed=None`` means inline weights drawn from the file plan's seed."""

    k: int
    d: int
    hidden: tuple[int, ...]
    L: float = 20.0
    omega0: float = 1.0
    bias: bool = True
    normalize: bool = True
    seed: int | None = 0


@dataclass(frozen=True)
class SegmentPlan:
    generator: int
    m: int
    alpha_dtype: str = "f32"
    beta_dtype: str = "f32"
    codec: str = "raw"


@dataclass(frozen=True)
class Theta0Plan:
    kind: str = "zeros"
    seed: int = 0
    stream: int = 0
    bound: float = 0.1
    mean: float = 0.0
    std: float = 1.0
    stored_dtype: str = "f32"


@dataclass(frozen=True)
class McncPlan:
    name: str
    segment: int
    shape: tuple[int, ...]
    dtype: str = "f32"
    theta0: Theta0Plan = Theta0Plan()


@dataclass(frozen=True)
class LoraPlan:
    name: str
    segment_a: int
    segment_b: int
    out_features: int
    in_features: int
    rank: int
    scale: float = 1.0
    dtype: str = "f32"
    factor_dtype: str = "f32"
    theta0: Theta0Plan = Theta0Plan()


@dataclass(frozen=True)
class DensePlan:
    name: str
    shape: tuple[int, ...]
    dtype: str = "f32"
    codec: str = "raw"


TensorPlan = McncPlan | LoraPlan | DensePlan


@dataclass(frozen=True)
class FilePlan:
    generators: tuple[GeneratorPlan, ...]
    segments: tuple[SegmentPlan, ...]
    tensors: tuple[TensorPlan, ...]
    seed: int = 0
    alignment: int = 64
    metadata: tuple[tuple[str, str], ...] = ()
    info: tuple[tuple[str, str], ...] = ()
    beta_scale: float = 0.5


# -- strategies -----------------------------------------------------------------------------

_small_shapes = st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple)
_rank2_shapes = st.lists(st.integers(1, 6), min_size=2, max_size=3).map(tuple)
_dense_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def generator_plans(draw: st.DrawFn) -> GeneratorPlan:
    """Small generators of every §5 variant: bias or not, normalised or not, inline weights."""
    inline = draw(st.booleans())
    return GeneratorPlan(
        k=draw(st.integers(1, 6)),
        d=draw(st.integers(1, 24)),
        hidden=tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))),
        L=draw(st.sampled_from([1.0, 5.0, 20.0])),
        omega0=draw(st.sampled_from([1.0, 0.5, 2.5])),
        bias=draw(st.booleans()),
        normalize=draw(st.booleans()),
        seed=None if inline else draw(st.integers(0, U32)),
    )


@st.composite
def theta0_plans(draw: st.DrawFn, shape: tuple[int, ...]) -> Theta0Plan:
    """A theta0 that suits ``shape`` (fan_in_uniform only for rank >= 2 with fan_in >= 1)."""
    kinds = list(THETA0_KINDS)
    if len(shape) < 2 or math.prod(shape[1:]) < 1:
        kinds.remove("fan_in_uniform")
    return Theta0Plan(
        kind=draw(st.sampled_from(kinds)),
        seed=draw(st.integers(0, U32)),
        stream=draw(st.integers(0, U32)),
        bound=draw(st.sampled_from([0.01, 0.5, 1.0 / 3.0])),
        mean=draw(st.sampled_from([0.0, -0.25, 1.0])),
        std=draw(st.sampled_from([1.0, 0.02, 0.7])),
        stored_dtype=draw(st.sampled_from(["f32", "f16", "bf16", "f64"])),
    )


@st.composite
def _mcnc_plan(draw: st.DrawFn, name: str, segments: int) -> McncPlan:
    shape = draw(st.one_of(_small_shapes, _rank2_shapes, st.just((0, 3))))
    return McncPlan(name, draw(st.integers(0, segments - 1)), shape,
                    draw(st.sampled_from(OUTPUT_DTYPES)), draw(theta0_plans(shape)))


@st.composite
def _lora_plan(draw: st.DrawFn, name: str, segments: int) -> LoraPlan:
    out_features, in_features = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return LoraPlan(
        name,
        draw(st.integers(0, segments - 1)),
        draw(st.integers(0, segments - 1)),
        out_features,
        in_features,
        draw(st.integers(1, 3)),
        draw(st.sampled_from([1.0, 0.5, -2.0])),
        draw(st.sampled_from(OUTPUT_DTYPES)),
        draw(st.sampled_from(OUTPUT_DTYPES)),
        draw(theta0_plans((out_features, in_features))),
    )


@st.composite
def _dense_plan(draw: st.DrawFn, name: str) -> DensePlan:
    return DensePlan(name, draw(_dense_shapes), draw(st.sampled_from(DENSE_DTYPES)),
                     draw(st.sampled_from(CODECS)))


@st.composite
def file_plans(draw: st.DrawFn, max_tensors: int = 6) -> FilePlan:
    """A random small file: 1-2 generators, 1-3 segments, mixed tensors, every segment used."""
    generators = tuple(draw(st.lists(generator_plans(), min_size=1, max_size=2)))
    segments = tuple(
        SegmentPlan(
            draw(st.integers(0, len(generators) - 1)),
            draw(st.sampled_from([1, 2, 4])),
            draw(st.sampled_from(ALPHA_BETA_DTYPES)),
            draw(st.sampled_from(ALPHA_BETA_DTYPES)),
            draw(st.sampled_from(CODECS)),
        )
        for _ in range(draw(st.integers(1, 3)))
    )
    count = draw(st.integers(1, max_tensors))
    tensors: list[TensorPlan] = []
    for i in range(count):
        kind = draw(st.sampled_from(["mcnc", "mcnc", "lora", "dense"]))
        name = f"layer{i}.{kind}"
        if kind == "mcnc":
            tensors.append(draw(_mcnc_plan(name, len(segments))))
        elif kind == "lora":
            tensors.append(draw(_lora_plan(name, len(segments))))
        else:
            tensors.append(draw(_dense_plan(name)))
    # Every segment needs a member (R41): give unused ones a small mcnc tensor.
    used = {t.segment for t in tensors if isinstance(t, McncPlan)}
    used |= {s for t in tensors if isinstance(t, LoraPlan) for s in (t.segment_a, t.segment_b)}
    for s in sorted(set(range(len(segments))) - used):
        shape = draw(_small_shapes)
        tensors.append(McncPlan(f"extra{s}", s, shape, draw(st.sampled_from(OUTPUT_DTYPES)),
                                draw(theta0_plans(shape))))
    metadata = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3))
    return FilePlan(
        generators=generators,
        segments=segments,
        tensors=tuple(tensors),
        seed=draw(st.integers(0, 2**63 - 1)),
        alignment=draw(st.sampled_from([64, 128, 4096])),
        metadata=tuple(sorted(metadata.items())),
        info=draw(st.sampled_from([(), (("producer", "tests"), ("license", "mit"))])),
        beta_scale=draw(st.sampled_from([0.05, 0.5, 2.0])),
    )


# -- materialisation ------------------------------------------------------------------------


class _Data:
    """Seeded random tensors (never all zeros) for one plan."""

    def __init__(self, seed: int) -> None:
        self.rng = torch.Generator().manual_seed(seed)

    def uniform(self, shape: tuple[int, ...], bound: float) -> torch.Tensor:
        return (torch.rand(shape, generator=self.rng, dtype=torch.float64) * 2 - 1) * bound

    def dense(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        torch_dtype = to_torch(dtype)
        if torch_dtype.is_floating_point:
            return (torch.randn(shape, generator=self.rng, dtype=torch.float64) * 3).to(
                torch_dtype)
        if torch_dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=self.rng).to(torch.bool)
        info = torch.iinfo(torch_dtype)
        return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape,
                             generator=self.rng, dtype=torch.int64).to(torch_dtype)


def _generator_spec(plan: GeneratorPlan, data: _Data) -> GeneratorSpec:
    base = GeneratorSpec(plan.k, plan.d, plan.hidden, plan.L, plan.omega0, plan.bias,
                         plan.normalize, seed=plan.seed if plan.seed is not None else 0)
    if plan.seed is not None:
        return base
    inline = []
    for t in range(len(plan.hidden) + 1):
        w_bound, b_bound = layer_bounds(base, t)
        fan_out, fan_in = base.widths[t + 1], base.widths[t]
        inline.append(data.uniform((fan_out, fan_in), w_bound).float())
        if plan.bias:
            inline.append(data.uniform((fan_out,), b_bound).float())
    return GeneratorSpec(plan.k, plan.d, plan.hidden, plan.L, plan.omega0, plan.bias,
                         plan.normalize, seed=None, inline=tuple(inline))


def _theta0(plan: Theta0Plan, shape: tuple[int, ...], label: str, data: _Data,
            externals: dict[str, torch.Tensor]) -> Theta0:
    if plan.kind == "zeros":
        return Theta0.zeros()
    if plan.kind == "uniform":
        return Theta0.uniform(plan.bound, plan.seed, plan.stream)
    if plan.kind == "fan_in_uniform":
        return Theta0.fan_in_uniform(plan.seed, plan.stream)
    if plan.kind == "normal":
        return Theta0.normal(plan.seed, plan.stream, plan.mean, plan.std)
    tensor = data.uniform(shape, 1.0).to(to_torch(plan.stored_dtype))
    if plan.kind == "stored":
        return Theta0.stored(tensor)
    externals[label] = tensor
    return Theta0.external(EXTERNAL_FILE, label, tensor_sha256(tensor))


def materialize(plan: FilePlan, directory: Path) -> dict[str, MCNC | LoRA | Dense]:
    """The ``save`` inputs of ``plan``; writes ``base.safetensors`` into ``directory`` when a
    theta0 is external. Segment sizes follow from their members: ``ceil(total / d)`` chunks."""
    data = _Data(plan.seed)
    specs = [_generator_spec(g, data) for g in plan.generators]
    totals = [0] * len(plan.segments)
    for t in plan.tensors:
        if isinstance(t, McncPlan):
            totals[t.segment] += math.prod(t.shape)
        elif isinstance(t, LoraPlan):
            totals[t.segment_a] += t.rank * t.in_features
            totals[t.segment_b] += t.out_features * t.rank
    segments = []
    for s, total in zip(plan.segments, totals, strict=True):
        spec = specs[s.generator]
        chunks = -(-total // spec.d)
        alpha = data.uniform((chunks, s.m, spec.k), spec.L).to(to_torch(s.alpha_dtype))
        beta = (torch.randn((chunks, s.m), generator=data.rng, dtype=torch.float64)
                * plan.beta_scale).to(to_torch(s.beta_dtype))
        segments.append(Segment(spec, alpha, beta, s.codec))
    externals: dict[str, torch.Tensor] = {}
    inputs: dict[str, MCNC | LoRA | Dense] = {}
    for t in plan.tensors:
        if isinstance(t, McncPlan):
            inputs[t.name] = MCNC(segments[t.segment], t.shape, to_torch(t.dtype),
                                  _theta0(t.theta0, t.shape, t.name, data, externals))
        elif isinstance(t, LoraPlan):
            shape = (t.out_features, t.in_features)
            factor_dtype = to_torch(t.factor_dtype)
            inputs[t.name] = LoRA(
                A=MCNC(segments[t.segment_a], (t.rank, t.in_features), factor_dtype),
                B=MCNC(segments[t.segment_b], (t.out_features, t.rank), factor_dtype),
                scale=t.scale,
                dtype=to_torch(t.dtype),
                theta0=_theta0(t.theta0, shape, t.name, data, externals),
            )
        else:
            inputs[t.name] = Dense(data.dense(t.shape, t.dtype), t.codec)
    if externals:
        save_file(externals, str(directory / EXTERNAL_FILE))
    return inputs
