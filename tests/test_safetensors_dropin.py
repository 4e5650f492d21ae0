"""``mcnc_format.safetensors`` held to what safetensors' own Python tests check.

Peer: huggingface/safetensors at commit 24b0b28, bindings/python/tests. Each peer test below
has a test here with the same case and the same expectations, written anew; only the I/O
calls are mapped onto ours (``safetensors.torch.X`` -> ``mcnc_format.safetensors.X``,
``safetensors.numpy.X`` -> ``mcnc_format.safetensors.numpy.X``, ``safetensors.safe_open`` ->
``mcnc_format.safetensors.safe_open``, the sharing helpers
``_find_shared_tensors``/``_is_complete``/``_end_ptr``/``_remove_duplicate_names`` ->
``mcnc_format.sharing``'s public functions of the same job, ``SafetensorError`` ->
``MCNCError``). Files go to ``tmp_path`` instead of ``./tests/data``.

Excluded before starting: dtypes the spec does not store (complex, fp8, fp4) and assertions on
safetensors' own byte layout (its header bytes, or raw safetensors byte strings fed to the
reader). Not applicable: the Rust binding's ``TensorSpec``/``serialize`` (docs/safetensors.md
says why). Hardware: tests that need CUDA, two GPUs, MPS, an Ascend NPU or a Gaudi HPU run
where that hardware is (skipped elsewhere, and then not counted).

Assertions are counted per statement of the peer's body (a helper such as
``assertTensorEqual`` counts its statements each time it is called; a statement in a loop
counts once; a body without assertions counts one: "it runs"). ``PEER_TESTS`` below is the
table: peer test, ours (``None`` where excluded), assertions applicable, whether it is a
numpy one. Every applicable assertion holds here except those ``NOT_HELD`` names;
docs/safetensors.md keeps the count and the reasons.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from gpu_marks import requires_cuda

import mcnc_format as mf
import mcnc_format.safetensors.numpy as mcnc_np
from mcnc_format import MCNCError, NumpyDtypeError
from mcnc_format import sharing as S
from mcnc_format.safetensors import (
    load,
    load_file,
    load_model,
    safe_open,
    save,
    save_file,
    save_model,
    storage_ptr,
    storage_size,
)
from mcnc_format.torch import MCNCConfig, reparametrize

HAS_CUDA = torch.cuda.is_available()
HAS_TWO_GPUS = torch.cuda.device_count() >= 2
HAS_MPS = torch.backends.mps.is_available()
HAS_NPU = importlib.util.find_spec("torch_npu") is not None
HAS_HPU = importlib.util.find_spec("habana_frameworks") is not None
cuda = requires_cuda

#: (peer file::test, our test or None when excluded (reason), applicable assertions, numpy)
PEER_TESTS: list[tuple[str, str | None, int, bool]] = [
    ("pt_comparison::test_serialization", None, 0, False),  # byte layout
    ("pt_comparison::test_odd_dtype", "test_odd_dtype", 3, False),  # complex entry dropped
    ("pt_comparison::test_complex", None, 0, False),  # complex dtype
    ("pt_comparison::test_odd_dtype_fp8_e4m3fn", None, 0, False),  # fp8
    ("pt_comparison::test_odd_dtype_fp8_e5m2", None, 0, False),  # fp8
    ("pt_comparison::test_odd_dtype_fp8_e8m0", None, 0, False),  # fp8
    ("pt_comparison::test_odd_dtype_fp8_fnuz", None, 0, False),  # fp8
    ("pt_comparison::test_odd_dtype_fp4", None, 0, False),  # fp4
    ("pt_comparison::test_zero_sized", "test_zero_sized", 2, False),
    ("pt_comparison::test_multiple_zero_sized", "test_multiple_zero_sized", 2, False),
    ("pt_comparison::test_disjoint_tensors_shared_storage",
     "test_disjoint_tensors_shared_storage", 1, False),
    ("pt_comparison::test_meta_tensor", "test_meta_tensor", 2, False),
    ("pt_comparison::test_in_memory", "test_in_memory", 1, False),  # its bytes check: layout
    ("pt_comparison::test_mps_with_device_index", "test_mps_with_device_index", 3, False),
    ("pt_comparison::test_gpu", "test_gpu", 1, False),  # CUDA
    ("pt_comparison::test_gpu_default_device", "test_gpu_default_device", 3, False),  # CUDA
    ("pt_comparison::test_mps", "test_mps", 2, False),
    ("pt_comparison::test_mps_fp4", None, 0, False),  # fp4
    ("pt_comparison::test_npu", "test_npu", 1, False),
    ("pt_comparison::test_hpu", "test_hpu", 1, False),
    ("pt_comparison::test_anonymous_accelerator", "test_anonymous_accelerator", 1, False),
    ("pt_comparison::test_sparse", "test_sparse", 2, False),
    ("pt_comparison::test_bogus", "test_bogus", 4, False),
    ("pt_comparison::test_deserialization_safe", "test_deserialization_safe", 2, False),
    ("pt_comparison::test_deserialization_device", "test_deserialization_device", 3, False),
    ("pt_comparison::test_deserialization_safe_gpu", "test_deserialization_safe_gpu", 2, False),
    ("pt_comparison::test_deserialization_safe_gpu_slice",
     "test_deserialization_safe_gpu_slice", 2, False),
    ("pt_comparison::test_deserialization_safe_device_1",
     "test_deserialization_safe_device_1", 2, False),
    ("pt_comparison::test_cannot_serialize_a_non_contiguous_tensor",
     "test_cannot_serialize_a_non_contiguous_tensor", 2, False),
    ("pt_comparison::test_cannot_serialize_shared", "test_cannot_serialize_shared", 2, False),
    ("pt_comparison::test_deserialization_slice", "test_deserialization_slice", 5, False),
    ("pt_comparison::test_deserialization_metadata", "test_deserialization_metadata", 2, False),
    ("simple::test_safetensor_error_module_is_importable",
     "test_error_module_is_importable", 1, False),
    ("simple::test_serialization", None, 0, True),  # byte layout (its 4 assertions)
    ("simple::test_deserialization", None, 0, True),  # raw safetensors bytes
    ("simple::test_deserialization_metadata", None, 0, True),  # raw safetensors bytes
    ("simple::test_serialization_order_invariant",
     "test_serialization_order_invariant", 1, True),
    ("simple::test_serialization_forces_alignment",  # its other 3: byte layout
     "test_serialization_forces_alignment", 1, True),
    ("simple::test_serialization_metadata", None, 0, True),  # byte layout (its 3)
    ("simple::test_serialization_no_big_endian", None, 0, True),  # byte layout (its 3)
    ("simple::test_accept_path", "test_accept_path", 1, False),
    ("simple::test_pt_sf_save_model_overlapping_storage",
     "test_save_model_overlapping_storage", 5, False),
    ("simple::test_get_correctly_dropped", "test_get_correctly_dropped", 1, False),
    ("simple::test_file_not_found", "test_file_not_found", 2, False),
    ("simple::test_numpy_example", "test_numpy_example", 4, True),
    ("simple::test_numpy_bool", "test_numpy_bool", 4, True),
    ("simple::test_torch_example", "test_torch_example", 4, False),
    ("simple::test_exception", None, 0, False),  # the Rust binding's TensorSpec/serialize
    ("simple::test_torch_slice", "test_torch_slice", 18, False),
    ("simple::test_numpy_slice", "test_numpy_slice", 30, True),
    ("pt_model::test_is_complete", "test_is_complete", 4, False),
    ("pt_model::test_find_shared_tensors", "test_find_shared_tensors", 6, False),
    ("pt_model::test_find_shared_non_shared_tensors",
     "test_find_shared_non_shared_tensors", 3, False),
    ("pt_model::test_end_ptr", "test_end_ptr", 4, False),
    ("pt_model::test_remove_duplicate_names", "test_remove_duplicate_names", 3, False),
    ("pt_model::test_failure", "test_failure", 1, False),
    ("pt_model::test_save", "test_save", 2, False),  # its bytes[192:] check: byte layout
    ("pt_model::test_workaround", "test_workaround", 2, False),
    ("pt_model::test_workaround_works_with_different_on_file_names",
     "test_workaround_different_on_file_names", 1, False),
    ("pt_model::test_workaround_non_contiguous", "test_workaround_non_contiguous", 3, False),
    ("pt_model::test_workaround_copy", "test_workaround_copy", 2, False),
    ("pt_model::test_difference_with_torch", "test_difference_with_torch", 4, False),
    ("pt_model::test_difference_torch_odd", "test_difference_torch_odd", 7, False),
    ("multithreaded::test_multithreaded_roundtripping_numpy",
     "test_multithreaded_roundtripping_numpy", 1, True),
    ("multithreaded::test_multithreaded_roundtripping_torch",
     "test_multithreaded_roundtripping_torch", 1, False),
]
#: Peer tests that need hardware this machine may lack: whether it is here (skipped, so not
#: counted, where it is not).
NEEDS_HARDWARE: dict[str, bool] = {
    "test_gpu": HAS_CUDA, "test_gpu_default_device": HAS_CUDA,
    "test_anonymous_accelerator": HAS_CUDA, "test_deserialization_device": HAS_CUDA,
    "test_deserialization_safe_gpu": HAS_CUDA, "test_deserialization_safe_gpu_slice": HAS_CUDA,
    "test_deserialization_safe_device_1": HAS_TWO_GPUS,
    "test_mps_with_device_index": HAS_MPS, "test_mps": HAS_MPS,
    "test_npu": HAS_NPU, "test_hpu": HAS_HPU,
}
#: Applicable peer assertions that do not hold, with the reason (docs/safetensors.md).
NOT_HELD: dict[str, str] = {}


def test_peer_table_names_our_tests_and_meets_the_target() -> None:
    """Every mapped test exists here; held / applicable reaches 95%, with the numpy tests
    and without them (counting the hardware-bound tests only where the hardware is)."""
    for _, ours, count, _numpy in PEER_TESTS:
        assert (ours is None) == (count == 0)
        assert ours is None or callable(globals().get(ours)), ours
    assert set(NEEDS_HARDWARE) <= {ours for _, ours, _, _ in PEER_TESTS}
    for with_numpy in (True, False):
        counted = [n for _, ours, n, numpy_test in PEER_TESTS
                   if ours is not None and NEEDS_HARDWARE.get(ours, True)
                   and (with_numpy or not numpy_test)]
        applicable = sum(counted)
        held = applicable - len(NOT_HELD)
        assert held / applicable >= 0.95


# -- test_pt_comparison.py: TorchTestCase --------------------------------------------------
def test_odd_dtype(tmp_path: Path) -> None:
    data = {
        "test": torch.randn((2, 2), dtype=torch.bfloat16),
        "test2": torch.randn((2, 2), dtype=torch.float16),
        "test3": torch.zeros((2, 2), dtype=torch.bool),
    }
    data["test3"][0, 0] = True
    local = tmp_path / "out_safe_pt_mmap_small.mcnc"
    save_file(data, local)
    reloaded = load_file(local)
    assert torch.equal(data["test"], reloaded["test"])
    assert torch.equal(data["test2"], reloaded["test2"])
    assert torch.equal(data["test3"], reloaded["test3"])


def test_zero_sized(tmp_path: Path) -> None:
    data = {"test": torch.zeros((2, 0), dtype=torch.float)}
    local = tmp_path / "out_safe_pt_mmap_small2.mcnc"
    save_file(data, local)
    reloaded = load_file(local)
    assert torch.equal(data["test"], reloaded["test"])
    reloaded = load(local.read_bytes())
    assert torch.equal(data["test"], reloaded["test"])


def test_multiple_zero_sized(tmp_path: Path) -> None:
    data = {
        "test": torch.zeros((2, 0), dtype=torch.float),
        "test2": torch.zeros((2, 0), dtype=torch.float),
    }
    local = tmp_path / "out_safe_pt_mmap_small3.mcnc"
    save_file(data, local)
    reloaded = load_file(local)
    assert torch.equal(data["test"], reloaded["test"])
    assert torch.equal(data["test2"], reloaded["test2"])


def test_disjoint_tensors_shared_storage(tmp_path: Path) -> None:
    A = torch.zeros((10, 10))
    save_file({"test": A[1:], "test2": A[:1]}, tmp_path / "out_safe_pt_mmap_small4.mcnc")


def test_meta_tensor(tmp_path: Path) -> None:
    A = torch.zeros((10, 10), device=torch.device("meta"))
    with pytest.raises(RuntimeError) as ex:
        save_file({"test": A}, tmp_path / "out_safe_pt_mmap_small5.mcnc")
    assert "Cannot copy out of meta tensor" in str(ex.value)


def test_in_memory() -> None:
    data = {"test": torch.zeros((2, 2), dtype=torch.float32)}
    binary = save(data)
    reloaded = load(binary)
    assert torch.equal(data["test"], reloaded["test"])


@cuda
def test_gpu(tmp_path: Path) -> None:
    data = {"test": torch.arange(4).view((2, 2)).to("cuda:0")}
    local = tmp_path / "out_safe_pt_mmap_small.mcnc"
    save_file(data, local)
    reloaded = load_file(local)
    assert torch.equal(torch.arange(4).view((2, 2)), reloaded["test"])


@cuda
def test_gpu_default_device(tmp_path: Path) -> None:
    data = {"test": torch.arange(4).view((2, 2)).to("cuda:0")}
    local = tmp_path / "out_safe_pt_mmap_small.mcnc"
    save_file(data, local)
    with torch.device("cuda:0"):
        reloaded = load_file(local)
        assert reloaded["test"].device == torch.device("cpu")
        reloaded = load_file(local, device="cuda:0")
        assert reloaded["test"].device == torch.device("cuda:0")
        assert torch.equal(torch.arange(4).view((2, 2)), reloaded["test"])


@cuda
def test_anonymous_accelerator(tmp_path: Path) -> None:
    data = {
        "test1": torch.zeros((2, 2), dtype=torch.float32).to(device=0),
        "test2": torch.zeros((2, 2), dtype=torch.float16).to(device=0),
    }
    local = tmp_path / "out_safe_pt_mmap_small_anonymous.mcnc"
    save_file(data, local)
    reloaded = load_file(local, device=0)
    for k in reloaded:
        assert torch.allclose(data[k], reloaded[k])


@pytest.mark.skipif(not HAS_MPS, reason="needs MPS")
def test_mps_with_device_index(tmp_path: Path) -> None:
    data = {"test": torch.arange(4, dtype=torch.float32).view(2, 2)}
    local = tmp_path / "out_safe_pt_mmap_small_mps_idx.mcnc"
    save_file(data, local)
    reloaded = load_file(local, device="mps:0")
    assert reloaded["test"].device.type == "mps"
    assert torch.equal(data["test"].to("mps"), reloaded["test"])
    with pytest.raises(Exception):  # noqa: B017 (the peer asks for any error)
        load_file(local, device="mps:1")


@pytest.mark.skipif(not HAS_MPS, reason="needs MPS")
def test_mps(tmp_path: Path) -> None:
    data = {
        "test1": torch.arange(16, dtype=torch.float32).reshape(4, 4),
        "test2": torch.arange(8, dtype=torch.float16).reshape(2, 4),
        "test3": torch.tensor([True, False, True, False]),
        "empty": torch.empty((0, 4), dtype=torch.float32),
    }
    local = tmp_path / "out_safe_pt_mmap_small_mps.mcnc"
    save_file(data, local)
    reloaded = load_file(local, device="mps")
    for k, v in data.items():
        assert reloaded[k].device.type == "mps"
        assert torch.equal(v.to("mps"), reloaded[k])


def _save_zeros_on_and_reload(device: str, path: Path) -> None:
    """The peer's NPU and HPU case: tensors made on ``device`` come back equal there."""
    data = {
        "test1": torch.zeros((2, 2), dtype=torch.float32).to(device),
        "test2": torch.zeros((2, 2), dtype=torch.float16).to(device),
    }
    save_file(data, path)
    reloaded = load_file(path, device=device)
    for k in reloaded:
        assert torch.allclose(data[k], reloaded[k])


@pytest.mark.skipif(not HAS_NPU, reason="needs an Ascend NPU (torch_npu)")
def test_npu(tmp_path: Path) -> None:
    importlib.import_module("torch_npu")  # registers the "npu" device with torch
    _save_zeros_on_and_reload("npu:0", tmp_path / "out_safe_pt_mmap_small_npu.mcnc")


@pytest.mark.skipif(not HAS_HPU, reason="needs an Intel Gaudi HPU (habana_frameworks)")
def test_hpu(tmp_path: Path) -> None:
    importlib.import_module("habana_frameworks.torch.core")  # registers the "hpu" device
    _save_zeros_on_and_reload("hpu", tmp_path / "out_safe_pt_mmap_small_hpu.mcnc")


def test_sparse(tmp_path: Path) -> None:
    data = {"test": torch.sparse_coo_tensor(size=(2, 3))}
    with pytest.raises(ValueError) as ctx:
        save_file(data, tmp_path / "out_safe_pt_sparse.mcnc")
    assert str(ctx.value) == (
        "You are trying to save a sparse tensors: `['test']` which this library does not "
        "support. You can make it a dense tensor before saving with `.to_dense()` but be aware "
        "this might make a much larger file than needed.")


def test_bogus(tmp_path: Path) -> None:
    local = tmp_path / "out_safe_pt_sparse.mcnc"
    with pytest.raises(ValueError) as ctx:
        save_file({"test": {"some": "thing"}}, local)
    assert str(ctx.value) == ("Key `test` is invalid, expected torch.Tensor but received "
                              "<class 'dict'>")
    with pytest.raises(ValueError) as ctx:
        save_file("notadict", local)  # type: ignore[arg-type]
    assert str(ctx.value) == "Expected a dict of [str, torch.Tensor] but received <class 'str'>"


# -- test_pt_comparison.py: LoadTestCase ---------------------------------------------------
@pytest.fixture
def load_case(tmp_path: Path) -> tuple[Path, Path]:
    data = {
        "test": torch.zeros((1024, 1024), dtype=torch.float32),
        "test2": torch.zeros((1024, 1024), dtype=torch.float32),
        "test3": torch.zeros((1024, 1024), dtype=torch.float32),
    }
    pt_filename = tmp_path / "pt_load.pt"
    sf_filename = tmp_path / "pt_load.mcnc"
    torch.save(data, pt_filename)
    save_file(data, sf_filename)
    return pt_filename, sf_filename


def test_deserialization_safe(load_case: tuple[Path, Path]) -> None:
    pt_filename, sf_filename = load_case
    _assert_close_on(load_file(sf_filename), torch.load(pt_filename), "cpu")


def _assert_close_on(weights: dict, tweights: dict, device: str) -> None:
    for k, v in weights.items():
        assert torch.allclose(v, tweights[k])
        assert v.device == torch.device(device)


@cuda
def test_deserialization_device(load_case: tuple[Path, Path]) -> None:
    _, sf_filename = load_case
    with torch.device("cuda:0"):
        assert load_file(sf_filename)["test"].device == torch.device("cpu")
    try:
        torch.set_default_device(torch.device("cuda:0"))
        assert load_file(sf_filename)["test"].device == torch.device("cpu")
        torch.set_default_device(torch.device(0))
        assert load_file(sf_filename)["test"].device == torch.device("cpu")
    finally:
        torch.set_default_device(torch.device("cpu"))


@cuda
def test_deserialization_safe_gpu(load_case: tuple[Path, Path]) -> None:
    pt_filename, sf_filename = load_case
    tweights = torch.load(pt_filename, map_location="cuda:0")
    load_file(sf_filename, device=0)
    _assert_close_on(load_file(sf_filename, device="cuda:0"), tweights, "cuda:0")


@cuda
def test_deserialization_safe_gpu_slice(load_case: tuple[Path, Path]) -> None:
    pt_filename, sf_filename = load_case
    weights = {}
    with safe_open(sf_filename, framework="pt", device="cuda:0") as f:
        for k in f.keys():  # noqa: SIM118 (safetensors handles have no __iter__)
            weights[k] = f.get_slice(k)[:1]
    tweights = {k: v[:1] for k, v in torch.load(pt_filename, map_location="cuda:0").items()}
    _assert_close_on(weights, tweights, "cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TWO_GPUS, reason="needs two GPUs")
def test_deserialization_safe_device_1(load_case: tuple[Path, Path]) -> None:
    pt_filename, sf_filename = load_case
    load_file(sf_filename, device=1)
    tweights = torch.load(pt_filename, map_location="cuda:1")
    _assert_close_on(load_file(sf_filename, device="cuda:1"), tweights, "cuda:1")


# -- test_pt_comparison.py: SliceTestCase --------------------------------------------------
@pytest.fixture
def slice_case(tmp_path: Path) -> tuple[torch.Tensor, Path]:
    tensor = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))
    local = tmp_path / "out_safe_pt_mmap_slice.mcnc"
    save_file({"test": tensor}.copy(), local)
    return tensor, local


def test_cannot_serialize_a_non_contiguous_tensor(tmp_path: Path) -> None:
    x = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))[:, :, 1]
    assert not x.is_contiguous()
    with pytest.raises(ValueError):
        save_file({"test": x}, tmp_path / "out.mcnc")


def test_cannot_serialize_shared(tmp_path: Path) -> None:
    A = torch.arange(6, dtype=torch.float32).reshape((2, 3))
    with pytest.raises(RuntimeError):
        save_file({"A": A, "B": A[:1]}, tmp_path / "out.mcnc")
    with pytest.raises(RuntimeError):
        save_file({"A": A, "B": A[1:]}, tmp_path / "out.mcnc")


def test_deserialization_slice(slice_case: tuple[torch.Tensor, Path]) -> None:
    expected, local = slice_case
    with safe_open(local, framework="pt") as f:
        _slice = f.get_slice("test")
        assert _slice.get_shape() == [1, 2, 3]
        assert _slice.get_dtype() == "F32"
        tensor = _slice[:, :, 1:2]
    assert torch.equal(tensor, torch.Tensor([[[1.0], [4.0]]]))
    assert torch.equal(tensor, expected[:, :, 1:2])
    buffer = tensor.numpy()
    if sys.byteorder == "big":
        buffer.byteswap(inplace=True)
    assert buffer.tobytes() == b"\x00\x00\x80?\x00\x00\x80@"


def test_deserialization_metadata(slice_case: tuple[torch.Tensor, Path], tmp_path: Path) -> None:
    _, local = slice_case
    with safe_open(local, framework="pt") as f:
        assert f.metadata() is None
    tensor = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))
    local2 = tmp_path / "out_safe_pt_mmap2.mcnc"
    save_file({"test": tensor}, local2, metadata={"Something": "more"})
    with safe_open(local2, framework="pt") as f:
        assert f.metadata() == {"Something": "more"}


# -- test_simple.py ------------------------------------------------------------------------
def test_error_module_is_importable() -> None:
    importlib.import_module(MCNCError.__module__)


def test_accept_path(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros((2, 2)), "b": torch.zeros((2, 3), dtype=torch.uint8)}
    filename = tmp_path / f"out_{threading.get_ident()}.mcnc"
    save_file(tensors, Path(filename))
    load_file(Path(filename))
    os.remove(Path(filename))


def test_save_model_overlapping_storage() -> None:
    m = torch.randn(10)
    n = torch.empty([], dtype=m.dtype, device=m.device)
    element_size = torch.finfo(m.dtype).bits // 8
    n.set_(source=m.untyped_storage()[: 4 * element_size])
    assert storage_ptr(n) == storage_ptr(m)
    assert storage_size(n) != storage_size(m)
    assert storage_size(n) == 4 * element_size
    assert storage_size(m) == 10 * element_size
    assert S.find_shared_tensors({"m": m, "n": n}) == [{"m"}, {"n"}]


def test_get_correctly_dropped(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros((2, 2)), "b": torch.zeros((2, 3), dtype=torch.uint8)}
    path = tmp_path / "out_windows.mcnc"
    save_file(tensors, path)
    with safe_open(path, framework="pt") as f:
        pass
    with pytest.raises(MCNCError):
        f.keys()
    path.write_text("something")


def test_file_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as ctx, safe_open("notafile", framework="pt"):
        pass
    assert str(ctx.value) == "No such file or directory: notafile"


def _assert_tensors_equal(tensors1: dict, tensors2: dict, equality_fn) -> None:
    assert tensors1.keys() == tensors2.keys(), "tensor keys don't match"
    for k, v1 in tensors1.items():
        assert equality_fn(v1, tensors2[k]), f"{k} tensors are different"


def test_torch_example(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn((2, 2)),
        "b": torch.randint(0, 128, (2, 3), dtype=torch.uint8),
    }
    tensors2 = tensors.copy()
    filename = tmp_path / f"out_pt_{threading.get_ident()}.mcnc"
    save_file(tensors, filename)
    loaded = load_file(filename)
    _assert_tensors_equal(tensors2, loaded, torch.allclose)
    del loaded
    save_file(tensors, filename)
    loaded = load_file(filename)
    _assert_tensors_equal(tensors2, loaded, torch.allclose)


def test_torch_slice(tmp_path: Path) -> None:
    A = torch.randn((10, 5))
    filename = tmp_path / f"slice_{threading.get_ident()}.mcnc"
    save_file({"a": A}, filename)
    with safe_open(filename, framework="pt", device="cpu") as f:
        slice_ = f.get_slice("a")
        for index, shape in [(slice(None), [10, 5]), ((), [10, 5]), (slice(None, 2), [2, 5]),
                             ((slice(None), slice(None, 2)), [10, 2]),
                             ((0, slice(None, 2)), [2]), ((slice(2, None), 0), [8]),
                             ((slice(2, None), 1), [8]), ((slice(2, None), -1), [8])]:
            tensor = slice_[index]
            assert list(tensor.shape) == shape
            torch.testing.assert_close(tensor, A[index])
        tensor = slice_[[]]
        assert list(tensor.shape) == [0, 5]
        torch.testing.assert_close(tensor, A[[]])


# -- test_simple.py: the numpy module and framework="np" -----------------------------------
def test_serialization_order_invariant() -> None:
    data = np.zeros((2, 2), dtype=np.int32)
    assert mcnc_np.save({"test1": data, "test2": data}) == mcnc_np.save(
        {"test2": data, "test1": data})


def test_serialization_forces_alignment() -> None:
    data = np.zeros((2, 2), dtype=np.int32)
    data2 = np.zeros((2, 2), dtype=np.float16)
    assert mcnc_np.save({"test1": data, "test2": data2}) == mcnc_np.save(
        {"test2": data2, "test1": data})


def _save_and_load_numpy(tensors: dict[str, np.ndarray], path: Path) -> None:
    """The peer's ReadmeTestCase numpy body: save_file and save, then load_file and load
    give the arrays back."""
    mcnc_np.save_file(tensors, path)
    out = mcnc_np.save(tensors)
    _assert_tensors_equal(tensors, mcnc_np.load_file(path), np.allclose)
    _assert_tensors_equal(tensors, mcnc_np.load(out), np.allclose)


def test_numpy_example(tmp_path: Path) -> None:
    _save_and_load_numpy({"a": np.zeros((2, 2)), "b": np.zeros((2, 3), dtype=np.uint8)},
                         tmp_path / "out_np.mcnc")


def test_numpy_bool(tmp_path: Path) -> None:
    _save_and_load_numpy({"a": np.asarray(False)}, tmp_path / "out_bool.mcnc")


def test_numpy_slice(tmp_path: Path) -> None:
    A = np.random.rand(10, 5)
    filename = tmp_path / f"slice_{threading.get_ident()}.mcnc"
    mcnc_np.save_file({"a": A}, filename)
    with safe_open(filename, framework="np", device="cpu") as f:
        slice_ = f.get_slice("a")
        for index, shape in [(slice(None), [10, 5]), ((), [10, 5]), (slice(None, 2), [2, 5]),
                             ((slice(None), slice(None, 2)), [10, 2]),
                             ((0, slice(None, 2)), [2]), ((slice(2, None), 0), [8]),
                             ((slice(2, None), 1), [8]), ((slice(2, None), -1), [8]),
                             ((slice(2, None), -5), [8]), ([], [0, 5])]:
            tensor = slice_[index]
            assert list(tensor.shape) == shape
            assert np.allclose(tensor, A[index])
        for index, message in [
            ((slice(2, None), -6), "Invalid index -6 for dimension 1 of size 5"),
            ([0, 1], "Non empty lists are not implemented"),
            ((slice(2, None), 20), "Error during slicing [2:, 20] with shape [10, 5]: index 20 "
             "out of bounds for tensor dimension #1 of size 5"),
            (slice(None, 20), "Error during slicing [:20] with shape [10, 5]: index 19 out of "
             "bounds for tensor dimension #0 of size 10"),
            ((slice(None), slice(None, 20)), "Error during slicing [:, :20] with shape [10, 5]: "
             "index 19 out of bounds for tensor dimension #1 of size 5"),
        ]:
            with pytest.raises(MCNCError) as ctx:
                slice_[index]
            assert str(ctx.value) == message


# -- test_pt_model.py ----------------------------------------------------------------------
class OnesModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.a.weight = torch.nn.Parameter(torch.ones((4, 4)))
        self.a.bias = torch.nn.Parameter(torch.ones((4,)))
        self.b = self.a


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(100, 100)
        self.b = self.a


class NonContiguousModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(100, 100)
        self.a.weight = torch.nn.Parameter(torch.zeros((100, 100)).transpose(0, 1))


class CopyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(100, 100)
        self.b = copy.deepcopy(self.a)


class NoSharedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(100, 100)
        self.b = torch.nn.Linear(100, 100)


def test_is_complete() -> None:
    A = torch.zeros((3, 3))
    assert S.is_complete(A)
    assert not S.is_complete(A[:1, :])
    assert not S.is_complete(A[::2, :])
    assert S.is_complete(torch.zeros((2, 2), device=torch.device("meta")))


def test_find_shared_tensors() -> None:
    A = torch.zeros((3, 3))
    B = A[:1, :]
    assert S.find_shared_tensors({"A": A, "B": B}) == [{"A", "B"}]
    assert S.find_shared_tensors({"A": A}) == [{"A"}]
    assert S.find_shared_tensors({"B": B}) == [{"B"}]
    C = torch.zeros((2, 2), device=torch.device("meta"))
    D = C[:1]
    assert S.find_shared_tensors({"C": C, "D": D}) == []
    assert S.find_shared_tensors({"C": C}) == []
    assert S.find_shared_tensors({"D": D}) == []


def test_find_shared_non_shared_tensors() -> None:
    A = torch.zeros((4,))
    assert S.find_shared_tensors({"B": A[:2], "C": A[2:]}) == [{"B"}, {"C"}]
    assert S.find_shared_tensors({"B": A[:2], "C": A[1:]}) == [{"B", "C"}]
    assert S.find_shared_tensors({"B": A[:2], "C": A[2:], "D": A[:1]}) == [{"B", "D"}, {"C"}]


def test_end_ptr() -> None:
    A = torch.zeros((4,))
    assert S.end_ptr(A) - A.data_ptr() == 16
    A = torch.zeros((16,))[::4]
    assert S.end_ptr(A) - A.data_ptr() == 16 * 3 + 4
    A = torch.zeros((4,), dtype=torch.float16)
    assert S.end_ptr(A) - A.data_ptr() == 8
    A = torch.zeros((16,), dtype=torch.float16)[::4]
    assert S.end_ptr(A) - A.data_ptr() == 8 * 3 + 2


def test_remove_duplicate_names() -> None:
    A = torch.zeros((3, 3))
    B = A[:1, :]
    assert S.remove_duplicate_names({"A": A, "B": B}) == {"A": ["B"]}
    assert S.remove_duplicate_names({"A": A, "B": B, "C": A}) == {"A": ["B", "C"]}
    with pytest.raises(RuntimeError):
        S.remove_duplicate_names({"B": B})


def test_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        save_file(Model().state_dict(), tmp_path / "tmp.mcnc")


def _assert_loads_back(model: torch.nn.Module, path: Path) -> None:
    """load_model of ``path`` into a fresh model of the same class gives ``model``'s state."""
    model2 = type(model)()
    load_model(model2, path)
    state_dict = model.state_dict()
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, state_dict[k])


def _save_tied_model_and_reload(model_class: type[torch.nn.Module], path: Path) -> None:
    """save_model keeps one name per tie and records the other; load_model ties it back."""
    model = model_class()
    save_model(model, path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"b.bias": "a.bias", "b.weight": "a.weight"}
    _assert_loads_back(model, path)


def test_save(tmp_path: Path) -> None:
    _save_tied_model_and_reload(OnesModel, tmp_path / "tmp_ones.mcnc")


def test_workaround(tmp_path: Path) -> None:
    _save_tied_model_and_reload(Model, tmp_path / "tmp.mcnc")


def test_workaround_different_on_file_names(tmp_path: Path) -> None:
    model = Model()
    state_dict = model.state_dict()
    state_dict.pop("a.weight")
    state_dict.pop("a.bias")
    save_file(state_dict, tmp_path / "tmp.mcnc")
    _assert_loads_back(model, tmp_path / "tmp.mcnc")


def test_workaround_non_contiguous(tmp_path: Path) -> None:
    model = NonContiguousModel()
    with pytest.raises(ValueError) as ctx:
        save_model(model, tmp_path / "tmp_c.mcnc", force_contiguous=False)
    assert "use save_model(..., force_contiguous=True)" in str(ctx.value)
    save_model(model, tmp_path / "tmp_c.mcnc", force_contiguous=True)
    _assert_loads_back(model, tmp_path / "tmp_c.mcnc")


def test_workaround_copy(tmp_path: Path) -> None:
    model = CopyModel()
    assert S.find_shared_tensors(model.state_dict()) == [
        {"a.weight"}, {"a.bias"}, {"b.weight"}, {"b.bias"}]
    save_model(model, tmp_path / "tmp.mcnc")
    _assert_loads_back(model, tmp_path / "tmp.mcnc")


def test_difference_with_torch(tmp_path: Path) -> None:
    model = Model()
    torch.save(model.state_dict(), tmp_path / "tmp2.bin")
    model2 = NoSharedModel()
    assert S.find_shared_tensors(model2.state_dict()) == [
        {"a.weight"}, {"a.bias"}, {"b.weight"}, {"b.bias"}]
    model2.load_state_dict(torch.load(tmp_path / "tmp2.bin"))
    assert S.find_shared_tensors(model2.state_dict()) == [
        {"a.weight"}, {"a.bias"}, {"b.weight"}, {"b.bias"}]
    save_model(model, tmp_path / "tmp2.mcnc")
    with pytest.raises(RuntimeError) as ctx:
        load_model(model2, tmp_path / "tmp2.mcnc")
    assert 'Missing key(s) in state_dict: "b.bias", "b.weight"' in str(ctx.value)


def test_difference_torch_odd(tmp_path: Path) -> None:
    model = NoSharedModel()
    assert model.a.weight.data_ptr() != model.b.weight.data_ptr()
    torch.save(model.state_dict(), tmp_path / "tmp3.bin")
    model2 = Model()
    assert S.find_shared_tensors(model2.state_dict()) == [
        {"a.weight", "b.weight"}, {"b.bias", "a.bias"}]
    model2.load_state_dict(torch.load(tmp_path / "tmp3.bin"))
    assert not torch.allclose(model2.a.weight, model.a.weight)
    torch.testing.assert_close(model2.a.weight, model.b.weight)
    assert S.find_shared_tensors(model2.state_dict()) == [
        {"a.weight", "b.weight"}, {"b.bias", "a.bias"}]
    save_model(model, tmp_path / "tmp3.mcnc")
    with pytest.raises(RuntimeError) as ctx:
        load_model(model2, tmp_path / "tmp3.mcnc")
    assert 'Unexpected key(s) in state_dict: "b.bias", "b.weight"' in str(ctx.value)


# -- test_multithreaded.py -----------------------------------------------------------------
def _roundtrip_in_threads(tmp_path: Path, tensors: dict[str, Any], save_fn: Callable[..., None],
                          load_fn: Callable[[Path], dict[str, Any]],
                          all_equal: Callable[[Any], Any]) -> None:
    """Four threads, started together with a tiny switch interval, each save and load
    ``tensors`` ten times: every load gives back what was saved."""
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def save_worker(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(10):
                path = tmp_path / f"test_{worker}_{i}.mcnc"
                save_fn(tensors, path)
                loaded = load_fn(path)
                for name, tensor in tensors.items():
                    assert all_equal(loaded[name] == tensor)
                path.unlink()
        except BaseException as exc:  # reported in the main thread
            failures.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.000001)
    try:
        threads = [threading.Thread(target=save_worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
        barrier.abort()
    assert not failures, failures


def test_multithreaded_roundtripping_numpy(tmp_path: Path) -> None:
    tensors = {
        "1": np.random.randn(5, 25),
        "2": np.random.randn(876, 768, 2),
        "3": np.ones(5000),
        "4": np.array(5000.0),
        "5": np.array(768, dtype=np.int32),
    }
    _roundtrip_in_threads(tmp_path, tensors, mcnc_np.save_file, mcnc_np.load_file, np.all)


def test_multithreaded_roundtripping_torch(tmp_path: Path) -> None:
    tensors = {
        "1": torch.randn(5, 25),
        "2": torch.randn(876, 768, 2),
        "3": torch.ones(5000),
        "4": torch.tensor(5000.0),
        "5": torch.tensor(768, dtype=torch.int32),
    }
    _roundtrip_in_threads(tmp_path, tensors, save_file, load_file, torch.all)


# -- beyond the peer: what the drop-in adds for .mcnc files ---------------------------------
VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def test_every_encoding_comes_back_as_tensors() -> None:
    """load_file and safe_open give the core reader's tensors for every valid vector."""
    valid = json.loads((VECTORS / "index.json").read_text())["valid"]
    for vector in valid:
        if vector["unsupported"]:
            continue  # load_file loads every tensor; the core names the unknown one
        path = VECTORS / vector["file"]
        names = mf.open(path).keys()
        want = mf.load(path, names=names)
        got = load_file(path)
        assert list(got) == names
        for name in names:
            assert torch.equal(got[name].view(-1), want[name].view(-1)) or (
                got[name].isnan().any() and torch.equal(got[name].nan_to_num(0),
                                                        want[name].nan_to_num(0))), name
        with safe_open(path, framework="pt") as f:
            assert f.keys() == sorted(names) and f.offset_keys() == names
            for name in names:
                part = f.get_slice(name)
                assert part.get_dtype() == mf.open(path).entry(name).dtype.upper()
                assert part.get_shape() == list(want[name].shape)


def test_slices_index_as_torch_does(tmp_path: Path) -> None:
    A = torch.randn(7, 6, 5)
    save_file({"a": A}, tmp_path / "a.mcnc")
    with safe_open(tmp_path / "a.mcnc", framework="pt") as f:
        part = f.get_slice("a")
        for index in [(slice(1, None, 2),), (slice(None), slice(None, None, 4), 2),
                      (..., slice(0, 5, 3)), (np.int64(3), torch.tensor(1)), (-1, ..., -2),
                      [], (slice(-100, 100, 3),), torch.tensor([0, 2]), [1, 3], (None, 0),
                      A[:, 0, 0] > 0]:
            assert torch.equal(part[index], A[index]), index
        for index, error in [((7,), IndexError), ((0, 0, 0, 0), IndexError),
                             ((slice(None, None, -1),), ValueError)]:
            with pytest.raises(error):
                part[index]
            with pytest.raises(error):
                A[index]


def test_save_file_is_independent_of_dict_order(tmp_path: Path) -> None:
    a, b = torch.randn(300, 300), torch.randn(3)
    assert save({"b": b, "a": a}) == save({"a": a, "b": b})
    save_file({"b": b, "a": a}, tmp_path / "x.mcnc")
    with safe_open(tmp_path / "x.mcnc", framework="pt") as f:
        assert f.offset_keys() == ["a", "b"]


def test_a_reparametrized_model_is_saved_compressed(tmp_path: Path) -> None:
    torch.manual_seed(0)

    def build() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 8))

    model = reparametrize(build(), MCNCConfig(k=4, d=128, hidden=(16, 16), seed=7))
    save_model(model, tmp_path / "m.mcnc", metadata={"arch": "mlp"})
    with mf.open(tmp_path / "m.mcnc") as f:
        assert "mcnc" in {f.tensor_info(n).encoding for n in f.keys()}  # noqa: SIM118
        assert f.metadata == {"arch": "mlp"}
    plain = build()
    missing, unexpected = load_model(plain, tmp_path / "m.mcnc")
    assert missing == set() and unexpected == []
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


def test_safetensors_files_still_load(tmp_path: Path) -> None:
    """After the switch, existing .safetensors checkpoints are read by safetensors itself."""
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    safetensors.torch.save_file(tensors, tmp_path / "old.safetensors")
    loaded = load_file(tmp_path / "old.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert torch.equal(load(safetensors.torch.save(tensors))["w"], tensors["w"])
    with safe_open(tmp_path / "old.safetensors", framework="pt") as f:
        assert f.get_slice("w")[1:, ::2].shape == (2, 2)


class TiedHeadModel(torch.nn.Module):
    """An embedding tied to the output layer (as language models tie them)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.mid = torch.nn.Linear(16, 300)
        self.out = torch.nn.Linear(300, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight


def test_ties_left_dense_in_a_reparametrized_model_are_stored_once(tmp_path: Path) -> None:
    """The tie is not compressed (excluded), so the export holds it as a plain tensor under
    two names: both save_models store it once and both loaders tie it back."""
    torch.manual_seed(0)
    config = MCNCConfig(k=4, d=128, hidden=(8, 8), seed=1, exclude=("emb.weight", "head.weight"))
    model = reparametrize(TiedHeadModel(), config)
    tokens = torch.randint(0, 50, (4,))
    with torch.no_grad():
        want = model.head(model.out(model.mid(model.emb(tokens))))
    for path in (mf.save_model(model, tmp_path / "core.mcnc"), tmp_path / "dropin.mcnc"):
        if path.name == "dropin.mcnc":
            save_model(model, path)
        with mf.open(path) as f:
            assert "emb.weight" in f and "head.weight" not in f
        for load_into_plain in (lambda m, p: load_model(m, p), mf.load_into):
            plain = TiedHeadModel()
            load_into_plain(plain, path)
            assert plain.head.weight is plain.emb.weight
            with torch.no_grad():
                got = plain.head(plain.out(plain.mid(plain.emb(tokens))))
            torch.testing.assert_close(got, want)


def test_a_default_device_does_not_move_loads() -> None:
    """The peer's CUDA default-device tests, checked on any machine with the meta device as
    the caller's default: every encoding still loads to the CPU, with the right values."""
    valid = json.loads((VECTORS / "index.json").read_text())["valid"]
    for vector in valid:
        if vector["unsupported"]:
            continue
        path = VECTORS / vector["file"]
        want = load_file(path)
        try:
            with torch.device("meta"):
                got = load_file(path)
                with safe_open(path, framework="pt") as f:
                    parts = {name: f.get_slice(name)[...] for name in f.keys()}  # noqa: SIM118
            torch.set_default_device("meta")
            core = mf.load(path)
        finally:
            torch.set_default_device(None)
        for name, tensor in want.items():
            for value in (got[name], parts[name], core[name]):
                assert value.device.type == "cpu", name
                assert torch.equal(value.nan_to_num(0), tensor.nan_to_num(0)), name


# -- beyond the peer: the numpy path ------------------------------------------------------
def _bits(value: Any) -> tuple[list[int], bytes]:
    """Shape and raw bytes of a tensor or an array (bf16 and NaNs compared bit for bit)."""
    if isinstance(value, torch.Tensor):
        flat = value.contiguous().reshape(-1)
        return list(value.shape), flat.view(torch.uint8).numpy().tobytes()
    return list(value.shape), np.ascontiguousarray(value).tobytes()


def _outcome(part: Any, index: Any) -> tuple[str, Any]:
    """``part[index]``'s bits, or its error's kind and text."""
    try:
        return "value", _bits(part[index])
    except MCNCError as exc:  # ours: SafetensorError is MCNCError
        return "SafetensorError", str(exc)
    except safetensors.SafetensorError as exc:
        return "SafetensorError", str(exc)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


def test_numpy_slices_index_as_safetensors_does(tmp_path: Path) -> None:
    """framework="np" slicing against safetensors' own on the same arrays: the same values,
    or the same error with the same text (negative and reversed slice bounds are numpy's
    beyond safetensors, which raises OverflowError and SystemError for them)."""
    arrays = {"f": np.random.rand(10, 5, 3).astype(np.float32), "z": np.asarray(3.0),
              "e": np.zeros((0, 4), dtype=np.int16)}
    safetensors.numpy.save_file(arrays, tmp_path / "peer.safetensors")
    mcnc_np.save_file(arrays, tmp_path / "ours.mcnc")
    indices = {
        "f": [slice(None), (), slice(1, 8, 3), slice(None, None, 20), (Ellipsis, 0),
              (0, Ellipsis, 1), (slice(np.int64(1), np.int64(3)),), torch.tensor(1),
              np.array(1), -10, [], slice(5, 5), (slice(2, None), -6), [0, 1], None, "a",
              (Ellipsis, Ellipsis), slice(None, None, -1), slice(None, None, 0), -11,
              slice(None, 20), (Ellipsis, 20), slice(None, 20, 2), (-1, 20), (20, 20),
              (20, -9), (slice(3, None, 2), Ellipsis, 7), (slice(None), 1, 2, 3), ([], 20),
              (0, []), 10, slice(10, None), slice(1.5, None)],
        "z": [(), Ellipsis, 0, slice(None), []],
        "e": [(), slice(None), [], 0],
    }
    with safetensors.safe_open(tmp_path / "peer.safetensors", framework="np") as peer, \
            safe_open(tmp_path / "ours.mcnc", framework="numpy") as ours:
        for name, cases in indices.items():
            theirs, mine = peer.get_slice(name), ours.get_slice(name)
            assert (mine.get_shape(), mine.get_dtype()) == (theirs.get_shape(),
                                                            theirs.get_dtype())
            for index in cases:
                assert _outcome(mine, index) == _outcome(theirs, index), (name, index)
        part = ours.get_slice("f")
        for index in [slice(-3, None), (slice(-4, -1), slice(None, -2)), slice(8, 3)]:
            assert np.array_equal(part[index], arrays["f"][index]), index
        with pytest.raises(MCNCError, match="Invalid index -12 for dimension 0 of size 10"):
            part[-12:]


def test_numpy_arrays_are_stored_as_their_values(tmp_path: Path) -> None:
    """Arrays the file cannot take as they lie in memory are stored as their values:
    big-endian ones, transposed and strided views, one array under two names, overlapping
    views, 0-d and empty arrays; each comes back as a native, C-ordered array."""
    base = np.random.rand(6, 8)
    arrays = {
        "big_endian": np.random.randint(-1000, 1000, (3, 4)).astype(">i4"),
        "big_endian_f64": base.astype(">f8"),
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "same": base, "same_again": base,
        "head": base[:4], "tail": base[2:],
        "half": np.random.rand(5).astype(np.float16),
        "bytes": np.random.randint(0, 255, (7,), dtype=np.uint8),
        "mask": np.random.rand(4, 4) > 0.5,
        "scalar": np.asarray(np.float32(2.5)),
        "empty": np.zeros((0, 3), dtype=np.int64),
    }
    loaded = mcnc_np.load(mcnc_np.save(arrays))
    assert list(loaded) == sorted(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype.newbyteorder("="), name
        assert loaded[name].dtype.isnative and loaded[name].flags.c_contiguous, name
        assert np.array_equal(loaded[name], array), name
    # safetensors itself stores the big-endian arrays little-endian too: the same values
    peer = safetensors.numpy.load(safetensors.numpy.save({"a": arrays["big_endian"]}))
    assert np.array_equal(peer["a"], loaded["big_endian"])
    assert peer["a"].dtype == loaded["big_endian"].dtype


def test_numpy_refusals(tmp_path: Path) -> None:
    """What the numpy path refuses, with safetensors' error types and texts where it has
    them (a device other than the CPU, for an .mcnc file as for a safetensors one)."""
    with pytest.raises(ValueError, match=r"Expected a dict of \[str, np.ndarray\]"):
        mcnc_np.save_file([np.zeros(2)], tmp_path / "x.mcnc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("Key `t` is invalid, expected np.ndarray "
                                                   "but received <class 'torch.Tensor'>")):
        mcnc_np.save({"t": torch.zeros(2)})  # type: ignore[dict-item]
    for dtype in (np.complex64, np.uint32, np.str_):
        with pytest.raises(MCNCError, match="cannot be stored"):
            mcnc_np.save({"c": np.zeros(2, dtype=dtype)})
    mcnc_np.save_file({"a": np.zeros(2)}, tmp_path / "x.mcnc")
    safetensors.numpy.save_file({"a": np.zeros(2)}, tmp_path / "x.safetensors")
    for path in (tmp_path / "x.mcnc", tmp_path / "x.safetensors"):
        with pytest.raises((MCNCError, safetensors.SafetensorError),
                           match="Device cuda:0 is not supported for framework numpy"):
            safe_open(path, framework="np", device="cuda:0")
    with pytest.raises(MCNCError, match="framework='np'"):
        safe_open(tmp_path / "x.mcnc", framework="tf")


def test_bf16_without_ml_dtypes_is_a_type_error_as_in_safetensors(tmp_path: Path) -> None:
    """numpy has no bfloat16 of its own: reading a bf16 tensor as an array raises a
    TypeError where safetensors raises one, in a process that has not imported ml_dtypes."""
    tensors = {"b": torch.randn(3, 4, dtype=torch.bfloat16), "f": torch.randn(2)}
    save_file(tensors, tmp_path / "x.mcnc")
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors")
    script = textwrap.dedent(f"""
        import sys
        import safetensors, safetensors.numpy
        import mcnc_format.safetensors as ours, mcnc_format.safetensors.numpy as ours_np
        assert "ml_dtypes" not in sys.modules
        folder = {str(tmp_path)!r}
        for opener, load, path in ((safetensors.safe_open, safetensors.numpy.load_file,
                                    folder + "/x.safetensors"),
                                   (ours.safe_open, ours_np.load_file, folder + "/x.mcnc")):
            with opener(path, framework="np") as f:
                assert f.get_slice("b").get_dtype() == "BF16"
                assert f.get_tensor("f").shape == (2,)
                for get in (lambda: f.get_tensor("b"), lambda: f.get_slice("b")[:1],
                            lambda: load(path)):
                    try:
                        get()
                    except TypeError as exc:
                        print(type(exc).__name__)
                    else:
                        raise SystemExit("no TypeError")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["TypeError"] * 3 + [NumpyDtypeError.__name__] * 3


def test_bf16_with_ml_dtypes_round_trips(tmp_path: Path) -> None:
    """With ml_dtypes imported, bf16 arrays save and load bit for bit, and read as
    safetensors' numpy path reads them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    array = np.random.randn(4, 6).astype(ml_dtypes.bfloat16)
    mcnc_np.save_file({"b": array}, tmp_path / "x.mcnc")
    safetensors.numpy.save_file({"b": array}, tmp_path / "x.safetensors")
    loaded = mcnc_np.load_file(tmp_path / "x.mcnc")["b"]
    assert loaded.dtype == array.dtype and _bits(loaded) == _bits(array)
    torch_view = load_file(tmp_path / "x.mcnc")["b"]
    assert torch_view.dtype == torch.bfloat16 and _bits(torch_view) == _bits(array)
    with safetensors.safe_open(tmp_path / "x.safetensors", framework="np") as peer, \
            safe_open(tmp_path / "x.mcnc", framework="np") as ours:
        assert _bits(ours.get_slice("b")[1:3, ::2]) == _bits(peer.get_slice("b")[1:3, ::2])


def test_every_encoding_comes_back_as_numpy_arrays() -> None:
    """The numpy module and framework="np" give the torch path's values, bit for bit, for
    every valid vector (bf16 ones as ml_dtypes' bfloat16)."""
    pytest.importorskip("ml_dtypes")
    valid = json.loads((VECTORS / "index.json").read_text())["valid"]
    for vector in valid:
        if vector["unsupported"]:
            continue
        path = VECTORS / vector["file"]
        want = load_file(path)
        got = mcnc_np.load_file(path)
        assert list(got) == list(want)
        with safe_open(path, framework="np") as f:
            for name, tensor in want.items():
                assert isinstance(got[name], np.ndarray)
                for value in (got[name], f.get_tensor(name), f.get_slice(name)[()]):
                    assert _bits(value) == _bits(tensor), (vector["file"], name)
                if tensor.ndim and tensor.shape[0] > 1:  # [1:] must lie inside dimension 0
                    assert _bits(f.get_slice(name)[1:]) == _bits(tensor[1:]), name


def test_numpy_reads_safetensors_files(tmp_path: Path) -> None:
    """After the switch, existing .safetensors files are read by safetensors.numpy."""
    arrays = {"w": np.random.rand(3, 4), "b": np.arange(5)}
    safetensors.numpy.save_file(arrays, tmp_path / "old.safetensors")
    for loaded in (mcnc_np.load_file(tmp_path / "old.safetensors"),
                   mcnc_np.load(safetensors.numpy.save(arrays))):
        assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    with safe_open(tmp_path / "old.safetensors", framework="np") as f:
        assert np.array_equal(f.get_slice("w")[1:, ::2], arrays["w"][1:, ::2])


def test_device_none_is_the_cpu_as_in_safetensors(tmp_path: Path) -> None:
    """safetensors reads ``device=None`` as the CPU (``load_file`` and ``safe_open``, both
    frameworks); the drop-in refused it ("None is not a device name")."""
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors")
    save_file(tensors, tmp_path / "x.mcnc")
    for path in (tmp_path / "x.safetensors", tmp_path / "x.mcnc"):
        loaded = load_file(path, device=None)  # type: ignore[arg-type]
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items()), path
        with safe_open(path, framework="pt", device=None) as f:  # type: ignore[arg-type]
            assert f.get_tensor("w").device.type == "cpu"
            assert torch.equal(f.get_slice("w")[1:], tensors["w"][1:])
        with safe_open(path, framework="np", device=None) as f:  # type: ignore[arg-type]
            assert np.array_equal(f.get_tensor("b"), tensors["b"].numpy())
        assert np.array_equal(mcnc_np.load_file(path)["w"], tensors["w"].numpy())
