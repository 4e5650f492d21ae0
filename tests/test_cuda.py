"""The CUDA paths end to end: what the CPU tests cover with stand-ins, on a real GPU.

Skipped without one (``benchmarks/gpu_check.sh`` runs them on a GPU machine). The pipelined
loader's pinned staging ring, copy stream and events, the fused Triton kernel, training in
the manifold on the device and ``load_into`` a meta-device module must give what the CPU
reader gives, within the loader tolerance of ``stream_helpers.assert_close``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_marks import needs_cuda, proves
from stream_helpers import SEED, assert_close, mixed_file
from torch import nn
from triton_helpers import requires_triton

import mcnc_format as mf
from mcnc_format.api import load_into, stream
from mcnc_format.engine.backend import triton_available
from mcnc_format.engine.options import GpuPath
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, reparametrize, save_model

pytestmark = needs_cuda
#: The fused route, asked for by name: every Triton path (``GpuPath``) where the file needs it.
FUSED = pytest.param(True, marks=proves(GpuPath.KERNEL_IEEE, GpuPath.PHILOX_KERNEL,
                                        GpuPath.LORA_MERGE_KERNEL))
TRITON = [False, *([FUSED] if triton_available() else [])]


@pytest.mark.parametrize("use_triton", TRITON, ids=lambda t: "fused" if t else "eager")
@pytest.mark.parametrize(("workspace", "staging"), [(None, 64 << 20), (900, 64)],
                         ids=["defaults", "small-batches-tiny-staging"])
def test_stream_on_cuda_matches_cpu_reader(tmp_path: Path, use_triton: bool,
                                           workspace: int | None, staging: int) -> None:
    path = mixed_file(tmp_path)
    got = {}
    for name, value in stream(path, "cuda", workspace_bytes=workspace, staging_bytes=staging,
                              use_triton=use_triton):
        assert value.device.type == "cuda", name
        got[name] = value
    assert_close(got, mf.load(path))


def test_load_dispatches_to_the_device_and_dtype(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    got = mf.load(path, device="cuda", dtype=torch.float16)
    want = mf.load(path)
    for name, value in got.items():
        assert value.device.type == "cuda", name
        if want[name].dtype.is_floating_point and want[name].numel():
            assert value.dtype == torch.float16, name
            assert torch.allclose(value.float().cpu(), want[name].half().float(),
                                  rtol=2e-3, atol=2e-3 * float(want[name].abs().max())), name


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 48)
        self.block = nn.TransformerEncoderLayer(48, 4, dim_feedforward=96, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(48, 64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens)))


def _tokens(offset: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + offset)
    return torch.randint(0, 64, (4, 11), generator=g).cuda()


def _same(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = float(want.abs().max())
    assert torch.allclose(got, want, rtol=rtol, atol=rtol * scale), (
        f"seed {SEED}: max difference {float((got - want).abs().max()):.3g}, scale {scale:.3g}")


def _train(model: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("chunking", ["tensor", "model"])
def test_trained_on_cuda_loads_into_a_meta_module(tmp_path: Path, chunking: str) -> None:
    """Train in the manifold on the GPU, pack, and fill a meta-device model from the file:
    the same function, on the GPU, with nothing materialised on the CPU."""
    torch.manual_seed(SEED)
    config = MCNCConfig(k=4, d=256, hidden=(16, 16), seed=SEED & 0xFFFF, chunking=chunking,
                        include=("*weight",), exclude=("*norm*",))
    model = reparametrize(_Decoder(), config).cuda()
    _train(model, _tokens(0))
    assert all(p.grad is None for n, p in model.named_parameters()
               if not p.requires_grad), "frozen parameters received gradients"
    path = save_model(model, tmp_path / "decoder.mcnc")
    with torch.device("meta"):
        plain = _Decoder()
    load_into(plain, path, device="cuda")
    plain.eval()
    assert all(t.device.type == "cuda" for t in plain.state_dict().values())
    with torch.no_grad():
        _same(plain(_tokens(1)), model(_tokens(1)))
    on_cpu = _Decoder()
    on_cpu.load_state_dict(mf.load(path), strict=True)
    on_cpu.eval()
    with torch.no_grad():  # CPU and GPU kernels differ in summation order, not in weights
        _same(on_cpu(_tokens(1).cpu()), plain(_tokens(1)).cpu(), rtol=1e-4)


def test_mcnc_lora_trained_on_cuda_loads_as_the_adapted_model(tmp_path: Path) -> None:
    """MCNC-LoRA on the GPU: the file's merged ``theta0 + scale * B @ A`` tensors, streamed
    back onto the GPU (lora encoding through the pipeline), compute what the adapted model
    computed."""
    torch.manual_seed(SEED)
    model = add_mcnc_lora(_Decoder(), MCNCConfig(k=4, d=128, hidden=(16, 16), seed=7),
                          target_modules=["head"], rank=4, lora_alpha=8).cuda()
    _train(model, _tokens(2))
    path = save_model(model, tmp_path / "adapted.mcnc")
    with mf.open(path) as f:
        assert f.tensor_info("head.weight").encoding == "lora"
    with torch.device("meta"):
        plain = _Decoder()
    load_into(plain, path, device="cuda")
    plain.eval()
    with torch.no_grad():
        _same(plain(_tokens(3)), model(_tokens(3)))


@requires_triton
@proves(GpuPath.KERNEL_IEEE, GpuPath.PHILOX_KERNEL)
def test_kernel_loads_wait_for_no_stream(tmp_path: Path) -> None:
    """Issue 12: inside a load on the kernel path nothing waits for the GPU's streams (no
    ``.item()``, no copy from pageable memory): ``set_sync_debug_mode("error")`` turns any
    such wait into an error. Whole tensors and column boxes (gathered rows) of mcnc tensors
    with Philox, stored and external theta0 in three dtypes, dense and bool tensors."""
    from safetensors.torch import save_file

    from mcnc_format import MCNC, GeneratorSpec, Segment, Theta0
    from mcnc_format.reader import tensor_sha256

    g = torch.Generator().manual_seed(SEED)
    spec = GeneratorSpec(k=5, d=100, hidden=(32, 32), seed=SEED % 2**32)
    seg = Segment(spec, torch.rand(40, 1, 5, generator=g) * 2 - 1,
                  torch.randn(40, 1, generator=g) * 0.1)
    base = torch.randn(12, 50, generator=g).to(torch.bfloat16)
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    path = tmp_path / "nosync.mcnc"
    mf.save(path, {
        "uniform": MCNC(seg, (30, 40), torch.bfloat16, Theta0.fan_in_uniform(1, 2)),
        "normal": MCNC(seg, (20, 30), torch.float16, Theta0.normal(3, 4, 0.0, 0.02)),
        "stored": MCNC(seg, (25, 20), torch.float32,
                       Theta0.stored(torch.randn(25, 20, generator=g))),
        "external": MCNC(seg, (12, 50), torch.bfloat16,
                         Theta0.external("base.safetensors", "w", tensor_sha256(base))),
        "dense": torch.randn(6, 7, generator=g),
        "mask": torch.rand(5, generator=g) > 0.5,
    })
    want = mf.load(path)
    boxes = {n: (slice(None), slice(1, None)) for n in ("uniform", "normal", "stored")}
    mf.load(path, "cuda", use_triton=True)  # generators drawn, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = mf.load(path, "cuda", use_triton=True)
        cut = mf.load(path, "cuda", use_triton=True, boxes=boxes, names=list(boxes))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(got, want)
    for name, box in boxes.items():
        assert torch.equal(cut[name], got[name][box]), name


@requires_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_draws_launch_on_their_device_whichever_is_current() -> None:
    """Triton launches on the current device. ``AdapterBank`` draws its generators and
    theta0 through the backend's ``draw_weights``/``draw_uniform`` outside any load, so a
    bank on ``cuda:1`` draws while ``cuda:0`` is current: the draw must still run on
    ``cuda:1`` (a launch on ``cuda:0`` would write ``cuda:1``'s memory from the wrong GPU)."""
    from mcnc_format import philox
    from mcnc_format.engine import triton_kernels as tk
    from mcnc_format.generator import GeneratorSpec

    with torch.cuda.device(0):
        drawn = tk.philox_uniform(7, 3, 5000, 0.5, torch.device("cuda:1"))
        spec = GeneratorSpec(k=5, d=100, hidden=(32, 32), seed=SEED % 2**32)
        weights = tk.draw_generator_weights(spec, torch.device("cuda:1"))
    torch.cuda.synchronize(1)
    assert drawn.device == torch.device("cuda:1")
    assert torch.equal(drawn.cpu(), philox.uniform_signed(7, 3, 0, 5000, 0.5))
    for got, want in zip(weights.flat(), spec.weights("cpu").flat(), strict=True):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize(("k", "hidden", "m"), [(5, (32, 32), 1), (16, (256, 256), 1),
                                                (5, (32, 32), 2)],
                         ids=["llama", "vision", "two-components"])
def test_a_chunks_left_factor_does_not_depend_on_its_batch(k: int, hidden: tuple[int, ...],
                                                           m: int) -> None:
    """What every box test on CUDA (``test_slices``, ``test_kernel_loads_wait_for_no_stream``,
    bench_gpu's ``bit_equal``) rests on, checked alone: a chunk's left factor (hidden layers
    and row norm, cuBLAS products) has the same bits whatever the batch that computed it. A box
    is rebuilt in batches of other sizes than the whole tensor's; cuBLAS picks its kernel
    (tile, split-K) by the product's shape, which can change a row's summation order. If
    this fails, box tests fail with it, and the kernel is not at fault."""
    from mcnc_format.engine.fused import FusedGenerator
    from mcnc_format.generator import GeneratorSpec

    spec = GeneratorSpec(k=k, d=1000, hidden=hidden, seed=SEED % 2**32)
    fused = FusedGenerator(spec.weights("cuda"), m)
    g = torch.Generator().manual_seed(SEED)
    chunks = 8192
    alpha = ((torch.rand(chunks, m, k, generator=g) * 2 - 1) * spec.L).cuda()
    beta = (torch.randn(chunks, m, generator=g) * 0.05).cuda()
    whole = fused.coefficients(alpha, beta)
    for start, count in ((0, 8), (8, 16), (40, 13), (1000, 64), (2048, 1024), (8, 8176)):
        part = fused.coefficients(alpha[start : start + count], beta[start : start + count])
        same = part[:count] == whole[start : start + count]
        assert bool(same.all()), (
            f"seed {SEED}: rows {start}..{start + count}: {int((~same.all(1)).sum())} of "
            f"{count} rows differ from the same rows of a {chunks}-row batch")
