"""The pipelined loader (``mcnc_format.api``) gives what the simple reader gives.

On the CPU the pipeline runs its eager path with a synchronous copy engine, so these tests
cover the planning (batches sized by the workspace, members spread over batches, segments
interleaved with dense and lora tensors), the staging ring, hand-out order, progress, the
theta0 kinds streamed from blobs and safetensors files (and a damaged Hub base fetched again),
malformed safetensors headers, error paths and ``load_into``. Results
must match ``mcnc_format.load`` within SPEC.md §10 (the batches differ, so float32 sums may
round differently: one output ulp). The CUDA-only parts (pinned buffers, copy stream, events)
share the ring logic tested here against an engine that defers every copy, as a GPU does.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hub_server import HubServer
from hypothesis import HealthCheck, given, settings
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from strategies import file_plans, materialize
from stream_helpers import SEED, assert_close, mixed_file
from triton_helpers import requires_triton

import mcnc_format as mf
from mcnc_format import MCNC, GeneratorSpec, Segment, Theta0, philox
from mcnc_format import hub as mhub
from mcnc_format.api import load, load_into, stream
from mcnc_format.engine.backend import CpuTorch
from mcnc_format.engine.options import LoadOptions, Progress
from mcnc_format.engine.plan import BatchStep, DenseStep, batch_rows
from mcnc_format.engine.safetensors_source import SafetensorsFile
from mcnc_format.engine.staging import StagingRing, SyncCopyEngine
from mcnc_format.errors import (
    DeviceMemoryError,
    ExternalReferenceError,
    MCNCError,
)
from mcnc_format.reader import tensor_sha256
from mcnc_format.torch_compat import OUT_OF_MEMORY

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


@pytest.mark.parametrize(
    ("workspace", "staging"),
    [(None, 64 << 20), (900, 64), (3000, 8), (1, 2)],
    ids=["defaults", "small-batches", "tiny-staging", "one-chunk-batches"],
)
def test_pipeline_matches_reader(tmp_path: Path, workspace: int | None, staging: int) -> None:
    path = mixed_file(tmp_path)
    want = mf.load(path)
    got = dict(stream(path, "cpu", workspace_bytes=workspace, staging_bytes=staging))
    assert_close(got, want)


def test_batches_cover_each_segment_once(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    with mf.open(path) as f:
        plan = f.plan(f.requests(), "cpu", LoadOptions(workspace_bytes=900))
        batches: dict[int, list[tuple[int, int]]] = {}
        for step in plan.steps:
            if isinstance(step, BatchStep):
                batches.setdefault(step.segment, []).append((step.first, step.stop))
        for index, spans in batches.items():
            chunks = f.header.segments[index].chunks
            assert spans[0][0] == 0 and spans[-1][1] == chunks
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert plan.chunks == sum(s.chunks for s in f.header.segments)
        # File order: the packed tensor first, the segment where its first member appears.
        assert isinstance(plan.steps[0], DenseStep) and isinstance(plan.steps[1], BatchStep)
        # Dense steps serve both stored encodings (§6.2, §6.4).
        assert [f.tensor_info(n).encoding for n in ("first_dense", "flag", "ints", "last_dense")
                ] == ["packed", "packed", "dense", "dense"]
    # A small workspace: batches of one row tile (8 chunks), consecutive, covering the segment.
    gen = GeneratorSpec(k=3, d=50, hidden=(8,), seed=5)
    g = torch.Generator().manual_seed(SEED)
    segment = Segment(gen, torch.rand(64, 1, 3, generator=g), torch.randn(64, 1, generator=g))
    mf.save(tmp_path / "long.mcnc", {"w": MCNC(segment, (64, 50))})
    with mf.open(tmp_path / "long.mcnc") as f:
        plan = f.plan(f.requests(), "cpu", LoadOptions(workspace_bytes=900))
        assert [(s.first, s.stop) for s in plan.steps] == [(c, c + 8) for c in range(0, 64, 8)]


def test_spec_vectors_match_reader() -> None:
    vectors = sorted(VECTORS.glob("*.mcnc"))
    if not vectors:
        pytest.skip("spec/vectors has no valid vectors yet")
    for path in vectors:
        try:
            want = mf.load(path)
        except MCNCError as exc:  # e.g. a vector that uses an unsupported feature on purpose
            with pytest.raises(type(exc)):
                dict(stream(path, "cpu"))
            continue
        assert_close(dict(stream(path, "cpu", workspace_bytes=4096, staging_bytes=1000)),
                      want)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=file_plans(max_tensors=4))
def test_random_files_match_reader(tmp_path_factory: pytest.TempPathFactory, plan) -> None:
    directory = tmp_path_factory.mktemp("plan")
    path = directory / "plan.mcnc"
    mf.save(path, materialize(plan, directory))  # type: ignore[arg-type]
    # Random generators include tiny ones (d = 1) where ||W h + b|| << ||W h|| + ||b||: the
    # Gram identity then cancels, and the different batch shapes' float32 rounding is
    # amplified by up to ~1e3. Agreement with float64 is tested for each path on its own.
    assert_close(dict(stream(path, "cpu", workspace_bytes=2000, staging_bytes=100)),
                  mf.load(path), rtol=1e-3)


def test_progress_and_names(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    seen: list[Progress] = []
    names = ["m4", "first_dense", "adapter", "m0"]
    got = load(path, "cpu", names=[*names, "m4"], progress=seen.append)  # a repeat: once
    assert sorted(got) == sorted(names)
    assert [p.name for p in seen] == list(got)
    assert [p.tensors_done for p in seen] == [1, 2, 3, 4]
    assert all(p.tensors_total == 4 for p in seen)
    total = sum(t.numel() * t.element_size() for t in got.values())
    assert seen[-1].bytes_done == seen[-1].bytes_total == total
    assert all(a.bytes_done <= b.bytes_done for a, b in itertools.pairwise(seen))


def test_dtype_override(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    got = load(path, "cpu", torch.float16)
    want = mf.load(path, dtype=torch.float16)
    assert_close(got, want)
    assert got["ints"].dtype == torch.int64 and got["flag"].dtype == torch.bool


class _DeferredEngine(SyncCopyEngine):
    """Queues copies and runs them only when waited on, as an asynchronous GPU would: a ring
    that refilled a staging buffer before waiting would upload the wrong bytes."""

    def __init__(self) -> None:
        super().__init__("cpu", in_place=False)
        self.queue: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.ticket = 0
        self.buffers = 0

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return super().host_buffer(nbytes)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> object:
        self.ticket += 1
        self.queue.append((self.ticket, src, dst))
        return self.ticket

    def _run_until(self, ticket: object) -> None:
        while self.queue and ticket is not None and self.queue[0][0] <= ticket:  # type: ignore[operator]
            _, src, dst = self.queue.pop(0)
            dst.copy_(src)

    def wait_host(self, marker: object) -> None:
        self._run_until(marker)

    def wait_compute(self, marker: object) -> None:
        self._run_until(marker)


@pytest.mark.parametrize("slots", [2, 3])
def test_staging_ring_never_refills_a_busy_buffer(slots: int) -> None:
    g = torch.Generator().manual_seed(SEED)
    engine = _DeferredEngine()
    ring = StagingRing(engine, slot_bytes=7, slots=slots)
    sources = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in (1, 30, 7, 64)]
    targets = [torch.zeros_like(s) for s in sources]
    seen = bytearray()
    markers = [ring.upload(memoryview(s.numpy()), t, observe=seen.extend)
               for s, t in zip(sources, targets, strict=True)]
    engine.wait_compute(markers[-1])
    for s, t in zip(sources, targets, strict=True):
        assert torch.equal(s, t)
    assert bytes(seen) == b"".join(s.numpy().tobytes() for s in sources)
    assert engine.buffers == slots and ring.host_bytes == slots * 7
    assert ring.bytes_uploaded == sum(s.numel() for s in sources)
    with pytest.raises(ValueError, match="bytes into"):
        ring.upload(b"abc", torch.zeros(2, dtype=torch.uint8))


def test_pipeline_through_deferred_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """The whole pipeline with copies that complete only when waited on."""
    path = mixed_file(tmp_path)
    monkeypatch.setattr(CpuTorch, "copy_engine", lambda self: _DeferredEngine())
    got = dict(stream(path, "cpu", workspace_bytes=900, staging_bytes=16))
    assert_close(got, mf.load(path))


def test_device_oom_is_reported_and_releases_everything(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mcnc_format.engine.backend as backend

    path = mixed_file(tmp_path)
    allocated: list[weakref.ref[torch.Tensor]] = []
    original = backend.hostmem.zeros

    def failing(numel: int, dtype: torch.dtype) -> torch.Tensor:
        if len(allocated) == 2:
            raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
        tensor = original(numel, dtype)
        allocated.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(backend.hostmem, "zeros", failing)
    with pytest.raises(DeviceMemoryError, match=r"after allocating \d+ bytes.*needs \d+ bytes"):
        load(path, "cpu", workspace_bytes=900)
    assert len(allocated) == 2
    assert all(ref() is None for ref in allocated)


def test_external_sha256_mismatch_stops_the_tensor(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    save_file({"w": torch.zeros(3, 4, 5, dtype=torch.bfloat16),
               "v": torch.zeros(4, 37)}, str(tmp_path / "base.safetensors"))
    handed_out = []
    with pytest.raises(ExternalReferenceError, match="sha256"):
        for name, _ in stream(path, "cpu"):
            handed_out.append(name)
    assert "m2" not in handed_out and "m0" in handed_out


def test_external_missing_tensor_and_shape(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    save_file({"v": torch.zeros(4, 37)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(ExternalReferenceError, match="no tensor named 'w'"):
        load(path, "cpu")
    save_file({"w": torch.zeros(60, dtype=torch.bfloat16), "v": torch.zeros(4, 37)},
              str(tmp_path / "base.safetensors"))
    with pytest.raises(ExternalReferenceError, match="shape"):
        load(path, "cpu")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 40)
        self.fc2 = torch.nn.Linear(40, 10)
        self.register_buffer("scale", torch.ones(10))


def _net_file(directory: Path) -> Path:
    g = torch.Generator().manual_seed(SEED)
    gen = GeneratorSpec(k=8, d=128, hidden=(16, 16), seed=3)
    chunks = -(-(24 * 40 + 40 * 10) // 128)
    seg = Segment(gen, torch.rand(chunks, 1, 8, generator=g) * 4 - 2, torch.randn(chunks, 1,
                                                                                 generator=g))
    tensors = {
        "fc1.weight": MCNC(seg, (40, 24), torch.float32, Theta0.fan_in_uniform(11, 0)),
        "fc1.bias": torch.randn(40, generator=g),
        "fc2.weight": MCNC(seg, (10, 40), torch.float32, Theta0.fan_in_uniform(11, 1)),
        "fc2.bias": torch.randn(10, generator=g),
        "scale": torch.rand(10, generator=g),
    }
    path = directory / "net.mcnc"
    mf.save(path, tensors)  # type: ignore[arg-type]
    return path


def test_load_into_meta_module_assigns(tmp_path: Path) -> None:
    path = _net_file(tmp_path)
    with torch.device("meta"):
        net = _Net()
    missing, unexpected = load_into(net, path, "cpu")
    assert missing == [] and unexpected == []
    want = mf.load(path)
    for name, value in net.state_dict().items():
        assert value.device.type == "cpu"
        assert torch.equal(value, want[name]), name
    assert isinstance(net.fc1.weight, torch.nn.Parameter)


def test_load_into_existing_module_copies(tmp_path: Path) -> None:
    path = _net_file(tmp_path)
    net = _Net()
    weight = net.fc1.weight
    load_into(net, path, "cpu")
    assert net.fc1.weight is weight  # copied in place, not replaced
    want = mf.load(path)
    for name, value in net.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_load_into_mismatch(tmp_path: Path) -> None:
    path = _net_file(tmp_path)
    net = _Net()
    net.extra = torch.nn.Linear(2, 2)
    with pytest.raises(MCNCError, match=r"missing .*extra\.weight"):
        load_into(net, path, "cpu")
    missing, unexpected = load_into(net, path, "cpu", strict=False)
    assert missing == ["extra.bias", "extra.weight"] and unexpected == []
    net = _Net()
    net.fc2 = torch.nn.Linear(40, 11)
    with pytest.raises(MCNCError, match=r"fc2\.weight.*shape"):
        load_into(net, path, "cpu", strict=False)


def test_forced_triton_without_triton(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mcnc_format.engine.backend as backend

    monkeypatch.setattr(backend, "installed_triton", lambda: None)
    with pytest.raises(MCNCError, match=r"mcnc-format\[gpu\]"):
        load(_net_file(tmp_path), "cpu", use_triton=True)


def test_a_triton_older_than_the_kernels_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """torch 2.3's CUDA builds install Triton 2.3, which lacks what the kernels import: a
    CUDA load then takes the torch path (it failed at the kernels' import), and asking for
    the kernels names the version needed."""
    import mcnc_format.engine.backend as backend
    from mcnc_format.serving import AdapterBank, Route

    assert [backend.triton_too_old(v) for v in ("2.3.1", "2.99", "3.0.0", "3.6.0+git9f3a",
                                                "10.1", "", "nightly")] == [
        True, True, False, False, False, False, False]
    monkeypatch.setattr(backend, "installed_triton", lambda: "2.3.1")
    assert not backend.triton_available()
    chosen = backend.choose_backend(torch.device("cuda"), LoadOptions())
    assert type(chosen) is backend.CudaTorch
    with pytest.raises(MCNCError, match=r"Triton 3\.0 or newer.*Triton 2\.3\.1"):
        load(_net_file(tmp_path), "cpu", use_triton=True)
    with pytest.raises(MCNCError, match=r"Route\.TRITON needs Triton 3\.0 or newer"):
        AdapterBank(torch.nn.Linear(2, 2), device="cpu", factor_cache_bytes=1 << 20,
                    route=Route.TRITON)


def test_damaged_base_file(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    base = tmp_path / "base.safetensors"
    data = base.read_bytes()
    base.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExternalReferenceError, match=r"truncated|does not fit"):
        load(path, "cpu")
    base.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(ExternalReferenceError, match="unreadable header"):
        load(path, "cpu")
    base.unlink()
    base.mkdir()
    with pytest.raises(ExternalReferenceError, match="not a regular file"):
        load(path, "cpu")


def test_abandoned_stream_closes_cleanly(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    iterator = stream(path, "cpu", workspace_bytes=900)
    name, tensor = next(iterator)
    iterator.close()  # the file, the staging ring and the worker threads are released
    assert name == "first_dense" and torch.equal(tensor, mf.load(path)["first_dense"])


def _raw_safetensors(path: Path, header: object, data: bytes = bytes(12)) -> Path:
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [3], "data_offsets": [0, 12]},
    {"dtype": 5, "shape": [3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": "3", "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [1.5, 2], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [True, 3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [-3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [3]},
    {"dtype": "F32", "shape": [3], "data_offsets": [0]},
    {"dtype": "F32", "shape": [3], "data_offsets": "0,12"},
    {"dtype": "F32", "shape": [3], "data_offsets": [0, 12.0]},
    {"dtype": "F32", "shape": [3], "data_offsets": [12, 0]},
    {"dtype": "F32", "shape": [3], "data_offsets": [-12, 0]},
    {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]},
    {"dtype": "F32", "shape": [3], "data_offsets": [2**70, 2**70 + 12]},
    [1, 2],
    "F32",
])
def test_malformed_safetensors_entries_are_reference_errors(tmp_path: Path,
                                                            entry: object) -> None:
    """Parseable JSON with wrong types or ranges is damage like any other (R75), never a
    TypeError or ValueError from deep inside the loader."""
    path = _raw_safetensors(tmp_path / "base.safetensors", {"w": entry, "ok": {
        "dtype": "F32", "shape": [3], "data_offsets": [0, 12]}})
    source = SafetensorsFile(path, "label")
    with pytest.raises(ExternalReferenceError, match=r"base\.safetensors .*'w'.*\(R75\)"):
        source.tensor("w")
    assert source.tensor("ok").shape == (3,) and source.tensor("ok").nbytes == 12
    source.close()


@pytest.mark.parametrize("header", ["[1]", "[" * 100_000, '{"w": '])
def test_malformed_safetensors_headers_are_reference_errors(tmp_path: Path,
                                                            header: str) -> None:
    path = _raw_safetensors(tmp_path / "base.safetensors", header)
    with pytest.raises(ExternalReferenceError, match=r"header.*\(R75\)"):
        SafetensorsFile(path, "label")


def test_unreadable_safetensors_paths_are_reference_errors(tmp_path: Path) -> None:
    with pytest.raises(ExternalReferenceError, match="not a regular file"):
        SafetensorsFile(tmp_path, "label")
    with pytest.raises(ExternalReferenceError, match="cannot be read"):
        SafetensorsFile(tmp_path / "missing.safetensors", "label")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")  # opening must neither block nor map it
        with pytest.raises(ExternalReferenceError, match="not a regular file"):
            SafetensorsFile(tmp_path / "fifo", "label")


def _mixed_segment_file(directory: Path) -> Path:
    """A segment whose members take both paths of a kernel-backed load: a float64 output
    (eager) beside members with float64 blob and external bases (kernel), and a segment of
    kernel members only. The generator is narrow and ``d`` large, so a ``[rows, d]`` float32
    product is far bigger than the kernel path's temporaries per chunk."""
    g = torch.Generator().manual_seed(SEED)
    gen = GeneratorSpec(k=2, d=512, hidden=(4,), seed=SEED % 2**31)
    shapes = [(40, 30), (700,), (3, 300)]
    chunks = -(-sum(torch.Size(s).numel() for s in shapes) // 512)
    mixed = Segment(gen, torch.rand(chunks, 1, 2, generator=g) * 2 - 1,
                    torch.randn(chunks, 1, generator=g))
    pure = Segment(gen, torch.rand(3, 1, 2, generator=g) * 2 - 1, torch.randn(3, 1, generator=g))
    base64 = torch.randn(3, 300, generator=g, dtype=torch.float64)
    save_file({"w": base64}, str(directory / "base.safetensors"))
    path = directory / "mixed_segment.mcnc"
    mf.save(path, {
        "wide": MCNC(mixed, shapes[0], torch.float64, Theta0.uniform(0.1, 7, 1)),
        "narrow": MCNC(mixed, shapes[1], torch.float32,
                       Theta0.stored(torch.randn(700, generator=g, dtype=torch.float64))),
        "ext": MCNC(mixed, shapes[2], torch.bfloat16,
                    Theta0.external("base.safetensors", "w", tensor_sha256(base64))),
        "pure": MCNC(pure, (3, 500), torch.float32, Theta0.normal(7, 2, 0.1, 0.5)),
    })
    return path


def _torch_kernels() -> SimpleNamespace:
    """``triton_kernels`` with the fused kernel replaced by torch, so the kernel path of the
    pipeline runs on the CPU in this process (the real kernel: test_triton_kernel.py)."""
    from mcnc_format.engine import triton_kernels as tk
    from mcnc_format.engine.fused import lora_merge
    from mcnc_format.generator import ieee_fp32

    calls = []

    def fused_regenerate(left: torch.Tensor, stacked: torch.Tensor, has_bias: bool,
                         dest: torch.Tensor, first_local: int, theta0: tk.KernelTheta0,
                         precision: str = "ieee", tile: object = None, theta_first: int = 0,
                         split: object = None) -> None:
        calls.append(left.shape[0])
        with ieee_fp32(left.device):
            values = (left @ stacked).reshape(-1)
        local = torch.arange(values.numel()) + first_local
        inside = (local >= 0) & (local < dest.numel())
        index, values = local[inside], values[inside]
        start, count = int(index[0]), index.numel()
        if theta0.kind == tk.THETA0_UNIFORM:
            values = values + philox.uniform_signed(theta0.seed, theta0.stream, start, count,
                                                    theta0.bound)
        elif theta0.kind == tk.THETA0_NORMAL:
            z = philox.normal(theta0.seed, theta0.stream, start, count)
            values = values + (z * theta0.std + theta0.mean)
        elif theta0.kind == tk.THETA0_DENSE:
            assert theta0.base is not None
            values = values + theta0.base[index].float()
        dest[index] = values.to(dest.dtype)

    def regenerate_members(left: torch.Tensor, stacked: torch.Tensor, has_bias: bool,
                           jobs: list[tk.MemberJob], precision: str = "ieee",
                           tile: object = None, split: object = None) -> None:
        for job in jobs:
            fused_regenerate(left[job.row0 : job.row1], stacked, has_bias, job.dest,
                             job.first_local, job.theta0, theta_first=job.theta_first)

    return SimpleNamespace(KERNEL_DTYPES=tk.KERNEL_DTYPES, kernel_theta0=tk.kernel_theta0,
                           kernel_precision=tk.kernel_precision, MemberJob=tk.MemberJob,
                           lora_merge=lambda out, b, a, scale, base: lora_merge(
                               out, b, a, scale, base, 1 << 20),
                           regenerate_members=regenerate_members,
                           fused_regenerate=fused_regenerate, calls=calls,
                           draw_generator_weights=lambda spec, device: spec.weights(device),
                           philox_uniform=lambda seed, stream, count, bound, device:
                           philox.uniform_signed(seed, stream, 0, count, bound, device))


def _use_kernels(monkeypatch: pytest.MonkeyPatch, kernels: object) -> None:
    """Loads run on a kernel backend whose kernels are ``kernels`` (torch stand-ins)."""
    import mcnc_format.reader as reader
    from mcnc_format.engine.backend import InterpretedTriton

    class StandIn(InterpretedTriton):
        def __init__(self, device: torch.device, options: LoadOptions) -> None:
            super().__init__(device, options)
            self._tk = kernels  # type: ignore[assignment]

    monkeypatch.setattr(reader, "choose_backend", StandIn)


@requires_triton
def test_mixed_segment_batches_fit_the_workspace(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One eager member (float64 output) makes its segment's batches eager-sized, so the
    ``[rows, d]`` float32 product stays inside the workspace; kernel-only segments keep the
    kernel's larger batches. Results still match the reader."""
    path = _mixed_segment_file(tmp_path)
    want = mf.load(path)
    workspace = 40_000  # a few row tiles of the eager path's float32 [rows, d] product
    kernels = _torch_kernels()
    _use_kernels(monkeypatch, kernels)
    with mf.open(path) as f:
        plan = f.plan(f.requests(), "cpu", LoadOptions(workspace_bytes=workspace))
        spans: dict[int, list[int]] = {}
        for step in plan.steps:
            assert isinstance(step, BatchStep)
            spans.setdefault(step.segment, []).append(step.chunks)
        header = f.header
    eager_rows = batch_rows(header, 0, workspace, eager=True)
    assert max(spans[0]) <= eager_rows < batch_rows(header, 0, workspace, eager=False)
    assert spans[1] == [min(3, batch_rows(header, 1, workspace, eager=False))]
    products: list[int] = []
    real_addmm = torch.addmm

    def recording_addmm(*args: object, **kw: object) -> torch.Tensor:
        out = real_addmm(*args, **kw)  # type: ignore[arg-type]
        products.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    got = load(path, "cpu", workspace_bytes=workspace)
    monkeypatch.undo()
    assert products and max(products) <= workspace
    assert kernels.calls  # the other members went through the (torch) kernel
    assert_close(got, want)


class _PoolEngine(SyncCopyEngine):
    """Keeps every tensor it allocates (so addresses are unique) and where it came from."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.staging: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def device_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.staging.append(torch.empty(shape, dtype=dtype))
        return self.staging[-1]

    def output_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.outputs.append(torch.empty(shape, dtype=dtype))
        return self.outputs[-1]


def test_outputs_are_allocated_as_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """Handed-out tensors come from ``output_empty`` (the compute stream's pool on CUDA, so
    the caller's stream can reuse them once freed); staging buffers from ``device_empty``."""
    path = mixed_file(tmp_path)
    engine = _PoolEngine()
    monkeypatch.setattr(CpuTorch, "copy_engine", lambda self: engine)
    got = load(path, "cpu", workspace_bytes=900, staging_bytes=64)
    outputs = {t.untyped_storage().data_ptr() for t in engine.outputs}
    staging = {t.untyped_storage().data_ptr() for t in engine.staging}
    assert not outputs & staging
    for name, tensor in got.items():  # never a staging buffer (the copy stream's pool on CUDA)
        assert tensor.untyped_storage().data_ptr() not in staging, name


def test_damaged_hub_base_is_read_again_after_its_fresh_download(
        hub: HubServer, tmp_path: Path) -> None:
    """The Hub deletes a damaged cached base and downloads it again to the same path: the
    pipeline must read the new file, not a map it kept of the damaged one (which would fail
    the check twice and get the good copy deleted)."""
    g = torch.Generator().manual_seed(SEED)
    base = {"layer.weight": torch.randn(8, 8, generator=g), "other": torch.randn(3, generator=g)}
    hub.create_repo("alice/base", files={"model.safetensors": safetensors_bytes(base)})
    theta0 = mhub.theta0_reference("alice/base/model.safetensors", "layer.weight")
    seg = Segment(GeneratorSpec(k=4, d=16, hidden=(8, 8), seed=SEED % 2**31),
                  torch.randn(4, 1, 4, generator=g), torch.randn(4, 1, generator=g))
    path = mf.save(tmp_path / "model.mcnc", {"layer.weight": MCNC(seg, (8, 8), theta0=theta0),
                                             "bias": torch.randn(8, generator=g)})
    want = mf.load(path)  # the reader fetches the base into the cache
    cached = mhub.resolve_reference(theta0.entry.uri or "")
    cached.resolve().write_bytes(safetensors_bytes(dict(base, **{
        "layer.weight": base["layer.weight"] + 1})))
    assert_close(load(path, "cpu"), want)
    assert cached.read_bytes() == safetensors_bytes(base)  # the good copy is kept


def test_accelerators_other_than_cuda_get_device_memory(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that is neither the CPU nor CUDA (``mps``, ``xpu``) gets ``DeviceTorch``:
    outputs and staging in device memory, not the host pages of ``CpuTorch``. Run on the CPU
    as if it were such a device, its loads equal the CPU's bit for bit."""
    import mcnc_format.reader as reader
    from mcnc_format.engine.backend import DeviceTorch, choose_backend

    for kind in ("mps", "xpu"):
        backend = choose_backend(torch.device(kind), LoadOptions())
        assert type(backend) is DeviceTorch and not backend.host_memory
    with pytest.raises(mf.UsageError, match=r"CUDA|Triton 3\.0"):  # 3.0: a too old Triton
        choose_backend(torch.device("mps"), LoadOptions(use_triton=True))
    path = mixed_file(tmp_path)
    want = load(path, "cpu", workspace_bytes=900)
    monkeypatch.setattr(reader, "choose_backend", DeviceTorch)
    got = load(path, "cpu", workspace_bytes=900)
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype
        assert torch.equal(want[name].view(torch.uint8), got[name].view(torch.uint8)), name
