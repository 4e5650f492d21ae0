"""The fused Triton kernel against the eager path and the float64 reference (SPEC.md §10).

Each case regenerates a run of chunks into one member's storage (first element anywhere in a
chunk, neighbours masked off), with every theta0 the kernel draws or reads: Philox uniform and
normal (on the fast path where rows start on a Philox block and on the per-element path), a
dense base updated in place and one of another dtype. Results must meet §10's per-chunk bound
against float64; for narrower outputs one output ulp is allowed on top, because the
interpreter's float32 -> bfloat16 cast truncates where a GPU rounds to nearest. Elements
outside the member are guarded. The pipeline with the kernel must agree with the reader.

The kernel runs in a child process under ``TRITON_INTERPRET=1`` (Triton decides at import
whether to interpret, and the setting must not leak into other tests); where CUDA is present
the same cases also run compiled, in this process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_marks import proves, requires_cuda
from triton_helpers import requires_nvidia_backend, requires_triton

import mcnc_format as mf
from mcnc_format import GeneratorSpec, philox, reference
from mcnc_format.constants import NORMAL_ATOL, REGEN_RTOL, REGEN_RTOL_16
from mcnc_format.engine.backend import KernelCapabilities
from mcnc_format.engine.fused import FusedGenerator
from mcnc_format.engine.options import GpuPath, LoadOptions
from mcnc_format.engine.plan import plan_load
from mcnc_format.generator import ieee_fp32
from mcnc_format.philox import round_to_f32

pytestmark = requires_triton

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_triton_kernel seed: {SEED}")
GUARD = 5  # sentinel elements on each side of the member's storage

_CHILD = """
import sys
import torch
from mcnc_format.engine import triton_kernels as tk
from mcnc_format.api import load

cases = torch.load(sys.argv[1])
outputs = []
for case in cases:
    buffer = case["buffer"].clone()
    dest = buffer[case["guard"] : buffer.numel() - case["guard"]]
    theta = dict(case["theta0"])
    if theta.pop("inplace", False):
        dest.copy_(theta["base"])
        theta["base"] = dest
    tk.fused_regenerate(case["left"], case["stacked"], case["has_bias"], dest,
                        case["first_local"], tk.KernelTheta0(**theta), case["precision"])
    outputs.append(buffer)
draws = [tk.philox_uniform(seed, stream, n, bound, torch.device("cpu"))
         for seed, stream, n, bound in torch.load(sys.argv[1].replace("cases", "draws"))]
files = {path: load(path, "cpu", use_triton=True, workspace_bytes=int(ws))
         for path, ws in zip(sys.argv[3::2], sys.argv[4::2])}
# Boxes through the kernel: rows and columns cut off every matrix of the first file.
first = sys.argv[3]
cut = {n: (slice(1, None), slice(1, None)) for n, t in files[first].items()
       if t.dim() == 2 and min(t.shape) > 1}
got = load(first, "cpu", use_triton=True, workspace_bytes=4096, boxes=cut, names=list(cut))
boxes = {n: (files[first][n][cut[n]], got[n]) for n in cut}
# theta0 drawn by the kernel (the adapter bank's rebuilds on a GPU) and by torch.
from mcnc_format.engine.theta0 import prng_values
from mcnc_format.header import FanInUniformTheta0, UniformTheta0
entries = [UniformTheta0(seed=2**32 - 3, stream=7, bound=0.1), FanInUniformTheta0(5, 2**31 + 9)]
theta0 = [(prng_values(e, (16, 300), 0, 4800, "cpu", "t", tk.philox_uniform),
           prng_values(e, (16, 300), 0, 4800, "cpu", "t")) for e in entries]
torch.save({"kernel": outputs, "files": files, "draws": draws, "boxes": boxes,
            "theta0": theta0}, sys.argv[2])
"""


def _case(spec: GeneratorSpec, m: int, rows: int, offset: int, numel: int, out: torch.dtype,
          theta0: dict, rng: np.random.Generator, precision: str = "ieee") -> dict:
    """Inputs of one kernel call plus what the checks need (alpha, beta, the float64 truth)."""
    alpha = torch.from_numpy(rng.uniform(-spec.L, spec.L, (rows, m, spec.k))).float()
    beta = torch.from_numpy(rng.normal(0, 0.5, (rows, m))).float()
    fused = FusedGenerator(spec.weights(), m)
    left = fused.coefficients(alpha, beta)[:rows]
    weights = [w.numpy() for w in spec.weights().flat()]
    phi = reference.phi_ref(weights, spec, alpha.double().numpy())  # [rows, m, d]
    delta64 = np.einsum("rm,rmd->rd", beta.double().numpy(), phi).reshape(-1)
    phi_norm = np.linalg.norm(phi, axis=-1)  # [rows, m]
    first_local = -offset
    local = np.arange(rows * spec.d) + first_local
    inside = (local >= 0) & (local < numel)
    theta64, theta_atol = _theta0_truth(theta0, local[inside], numel)
    truth = np.full(rows * spec.d, np.nan)
    truth[inside] = delta64[inside] + theta64
    theta_full = np.zeros(rows * spec.d)
    theta_full[inside] = theta64
    buffer = torch.full((numel + 2 * GUARD,), -7.0, dtype=out)
    return {
        "spec": spec, "left": left, "stacked": fused.stacked, "m": m,
        "has_bias": fused.weights.out_bias is not None, "first_local": first_local,
        "theta0": {k: v for k, v in theta0.items() if k != "kind_name"}, "precision": precision,
        "buffer": buffer, "guard": GUARD, "truth": truth, "theta_full": theta_full,
        "theta_atol": theta_atol, "beta": beta.double().numpy(), "phi_norm": phi_norm,
        "alpha": alpha, "fused": fused, "label": f"{theta0.get('kind_name')} {out} off={offset}",
    }


def _theta0_truth(theta0: dict, local: np.ndarray, numel: int) -> tuple[np.ndarray, float]:
    """float64 theta0 at member indices ``local`` and the absolute tolerance it carries."""
    name = theta0.get("kind_name")
    if name == "zeros":
        return np.zeros(len(local)), 0.0
    if name == "uniform":
        units = reference.uniform_signed_ref(theta0["seed"], theta0["stream"], 0, numel, 1.0)
        return units[local] * round_to_f32(theta0["bound"]), 0.0
    if name == "normal":
        z = reference.normal_ref(theta0["seed"], theta0["stream"], 0, numel)[local]
        std = round_to_f32(theta0["std"])
        return z * std + round_to_f32(theta0["mean"]), NORMAL_ATOL * abs(std) * max(
            1.0, float(np.abs(z).max(initial=0.0)))
    base = theta0["base"].double().numpy()
    return base[local], 0.0


def _cases(rng: np.random.Generator) -> list[dict]:
    from mcnc_format.engine import triton_kernels as tk

    llama = GeneratorSpec(k=5, d=200, hidden=(32, 32), seed=int(rng.integers(2**32)))
    narrow = GeneratorSpec(k=16, d=96, hidden=(64,), seed=int(rng.integers(2**32)), bias=False)
    odd = GeneratorSpec(k=3, d=150, hidden=(8, 8), seed=int(rng.integers(2**32)), omega0=2.5)
    vision = GeneratorSpec(k=16, d=1600, hidden=(256, 256), seed=int(rng.integers(2**32)))
    key = {"seed": int(rng.integers(2**32)), "stream": int(rng.integers(2**32))}
    uniform = {"kind": tk.THETA0_UNIFORM, "bound": 0.07, "kind_name": "uniform", **key}
    normal = {"kind": tk.THETA0_NORMAL, "mean": 0.25, "std": 0.5, "kind_name": "normal", **key}
    zeros = {"kind": tk.THETA0_ZEROS, "kind_name": "zeros"}
    bf16_base = torch.from_numpy(rng.normal(0, 1, 10 * 200 - 90)).to(torch.bfloat16)
    f32_base = torch.from_numpy(rng.normal(0, 1, 6 * 150 - 7)).float()
    f64_base = torch.from_numpy(rng.normal(0, 1, 5 * 96 - 10))
    return [
        _case(llama, 1, 10, 37, 10 * 200 - 37 - 50, torch.float32, uniform, rng),
        _case(llama, 1, 10, 0, 10 * 200 - 3, torch.bfloat16, uniform, rng),
        _case(llama, 1, 7, 3, 7 * 200 - 3, torch.float32, normal, rng),
        _case(llama, 2, 7, 0, 7 * 200, torch.bfloat16, normal, rng),
        _case(llama, 1, 10, 40, 10 * 200 - 90, torch.bfloat16,
              {"kind": tk.THETA0_DENSE, "base": bf16_base, "inplace": True,
               "kind_name": "dense"}, rng),
        _case(narrow, 3, 9, 5, 9 * 96 - 5, torch.float32, zeros, rng),
        _case(narrow, 3, 9, 0, 9 * 96, torch.float16, zeros, rng, precision="tf32x3"),
        _case(odd, 1, 6, 4, 6 * 150 - 4, torch.float32, uniform, rng),
        _case(odd, 2, 6, 1, 6 * 150 - 7, torch.bfloat16,
              {"kind": tk.THETA0_DENSE, "base": f32_base, "kind_name": "dense"}, rng),
        _case(narrow, 1, 5, 3, 5 * 96 - 10, torch.float16,
              {"kind": tk.THETA0_DENSE, "base": f64_base, "kind_name": "dense"}, rng),
        _case(vision, 1, 2, 0, 2 * 1600, torch.float32, uniform, rng),
        # Split bfloat16 products: 16-bit outputs, and float32 ones that show the error
        # before any rounding (K = 256 runs several K blocks).
        _case(llama, 1, 10, 0, 10 * 200 - 3, torch.bfloat16, uniform, rng, precision="bf16x3"),
        _case(narrow, 3, 9, 0, 9 * 96, torch.float16, zeros, rng, precision="bf16x3"),
        _case(llama, 2, 10, 37, 10 * 200 - 37 - 50, torch.float32, normal, rng,
              precision="bf16x3"),
        _case(vision, 1, 2, 0, 2 * 1600, torch.float32, uniform, rng, precision="bf16x3"),
    ]


def _draws(rng: np.random.Generator) -> list[tuple[int, int, int, float]]:
    """(seed, stream, count, bound) cases for ``philox_uniform``: counts that are and are not
    multiples of the block, extreme keys."""
    cases = [(0, 0, 5, 1.0), (2**32 - 1, 2**32 - 1, 1030, 0.5), (7, 3, 0, 1.0)]
    cases += [(int(rng.integers(2**32)), int(rng.integers(2**32)), int(rng.integers(1, 3000)),
               float(rng.uniform(0.01, 2))) for _ in range(3)]
    return cases


def _check_draws(cases: list[tuple[int, int, int, float]], got: list[torch.Tensor]) -> None:
    """Exact: the kernel's draw equals the torch Philox draw bit for bit (§8.2)."""
    for (seed, stream, n, bound), value in zip(cases, got, strict=True):
        expected = philox.uniform_signed(seed, stream, 0, n, bound)
        assert torch.equal(value.cpu(), expected), (seed, stream, n, bound, SEED)


def _check_case(case: dict, buffer: torch.Tensor) -> None:
    guard = case["guard"]
    assert bool((buffer[:guard] == -7).all()) and bool((buffer[-guard:] == -7).all()), (
        "kernel wrote outside the member", case["label"], SEED)
    value = buffer[guard:-guard].double().numpy()
    numel = value.size
    d = case["spec"].d
    truth = case["truth"]
    local = np.arange(truth.size) + case["first_local"]
    inside = (local >= 0) & (local < numel)
    got = np.full(truth.size, np.nan)
    got[inside] = value[local[inside]]
    err = np.where(inside, got - truth, 0.0).reshape(-1, d)
    theta = case["theta_full"].reshape(-1, d)
    # §10.1: ||v - v64|| <= REGEN_RTOL * (||theta0_c|| + sum_j |beta_cj| ||phi64(alpha_cj)||)
    scale = np.linalg.norm(theta, axis=1) + (np.abs(case["beta"]) * case["phi_norm"]).sum(1)
    # Split bfloat16 products are held to the 16-bit outputs' bound, before their rounding.
    rtol = REGEN_RTOL_16 if case["precision"] == "bf16x3" else REGEN_RTOL
    bound = rtol * scale + case["theta_atol"] * math.sqrt(d)
    dtype = buffer.dtype
    if dtype != torch.float32:
        # One output ulp per element (the interpreter truncates to bfloat16).
        t = np.where(inside, truth, 0.0)
        ulp = (np.abs(t) * torch.finfo(dtype).eps + torch.finfo(dtype).tiny).reshape(-1, d)
        err = np.maximum(np.abs(err) - ulp, 0.0).reshape(-1, d)
    norms = np.linalg.norm(err, axis=1)
    assert bool((norms <= bound).all()), (case["label"], float((norms / bound).max()), SEED)


def _check_against_eager(case: dict, buffer: torch.Tensor) -> None:
    """The kernel and the eager product agree to float32 rounding (before the cast)."""
    if buffer.dtype != torch.float32:
        return
    with ieee_fp32(torch.device("cpu")):
        eager = (case["left"] @ case["stacked"]).double().numpy().reshape(-1)
    local = np.arange(eager.size) + case["first_local"]
    value = buffer[case["guard"]:-case["guard"]].double().numpy()
    inside = (local >= 0) & (local < value.size)
    expected = eager[inside] + case["theta_full"][inside]
    rtol = REGEN_RTOL_16 if case["precision"] == "bf16x3" else REGEN_RTOL
    tol = rtol * (np.abs(expected).max() + 1) + case["theta_atol"]
    assert np.abs(value[local[inside]] - expected).max() <= tol, (case["label"], SEED)


def _mixed_file(directory: Path) -> Path:
    """Segments whose members start mid-chunk, with Philox, blob and external theta0 (of the
    tensor's dtype, of another, float64 included), and a float64 output on the eager path in
    the same segment as kernel members."""
    from safetensors.torch import save_file

    from mcnc_format import MCNC, Segment, Theta0
    from mcnc_format.reader import tensor_sha256

    g = torch.Generator().manual_seed(SEED)
    gen = GeneratorSpec(k=5, d=120, hidden=(32, 32), seed=SEED)
    shapes = [(9, 13), (3, 50), (41,), (6, 7), (5, 30), (77,), (2, 40)]
    chunks = -(-sum(math.prod(s) for s in shapes) // 120)
    seg = Segment(gen, (torch.rand(chunks, 1, 5, generator=g) * 40 - 20).to(torch.bfloat16),
                  torch.randn(chunks, 1, generator=g) * 0.3)
    base = torch.randn(3, 50, generator=g).to(torch.bfloat16)
    base64 = torch.randn(2, 40, generator=g, dtype=torch.float64)
    save_file({"w": base, "w64": base64}, str(directory / "base.safetensors"))
    mf.save(directory / "k.mcnc", {
        "a": MCNC(seg, shapes[0], torch.bfloat16, Theta0.fan_in_uniform(4, 1)),
        "b": MCNC(seg, shapes[1], torch.bfloat16,
                  Theta0.external("base.safetensors", "w", tensor_sha256(base))),
        "c": MCNC(seg, shapes[2], torch.float32, Theta0.normal(4, 2, 0.0, 0.02)),
        "d": MCNC(seg, shapes[3], torch.float16,
                  Theta0.stored(torch.randn(6, 7, generator=g))),
        "f": MCNC(seg, shapes[4], torch.float64, Theta0.uniform(0.05, 4, 3)),
        "g": MCNC(seg, shapes[5], torch.float32,
                  Theta0.stored(torch.randn(77, generator=g, dtype=torch.float64))),
        "h": MCNC(seg, shapes[6], torch.bfloat16,
                  Theta0.external("base.safetensors", "w64", tensor_sha256(base64))),
        "e": torch.randn(5, generator=g),
    })
    return directory / "k.mcnc"


def _vectors() -> list[Path]:
    root = Path(__file__).resolve().parent.parent / "spec" / "vectors"
    usable = []
    for path in sorted(root.glob("*.mcnc")):
        try:
            mf.load(path)
        except mf.MCNCError:
            continue  # vectors of unsupported features are tested by test_stream
        usable.append(path)
    return usable


def _compare_files(files: dict[str, dict[str, torch.Tensor]]) -> None:
    for path, got in files.items():
        want = mf.load(path)
        assert sorted(got) == sorted(want), path
        for name, expected in want.items():
            value = got[name]
            assert value.dtype == expected.dtype and value.shape == expected.shape, (path, name)
            if not expected.dtype.is_floating_point or expected.numel() == 0:
                assert torch.equal(value, expected), (path, name)
                continue
            a, b = value.double(), expected.double()
            ulp = b.abs() * torch.finfo(expected.dtype).eps + torch.finfo(expected.dtype).tiny
            tol = 2 * ulp + 1e-5 * b.abs().max()
            assert bool(((a - b).abs() <= tol).all()), (path, name, SEED)


def test_kernel_interpreted(tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    cases = _cases(rng)
    inputs = tmp_path / "cases.pt"
    torch.save([{k: case[k] for k in ("buffer", "guard", "theta0", "left", "stacked",
                                      "has_bias", "first_local", "precision")}
                for case in cases], inputs)
    draws = _draws(rng)
    torch.save(draws, tmp_path / "draws.pt")
    files = [_mixed_file(tmp_path), *_vectors()]
    file_args = [str(a) for path in files for a in (path, 4096)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(inputs), str(result), *file_args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(result)
    for case, buffer in zip(cases, out["kernel"], strict=True):
        _check_case(case, buffer)
        _check_against_eager(case, buffer)
    _compare_files(out["files"])
    _check_draws(draws, out["draws"])
    for drawn, reference_draw in out["theta0"]:
        assert torch.equal(drawn, reference_draw)
    assert out["boxes"], "the mixed file has matrices"
    for name, (whole, box) in out["boxes"].items():  # the kernel's boxes, bit for bit
        assert torch.equal(box.contiguous().view(torch.uint8),
                           whole.contiguous().view(torch.uint8)), name


_REGEN_SIGNATURE = {
    "left_ptr": "*fp32", "w_ptr": "*bf16", "w_lo_ptr": "*bf16", "bias_ptr": "*fp32",
    "out_ptr": "*bf16", "base_ptr": "*fp64", "rows_ptr": "*i64", "tiles_ptr": "*i64",
    "ints_ptr": "*i64", "floats_ptr": "*fp32", "K": "i32", "stride_left": "i32", "d": "i32",
    **dict.fromkeys(("HAS_BIAS", "THETA", "ALIGNED", "GATHER", "BLOCK_C", "BLOCK_D", "BLOCK_K",
                     "PRECISION", "COMPILED", "VEC"), "constexpr"),
}


@requires_nvidia_backend
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_cuda_without_a_gpu(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Ahead-of-time compilation to sm_90 PTX and cubin (no GPU needed): the interpreter
    accepts what compiled Triton refuses (a jit function reading a non-constexpr global), and
    only compiled code shows which math instructions the Box-Muller transform uses. Every
    theta0 branch that calls a helper is compiled, so every jit function is covered."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mcnc_format.engine import triton_kernels as tk

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))  # really compile
    jit_functions = {name for name, value in vars(tk).items()
                     if isinstance(value, triton.JITFunction)}
    assert jit_functions == {"_uniform_units", "_box_muller", "dot_f32", "_regen_kernel",
                             "_uniform_kernel", "_lora_merge_kernel"}, (
        "compile any new jit function here too")
    target = GPUTarget("cuda", 90, 32)
    ptx = []
    for theta, aligned, gather, precision in ((tk.THETA0_UNIFORM, True, False, "bf16x3"),
                                              (tk.THETA0_NORMAL, False, True, "ieee"),
                                              (tk.THETA0_DENSE, False, False, "tf32x3")):
        constants = {"HAS_BIAS": True, "THETA": theta, "ALIGNED": aligned, "GATHER": gather,
                     "BLOCK_C": 16, "BLOCK_D": 16, "BLOCK_K": 16, "PRECISION": precision,
                     "COMPILED": True, "VEC": 1}
        weights = "*bf16" if precision == "bf16x3" else "*fp32"
        signature = dict(_REGEN_SIGNATURE, w_ptr=weights, w_lo_ptr=weights)
        source = ASTSource(tk._regen_kernel, signature, constexprs=constants)
        ptx.append(triton.compile(source, target=target, options={"num_warps": 1}).asm["ptx"])
    # The default tile with split products: Hopper's warpgroup tensor-core instructions.
    # Aligned members (VEC = 8 bf16 values) are stored 16 bytes at a time, others value by value.
    for vec, store in ((8, "st.global.v4.b32"), (1, "st.global.b16")):
        constants = {"HAS_BIAS": True, "THETA": tk.THETA0_UNIFORM, "ALIGNED": True,
                     "GATHER": False, "BLOCK_C": tk.DEFAULT_TILE[0],
                     "BLOCK_D": tk.DEFAULT_TILE[1], "BLOCK_K": 32, "PRECISION": "bf16x3",
                     "COMPILED": True, "VEC": vec}
        source = ASTSource(tk._regen_kernel, _REGEN_SIGNATURE, constexprs=constants)
        hopper = triton.compile(source, target=target, options={"num_warps": tk.DEFAULT_TILE[2]})
        assert "wgmma" in hopper.asm["ptx"]
        stores = set(re.findall(r"st\.global[.\w]*", hopper.asm["ptx"]))
        assert stores == {store}, (vec, stores)
    source = ASTSource(tk._uniform_kernel, {"out_ptr": "*fp32", "n": "i32", "key": "i64",
                                            "bound": "fp32", "BLOCK": "constexpr"},
                       constexprs={"BLOCK": 64})
    ptx.append(triton.compile(source, target=target, options={"num_warps": 1}).asm["ptx"])
    # The lora merge rounds every product and sum: no fused multiply-add (§6.3's bits).
    source = ASTSource(tk._lora_merge_kernel, {
        "out_ptr": "*bf16", "b_ptr": "*bf16", "a_ptr": "*fp32", "base_ptr": "*bf16",
        **dict.fromkeys(("rows", "cols", "rank", "stride_out", "stride_b", "stride_a",
                         "stride_base"), "i32"), "scale": "fp32",
        **dict.fromkeys(("HAS_BASE", "BLOCK_R", "BLOCK_C"), "constexpr")},
        constexprs={"HAS_BASE": True, "BLOCK_R": 16, "BLOCK_C": 32})
    merge = triton.compile(source, target=target, options={"num_warps": 1,
                                                           "enable_fp_fusion": False})
    assert "mul.rn.f32" in merge.asm["ptx"] and "fma.rn.f32" not in merge.asm["ptx"]
    approximate = re.compile(r"\b(?:sqrt|rsqrt|lg2|ex2|sin|cos)\.approx")
    assert not any(approximate.search(text) for text in ptx)
    assert "sqrt.rn.f32" in ptx[1]


@requires_cuda
@pytest.mark.parametrize("precision", [
    pytest.param("ieee", marks=proves(GpuPath.KERNEL_IEEE)),
    pytest.param("bf16x3", marks=proves(GpuPath.KERNEL_BF16X3)),
    "tf32x3",
])
def test_kernel_compiled(precision: str) -> None:
    """The interpreted test's cases of one output-layer product, compiled: each product's
    verdict stands alone in a GPU run's record (benchmarks/gpu_record.py)."""
    from mcnc_format.engine import triton_kernels as tk

    rng = np.random.default_rng(SEED)
    cases = [case for case in _cases(rng) if case["precision"] == precision]
    assert cases, precision
    for case in cases:
        buffer = case["buffer"].cuda()
        dest = buffer[GUARD:-GUARD]
        theta = dict(case["theta0"])
        if theta.pop("inplace", False):
            dest.copy_(theta["base"].cuda())
            theta["base"] = dest
        elif "base" in theta:
            theta["base"] = theta["base"].cuda()
        tk.fused_regenerate(case["left"].cuda(), case["stacked"].cuda(), case["has_bias"], dest,
                            case["first_local"], tk.KernelTheta0(**theta), case["precision"])
        _check_case(case, buffer.cpu())
        _check_against_eager(case, buffer.cpu())


@requires_cuda
@proves(GpuPath.PHILOX_KERNEL, GpuPath.KERNEL_IEEE)
def test_draws_and_loads_compiled(tmp_path: Path) -> None:
    """The interpreted test's Philox draws and whole-file loads (members of every theta0 kind
    in one launch per batch), compiled."""
    from mcnc_format.api import load
    from mcnc_format.engine import triton_kernels as tk

    rng = np.random.default_rng(SEED)
    _cases(rng)  # the draws follow the cases in the interpreted test's stream
    draws = _draws(rng)
    _check_draws(draws, [tk.philox_uniform(s, t, n, b, torch.device("cuda"))
                         for s, t, n, b in draws])
    files = [_mixed_file(tmp_path), *_vectors()]
    _compare_files({str(p): {k: v.cpu() for k, v in load(p, "cuda", use_triton=True).items()}
                    for p in files})


def test_kernel_precision_keeps_each_dtype_within_its_bound() -> None:
    """Split bfloat16 products meet §10.1's bound for 16-bit outputs only: ``AUTO`` and
    ``BF16X3`` use them there, float32 outputs keep IEEE FMA, explicit choices stand. ``AUTO``
    picks only products a GPU run measured (``MEASURED_ON_GPU``): IEEE until one records
    ``BF16X3``."""
    from mcnc_format.engine import triton_kernels as tk
    from mcnc_format.engine.options import MEASURED_ON_GPU, GpuPath, Precision

    cpu = torch.device("cpu")  # the interpreter: tensor-core products emulated
    ieee, bf16x3 = Precision.IEEE, Precision.BF16X3
    assert GpuPath.KERNEL_BF16X3 not in MEASURED_ON_GPU  # until a GPU run records it
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert tk.kernel_precision(Precision.AUTO, dtype, cpu) is ieee
    measured = frozenset({GpuPath.KERNEL_IEEE, GpuPath.KERNEL_BF16X3})  # once recorded
    for precision, given in ((Precision.AUTO, measured), (bf16x3, MEASURED_ON_GPU)):
        assert tk.kernel_precision(precision, torch.bfloat16, cpu, measured=given) is bf16x3
        assert tk.kernel_precision(precision, torch.float16, cpu, measured=given) is bf16x3
        assert tk.kernel_precision(precision, torch.float32, cpu, measured=given) is ieee
    # Inline generator weights may cancel more in the output layer: AUTO keeps IEEE for them.
    assert tk.kernel_precision(Precision.AUTO, torch.bfloat16, cpu, drawn=False,
                               measured=measured) is ieee
    assert tk.kernel_precision(bf16x3, torch.bfloat16, cpu, drawn=False) is bf16x3
    for dtype in (torch.bfloat16, torch.float32):
        assert tk.kernel_precision(ieee, dtype, cpu) is ieee
        assert tk.kernel_precision(Precision.TF32X3, dtype, cpu) is Precision.TF32X3
    assert LoadOptions().precision is Precision.AUTO


_MEMBERS_CHILD = """
import sys
import torch
from mcnc_format.engine import triton_kernels as tk
from mcnc_format.api import load

launches = []
launch = tk._launch

def counting(left, stacked, has_bias, jobs, *args):
    launches.append(len(jobs))
    return launch(left, stacked, has_bias, jobs, *args)

tk._launch = counting
got = load(sys.argv[1], "cpu", use_triton=True, workspace_bytes=1 << 26)
torch.save({"tensors": got, "launches": launches}, sys.argv[2])
"""


def test_one_launch_per_batch_covers_many_members_interpreted(tmp_path: Path) -> None:
    """A batch whose chunks hold many members (starting mid-chunk, several per chunk, Philox
    keys with the top bit set) costs one launch per output dtype, theta0 evaluation and vector
    width, not one per member, and each member's values match the torch path."""
    from mcnc_format import MCNC, Segment, Theta0

    g = torch.Generator().manual_seed(SEED)
    spec = GeneratorSpec(k=4, d=64, hidden=(16,), seed=SEED)
    # Sizes of whole vectors (8 values), then three that shift the rest off that alignment.
    sizes = [8 * int(n) for n in torch.randint(1, 20, (27,), generator=g)]
    sizes += [int(n) for n in torch.randint(1, 150, (3,), generator=g)]
    sizes.append(-sum(sizes) % (8 * spec.d) + 8 * spec.d)  # whole row tiles: one batch
    chunks = sum(sizes) // spec.d
    seg = Segment(spec, torch.rand(chunks, 1, 4, generator=g) * 2 - 1,
                  torch.randn(chunks, 1, generator=g) * 0.3)
    tensors = {}
    for i, n in enumerate(sizes):  # every kind keyed by a stream >= 2**31, two dtypes
        theta0 = (Theta0.uniform(0.05, 2**32 - 1 - i, 2**31 + i) if i % 3 == 0 else
                  Theta0.normal(7, 2**31 + i, 0.0, 0.02) if i % 3 == 1 else Theta0.zeros())
        tensors[f"t{i:02d}"] = MCNC(seg, (n,), torch.bfloat16 if i % 2 else torch.float32,
                                    theta0)
    path = tmp_path / "members.mcnc"
    mf.save(path, tensors)
    result = tmp_path / "members.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _MEMBERS_CHILD, str(path), str(result)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(result)
    from mcnc_format.engine import triton_kernels as tk

    with mf.open(path) as f:
        kernels = KernelCapabilities(frozenset(tk.KERNEL_DTYPES))
        assert len(plan_load(f.header, f.requests(), 1 << 26, kernels).steps) == 1, "one batch"
    # One launch per group: of the aligned members, 2 dtypes x 3 kinds, Philox kinds split by
    # block alignment; the last four may each need a group of their own (vector width).
    assert len(out["launches"]) <= 2 * (1 + 2 + 2) + 4 and sum(out["launches"]) == len(sizes)
    _compare_files({str(path): out["tensors"]})


_MERGE_CHILD = """
import sys
import torch
from mcnc_format.engine import triton_kernels as tk
from mcnc_format.api import load

cases = torch.load(sys.argv[1])
for case in cases:
    tk.lora_merge(case["out"], case["b"], case["a"], case["scale"], case["base"])
boxes = {"w": (slice(3, 50), slice(7, 40)), "v": (slice(None), slice(1, None))}
files = {"whole": load(sys.argv[3], "cpu", use_triton=True),
         "boxes": load(sys.argv[3], "cpu", use_triton=True, boxes=boxes, names=list(boxes))}
torch.save({"cases": cases, "files": files}, sys.argv[2])
"""


def test_lora_merge_kernel_interpreted_equals_the_torch_merge(tmp_path: Path) -> None:
    """The one-pass merge kernel gives ``fused.lora_merge``'s bits: ranks 1 to 24, bases of
    every float dtype (a column view too) or none, factors in bf16 and f32; and a lora file
    loaded through the kernels matches the torch path, its boxes the whole bit for bit."""
    from safetensors.torch import save_file

    from mcnc_format import MCNC, LoRA, Segment, Theta0
    from mcnc_format.engine.fused import lora_merge
    from mcnc_format.reader import tensor_sha256

    g = torch.Generator().manual_seed(SEED)
    cases, wants = [], []
    for rank, base_dtype, factor in ((1, torch.float32, torch.float32),
                                     (3, torch.bfloat16, torch.bfloat16),
                                     (16, torch.float64, torch.bfloat16),
                                     (24, None, torch.float32), (5, torch.float16, torch.float32)):
        b = torch.randn(37, rank, generator=g).to(factor)
        a = torch.randn(rank, 150, generator=g).to(factor)
        base = (None if base_dtype is None
                else torch.randn(37, 170, generator=g).to(base_dtype)[:, 20:])
        scale = float(torch.rand((), generator=g)) * 4 - 2
        want = torch.empty(37, 150)
        lora_merge(want, b, a, scale, base, 1 << 10)
        wants.append(want)
        cases.append({"out": torch.full((37, 150), float("nan")), "b": b, "a": a,
                      "scale": scale, "base": base})
    spec = GeneratorSpec(k=4, d=64, hidden=(16,), seed=SEED % 2**32)

    def segment(chunks: int) -> Segment:
        return Segment(spec, torch.rand(chunks, 1, 4, generator=g) * 2 - 1,
                       torch.randn(chunks, 1, generator=g) * 0.3)

    base = torch.randn(60, 48, generator=g).to(torch.bfloat16)
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    path = tmp_path / "lora.mcnc"
    mf.save(path, {
        "w": LoRA(MCNC(segment(6), (8, 48)), MCNC(segment(8), (60, 8)), 0.75, torch.float32,
                  Theta0.external("base.safetensors", "w", tensor_sha256(base))),
        "v": LoRA(MCNC(segment(2), (4, 30)), MCNC(segment(2), (20, 4)), -1.5, torch.float32,
                  Theta0.uniform(0.1, 5, 6)),
    })
    inputs, result = tmp_path / "merge.pt", tmp_path / "merged.pt"
    torch.save(cases, inputs)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _MERGE_CHILD, str(inputs), str(result),
                           str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(result)
    for case, want in zip(out["cases"], wants, strict=True):
        assert torch.equal(case["out"].view(torch.int32), want.view(torch.int32))
    _compare_files({str(path): out["files"]["whole"]})  # the factors' products may differ
    whole = out["files"]["whole"]
    for name, box in {"w": (slice(3, 50), slice(7, 40)), "v": (slice(None), slice(1, None))
                      }.items():
        want = whole[name][box].contiguous()
        assert torch.equal(out["files"]["boxes"][name].view(torch.int32),
                           want.view(torch.int32)), name


@requires_cuda
@proves(GpuPath.LORA_MERGE_KERNEL)
def test_lora_merge_kernel_compiled_equals_the_torch_merge() -> None:
    """Compiled, the merge kernel rounds to nearest where the interpreter truncates: on the
    device its bits equal the torch merge's for every output dtype the kernel stores."""
    from mcnc_format.engine import triton_kernels as tk
    from mcnc_format.engine.fused import lora_merge

    g = torch.Generator().manual_seed(SEED)
    for out_dtype in tk.KERNEL_DTYPES:
        for base_dtype in (torch.bfloat16, torch.float64, None):
            b = torch.randn(300, 16, generator=g).to(torch.bfloat16).cuda()
            a = torch.randn(16, 520, generator=g).cuda()
            base = (None if base_dtype is None
                    else torch.randn(300, 530, generator=g).to(base_dtype).cuda()[:, 7:527])
            want = torch.empty(300, 520, dtype=out_dtype, device="cuda")
            lora_merge(want, b, a, -0.37, base, 1 << 16)
            got = torch.empty_like(want)
            tk.lora_merge(got, b, a, -0.37, base)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (
                out_dtype, base_dtype)
