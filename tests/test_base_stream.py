"""Base checkpoints streamed into their final buffers, and MCNC-LoRA merged onto them.

A dense theta0 (an external safetensors base, or a stored blob) is read piece by piece
straight into the output on the CPU, or through the staging ring's slots on a device (here:
the CPU engine made to stream like one, with slots of a few hundred bytes so many rotate);
the base's SHA-256 is computed from those bytes as they pass. The bytes must be the base's own
(``safetensors.torch.load_file``) for every dtype and for sizes around slot boundaries, the pin
verdicts must hold as before, and a lora tensor merged into its base in place, in row blocks,
must give exactly the §6.3 arithmetic for the whole tensor and every box.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from stream_helpers import SEED

import mcnc_format as mf
from mcnc_format import MCNC, GeneratorSpec, LoRA, Segment, Theta0
from mcnc_format.engine.backend import CpuTorch
from mcnc_format.engine.fused import lora_merge, lora_product
from mcnc_format.engine.safetensors_source import SafetensorsFile
from mcnc_format.engine.sha256 import StreamHash
from mcnc_format.engine.staging import StagingRing, SyncCopyEngine
from mcnc_format.reader import tensor_sha256
from mcnc_format.torch_compat import OUT_OF_MEMORY

#: Slot size of the streaming test engine: odd, so pieces straddle elements.
SLOT = 333
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
#: Element counts around slot boundaries for each item size (1, 2, 4 and 8 bytes).
SIZES = [1, SLOT // 8, SLOT // 4, SLOT // 2 + 1, SLOT, 2 * SLOT - 1, 2 * SLOT + 3, 5 * SLOT]


@pytest.fixture(params=["in_place", "ring"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Loads run with the CPU engine (bytes read into the output) or with it streaming
    through the ring like a device; ``staging_bytes`` below makes slots of ``SLOT`` bytes."""
    in_place = request.param == "in_place"
    monkeypatch.setattr(CpuTorch, "copy_engine",
                        lambda self: SyncCopyEngine(self.device, in_place=in_place))
    return request.param



def _base(directory: Path, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A base checkpoint with one tensor per dtype and size (plus a matrix per dtype)."""
    tensors = {f"{str(dtype)[6:]}_{n}": torch.randn(n, generator=g).to(dtype)
               for dtype in DTYPES for n in SIZES}
    tensors |= {f"{str(dtype)[6:]}_matrix": torch.randn(37, 29, generator=g).to(dtype)
                for dtype in DTYPES}
    save_file(tensors, str(directory / "base.safetensors"))
    return tensors


def _over_base(directory: Path, base: dict[str, torch.Tensor], g: torch.Generator) -> Path:
    """Each base tensor as theta0 of an mcnc tensor of its own dtype with beta zero: the
    loaded tensor is the base tensor itself."""
    spec = GeneratorSpec(k=3, d=64, hidden=(8,), seed=SEED % 2**31)
    chunks = -(-sum(t.numel() for t in base.values()) // 64)
    seg = Segment(spec, torch.rand(chunks, 1, 3, generator=g), torch.zeros(chunks, 1))
    tensors = {name: MCNC(seg, tuple(t.shape), t.dtype, Theta0.external(
        "base.safetensors", name, tensor_sha256(t))) for name, t in base.items()}
    path = directory / "over_base.mcnc"
    mf.save(path, tensors)  # type: ignore[arg-type]
    return path


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_stream_puts_the_base_bytes_where_they_belong(engine: str, tmp_path: Path) -> None:
    """Whole base tensors of every dtype and size, and row blocks of the matrices, loaded as
    theta0 with beta zero: the output bytes are those ``load_file`` returns."""
    g = torch.Generator().manual_seed(SEED)
    base = _base(tmp_path, g)
    path = _over_base(tmp_path, base, g)
    want = load_file(str(tmp_path / "base.safetensors"))
    got = mf.load(path, staging_bytes=2 * SLOT, verify="full")
    for name, tensor in want.items():
        assert _bits(got[name]) == _bits(tensor), name
    boxes = {name: (slice(5, 30),) for name in want if name.endswith("matrix")}
    got = mf.load(path, names=list(boxes), boxes=boxes, staging_bytes=2 * SLOT)
    for name, box in boxes.items():
        assert _bits(got[name]) == _bits(want[name][box]), name


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("in_place", [False, True])
def test_ring_stream_reads_each_piece_once_and_hashes_it(slots: int, in_place: bool) -> None:
    """``StagingRing.stream`` from a reader, observed by a ``StreamHash``: the destination
    gets the bytes, the digest is the bytes' SHA-256, and a slot is never refilled before the
    hash of its piece is done."""
    g = torch.Generator().manual_seed(SEED)
    pool = ThreadPoolExecutor(2)
    ring = StagingRing(SyncCopyEngine("cpu", in_place=in_place), SLOT, slots)
    for n in (1, SLOT - 1, SLOT, SLOT + 1, 7 * SLOT + 5):
        data = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        digests: list[str] = []
        hasher = StreamHash(pool, n, digests.append)
        reads: list[tuple[int, int]] = []

        def read(start: int, view: memoryview, data: torch.Tensor = data,
                 reads: list[tuple[int, int]] = reads) -> None:
            reads.append((start, len(view)))
            view[:] = data.numpy()[start : start + len(view)].tobytes()

        dst = torch.zeros(n, dtype=torch.uint8)
        marker = ring.stream(n, dst, read, hasher.feed)
        ring.engine.wait_compute(marker)
        hasher.verdict.result(timeout=10)
        assert torch.equal(dst, data)
        assert digests == [hashlib.sha256(data.numpy().tobytes()).hexdigest()]
        assert [s for s, _ in reads] == list(range(0, n, SLOT)) and sum(k for _, k in reads) == n
    assert ring.host_bytes == (0 if in_place else slots * SLOT)
    ring.drain()
    pool.shutdown()


def test_pins_hold_when_hashed_from_streamed_bytes(engine: str, tmp_path: Path,
                                                  hashes: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """FULL hashes every load and refuses a damaged base; CACHED skips an unchanged base and
    hashes a replaced one again; all from the bytes read for the load (no second read)."""
    monkeypatch.setattr(SafetensorsFile, "sha256", None)  # a second read would fail
    g = torch.Generator().manual_seed(SEED)
    base = _base(tmp_path, g)
    path = _over_base(tmp_path, base, g)
    names = list(base)
    mf.load(path, staging_bytes=2 * SLOT, verify="full")
    mf.load(path, staging_bytes=2 * SLOT, verify="full")
    assert len(hashes) == 2 * len(names)
    hashes.clear()
    mf.load(path, staging_bytes=2 * SLOT)  # CACHED: the file is known
    assert hashes == []
    file = tmp_path / "base.safetensors"
    data = file.read_bytes()
    (tmp_path / "copy").write_bytes(data)
    os.replace(tmp_path / "copy", file)  # the same bytes, another inode
    mf.load(path, staging_bytes=2 * SLOT)
    assert len(hashes) == len(names)
    damaged = bytearray(data)
    damaged[-3] ^= 0x10  # inside the last tensor's bytes
    file.write_bytes(bytes(damaged))
    with pytest.raises(mf.ExternalReferenceDamaged, match="sha256"):
        mf.load(path, staging_bytes=2 * SLOT, verify="full")


class _CuttingEngine(SyncCopyEngine):
    """Streams through the ring and cuts ``path`` to ``size`` bytes at its first copy: the
    base is truncated while its tensor is being read."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__("cpu", in_place=False)
        self.path: Path = path
        self.size: int | None = size

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> object:
        if self.size is not None:
            os.truncate(self.path, self.size)
            self.size = None
        return super().copy(src, dst)


def test_a_base_cut_while_read_fails_the_load_and_is_checked_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[str]) -> None:
    """A base truncated after its first pieces were read (and fed to the hash) fails the load
    as damage and leaves no half-done pin check behind: once the base is whole again, the
    same open file reads it, hashes it in full and loads it."""
    g = torch.Generator().manual_seed(SEED)
    base = _base(tmp_path, g)
    path = _over_base(tmp_path, base, g)
    file = tmp_path / "base.safetensors"
    data = file.read_bytes()
    name = "float64_matrix"
    with mf.MCNCFile(path, verify="full", staging_bytes=2 * SLOT) as f:
        cutting = _CuttingEngine(file, len(data) // 2)  # cuts once, at the first load
        monkeypatch.setattr(CpuTorch, "copy_engine", lambda self: cutting)
        with pytest.raises(mf.ExternalReferenceDamaged, match="truncated or replaced"):
            f.get_tensor(name)
        assert hashes == []
        with open(file, "r+b") as out:  # whole again, same inode
            out.write(data)
        assert _bits(f.get_tensor(name)) == _bits(base[name])
        assert len(hashes) == 1


def _adapter(directory: Path, g: torch.Generator, base_dtype: torch.dtype,
             rank: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """An MCNC-LoRA adapter whose lora tensors reference their base weights (what ``mcnc
    pack --base`` writes), in the base's dtype and in float32."""
    base = {"q": torch.randn(40, 24, generator=g).to(base_dtype),
            "up": torch.randn(29, 40, generator=g).to(base_dtype)}
    save_file(base, str(directory / "base.safetensors"))
    spec = GeneratorSpec(k=3, d=16, hidden=(8,), seed=SEED % 2**31)
    tensors: dict[str, LoRA] = {}
    for name, weight in base.items():
        out_f, in_f = weight.shape
        theta0 = Theta0.external("base.safetensors", name, tensor_sha256(weight))
        for dtype, suffix in ((base_dtype, ""), (torch.float32, "_f32")):
            seg_a = Segment(spec, torch.rand(-(-rank * in_f // 16), 1, 3, generator=g),
                            torch.randn(-(-rank * in_f // 16), 1, generator=g))
            seg_b = Segment(spec, torch.rand(-(-out_f * rank // 16), 1, 3, generator=g),
                            torch.randn(-(-out_f * rank // 16), 1, generator=g))
            tensors[name + suffix] = LoRA(MCNC(seg_a, (rank, in_f)), MCNC(seg_b, (out_f, rank)),
                                          0.75, dtype, theta0)
    path = directory / "adapter.mcnc"
    mf.save(path, tensors)  # type: ignore[arg-type]
    return path, base


def _boxes(shape: tuple[int, ...]) -> list[tuple]:
    rows, cols = shape
    return [(slice(None),), (slice(3, rows - 5),), (rows - 1,), (slice(None), slice(2, cols - 3)),
            (slice(1, rows // 2), slice(cols // 3, None)), (4, slice(1, 6))]


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_lora_over_a_streamed_base_is_the_formula_in_every_box(
        engine: str, tmp_path: Path, base_dtype: torch.dtype) -> None:
    """Merged lora tensors equal ``(lora_product(B, A) * scale + base.float()).to(dtype)``
    bit for bit, whole and in every box kind, whatever the slot size and merge block."""
    g = torch.Generator().manual_seed(SEED)
    path, base = _adapter(tmp_path, g, base_dtype, rank=3)
    with mf.MCNCFile(path, staging_bytes=2 * SLOT) as f:
        whole = f.tensors()
        for name, value in whole.items():
            a, b, scale = f.get_lora_factors(name)
            assert scale == 0.75
            weight = base[name.removesuffix("_f32")]
            want = (lora_product(b, a) * 0.75 + weight.to(torch.float32)).to(value.dtype)
            assert _bits(value) == _bits(want), name
            for box in _boxes(tuple(value.shape)):
                assert _bits(f.get_slice(name)[box]) == _bits(value[box]), (name, box)
    got = mf.load(path, boxes={n: (slice(2, 9), slice(1, 7)) for n in whole},
                  staging_bytes=2 * SLOT)
    for name, value in got.items():
        assert _bits(value) == _bits(whole[name][2:9, 1:7]), name


@pytest.mark.parametrize("rank", [0, 1, 5])
@pytest.mark.parametrize("block", [1, 37, 10_000])
def test_lora_merge_is_lora_product_then_scale_base_and_cast(rank: int, block: int) -> None:
    g = torch.Generator().manual_seed(SEED + rank)
    b = torch.randn(23, rank, generator=g).to(torch.bfloat16)
    a = torch.randn(rank, 17, generator=g)
    for base_dtype in (None, torch.bfloat16, torch.float16, torch.float32, torch.float64):
        base = None if base_dtype is None else torch.randn(23, 17, generator=g).to(base_dtype)
        product = (lora_product(b, a) if rank else torch.zeros(23, 17)) * 1.3
        for out_dtype in (torch.float32, torch.bfloat16, torch.float64):
            want = (product + base.to(torch.float32) if base is not None else product
                    ).to(out_dtype)
            out = torch.empty(23, 17, dtype=out_dtype)
            lora_merge(out, b, a, 1.3, base, block)
            assert _bits(out) == _bits(want), (base_dtype, out_dtype)
            if base is not None and base.dtype == out_dtype:  # in place over the base
                out = base.clone()
                lora_merge(out, b, a, 1.3, out, block)
                assert _bits(out) == _bits(want), (base_dtype, out_dtype)


def test_the_lora_benchmark_runs(tmp_path: Path) -> None:
    """``benchmarks/bench_lora.py --size quick``: the adapter packed against its base loads,
    its bases read alone equal ``load_file``'s, and the ratios are printed."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora.py"
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, str(script), "--size", "quick", "--repeats", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "merged/base" in run.stdout, run.stdout
    result = json.loads(out.read_text())
    assert result["cached"]["ratio"] > 0 and result["full"]["merged_s"] > 0


def test_a_failed_allocation_leaves_the_pin_check_to_the_next_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that runs out of memory while allocating a base's staging buffer (a bf16 base
    under a float32 lora output) ends the pin check it had begun: the next load on the same
    open file checks the base again and finishes, instead of waiting for a verdict that
    would never come."""
    import threading

    g = torch.Generator().manual_seed(SEED)
    path, _ = _adapter(tmp_path, g, torch.bfloat16, 4)
    want = mf.load(path)["q_f32"]
    real = SyncCopyEngine.device_empty
    failures = [OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")]

    def flaky(self: SyncCopyEngine, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if failures:
            raise failures.pop()
        return real(self, shape, dtype)

    monkeypatch.setattr(SyncCopyEngine, "device_empty", flaky)
    with mf.MCNCFile(path, verify="full") as f:
        with pytest.raises(mf.DeviceMemoryError):
            f.get_tensor("q_f32")
        got: dict[str, torch.Tensor] = {}
        retry = threading.Thread(target=lambda: got.setdefault("q", f.get_tensor("q_f32")),
                                 daemon=True)
        retry.start()
        retry.join(60)
        assert not retry.is_alive(), "the retry waits for a pin check that never ends"
    assert torch.equal(got["q"], want)


def test_closing_the_file_ends_a_pin_check_left_unfinished(tmp_path: Path) -> None:
    """A base being hashed as it is read, when the file is closed before all of it was fed
    (a stream left unfinished): the pieces fed are released and the verdict says the check
    did not finish, so a load's clean-up waiting on them ends."""
    g = torch.Generator().manual_seed(SEED)
    path, base = _adapter(tmp_path, g, torch.bfloat16, 4)
    f = mf.MCNCFile(path, verify="full")
    t = f.entry("q")
    read = f.context.theta0.dense_read(t.theta0, t.shape, 0, base["q"].numel(), "q")
    assert read.hash is not None
    half = memoryview(bytearray(read.nbytes // 2))
    read.read(0, half)
    piece = read.hash.feed(half)
    f.close()
    piece.result(timeout=30)
    with pytest.raises(mf.MCNCError, match="before all of its bytes were hashed"):
        read.hash.verdict.result(timeout=30)
