"""Boxes of tensors through the one engine: ``get_slice`` and ``load(boxes=...)``.

A box must equal the same elements of the whole tensor bit for bit (same device and dtype),
for every encoding and theta0 kind, and must rebuild only the chunks that cover it. This holds
because every chunk is computed by the same operations whatever batch rebuilds it (whole row
tiles, ``ordered_matmul`` for the generator's small products; docs/architecture.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gpu_marks import needs_cuda
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import file_plans, materialize
from stream_helpers import mixed_file
from triton_helpers import requires_triton

import mcnc_format as mf
from mcnc_format import MCNC, GeneratorSpec, Segment, Theta0
from mcnc_format.engine.box import Box
from mcnc_format.errors import MCNCIndexError, UnsupportedFeatureError, UsageError

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
VALID = json.loads((VECTORS / "index.json").read_text())["valid"]
#: On CUDA the fused kernel rebuilds boxes (contiguous ones in place, others gathered from
#: whole chunk rows): a box must still equal the whole tensor's elements bit for bit.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _boxes(shape: tuple[int, ...]) -> list[Any]:
    """Row blocks, column blocks, negative bounds, positive steps, integers (also as numpy
    integers and 0-d tensors), ``...`` and ``[]`` for a shape."""
    if not shape:
        return [(), (...,)]
    first = shape[0]
    boxes: list[Any] = [(slice(None),), (slice(first // 3, first - first // 4),),
                        (slice(-max(first // 2, 1), None),), (...,), [],
                        (slice(None, None, 2),), (slice(1, None, 3),),
                        (slice(np.int64(0), torch.tensor(first)),)]
    if first:
        boxes += [(first - 1,), (np.int64(-1),), (torch.tensor(first // 2),)]
        if len(shape) >= 2:
            boxes.append((0, slice(None, None, 4)))
    if len(shape) >= 2:
        cols = shape[1]
        boxes += [(slice(None), slice(cols // 4, cols - cols // 3)),
                  (slice(None, None, 3), slice(1, None, 2)),
                  (slice(1, max(first - 1, 1)), slice(-max(cols // 2, 1), None)),
                  (..., slice(0, max(cols // 5, 1)))]
    if len(shape) >= 3:
        boxes.append((slice(0, 1), slice(None), slice(1, shape[2])))
    return boxes


def _assert_bits(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
    """The same dtype, shape and bytes."""
    assert got.dtype == want.dtype and got.shape == want.shape, label
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)

    assert torch.equal(raw(got), raw(want)), label


def _check_all_boxes(f: mf.MCNCFile, names: list[str], device: str = "cpu") -> None:
    for name in names:
        whole = f.get_tensor(name, device)
        handle = f.get_slice(name).to(device)
        assert handle.get_shape() == list(whole.shape)
        assert handle.get_dtype() == f.entry(name).dtype
        for index in _boxes(tuple(whole.shape)):
            _assert_bits(handle[index], whole[index], f"{name}{index}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vector", VALID, ids=[v["file"] for v in VALID])
def test_every_box_of_every_vector_equals_the_whole_tensor(vector: dict, device: str) -> None:
    with mf.open(VECTORS / vector["file"]) as f:
        names = [n for n in f.keys() if n not in vector["unsupported"]]  # noqa: SIM118
        _check_all_boxes(f, names, device)
        for name in vector["unsupported"]:
            with pytest.raises(UnsupportedFeatureError):
                f.get_slice(name)[...]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=file_plans(max_tensors=4), data=st.data())
def test_random_files_and_boxes(tmp_path_factory: pytest.TempPathFactory, plan, data) -> None:
    directory = tmp_path_factory.mktemp("slices")
    path = directory / "plan.mcnc"
    mf.save(path, materialize(plan, directory))  # type: ignore[arg-type]
    workspace = data.draw(st.sampled_from([None, 3000, 50_000]))
    with mf.MCNCFile(path, workspace_bytes=workspace) as f:
        whole = f.tensors()
        for name, tensor in whole.items():
            index = tuple(_drawn_slice(data, n) for n in tensor.shape)
            _assert_bits(f.get_slice(name)[index], tensor[index], f"{name}{index}")
        boxes = {name: tuple(_drawn_slice(data, n) for n in t.shape) for name, t in whole.items()}
        for name, value in mf.load(path, boxes=boxes, workspace_bytes=workspace).items():
            _assert_bits(value, whole[name][boxes[name]], name)


def _drawn_slice(data: st.DataObject, size: int) -> slice:
    start = data.draw(st.integers(0, size))
    stop = data.draw(st.integers(start, size))
    return slice(start, stop)


def _big_file(path: Path, theta0: Theta0) -> Path:
    spec = GeneratorSpec(k=4, d=100, hidden=(8,), seed=3)
    g = torch.Generator().manual_seed(0)
    segment = Segment(spec, alpha=torch.rand(1600, 1, 4, generator=g),
                      beta=torch.randn(1600, 1, generator=g))
    mf.save(path, {"w": MCNC(segment, (400, 400), theta0=theta0)})
    return path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("theta0", [Theta0.zeros(), Theta0.fan_in_uniform(5, 1),
                                    Theta0.normal(5, 2, std=0.1)],
                         ids=["zeros", "fan_in_uniform", "normal"])
def test_a_row_block_rebuilds_its_share_of_chunks(tmp_path: Path, theta0: Theta0,
                                                  device: str) -> None:
    """A 1/16 row block of a 1600-chunk tensor rebuilds at most 100 + 2 boundary chunks;
    a column block only the chunks its rows' columns touch."""
    path = _big_file(tmp_path / "big.mcnc", theta0)
    seen: list[mf.Progress] = []
    with mf.MCNCFile(path, workspace_bytes=4096, progress=seen.append) as f:
        whole = f.get_tensor("w", device)
        handle = f.get_slice("w").to(device)
        for rank in range(16):
            box = (slice(25 * rank + 3, 25 * rank + 28), slice(None))
            _assert_bits(handle[box], whole[box], str(box))
            assert seen[-1].chunks_regenerated <= 1600 // 16 + 2
        plan = f.plan(f.requests(boxes={"w": (slice(None), slice(0, 50))}))
        # 400 rows of 400 values in chunks of 100: columns 0..49 touch one chunk per row.
        assert plan.chunks == 400
        _assert_bits(handle[:, 0:50], whole[:, 0:50], "columns")
        _assert_bits(handle[3:300, 120:170], whole[3:300, 120:170], "a block")


def _start(event: Any) -> int:
    """A profiler event's start (older torch gives it in microseconds only)."""
    return event.start_ns() if hasattr(event, "start_ns") else 1000 * event.start_us()


def _peak_bytes(device: str, run: Callable[[], dict[str, torch.Tensor]]
                ) -> tuple[int, dict[str, torch.Tensor]]:
    """The most bytes ``device``'s allocator held during ``run`` beyond what it held before
    (on the CPU: from the profiler's allocation events), and what ``run`` returned."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        got = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, got
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = run()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]"), key=_start):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, got


@pytest.mark.parametrize(("device", "use_triton"), [
    ("cpu", None), pytest.param("cuda", False, marks=needs_cuda),
    pytest.param("cuda", True, marks=[*needs_cuda, requires_triton])])
def test_a_column_box_holds_at_most_its_workspace_beyond_its_output(
        tmp_path: Path, device: str, use_triton: bool | None) -> None:
    """A box that is not one range is gathered from whole chunk rows, through the int64
    positions of its values: they are part of the workspace (``plan.batch_rows``), so the
    load holds its output and at most the workspace (it held 1.5 times the workspace when
    the positions were computed out of place)."""
    spec = GeneratorSpec(k=5, d=1000, hidden=(32, 32), seed=5)
    g = torch.Generator().manual_seed(0)
    segment = Segment(spec, torch.rand(600, 1, 5, generator=g) * 2 - 1,
                      torch.randn(600, 1, generator=g) * 0.1)
    path = tmp_path / "w.mcnc"
    mf.save(path, {"w": MCNC(segment, (600, 1000), torch.float32, Theta0.zeros())})
    workspace = 4 << 20
    box = {"w": (slice(None), slice(1, None))}
    with mf.MCNCFile(path, workspace_bytes=workspace, use_triton=use_triton) as f:
        dict(f.stream(["w"], device, boxes=box))  # the generator drawn, kernels compiled
        peak, got = _peak_bytes(device, lambda: dict(f.stream(["w"], device, boxes=box)))
    assert peak - got["w"].nbytes <= workspace, (peak, got["w"].nbytes, workspace)


def test_boxes_through_load_and_stream(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    whole = mf.load(path)
    boxes = {name: (slice(1, None),) for name, t in whole.items() if t.dim() and t.shape[0] > 1}
    got = mf.load(path, boxes=boxes)
    assert set(got) == set(whole)
    for name, value in got.items():
        _assert_bits(value, whole[name][boxes[name]] if name in boxes else whole[name], name)
    with pytest.raises(UsageError, match="steps of 1"):
        mf.load(path, boxes={"m0": (slice(None, None, 2),)})
    with pytest.raises(mf.MCNCError, match="does not hold"):
        mf.load(path, boxes={"nope": (slice(0, 1),)})
    with mf.open(path) as f:
        with pytest.raises(IndexError, match="out of bounds") as raised:
            f.get_slice("m0")[10**6]
        assert isinstance(raised.value, UsageError)  # also ours: MCNCIndexError
        with pytest.raises(MCNCIndexError, match="too many indices"):
            f.get_slice("m0")[(0,) * 9]


def test_box_arithmetic() -> None:
    box = Box.from_index((4, 6, 5), (slice(1, 3), slice(2, 4)))
    assert box.lengths == (2, 2, 5) and box.run_dim == 1 and box.run_length == 10
    assert box.runs == 2 and not box.contiguous
    assert box.elements(0, 2).tolist() == [*range(40, 50), *range(70, 80)]
    row = Box.from_index((4, 6, 5), (slice(1, 3),))
    assert row.contiguous and row.first_element == 30 and row.numel == 60
    assert Box.from_offsets((8, 8), (2, 0), (3, 8)).contiguous
    assert Box.from_index((3, 4), (-1, ...)).result_shape == (4,)
    assert Box.full(()).numel == 1 and Box.full(()).runs == 1
    assert math.prod(Box.from_index((5, 0), (slice(None),)).lengths) == 0


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64, torch.complex64,
                                   "int8", "float8"])
def test_non_float_dtypes_are_refused(tmp_path: Path, dtype: object) -> None:
    path = mixed_file(tmp_path)
    with pytest.raises(UsageError, match="dtype"):
        mf.load(path, dtype=dtype)  # type: ignore[arg-type]


def test_dtype_names(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    got = mf.load(path, dtype="bf16", names=["m0"])
    assert got["m0"].dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["banana", "", "xpu", "cuda:7"] + (
    ["cuda"] if not torch.cuda.is_available() else []))
def test_missing_devices_are_refused_up_front(tmp_path: Path, device: str) -> None:
    path = mixed_file(tmp_path)
    with pytest.raises(UsageError, match="available here: cpu"):
        mf.load(path, device)


def test_an_integer_device_is_a_cuda_index(tmp_path: Path) -> None:
    """``device=0`` is ``cuda:0`` (torch's and safetensors' reading). Where there is no CUDA
    device the refusal says so; it said "0 is not a device name"."""
    path = mixed_file(tmp_path)
    if torch.cuda.is_available():
        assert mf.load(path, 0, names=["m0"])["m0"].device == torch.device("cuda", 0)
        return
    with pytest.raises(UsageError, match=r"cuda:0.*no CUDA device.*available here: cpu"):
        mf.load(path, 0)


def test_meta_device_gives_shapes_and_dtypes(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    whole = mf.load(path)
    meta = mf.load(path, "meta", boxes={"m0": (slice(0, 1),)})
    for name, tensor in meta.items():
        assert tensor.is_meta and tensor.dtype == whole[name].dtype
        expected = whole[name][0:1] if name == "m0" else whole[name]
        assert tensor.shape == expected.shape


def test_reading_a_local_file_does_not_import_the_hub(tmp_path: Path) -> None:
    path = _big_file(tmp_path / "local.mcnc", Theta0.zeros())
    code = ("import sys, mcnc_format\n"
            f"f = mcnc_format.open({str(path)!r})\n"
            "f.get_tensor('w'); f.get_slice('w')[0:2]; mcnc_format.load(f.path)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('huggingface_hub', 'mcnc_format') and 'hub' in m))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _external_file(directory: Path) -> tuple[Path, Path]:
    """A matrix and a lora adapter whose factor A starts from an external base tensor."""
    from safetensors.torch import save_file

    from mcnc_format import LoRA
    from mcnc_format.reader import tensor_sha256

    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 12, generator=g)
    save_file({"w": base, "a": base[:4].clone()}, str(directory / "base.safetensors"))
    spec = GeneratorSpec(k=3, d=16, hidden=(8,), seed=4)
    seg = Segment(spec, torch.rand(11, 1, 3, generator=g), torch.randn(11, 1, generator=g))
    path = directory / "external.mcnc"
    mf.save(path, {
        "w": MCNC(seg, (8, 12), theta0=Theta0.external("base.safetensors", "w",
                                                       tensor_sha256(base))),
        "lora": LoRA(MCNC(seg, (4, 12), theta0=Theta0.external(
            "base.safetensors", "a", tensor_sha256(base[:4]))), MCNC(seg, (8, 4)), 0.5),
    })
    return path, directory / "base.safetensors"


@pytest.mark.parametrize("box", [(slice(None), slice(2, 5)), (slice(1, 3),), (3, slice(1, 4))],
                         ids=["columns", "rows", "row-and-columns"])
def test_every_box_on_a_damaged_base_is_refused(tmp_path: Path, box: tuple) -> None:
    """R75 holds for every box, and for a lora tensor whose factor starts from the base."""
    path, base = _external_file(tmp_path)
    whole = mf.load(path)
    for name in ("w", "lora"):
        _assert_bits(mf.load(path, boxes={name: box}, names=[name])[name], whole[name][box],
                     name)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(8, 12), "a": torch.zeros(4, 12)}, str(base))  # other values
    for name in ("w", "lora"):
        with pytest.raises(mf.ExternalReferenceDamaged, match="sha256"):
            mf.load(path, boxes={name: box}, names=[name], verify="full")
    from mcnc_format.verify import verify_file

    report = verify_file(path)
    assert not report.ok and any(p.rule == "R75" for p in report.problems)


def test_boxes_and_options_that_do_not_fit_are_usage_errors(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    shape = mf.open(path).entry("m0").shape
    for box in (Box.full((10, 10)), Box(shape, (0, 5), (shape[0], 3)),
                Box(shape, (-2, 0), shape), Box(shape, (0, 0), shape, drop=(0,))):
        with pytest.raises(UsageError):
            mf.load(path, names=["m0"], boxes={"m0": box})
    with mf.open(path) as f:
        for index in (slice("a", 3), slice(0, 2.5), np.array([1, 2]), 1.0, True, None,
                      torch.tensor([0, 1])):
            with pytest.raises(MCNCIndexError, match="integer bounds and a positive step"):
                f.get_slice("m0")[index]
        for index in (slice(None, None, -1), slice(None, None, 0)):
            with pytest.raises(UsageError, match="step"):
                f.get_slice("m0")[index]
    for bounds in ((torch.tensor(0), 0), (0.0, 0)):
        with pytest.raises(UsageError, match="must be Python ints"):
            mf.load(path, names=["m0"], boxes={"m0": Box(shape, bounds, shape)})
    with pytest.raises(UsageError, match="precision='bogus'"):
        mf.load(path, precision="bogus")
    with pytest.raises(UsageError, match="verify='bogus'"):
        mf.load(path, verify="bogus")


def test_zero_dim_tensors_take_only_empty_indices(tmp_path: Path) -> None:
    path = tmp_path / "scalar.mcnc"
    mf.save(path, {"s": torch.tensor(2.5)})
    with mf.open(path) as f:
        handle = f.get_slice("s")
        assert handle[()].item() == 2.5 and handle[...].item() == 2.5
        for index in (0, slice(None), []):
            with pytest.raises(MCNCIndexError):
                handle[index]


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        mf.open(tmp_path / "absent.mcnc")
    assert isinstance(raised.value, mf.MCNCFileNotFoundError)
    assert str(tmp_path / "absent.mcnc") in str(raised.value)


def test_option_values_of_the_wrong_kind_are_usage_errors(tmp_path: Path) -> None:
    """Byte counts that are not positive integers, a ``use_triton`` that is not a bool,
    ``names`` that is a string or no iterable and ``boxes`` that is no mapping are refused
    up front by every entry point, naming the option. Before, a string byte count failed deep
    in the planner (``TypeError: unsupported operand type(s) for //``), a negative one loaded
    as if it were the smallest, ``use_triton="no"`` forced the kernels, and ``names="m0"``
    asked for the tensors ``'m'`` and ``'0'``."""
    path = mixed_file(tmp_path)
    refused: list[tuple[dict[str, Any], str]] = [
        *(({option: value}, option)
          for option in ("workspace_bytes", "staging_bytes")
          for value in ("64MiB", 1e6, -1, 0, True)),
        *(({"use_triton": value}, "use_triton") for value in ("no", 0, 1)),
        ({"names": "m0"}, r"names=\['m0'\]"), ({"names": 3}, "names"),
        ({"boxes": [("m0", (slice(0, 1),))]}, "boxes"),
    ]
    for keywords, message in refused:
        with pytest.raises(UsageError, match=message):
            mf.load(path, **keywords)
        with pytest.raises(UsageError, match=message):
            next(mf.stream(path, **keywords))
        options = {k: v for k, v in keywords.items() if k not in ("names", "boxes")}
        if options:
            with pytest.raises(UsageError, match=message):
                mf.MCNCFile(path, **options)
    with mf.open(path) as f, pytest.raises(UsageError, match=r"names=\['m0'\]"):
        f.tensors("m0")
    want = mf.load(path, names=["m0"])["m0"]
    for value in (np.int64(50_000), 50_000):  # any integer, numpy's too
        got = mf.load(path, names=("m0",), workspace_bytes=value, staging_bytes=value)["m0"]
        _assert_bits(got, want, str(type(value)))
