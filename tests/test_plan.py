"""The planner on its own: a header built in memory, no file, no I/O.

``plan_load`` is pure: a header, the requested boxes and dtypes, a workspace size and what the
backend's kernels take (data) give the steps. These tests pin its contract: every requested
element is covered exactly once, chunks shared by neighbouring tensors are regenerated once,
batches fit the workspace in whole row tiles, a box touches only the chunks it needs, lora
boxes plan their factors' boxes, and kernel capabilities change batch sizing only.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from mcnc_format.engine.backend import KernelCapabilities
from mcnc_format.engine.box import Box
from mcnc_format.engine.fused import ROW_TILE
from mcnc_format.engine.plan import (
    BatchStep,
    DenseStep,
    EmptyStep,
    MergeStep,
    TensorRequest,
    batch_rows,
    plan_load,
)
from mcnc_format.header import Header

D = 16


def _blob(shape: list[int], dtype: str = "f32") -> dict[str, Any]:
    size = {"f32": 4, "u8": 1}[dtype]
    return {"codec": "raw", "dtype": dtype, "length": math.prod(shape) * size, "offset": 0,
            "shape": shape, "xxh3": 0}


def _header(shapes: list[tuple[int, ...]], lora: bool = False) -> Header:
    """One segment of generator d=16 holding ``shapes`` in order (plus a dense tensor and,
    with ``lora``, a lora tensor whose factors are members of a second segment)."""
    values = sum(math.prod(s) for s in shapes)
    chunks = -(-values // D)
    tensors: list[dict[str, Any]] = [
        {"dtype": "f32", "encoding": "mcnc", "name": f"t{i}", "segment": 0, "shape": list(s),
         "theta0": {"kind": "prng", "scheme": "uniform", "seed": 1, "stream": i,
                    "bound": 0.1}}
        for i, s in enumerate(shapes)]
    blobs = [_blob([chunks, 1, 2]), _blob([chunks, 1]), _blob([12], "u8")]
    tensors.append({"blob": 2, "dtype": "f32", "encoding": "packed", "name": "dense",
                    "shape": [3]})
    segments = [{"alpha": 0, "beta": 1, "chunks": chunks, "generator": 0, "m": 1}]
    if lora:
        rank, out_f, in_f = 2, 12, 20
        lchunks = -(-(rank * in_f + out_f * rank) // D)
        blobs += [_blob([lchunks, 1, 2]), _blob([lchunks, 1])]
        segments.append({"alpha": 3, "beta": 4, "chunks": lchunks, "generator": 0, "m": 1})
        tensors.append({"dtype": "f32", "encoding": "lora", "name": "lora",
                        "shape": [out_f, in_f], "scale": 2.0, "theta0": {"kind": "zeros"},
                        "A": {"shape": [rank, in_f], "dtype": "f32", "segment": 1,
                              "theta0": {"kind": "zeros"}},
                        "B": {"shape": [out_f, rank], "dtype": "f32", "segment": 1,
                              "theta0": {"kind": "zeros"}}})
    value = {"alignment": 64, "blobs": blobs, "metadata": {}, "segments": segments,
             "generators": [{"L": 20.0, "activation": "sin", "bias": True, "d": D,
                             "hidden": [4], "k": 2, "normalize": True, "omega0": 1.0,
                             "weights": {"kind": "philox", "seed": 1}}],
             "tensors": tensors}
    return Header.parse(value, "in-memory", 1)


def _requests(header: Header, boxes: dict[str, Box] | None = None) -> list[TensorRequest]:
    boxes = boxes or {}
    return [TensorRequest(t, boxes.get(t.name, Box.full(t.shape)), torch.float32)
            for t in header.tensors]


def _coverage(plan_steps: list[Any]) -> dict[str, list[int]]:
    """How many times each output element of each target is written by a batch."""
    seen: dict[str, list[int]] = {}
    for step in plan_steps:
        if isinstance(step, BatchStep):
            for piece in step.pieces:
                counts = seen.setdefault(piece.target.name, [0] * piece.target.numel)
                for i in range(piece.lo, piece.hi):
                    counts[i] += 1
    return seen


@pytest.mark.parametrize("seed", [random.randrange(1 << 30) for _ in range(4)])
def test_every_element_is_covered_once_and_shared_chunks_rebuilt_once(seed: int) -> None:
    rng = random.Random(seed)
    shapes = [(rng.randint(1, 9), rng.randint(1, 13)) for _ in range(rng.randint(1, 5))]
    header = _header(shapes)
    plan = plan_load(header, _requests(header), workspace_bytes=1 << 20)
    coverage = _coverage(plan.steps)
    for i, shape in enumerate(shapes):
        assert coverage[f"t{i}"] == [1] * math.prod(shape)
    chunks = [c for s in plan.steps if isinstance(s, BatchStep) for c in range(s.first, s.stop)]
    assert sorted(chunks) == list(range(header.segments[0].chunks))  # each chunk once
    assert plan.chunks == header.segments[0].chunks
    assert [type(s) for s in plan.steps].count(DenseStep) == 1
    assert {t.name for t in plan.outputs} == {t.name for t in header.tensors}
    completed = [t.name for s in plan.steps for t in s.completes]
    assert sorted(completed) == sorted(t.name for t in header.tensors)


def test_batches_are_whole_row_tiles_that_fit_the_workspace() -> None:
    header = _header([(64, 64)])
    workspace = 40_000
    plan = plan_load(header, _requests(header), workspace)
    rows = batch_rows(header, 0, workspace, eager=True)
    batches = [s for s in plan.steps if isinstance(s, BatchStep)]
    assert len(batches) > 1 and rows % ROW_TILE == 0
    assert all(s.chunks <= rows for s in batches)
    assert all(s.chunks % ROW_TILE == 0 for s in batches[:-1])


def test_a_box_rebuilds_only_the_chunks_it_touches() -> None:
    header = _header([(32, 32)])
    box = Box((32, 32), (4, 0), (6, 32))  # rows 4-5: values 128..191, chunks 8..11
    plan = plan_load(header, _requests(header, {"t0": box})[:1], 1 << 20)
    (step,) = plan.steps
    assert isinstance(step, BatchStep) and (step.first, step.stop) == (8, 12)
    column = Box((32, 32), (0, 3), (32, 5))  # two values in each row: one chunk per row
    plan = plan_load(header, _requests(header, {"t0": column})[:1], 1 << 20)
    assert plan.chunks == 32
    assert _coverage(plan.steps)["t0"] == [1] * column.numel


def test_lora_boxes_plan_their_factor_boxes_and_a_merge() -> None:
    header = _header([(4, 4)], lora=True)
    lora = next(t for t in header.tensors if t.name == "lora")
    box = Box((12, 20), (2, 5), (7, 9))
    (request,) = [r for r in _requests(header, {"lora": box}) if r.entry is lora]
    plan = plan_load(header, [request], 1 << 20)
    merges = [s for s in plan.steps if isinstance(s, MergeStep)]
    assert len(merges) == 1 and plan.steps[-1] is merges[0]
    merge = merges[0]
    assert (merge.a.box.starts, merge.a.box.stops) == ((0, 5), (2, 9))  # A's columns
    assert (merge.b.box.starts, merge.b.box.stops) == ((2, 0), (7, 2))  # B's rows
    assert not merge.a.output and not merge.b.output and merge.target.output
    assert [t.name for t in plan.outputs] == ["lora"]


def test_empty_tensors_and_kernel_capabilities() -> None:
    header = _header([(0, 5), (80, 80)])
    workspace = 6_000
    assert batch_rows(header, 0, workspace, True) < batch_rows(header, 0, workspace, False)
    plan = plan_load(header, _requests(header), workspace)
    assert isinstance(plan.steps[0], EmptyStep)
    kernels = KernelCapabilities(frozenset({torch.float32}))
    with_kernels = plan_load(header, _requests(header), workspace, kernels)
    # The kernel writes outputs directly: no float32 [rows, d] product, so larger batches.
    assert len(with_kernels.steps) < len(plan.steps)
    assert _coverage(with_kernels.steps) == _coverage(plan.steps)
    float64 = [TensorRequest(r.entry, r.box, torch.float64) for r in _requests(header)]
    assert len(plan_load(header, float64, workspace, kernels).steps) == len(plan.steps)
