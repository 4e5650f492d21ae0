"""The reader against the spec's test vectors (``spec/vectors``, SPEC.md §14).

Valid vectors: every tensor must match its ``NAME.expected.safetensors``: dense and packed
tensors bit for bit, mcnc tensors and lora factors chunk by chunk within §10.1, merged lora
tensors element by element within the error propagated from the factors (see
``_check_lora``). The bounds' ingredients (theta0 norms, ``||phi64||``, normal ``z64``) come
from a float64 evaluation of the file itself with ``mcnc_format.reference``, which also checks
that the expected files are the correctly rounded reference values.

Invalid vectors: each raises its documented ``MCNCError`` subclass at the documented stage.
And ``spec/make_vectors.py`` regenerates every file byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gpu_marks import needs_cuda, proves
from safetensors.torch import load_file, safe_open

import mcnc_format as mf
from mcnc_format import constants as C
from mcnc_format import errors, philox, reference
from mcnc_format.api import stream
from mcnc_format.engine.backend import triton_available
from mcnc_format.engine.options import GpuPath
from mcnc_format.header import (
    BlobTheta0,
    ExternalTheta0,
    FanInUniformTheta0,
    LoRATensor,
    MCNCTensor,
    MemberEntry,
    NormalTheta0,
    Theta0Entry,
    UniformTheta0,
    ZerosTheta0,
)

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "spec" / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())
VALID = INDEX["valid"]
INVALID = INDEX["invalid"]
U = 2.0**-24  # unit roundoff of float32

# A random workspace makes the reader split segments into batches at varying chunk boundaries;
# the result must meet the same bounds. The seed is printed so a failure can be replayed.
_SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_vectors: workspace seed {_SEED}")
WORKSPACES = [None, random.Random(_SEED).randrange(64, 4096)]
# On a machine with a GPU the same vectors check the device paths: the reader's (on-device
# theta0), and the pipelined loader's, eager and through the fused Triton kernel.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda),
           pytest.param("cuda-stream-eager", marks=needs_cuda),
           pytest.param("cuda-stream-fused", marks=[
               *needs_cuda, proves(GpuPath.KERNEL_IEEE, GpuPath.PHILOX_KERNEL,
                                   GpuPath.LORA_MERGE_KERNEL)])]


# --------------------------------------------------------------------------------------------
# float64 evaluation of a file with the reference (independent of spec/make_vectors.py)
# --------------------------------------------------------------------------------------------


# float64 sin and matrix products differ in the last bit between math libraries (NumPy
# builds, BLAS), so a float64 reference evaluation reproduces only to about this, relative.
F64_REPRODUCIBILITY = 1e-12


def half_ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Half the spacing of ``dtype`` at ``|values|``: one rounding's error. For f64, where
    nothing is rounded, the float64 reference's own reproducibility."""
    x = np.abs(values)
    if dtype == "f64":
        return F64_REPRODUCIBILITY * np.maximum(1.0, x)
    if dtype == "f16":
        return np.spacing(x.astype(np.float16)).astype(np.float64) / 2
    spacing = np.spacing(x.astype(np.float32)).astype(np.float64)
    return spacing * 2.0**16 / 2 if dtype == "bf16" else spacing / 2


def theta0_ref(f: mf.MCNCFile, entry: Theta0Entry, shape: tuple[int, ...]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(float64 theta0, per-element allowance): the allowance is §8.3's normal tolerance."""
    n = math.prod(shape)
    zeros = np.zeros(n)
    if isinstance(entry, ZerosTheta0):
        return zeros, zeros
    if isinstance(entry, NormalTheta0):
        z64 = reference.normal_ref(entry.seed, entry.stream, 0, n)
        std = float(np.float32(entry.std))
        return (float(np.float32(entry.mean)) + std * z64,
                abs(std) * C.NORMAL_ATOL * np.maximum(1.0, np.abs(z64)))
    if isinstance(entry, UniformTheta0 | FanInUniformTheta0):
        bound = entry.bound if isinstance(entry, UniformTheta0) else \
            1.0 / math.sqrt(math.prod(shape[1:]))
        values = reference.uniform_signed_ref(entry.seed, entry.stream, 0, n, bound)
        return values.astype(np.float64), zeros
    if isinstance(entry, BlobTheta0):
        return f.blob_tensor(entry.blob).to(torch.float64).reshape(-1).numpy(), zeros
    assert isinstance(entry, ExternalTheta0)
    with safe_open(str(f.path.parent / entry.uri), framework="pt") as base:
        value = base.get_tensor(entry.tensor)
    return value.to(torch.float64).reshape(-1).numpy(), zeros


def p_factor(spec: mf.GeneratorSpec, weights: list[np.ndarray]) -> float:
    """§10.1's ``max(1, P / 20)`` with ``P = |omega0| * max_i (L * sum_j |W_1[i, j]| +
    |b_1[i]|)``, the bound on the first sine layer's argument."""
    w1 = np.abs(np.asarray(weights[0], dtype=np.float64))
    b1 = np.abs(np.asarray(weights[1], dtype=np.float64)) if spec.bias else 0.0
    p = abs(spec.omega0) * float(np.max(spec.L * w1.sum(axis=1) + b1))
    return max(1.0, p / 20)


def rtol_of(dtype: str) -> float:
    """§10.1's ``rtol`` of a tensor's dtype: ``REGEN_RTOL_16`` for f16 and bf16."""
    return C.REGEN_RTOL_16 if dtype in ("f16", "bf16") else C.REGEN_RTOL


@dataclass
class MemberRef:
    """A segment member in float64: its values, and for each element its segment chunk, that
    chunk's right-hand side of §10.1 (``max(1, P / 20) * (||theta0_c|| + sum_j |beta_cj|
    ||phi64||)``), its own normal-theta0 allowance (§8.3) and the norm of its chunk's; and the
    member's ``rtol``."""

    values: np.ndarray
    chunk: list[tuple[int, int]]
    chunk_scale: np.ndarray
    normal: np.ndarray
    chunk_normal: np.ndarray
    rtol: float

    @property
    def element_bound(self) -> np.ndarray:
        """Each element's own bound: ``rtol`` times its chunk's right-hand side, plus the
        chunk's normal allowance."""
        return self.rtol * self.chunk_scale + self.chunk_normal


def segment_ref(f: mf.MCNCFile, index: int, members: list[MemberEntry]) -> list[MemberRef]:
    """v64 of §10.1 for every member of segment ``index``, with each chunk's right-hand side
    and normal allowance."""
    seg = f.header.segments[index]
    gen = f.header.generators[seg.generator]
    spec = f.generator_spec(seg.generator)
    weights = (reference.generator_weights_ref(spec) if gen.seed is not None
               else [t.numpy() for t in spec.inline or ()])
    alpha = f.blob_tensor(seg.alpha).to(torch.float64).numpy()
    beta = f.blob_tensor(seg.beta).to(torch.float64).numpy()
    phi = reference.phi_ref(weights, spec, alpha)
    delta = np.einsum("cm,cmd->cd", beta, phi).reshape(-1)
    n = seg.chunks * gen.d
    theta0 = np.zeros(n)
    allowance = np.zeros(n)
    for m in members:
        values, extra = theta0_ref(f, m.theta0, m.shape)
        theta0[m.offset:m.offset + m.numel] = values
        allowance[m.offset:m.offset + m.numel] = extra
    scale = p_factor(spec, weights) * (
        np.linalg.norm(theta0.reshape(seg.chunks, gen.d), axis=1)
        + (np.abs(beta) * np.linalg.norm(phi, axis=-1)).sum(axis=1))
    normal = np.linalg.norm(allowance.reshape(seg.chunks, gen.d), axis=1)
    chunk_of = np.arange(n) // gen.d
    out = []
    for m in members:
        chunks = chunk_of[m.offset:m.offset + m.numel]
        out.append(MemberRef((theta0 + delta)[m.offset:m.offset + m.numel],
                             [(index, int(c)) for c in chunks], scale[chunks],
                             allowance[m.offset:m.offset + m.numel], normal[chunks],
                             rtol_of(m.dtype)))
    return out


def members_ref(f: mf.MCNCFile) -> dict[str, MemberRef]:
    """Every segment member of the file (mcnc tensors by name, lora factors as NAME:A/B)."""
    by_segment: dict[int, list[tuple[str, MemberEntry]]] = {}
    for t in f.header.tensors:
        if isinstance(t, MCNCTensor) and not t.theta0.known:
            continue
        for label, member in t.labelled_members():
            by_segment.setdefault(member.segment, []).append((label, member))
    out: dict[str, MemberRef] = {}
    for index, group in by_segment.items():
        refs = segment_ref(f, index, [factor for _, factor in group])
        out.update((label, ref) for (label, _), ref in zip(group, refs, strict=True))
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).reshape(-1).numpy()


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


class ChunkLedger:
    """Per segment chunk, summed over the members that share it: the squared error of the
    reader's values, the squared normal-theta0 and rounding allowances, each element divided
    by its member's ``rtol`` (§10.1 weighs errors by dtype), and the chunk's bound."""

    def __init__(self) -> None:
        self.err: dict[tuple[int, int], float] = {}
        self.normal: dict[tuple[int, int], float] = {}
        self.rounding: dict[tuple[int, int], float] = {}
        self.bound: dict[tuple[int, int], float] = {}

    def add(self, name: str, got: np.ndarray, expected: np.ndarray | None, ref: MemberRef,
            dtype: str) -> None:
        """Record one member, compared with its expected (rounded) values, or with v64 itself
        when ``expected`` is None (lora factors, which the expected files do not hold).

        The rounding allowance adds to the spec's bound the reader's rounding to ``dtype``
        (half an ulp when narrower than f32, as §10.1 says) and the expected file's own (half
        an ulp unless f64). The expected values must be the correctly rounded v64.
        """
        rounding = half_ulp(got, dtype) if dtype in ("f16", "bf16") else np.zeros_like(got)
        if expected is None:
            expected = ref.values
        else:
            rounded = half_ulp(expected, dtype)
            assert np.all(np.abs(expected - ref.values) <= rounded * (1 + 1e-9)), (
                f"{name}: the expected file is not the correctly rounded reference")
            rounding = rounding + rounded
        weight = 1.0 / ref.rtol
        for key, diff, r, scale, normal in zip(ref.chunk, got - expected, rounding,
                                               ref.chunk_scale, ref.normal, strict=True):
            self.err[key] = self.err.get(key, 0.0) + (diff * weight) ** 2
            self.normal[key] = self.normal.get(key, 0.0) + (normal * weight) ** 2
            self.rounding[key] = self.rounding.get(key, 0.0) + (r * weight) ** 2
            self.bound[key] = scale

    def check(self) -> None:
        """§10.1 for every chunk: ``||(v_c - e_c) / rtol|| <= bound_c + ||normal_c / rtol|| +
        ||rounding_c / rtol||``."""
        for key, err in self.err.items():
            allowed = (self.bound[key] + math.sqrt(self.normal[key])
                       + math.sqrt(self.rounding[key]))
            assert math.sqrt(err) <= allowed, (
                f"segment {key[0]} chunk {key[1]}: |(v - v64) / rtol| = {math.sqrt(err):.3g} > "
                f"{allowed:.3g}")


def _check_lora(f: mf.MCNCFile, name: str, got: torch.Tensor, expected: torch.Tensor,
                refs: dict[str, MemberRef]) -> None:
    """A merged lora tensor, element by element.

    With the factors' float64 values A, B and their bounds eA, eB (each element within its
    chunk's §10.1 bound), the float32 merge ``fl(fl(s * fl(B @ A)) + theta0)`` is off by at
    most ``|s| (eB|A| + |B|eA + eB eA) + |s| (gamma_r + 3u)(|B| + eB)(|A| + eA) + u|theta0|``
    (``gamma_r = r u / (1 - r u)``: the dot product of length r; 3u: the scale, the sum and
    slack), plus theta0's own normal tolerance and the two dtype roundings of
    ``ChunkLedger.add``. A factor narrower than f32 is rounded to its dtype before the product
    (§6.3 as the reader implements it): its half ulp joins eA or eB.
    """
    t = f.entry(name)
    assert isinstance(t, LoRATensor)
    ra, rb = refs[f"{name}:A"], refs[f"{name}:B"]
    a, b = ra.values.reshape(t.A.shape), rb.values.reshape(t.B.shape)
    ea, eb = (ref.element_bound.reshape(factor.shape) + (
        half_ulp(values, factor.dtype) if factor.dtype in ("f16", "bf16") else 0.0)
        for ref, factor, values in ((ra, t.A, a), (rb, t.B, b)))
    theta0, extra = theta0_ref(f, t.theta0, t.shape)
    scale = abs(float(t.scale or 0.0))
    r = t.A.shape[0]
    gamma = r * U / (1 - r * U)
    big_a, big_b = np.abs(a) + ea, np.abs(b) + eb
    bound = scale * (eb @ np.abs(a) + np.abs(b) @ ea + eb @ ea) \
        + scale * (gamma + 3 * U) * (big_b @ big_a) + U * np.abs(theta0.reshape(t.shape)) \
        + extra.reshape(t.shape)
    v64 = theta0.reshape(t.shape) + float(t.scale or 0.0) * (b @ a)
    e = _np(expected).reshape(t.shape)
    assert np.all(np.abs(e - v64) <= half_ulp(e, t.dtype) * (1 + 1e-9) + 1e-300), (
        f"{name}: the expected file is not the correctly rounded reference")
    g = _np(got).reshape(t.shape)
    narrow = t.dtype in ("f16", "bf16")
    allowed = bound + half_ulp(e, t.dtype) + (half_ulp(g, t.dtype) if narrow else 0.0)
    assert np.all(np.abs(g - e) <= allowed), f"{name}: merged lora outside its bound"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workspace", WORKSPACES, ids=["default-workspace", "small-workspace"])
@pytest.mark.parametrize("vector", VALID, ids=[v["file"] for v in VALID])
def test_valid_vector(vector: dict, workspace: int | None, device: str) -> None:
    expected = load_file(VECTORS / vector["expected"])
    unsupported = vector["unsupported"]
    with mf.MCNCFile(VECTORS / vector["file"], workspace_bytes=workspace) as f:
        assert f.minor == vector["minor"]
        assert sorted(f.keys()) == sorted([*expected, *unsupported])
        for name, error in unsupported.items():
            with pytest.raises(getattr(errors, error)):
                f.get_tensor(name)
        if device.startswith("cuda-stream"):
            fused = device.endswith("fused")
            if fused and not triton_available():
                pytest.skip("triton is not installed")
            got = dict(stream(f.path, "cuda", names=list(expected), workspace_bytes=workspace,
                              use_triton=fused))
            device = "cuda"
        else:
            got = f.tensors(list(expected), device=device)
        refs = members_ref(f)
        ledger = ChunkLedger()
        for name, want in expected.items():
            t = f.entry(name)
            value = got[name]
            assert value.dtype == want.dtype and value.shape == want.shape, name
            assert value.device.type == device, name
            if t.stores_values:  # dense and packed: the stored values, bit for bit
                assert torch.equal(value.cpu(), want), name
            elif isinstance(t, MCNCTensor):
                ledger.add(name, _np(value), _np(want), refs[name], t.dtype)
            else:
                _check_lora(f, name, value, want, refs)
                a, b, _ = f.get_lora_factors(name, device=device)
                for (label, entry), factor in zip(t.labelled_members(), (a, b), strict=True):
                    ledger.add(label, _np(factor), None, refs[label], entry.dtype)
        ledger.check()


@pytest.mark.parametrize("vector", INVALID, ids=[v["file"] for v in INVALID])
def test_invalid_vector(vector: dict) -> None:
    path = VECTORS / vector["file"]
    error = getattr(errors, vector["error"])
    assert issubclass(error, errors.MCNCError)
    if vector["stage"] == "open":
        with pytest.raises(error) as caught:
            mf.open(path)
        check_message(caught.value, path, vector["rule"])
        return
    with mf.open(path) as f:
        target = vector["tensor"]
        names = f.keys()
        others = [n for n in names if n != target]
        f.tensors(others)
        if vector["stage"] == "read":
            with pytest.raises(error) as caught:
                f.get_tensor(target)
        else:
            assert vector["stage"] == "verify"
            f.tensors()
            with pytest.raises(error) as caught:
                f.check_padding()
    check_message(caught.value, path, vector["rule"])


def check_message(error: BaseException, path: Path, rule: str) -> None:
    """Messages name the file and the rule (the rule's number points into SPEC.md §12), and
    the error reports the rule's identifier as a value (§12, "Reporting")."""
    assert str(path) in str(error), f"the message does not name the file: {error}"
    assert re.search(rf"\b{rule}\b", str(error)), f"the message does not cite {rule}: {error}"
    assert getattr(error, "rule", None) == rule, f"the error's rule is not {rule}: {error!r}"


def test_index_lists_every_file() -> None:
    """Each file in spec/vectors is indexed, and each invalid vector is named for its rule."""
    listed = {v["file"] for v in VALID} | {v["expected"] for v in VALID}
    listed |= {v["file"] for v in INVALID}
    present = {str(p.relative_to(VECTORS)) for p in VECTORS.rglob("*.mcnc")}
    present |= {str(p.relative_to(VECTORS)) for p in VECTORS.glob("*.expected.safetensors")}
    assert listed == present
    for v in INVALID:
        stem = Path(v["file"]).name
        assert stem[0] == "R" and f"R{int(stem[1:3])}" == v["rule"], stem
        assert v["stage"] in INDEX["stages"]
        assert (v["tensor"] is None) == (v["stage"] != "read")


def test_valid_vectors_are_small() -> None:
    total = sum(p.stat().st_size for p in VECTORS.rglob("*") if p.is_file())
    assert total < 512 * 1024


def _make_vectors_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    script = ROOT / "spec" / "make_vectors.py"
    spec = importlib.util.spec_from_file_location("make_vectors", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_header_that_oscillates_at_one_level_is_compressed_at_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With these 48 tensors (the compressed-header vector's inputs, cut to 48) the level-19
    header moves the data start between 512 and 576 forever (481 and 480 bytes): the writer
    must settle at a lower level (§11) rather than fall back to an 11x larger plain header."""
    module = _make_vectors_module(monkeypatch)
    data = module._Data("compressed-header")
    gen = mf.GeneratorSpec(k=3, d=16, hidden=(8,), L=20.0, seed=11)
    shapes = [(2, 3)] * 48
    seg = data.segment(gen, shapes, m=1)
    tensors = {f"model.layers.{i // 3}.mlp.{('up', 'down', 'gate')[i % 3]}_proj.weight":
               mf.MCNC(seg, shape) for i, shape in enumerate(shapes)}
    path = mf.save(tmp_path / "oscillating.mcnc", tensors)
    raw = path.read_bytes()
    header_codec, header_length = struct.unpack_from("<IQ", raw, 12)
    assert header_codec == C.HEADER_CODEC_ZSTD and header_length < 600
    with mf.open(path) as f:
        assert f.keys() == list(tensors)


def test_make_vectors_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """``python spec/make_vectors.py OUT`` reproduces every committed file (run in-process:
    the same ``generate`` the script's ``main`` calls)."""
    module = _make_vectors_module(monkeypatch)
    module.main(["make_vectors.py", str(tmp_path)])
    made = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    committed = {str(p.relative_to(VECTORS)) for p in VECTORS.rglob("*") if p.is_file()}
    assert made == committed
    for name in sorted(made):
        fresh, committed_bytes = (tmp_path / name).read_bytes(), (VECTORS / name).read_bytes()
        if fresh != committed_bytes and name.endswith(".expected.safetensors"):
            _assert_same_up_to_f64_reproducibility(tmp_path / name, VECTORS / name)
            continue
        assert fresh == committed_bytes, name


def _assert_same_up_to_f64_reproducibility(fresh: Path, committed: Path) -> None:
    """Expected files made with another math library: same tensors, bit for bit except f64
    ones, which agree to ``F64_REPRODUCIBILITY``."""
    a, b = load_file(fresh), load_file(committed)
    assert sorted(a) == sorted(b), fresh.name
    for key, value in b.items():
        assert a[key].dtype == value.dtype and a[key].shape == value.shape, (fresh.name, key)
        if value.dtype != torch.float64:
            assert torch.equal(a[key], value), (fresh.name, key)
        else:
            slack = F64_REPRODUCIBILITY * value.abs().clamp_min(1.0)
            assert bool(((a[key] - value).abs() <= slack).all()), (fresh.name, key)


def test_philox_json_matches_implementation() -> None:
    doc = json.loads((VECTORS / "philox.json").read_text())
    for case in doc["known_answers"]:
        counter = [torch.tensor([int(w, 16)], dtype=torch.int64) for w in case["counter"]]
        key = [int(w, 16) for w in case["key"]]
        out = philox.philox4x32(*counter, *key)
        assert [f"{int(w):08x}" for w in out] == case["output"]
    assert len(doc["streams"]) >= 5
    assert any(case["start"] // 4 >= 2**32 for case in doc["streams"])
    for case in doc["streams"]:
        words = philox.stream_words(case["seed"], case["stream"], case["start"], case["count"])
        assert [f"{int(w):08x}" for w in words] == case["words"], case
    for case in doc["uniform"]:
        values = philox.uniform_signed(case["seed"], case["stream"], case["start"],
                                       case["count"], case["bound"])
        bits = values.numpy().view(np.uint32)
        assert [f"{int(b):08x}" for b in bits] == case["float32_bits"], case
    for case in doc["normal"]:
        z = philox.normal(case["seed"], case["stream"], case["start"], case["count"])
        z64 = np.array(case["z64"])
        assert np.all(np.abs(z.numpy() - z64) <= C.NORMAL_ATOL * np.maximum(1, np.abs(z64)))
