"""The adapter bank's Triton route (Punica-style SGMV over factor slabs) against the torch route.

Kernel cases: a two-Linear base, adapters of mixed ranks and factor dtypes put into slabs
(slots grown, freed and reused), and batches with consecutive groups, rows of one adapter
apart, rows without an adapter, rows repeated as generation repeats them, several tokens per
row. Each adapted module's output through ``TritonRouting`` is compared with
``TorchRouting``'s arithmetic on the same input and base output, element by element, within

    16 eps_f |x| |A|^T |B|^T |scale| + 4 eps_o (|base| + |x| |A|^T |B|^T |scale|)

(``eps_f``, ``eps_o``: machine epsilon of the factor and output dtypes): a few roundings per
route (the cast of the input, the intermediate, the product, the scale, the output, the
add; the interpreter truncates float32 to 16-bit floats where torch rounds to nearest),
and the two routes' different summation orders over ``in`` and ``r`` terms, whose errors
grow like the square root of the length for these random inputs (the worst-case bound grows
with the length; observed errors stay under a quarter of this bound, and a scale off by
1e-4 exceeds it for float32). Rows without an adapter keep the base output bit for bit.

End to end: ``AdapterBank(route=Route.TRITON)`` over the tiny Llama of test_serving gives
logits within ``OUTPUT_RTOL`` of the torch route's and of each adapter merged into its own
copy of the base, the same beam-search sequences as the torch route, the reader's factors
bit for bit from its slabs, the same logits after evictions reuse slots, and refusals.

The kernels run in a child process under ``TRITON_INTERPRET=1`` (Triton decides at import
whether to interpret, and the setting must not leak into other tests); where CUDA is present
the kernel cases also run compiled, in this process. Compilation to sm_90 PTX is checked
without a GPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from gpu_marks import requires_cuda
from serving_helpers import make_bank, make_tokens, merged_model, serve
from torch_helpers import SEED, assert_same_outputs, one_thread  # noqa: F401 (autouse)
from triton_helpers import requires_nvidia_backend, requires_triton

import mcnc_format as mf
from mcnc_format import GeneratorSpec
from mcnc_format.errors import UsageError
from mcnc_format.serving import AdapterBank, Route
from mcnc_format.serving.route import TorchRouting

pytestmark = requires_triton

DIMS = (40, 72, 24)  # the two Linears: 40 -> 72 -> 24

_CHILD = """
import sys
import torch
from mcnc_format.errors import UsageError
from mcnc_format.serving import AdapterBank, Route
from test_serving_triton import run_case

assert not __import__("mcnc_format.engine.triton_kernels", fromlist=["x"]).compiled()
inputs = torch.load(sys.argv[1], weights_only=False)
out = {"cases": [run_case(case, "cpu") for case in inputs["cases"]]}
bank_in = inputs["bank"]
base = bank_in["base"]

def bank(cache=1 << 20):
    b = AdapterBank(base, device="cpu", factor_cache_bytes=cache, route=Route.TRITON)
    for name, path in bank_in["files"].items():
        b.add(name, path)
    return b

roomy = bank()
with torch.no_grad():
    out["logits"] = roomy(bank_in["tokens"], adapters=bank_in["rows"]).logits
    out["beams"] = roomy.generate(bank_in["prompts"], adapters=bank_in["beam_rows"],
                                  **bank_in["generate"])
    out["factors"] = {n: roomy.factors(n) for n in bank_in["files"]}
    tight = bank(bank_in["tight_cache"])
    out["cycle"] = []
    for name in bank_in["cycle"]:
        logits = tight(bank_in["short"], adapters=[name] * len(bank_in["short"])).logits
        out["cycle"].append((logits, tight.stats().cached, tight.stats().slab_bytes))
    # Factors given out, then evicted: "b" takes the slots of "a" while "c" keeps the slabs.
    pair = bank(sum(a.nbytes + b.nbytes for n in "ac" for a, b, _ in out["factors"][n].values()))
    pair.factors("c")
    out["kept"] = ("a", pair.factors("a"))
    pair.factors("c")
    pair(bank_in["short"], adapters=["b"] * len(bank_in["short"]))
    assert pair.stats().cached == ("c", "b"), pair.stats().cached
refusals = {}
try:
    roomy(bank_in["tokens"], adapters=bank_in["rows"])  # grad enabled: the base's params
except UsageError as e:
    refusals["grad"] = str(e)
try:
    roomy.add("f64", bank_in["f64"], check_base=False)
except UsageError as e:
    refusals["f64"] = str(e)
for name in bank_in["files"]:
    roomy.remove(name)
out["refusals"] = refusals
out["empty_slab_bytes"] = roomy.stats().slab_bytes
torch.save(out, sys.argv[2])
"""


def _base(dtype: torch.dtype, g: torch.Generator) -> torch.nn.Sequential:
    layers = [torch.nn.Linear(DIMS[i], DIMS[i + 1]) for i in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return torch.nn.Sequential(*layers).to(dtype).requires_grad_(False)


def _factors(rank: int, dtype: torch.dtype, modules: tuple[str, ...], g: torch.Generator
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for module in modules:
        i = int(module)
        a = (torch.randn(rank, DIMS[i], generator=g) / DIMS[i] ** 0.5).to(dtype)
        b = torch.randn(DIMS[i + 1], rank, generator=g).to(dtype)
        out[module] = (a, b, float(torch.rand((), generator=g)) * 3 + 0.1)
    return out


def _cases() -> list[dict[str, Any]]:
    """(label, factor dtype per adapter, output dtype, slab operations, rows, repeat,
    tokens): adapters p..w; each ``put`` copies into a slab, ``free`` empties a slot."""
    g = torch.Generator().manual_seed(SEED)
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    both, first, second = ("0", "1"), ("0",), ("1",)
    specs = [
        ("consecutive groups", f32, [("p", 4, f32, both), ("q", 8, f32, both)],
         ["p", "p", "q", "q", "q"], 1, 7),
        ("rows apart, repeated, None", f32,
         [("p", 8, f32, both), ("q", 3, f32, first), ("r", 16, f32, second)],
         ["p", "q", None, "p", "r", "q", None], 3, 2),
        ("mixed ranks, slots grown, freed and reused", f32,
         [("p", 2, f32, both), ("q", 5, f32, both), ("r", 16, f32, both),
          ("s", 1, f32, both), ("t", 9, f32, both), "-q", "-s", ("u", 12, f32, both),
          ("v", 7, f32, both)],
         ["u", "t", "p", "r", "v", "p", "u", None, "t"], 1, 3),
        ("bfloat16 factors, float32 base", f32,
         [("p", 8, bf16, both), ("q", 4, bf16, both)], ["q", "p", None, "q"], 2, 5),
        ("bfloat16 factors and base", bf16,
         [("p", 8, bf16, both), ("q", 16, bf16, first)], ["p", "q", "p", "q"], 1, 9),
        ("float16 and float32 factors in one module: two slabs", f16,
         [("p", 8, f16, both), ("q", 4, f32, both), ("r", 4, f16, second)],
         ["r", "q", "p", None, "q"], 2, 1),
        ("one row, one adapter, many tokens", f32, [("p", 4, f32, both)], ["p"], 1, 37),
        ("ranks beyond one block of ranks (a partial second block)", f32,
         [("p", 80, f32, both), ("q", 3, f32, first)], ["p", "q", "p"], 1, 2),
    ]
    cases = []
    for label, out_dtype, ops, rows, repeat, tokens in specs:
        factors = {op[0]: _factors(op[1], op[2], op[3], g) for op in ops
                   if isinstance(op, tuple)}
        ops = [("put", op[0]) if isinstance(op, tuple) else ("free", op[1:]) for op in ops]
        x = torch.randn(len(rows) * repeat, tokens, DIMS[0], generator=g).to(out_dtype)
        cases.append({"label": label, "base": _base(out_dtype, g), "factors": factors,
                      "ops": ops, "rows": rows, "x": x})
    return cases


def run_case(case: dict[str, Any], device: str) -> dict[str, Any]:
    """Through ``TritonRouting``: each module's input, base output and output, and every
    slab-held adapter's factors as the slabs give them back."""
    from mcnc_format.serving.route import TritonRouting
    from mcnc_format.serving.slab import FactorSlabs

    slabs = FactorSlabs()
    for op, name in case["ops"]:
        if op == "put":
            slabs.put(name, {m: (a.to(device), b.to(device), s)
                             for m, (a, b, s) in case["factors"][name].items()})
        else:
            slabs.free(name)
    base = copy.deepcopy(case["base"]).to(device)
    seen: dict[str, list[torch.Tensor]] = {}

    def before(name: str):
        return lambda module, args, output: seen.setdefault(name, []).extend(
            [args[0].clone(), output.clone()])

    def after(name: str):
        return lambda module, args, output: seen[name].append(output.clone())

    handles = [base.get_submodule(m).register_forward_hook(before(m)) for m in ("0", "1")]
    routing = TritonRouting(case["rows"], slabs, torch.device(device))
    with torch.no_grad(), routing.installed(base):
        handles += [base.get_submodule(m).register_forward_hook(after(m)) for m in ("0", "1")]
        base(case["x"].to(device))
    for handle in handles:
        handle.remove()
    held = {n for slab in slabs.slabs.values() for n in slab.held}
    return {"seen": {m: [t.cpu() for t in v] for m, v in seen.items()},
            "factors": {n: {m: (a.cpu(), b.cpu(), s) for m, (a, b, s) in
                            slabs.factors(n).items()} for n in held}}


def _check_case(case: dict[str, Any], got: dict[str, Any]) -> None:
    label = (case["label"], SEED)
    live = set(got["factors"])
    for name in live:  # the slabs give back what was put, bit for bit
        assert got["factors"][name].keys() == case["factors"][name].keys(), label
        for module, (a, b, s) in case["factors"][name].items():
            ga, gb, gs = got["factors"][name][module]
            assert torch.equal(ga, a) and torch.equal(gb, b) and gs == s, label
    factors = {n: case["factors"][n] for n in live}
    for module, (x, base_out, out) in got["seen"].items():
        linear = case["base"].get_submodule(module)
        want = _torch_route(case["rows"], factors, module, linear, x, base_out.clone())
        abs_factors = {n: {m: (a.double().abs(), b.double().abs(), abs(s))
                           for m, (a, b, s) in f.items()} for n, f in factors.items()}
        chain = _torch_route(case["rows"], abs_factors, module, linear, x.double().abs(),
                             torch.zeros(base_out.shape, dtype=torch.float64))
        eps_f = max((torch.finfo(f[module][0].dtype).eps for f in factors.values()
                     if module in f), default=0.0)
        eps_o = torch.finfo(out.dtype).eps
        bound = (16 * eps_f * chain + 4 * eps_o * (base_out.double().abs() + chain))
        error = (out.double() - want.double()).abs()
        assert bool((error <= bound).all()), (*label, module,
                                              float((error / bound.clamp_min(1e-30)).max()))
        untouched = chain.reshape(chain.shape[0], -1).eq(0).all(1)
        assert torch.equal(out[untouched], base_out[untouched]), label
        assert not torch.equal(out[~untouched], base_out[~untouched]), label


def _torch_route(rows: list[str | None], factors: dict[str, Any], module: str,
                 linear: torch.nn.Module, x: torch.Tensor, output: torch.Tensor
                 ) -> torch.Tensor:
    """The torch route's result for one module: its hook on the given input and output."""
    routing = TorchRouting(rows, factors, torch.device("cpu"))
    if module not in routing.modules:
        return output
    return routing.hook(module)(linear, (x,), output)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return serve(tmp_path_factory)


def _float64_adapter(path: Path) -> Path:
    from mcnc_format import MCNC, LoRA, Segment

    g = torch.Generator().manual_seed(SEED)
    seg = Segment(GeneratorSpec(k=3, d=16, hidden=(8,), seed=5),
                  torch.randn(16, 1, 3, generator=g), torch.randn(16, 1, generator=g))
    shape_a, shape_b = (4, 32), (32, 4)
    mf.save(path, {"model.layers.0.self_attn.q_proj.weight": LoRA(
        MCNC(seg, shape_a, torch.float64), MCNC(seg, shape_b, torch.float64), 0.5)})
    return path


@pytest.fixture(scope="module")
def interpreted(served, tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    """The kernel cases and the bank's calls, run once in an interpreting child."""
    tmp = tmp_path_factory.mktemp("sgmv")
    base, files, _ = served
    roomy = make_bank(served)
    sizes = {n: sum(a.nbytes + b.nbytes for a, b, _ in roomy.factors(n).values())
             for n in files}
    bank_in = {
        "base": base, "files": files, "rows": ["b", None, "a", "a", "c", "b"],
        "tokens": make_tokens(6, 9, 100), "prompts": make_tokens(3, 5, 300),
        "beam_rows": ["a", "c", "b"],
        "generate": {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0,
                     "num_beams": 2},
        "tight_cache": sizes["c"], "cycle": ["a", "b", "c", "a", "b", "c"],
        "short": make_tokens(3, 7, 200), "f64": _float64_adapter(tmp / "f64.mcnc"),
    }
    inputs = {"cases": _cases(), "bank": bank_in}
    torch.save(inputs, tmp / "in.pt")
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp / "in.pt"), str(tmp / "out.pt")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return inputs, torch.load(tmp / "out.pt", weights_only=False)


def test_kernels_interpreted_equal_the_torch_route(interpreted):
    inputs, out = interpreted
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        _check_case(case, got)


def test_bank_interpreted_equals_the_torch_route_and_merged_models(served, interpreted):
    inputs, out = interpreted
    bank_in = inputs["bank"]
    torch_bank = make_bank(served)
    with torch.no_grad():
        want = torch_bank(bank_in["tokens"], adapters=bank_in["rows"]).logits
        for i, name in enumerate(bank_in["rows"]):
            model = served[0] if name is None else merged_model(served, name)
            assert_same_outputs(out["logits"][i], model(bank_in["tokens"][i : i + 1]).logits[0])
            assert_same_outputs(out["logits"][i], want[i])
        beams = torch_bank.generate(bank_in["prompts"], adapters=bank_in["beam_rows"],
                                    **bank_in["generate"])
        assert torch.equal(out["beams"], beams), SEED
        # The factors the bank gave out, the reader's bits, also those kept while their
        # slots went to other adapters.
        for name, factors in [*out["factors"].items(), out["kept"]]:
            with mf.open(bank_in["files"][name]) as f:
                for module, (a, b, scale) in factors.items():
                    want_a, want_b, want_scale = f.get_lora_factors(f"{module}.weight")
                    assert torch.equal(a, want_a) and torch.equal(b, want_b), (name, module)
                    assert scale == want_scale
        expected = [("a",), ("a", "b"), ("c",)] * 2
        for name, (logits, cached, slab_bytes), held in zip(bank_in["cycle"], out["cycle"],
                                                           expected, strict=True):
            rows = [name] * len(bank_in["short"])
            assert_same_outputs(logits, torch_bank(bank_in["short"], adapters=rows).logits)
            assert cached == held and slab_bytes > 0
    assert "torch.no_grad" in out["refusals"]["grad"]
    assert "Route.TORCH" in out["refusals"]["f64"] and "float64" in out["refusals"]["f64"]
    assert out["empty_slab_bytes"] == 0


def test_the_triton_route_is_refused_where_it_cannot_run(monkeypatch):
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(UsageError, match="CUDA"):
            AdapterBank(base, device="cpu", factor_cache_bytes=1 << 20, route=Route.TRITON)
    with pytest.raises(UsageError, match="route must be a Route"):
        AdapterBank(base, device="cpu", factor_cache_bytes=1 << 20, route="triton")
    monkeypatch.setattr("mcnc_format.engine.backend.installed_triton", lambda: None)
    with pytest.raises(UsageError, match=r"mcnc-format\[gpu\]"):
        AdapterBank(base, device="cpu", factor_cache_bytes=1 << 20, route=Route.TRITON)
    assert AdapterBank(base, device="cpu", factor_cache_bytes=1).stats().slab_bytes == 0


def test_the_triton_route_refuses_layers_off_the_bank_device():
    """Triton launches on the current device: a layer whose input or output is elsewhere than
    the bank's factors (a model sharded across devices) is refused, not launched."""
    from mcnc_format.serving.route import TritonRouting
    from mcnc_format.serving.slab import FactorSlabs

    g = torch.Generator().manual_seed(SEED)
    slabs = FactorSlabs()
    slabs.put("p", _factors(4, torch.float32, ("0",), g))
    hook = TritonRouting(["p"], slabs, torch.device("cpu")).hook("0")
    layer = torch.nn.Linear(DIMS[0], DIMS[1])
    x = torch.randn(1, DIMS[0], device="meta")
    with torch.no_grad(), pytest.raises(UsageError, match="bank's device"):
        hook(layer, (x,), torch.empty(1, DIMS[1], device="meta"))


@requires_cuda
def test_kernels_compiled_equal_the_torch_route():
    for case in _cases():
        _check_case(case, run_case(case, "cuda"))


@requires_nvidia_backend
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_cuda_without_a_gpu(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Ahead-of-time compilation to sm_90 PTX (no GPU needed): what the interpreter accepts
    compiled Triton may refuse, and the interpreter runs 16-bit products widened (``dot_f32``),
    so the compiled 16-bit path is only seen here: its products use tensor cores (``mma``),
    while float32 products stay IEEE FMA (no TF32 tensor-core product)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mcnc_format.serving import sgmv

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))  # really compile
    jit_functions = {name for name, value in vars(sgmv).items()
                     if isinstance(value, triton.JITFunction)}
    assert jit_functions == {"dot_f32", "_shrink_kernel", "_expand_kernel"}, (
        "compile any new jit function here too")
    target = GPUTarget("cuda", 90, 32)
    # Any rank runs in blocks of at most sgmv._BLOCK_R ranks: the largest block's shared
    # memory fits the smallest GPUs' (about 99 KB on L4, L40S, A10).
    for (factor, out), block_r in zip((("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")),
                                      (sgmv._BLOCK_R, 16, sgmv._BLOCK_R), strict=True):
        blocks = {"BLOCK_M": sgmv.BLOCK_M, "BLOCK_R": block_r, "PRECISION": sgmv._precision(
            getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[factor])),
            "COMPILED": True}
        common = {"rows_ptr": "*i32", "tiles_ptr": "*i32", "r_max": "i32",
                  **dict.fromkeys(blocks, "constexpr")}
        shrink = ASTSource(sgmv._shrink_kernel, {
            "x_ptr": f"*{out}", "a_ptr": f"*{factor}", "y_ptr": f"*{factor}", "features": "i32",
            "stride_x": "i32", "BLOCK_K": "constexpr", **common},
            constexprs={**blocks, "BLOCK_K": 64})
        expand = ASTSource(sgmv._expand_kernel, {
            "y_ptr": f"*{factor}", "b_ptr": f"*{factor}", "scale_ptr": "*fp32",
            "out_ptr": f"*{out}", "out_features": "i32", "stride_out": "i32",
            "BLOCK_N": "constexpr", **common}, constexprs={**blocks, "BLOCK_N": 64})
        for source in (shrink, expand):
            kernel = triton.compile(source, target=target, options={"num_warps": 4})
            assert ("mma" in kernel.asm["ptx"]) == (factor != "fp32"), (factor, out)
            assert kernel.metadata.shared <= 99 << 10, (factor, block_r, kernel.metadata.shared)
