"""The pipelined loader (``mcnc_format.streaming``) gives what the simple reader gives.

On the CPU the pipeline runs its eager path with a synchronous copy engine, so these tests
cover the planning (batches sized by the workspace, members spread over batches, segments
interleaved with dense and lora tensors), the staging ring, hand-out order, progress, the
theta0 kinds streamed from blobs and safetensors files, error paths and ``load_into``. Results
must match ``mcnc_format.load`` within SPEC.md §10 (the batches differ, so float32 sums may
round differently: one output ulp). The CUDA-only parts (pinned buffers, copy stream, events)
share the ring logic tested here against an engine that defers every copy, as a GPU does.
"""

from __future__ import annotations

import itertools
import os
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import save_file
from strategies import file_plans, materialize

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, LoRA, Segment, Theta0
from mcnc_format.errors import (
    DeviceMemoryError,
    ExternalReferenceError,
    MCNCError,
)
from mcnc_format.gpu.pipeline import LoadOptions, PipelinedLoader, Progress
from mcnc_format.gpu.staging import StagingRing, SyncCopyEngine
from mcnc_format.reader import tensor_sha256
from mcnc_format.streaming import load, load_into, stream

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_stream seed: {SEED}")


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  rtol: float = 1e-5) -> None:
    """Same names, shapes, dtypes; values equal up to one ulp of the output dtype or ``rtol``
    of the tensor's largest value (float32 sums round differently in other batch sizes)."""
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for name, expected in want.items():
        value = got[name]
        assert value.dtype == expected.dtype and value.shape == expected.shape, name
        assert value.device.type == "cpu"
        if not expected.dtype.is_floating_point or expected.numel() == 0:
            assert torch.equal(value, expected), name
            continue
        a, b = value.double(), expected.double()
        ulp = torch.finfo(expected.dtype).eps * b.abs().clamp_min(torch.finfo(expected.dtype).tiny)
        bound = torch.maximum(ulp, rtol * b.abs().max().clamp_min(1e-30).expand_as(b))
        assert bool(((a - b).abs() <= bound).all()), (name, float((a - b).abs().max()))


def _mixed_file(directory: Path, seed: int = SEED) -> Path:
    """A file with every theta0 kind, output dtypes, members across chunk boundaries, an
    empty member, dense raw and zstd tensors and a lora tensor, in interleaved order."""
    g = torch.Generator().manual_seed(seed)
    gen = GeneratorSpec(k=5, d=100, hidden=(32, 32), seed=seed % 2**32)
    shapes = [(7, 13), (50,), (3, 4, 5), (0,), (33,), (4, 37)]
    total = sum(torch.Size(s).numel() for s in shapes)
    chunks = -(-total // 100)
    alpha = ((torch.rand(chunks, 2, 5, generator=g) * 2 - 1) * 20).to(torch.bfloat16)
    seg = Segment(gen, alpha, torch.randn(chunks, 2, generator=g), "zstd")
    base = (torch.randn(3, 4, 5, generator=g)).to(torch.bfloat16)
    base32 = torch.randn(4, 37, generator=g)
    save_file({"w": base, "v": base32}, str(directory / "base.safetensors"))
    thetas = [
        Theta0.fan_in_uniform(1, 2),
        Theta0.normal(3, 4, 0.5, 2.0),
        Theta0.external("base.safetensors", "w", tensor_sha256(base)),
        Theta0.zeros(),
        Theta0.stored(torch.randn(33, generator=g).to(torch.float16)),
        Theta0.external("base.safetensors", "v", tensor_sha256(base32)),
    ]
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16, torch.float64,
              torch.bfloat16]
    small = GeneratorSpec(k=4, d=16, hidden=(8,), seed=9, bias=False)
    seg_a = Segment(small, torch.rand(1, 2, 4, generator=g), torch.randn(1, 2, generator=g))
    seg_b = Segment(small, torch.rand(1, 2, 4, generator=g), torch.randn(1, 2, generator=g))
    tensors: dict[str, object] = {"first_dense": torch.randn(4, 4, generator=g)}
    for i, (shape, dtype, theta0) in enumerate(zip(shapes, dtypes, thetas, strict=True)):
        tensors[f"m{i}"] = MCNC(seg, shape, dtype, theta0)
        if i == 2:
            tensors["ints"] = Dense(torch.arange(10) * 3 - 7, "zstd")
            tensors["adapter"] = LoRA(MCNC(seg_a, (2, 8)), MCNC(seg_b, (8, 2)), 0.5,
                                      torch.float32, Theta0.uniform(0.1, 5, 6))
    tensors["flag"] = torch.tensor([True, False, True])
    path = directory / "mixed.mcnc"
    mf.save(path, tensors)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("workspace", "staging"),
    [(None, 64 << 20), (900, 64), (3000, 8), (1, 2)],
    ids=["defaults", "small-batches", "tiny-staging", "one-chunk-batches"],
)
def test_pipeline_matches_reader(tmp_path: Path, workspace: int | None, staging: int) -> None:
    path = _mixed_file(tmp_path)
    want = mf.load(path)
    got = dict(stream(path, "cpu", workspace_bytes=workspace, staging_bytes=staging))
    _assert_close(got, want)


def test_batches_cover_each_segment_once(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    with mf.open(path) as f:
        loader = PipelinedLoader(f, "cpu", options=LoadOptions(workspace_bytes=900))
        steps = loader.plan()
        batches: dict[int, list[tuple[int, int]]] = {}
        for step in steps:
            if step.kind == "batch":
                assert step.segment is not None
                batches.setdefault(step.segment.index, []).append((step.c0, step.c1))
        for index, spans in batches.items():
            chunks = f.header.segments[index].chunks
            assert spans[0][0] == 0 and spans[-1][1] == chunks
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert len(batches[0]) > 1  # the workspace forced several batches
        kinds = [s.kind for s in steps]
        # File order: the dense tensor first, the segment where its first member appears.
        assert kinds[0] == "dense" and kinds[1] == "batch"


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
        _assert_close(dict(stream(path, "cpu", workspace_bytes=4096, staging_bytes=1000)),
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
    _assert_close(dict(stream(path, "cpu", workspace_bytes=2000, staging_bytes=100)),
                  mf.load(path), rtol=1e-3)


def test_progress_and_names(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    seen: list[Progress] = []
    names = ["m4", "first_dense", "adapter", "m0"]
    got = load(path, "cpu", names=names, progress=seen.append)
    assert sorted(got) == sorted(names)
    assert [p.name for p in seen] == list(got)
    assert [p.tensors_done for p in seen] == [1, 2, 3, 4]
    assert all(p.tensors_total == 4 for p in seen)
    total = sum(t.numel() * t.element_size() for t in got.values())
    assert seen[-1].bytes_done == seen[-1].bytes_total == total
    assert all(a.bytes_done <= b.bytes_done for a, b in itertools.pairwise(seen))


def test_dtype_override(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    got = load(path, "cpu", torch.float16)
    want = mf.load(path, dtype=torch.float16)
    _assert_close(got, want)
    assert got["ints"].dtype == torch.int64 and got["flag"].dtype == torch.bool


class _DeferredEngine(SyncCopyEngine):
    """Queues copies and runs them only when waited on, as an asynchronous GPU would: a ring
    that refilled a staging buffer before waiting would upload the wrong bytes."""

    def __init__(self) -> None:
        super().__init__("cpu")
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
    path = _mixed_file(tmp_path)
    monkeypatch.setattr(PipelinedLoader, "_engine", lambda self: _DeferredEngine())
    got = dict(stream(path, "cpu", workspace_bytes=900, staging_bytes=16))
    _assert_close(got, mf.load(path))


def test_device_oom_is_reported_and_releases_everything(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _mixed_file(tmp_path)
    allocated: list[weakref.ref[torch.Tensor]] = []
    original = SyncCopyEngine.device_empty

    def failing(self: SyncCopyEngine, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(allocated) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        tensor = original(self, shape, dtype)
        allocated.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(SyncCopyEngine, "device_empty", failing)
    with pytest.raises(DeviceMemoryError, match=r"after allocating \d+ bytes.*needs \d+ bytes"):
        load(path, "cpu", workspace_bytes=900)
    assert len(allocated) == 4
    assert all(ref() is None for ref in allocated)


def test_external_sha256_mismatch_stops_the_tensor(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    save_file({"w": torch.zeros(3, 4, 5, dtype=torch.bfloat16),
               "v": torch.zeros(4, 37)}, str(tmp_path / "base.safetensors"))
    handed_out = []
    with pytest.raises(ExternalReferenceError, match="sha256"):
        for name, _ in stream(path, "cpu"):
            handed_out.append(name)
    assert "m2" not in handed_out and "m0" in handed_out


def test_external_missing_tensor_and_shape(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
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
    import mcnc_format.gpu.pipeline as pipeline

    monkeypatch.setattr(pipeline, "triton_available", lambda: False)
    with pytest.raises(MCNCError, match=r"mcnc-format\[gpu\]"):
        load(_net_file(tmp_path), "cpu", use_triton=True)


def test_damaged_base_file(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    base = tmp_path / "base.safetensors"
    data = base.read_bytes()
    base.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExternalReferenceError, match=r"truncated|does not fit"):
        load(path, "cpu")
    base.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(ExternalReferenceError, match="unreadable header"):
        load(path, "cpu")


def test_abandoned_stream_closes_cleanly(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    iterator = stream(path, "cpu", workspace_bytes=900)
    name, tensor = next(iterator)
    iterator.close()  # the file, the staging ring and the worker threads are released
    assert name == "first_dense" and torch.equal(tensor, mf.load(path)["first_dense"])
