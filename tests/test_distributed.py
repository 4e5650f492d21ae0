"""Sharded loading through torch's distributed checkpointing: real gloo process groups on the
CPU, FSDP2, tensor parallel and a 2-D mesh, every rank rebuilding only its own boxes.

The gloo scenarios run in one spawn of four ranks (starting processes dominates the cost);
single-process checks (``no_dist``, the errors) run in the test process.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import dist_api  # noqa: F401 (skips this module on an older torch)
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from dist_helpers import VOCAB, TinyLM, init_gloo, leave_gloo, write_model_file
from stream_helpers import SEED
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import mcnc_format as mf
from mcnc_format import UsageError
from mcnc_format.distributed import MCNCLoadPlanner, MCNCStorageReader, ReadStats, load
from mcnc_format.engine.box import Box
from mcnc_format.engine.options import LoadOptions
from mcnc_format.header import LoRATensor, MCNCTensor

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning")  # DCP in one process says so

WORLD = 4


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("dist"), SEED)


def no_dist(state_dict: dict[str, torch.Tensor], reader: MCNCStorageReader,
            **kwargs: object) -> None:
    dcp.load(state_dict, storage_reader=reader, no_dist=True, **kwargs)


# -- what each rank may regenerate -----------------------------------------------------------
def chunk_bound(f: mf.MCNCFile, name: str, box: Box) -> int:
    """The chunks a box can touch: per run, the chunks its elements span plus one at each
    end where the run starts or stops inside a chunk; a lora box, those of its factor boxes
    (the columns of ``A``, the rows of ``B``)."""
    t = f.entry(name)
    if isinstance(t, MCNCTensor):
        return _member_bound(f, t.segment, box)
    if isinstance(t, LoRATensor):
        rank = t.A.shape[0]
        a = Box(t.A.shape, (0, box.starts[1]), (rank, box.stops[1]))
        b = Box(t.B.shape, (box.starts[0], 0), (box.stops[0], rank))
        return _member_bound(f, t.A.segment, a) + _member_bound(f, t.B.segment, b)
    return 0


def _member_bound(f: mf.MCNCFile, segment: int, box: Box) -> int:
    d = f.header.generators[f.header.segments[segment].generator].d
    return box.runs * (math.ceil(box.run_length / d) + 1)


def file_chunks(f: mf.MCNCFile) -> int:
    return sum(s.chunks for s in f.header.segments)


# -- single process -------------------------------------------------------------------------
def test_no_dist_fills_plain_and_meta_models_bit_for_bit(model_file: Path) -> None:
    want = mf.load(model_file)
    model = TinyLM()
    reader = MCNCStorageReader(model_file)
    no_dist(model.state_dict(), reader)
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert reader.stats.engine_calls == 1  # one box per tensor: one engine load
    with mf.open(model_file) as f:
        assert reader.stats.chunks_regenerated == file_chunks(f)

    with torch.device("meta"):
        meta = TinyLM()
    meta.to_empty(device="cpu")
    stats = load(meta.state_dict(), model_file, no_dist=True)
    assert isinstance(stats, ReadStats) and stats.elements == sum(t.numel() for t in want.values())
    for name, value in meta.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_cast_rebuilds_floats_in_the_state_dicts_dtype(model_file: Path) -> None:
    want = mf.load(model_file, dtype=torch.bfloat16)
    model = TinyLM().to(torch.bfloat16)
    load(model.state_dict(), model_file, cast=True, no_dist=True)
    for name, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, want[name]), name


def test_a_state_dict_that_differs_from_the_file_is_a_usage_error(model_file: Path) -> None:
    open_before = set(_descriptors_of(model_file))

    def state() -> dict[str, torch.Tensor]:
        return dict(TinyLM().state_dict())

    extra = state() | {"layers.2.up.weight": torch.zeros(40, 24)}
    with pytest.raises(UsageError, match=r"'layers\.2\.up\.weight' is not in the file") as info:
        load(extra, model_file, no_dist=True)
    assert info.value.tensor == "layers.2.up.weight" and info.value.path == str(model_file)

    fewer = state()
    del fewer["head.weight"]
    with pytest.raises(UsageError, match=r"1 tensors of the file are not in the state dict: "
                                         r"\['head.weight'\]"):
        load(fewer, model_file, no_dist=True)
    load(fewer, model_file, strict=False, no_dist=True)  # a subset, on purpose
    assert torch.equal(fewer["embed.weight"], mf.load(model_file)["embed.weight"])

    wrong_shape = state() | {"layers.0.up.weight": torch.zeros(24, 40)}
    with pytest.raises(UsageError, match=r"has shape \[40, 24\] in the file, the state dict "
                                         r"holds \[24, 40\]"):
        load(wrong_shape, model_file, no_dist=True)

    half = state() | {"layers.0.up.weight": torch.zeros(40, 24, dtype=torch.float16)}
    with pytest.raises(UsageError, match=r"torch\.float32 in the file, the state dict "
                                         r"holds torch\.float16.*cast=True"):
        load(half, model_file, no_dist=True)
    ints = state() | {"layers.0.norm.weight": torch.zeros(24, dtype=torch.int32)}
    with pytest.raises(UsageError,
                       match=r"holds torch\.int32\. Build the model in torch\.float32$"):
        load(ints, model_file, cast=True, no_dist=True)

    # With DCP's own call the reader's checks arrive wrapped, as DCP wraps every rank's error.
    with pytest.raises(CheckpointException) as wrapped:
        no_dist(half, MCNCStorageReader(model_file))
    (error, _), = wrapped.value.failures.values()
    assert isinstance(error, UsageError) and error.tensor == "layers.0.up.weight"
    with pytest.raises(CheckpointException) as wrapped:
        no_dist(extra, MCNCStorageReader(model_file), planner=MCNCLoadPlanner())
    (error, _), = wrapped.value.failures.values()
    assert isinstance(error, UsageError) and error.tensor == "layers.2.up.weight"
    # Failed in the reader, in the planner (between the reader's steps), or abandoned: no
    # descriptor of the file stays open.
    assert set(_descriptors_of(model_file)) <= open_before


def test_a_meta_model_without_a_process_group_is_told_to_get_storage(model_file: Path
                                                                     ) -> None:
    """A model built on the meta device and loaded with ``no_dist`` before ``to_empty``:
    DCP would allocate its tensors on the process group's device and fail with "Default
    process group has not been initialized" wrapped in a CheckpointException (a
    BaseException), which reads as if no_dist were ignored."""
    with torch.device("meta"):
        meta = TinyLM()
    with pytest.raises(UsageError, match=r"is on the meta device.*to_empty") as info:
        load(meta.state_dict(), model_file, no_dist=True)
    assert info.value.tensor in meta.state_dict() and info.value.path == str(model_file)
    with pytest.raises(UsageError, match="to_empty"):
        load({"model": meta.state_dict()}, model_file, strict=False, no_dist=True)
    meta.to_empty(device="cpu")
    load(meta.state_dict(), model_file, no_dist=True)
    want = mf.load(model_file)
    for name, value in meta.state_dict().items():
        assert torch.equal(value, want[name]), name


def _descriptors_of(path: Path) -> list[str]:
    """This process's open file descriptors on ``path``."""
    target = os.path.realpath(path)
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == target:
                found.append(fd.name)
    return found


def test_checkpoint_ids_and_the_core_stays_free_of_torch_distributed(model_file: Path) -> None:
    assert MCNCStorageReader.validate_checkpoint_id(model_file)
    assert MCNCStorageReader.validate_checkpoint_id("hf://org/repo/model.mcnc")
    assert not MCNCStorageReader.validate_checkpoint_id(model_file.parent)
    model = TinyLM()
    reader = MCNCStorageReader("elsewhere.mcnc")
    dcp.load(model.state_dict(), checkpoint_id=model_file, storage_reader=reader, no_dist=True)
    assert torch.equal(model.head.weight, mf.load(model_file)["head.weight"])
    code = ("import sys, mcnc_format; f = mcnc_format.open(sys.argv[1]); f.tensors(); "
            "assert 'torch.distributed.checkpoint' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code, str(model_file)], check=True,
                   env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})


# -- four gloo ranks --------------------------------------------------------------------------
def test_fsdp2_tp_and_2d_meshes_on_four_gloo_ranks(model_file: Path, tmp_path: Path) -> None:
    mp.start_processes(_rank_main, args=(str(model_file), str(tmp_path / "store")),
                       nprocs=WORLD, join=True, start_method="spawn")


def _rank_main(rank: int, path: str, store: str) -> None:
    init_gloo(rank, WORLD, store)
    try:
        want = mf.load(path)
        with mf.open(path) as f:
            _fsdp2(rank, f, want)
            _tp_by_dp(f, want)
            _errors_reach_every_rank(path)
        leave_gloo()
    finally:
        dist.destroy_process_group()


def _fsdp2(rank: int, f: mf.MCNCFile, want: dict[str, torch.Tensor]) -> None:
    """FSDP2 on four ranks, built on the meta device: DCP's own call fills it, each rank
    regenerating about a quarter of the chunks."""
    with torch.device("meta"):
        model = TinyLM()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    reader = MCNCStorageReader(f.label)
    dcp.load(model.state_dict(), storage_reader=reader)
    _assert_equal_to_whole(model, want)
    _assert_own_share(rank, f, reader.stats, model)
    assert reader.stats.engine_calls == 1


def _tp_by_dp(f: mf.MCNCFile, want: dict[str, torch.Tensor]) -> None:
    """Tensor parallel 2 x data parallel 2 on a 2-D mesh: colwise ``up``/``gate`` (rows,
    then FSDP's strided shard of the same dimension), rowwise ``down`` (column boxes)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with torch.device("meta"):
        model = TinyLM()
    for layer in model.layers:
        parallelize_module(layer, mesh["tp"], {"up": ColwiseParallel(),
                                               "gate": ColwiseParallel(),
                                               "down": RowwiseParallel()})
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    model.to_empty(device="cpu")
    stats = load(model.state_dict(), f.label)
    _assert_equal_to_whole(model, want)
    bound = sum(chunk_bound(f, name, box) for name, box in stats.boxes)
    assert stats.chunks_regenerated <= bound
    down = [box for name, box in stats.boxes if name == "layers.0.down.weight"]
    assert down and all(box.lengths[1] < box.shape[1] for box in down)  # column boxes


def _errors_reach_every_rank(path: str) -> None:
    model = TinyLM()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    state = model.state_dict()
    state["layers.1.up.bias"] = torch.zeros(41)
    with pytest.raises(UsageError, match=r"'layers\.1\.up\.bias' has shape"):
        load(state, path)


def _assert_equal_to_whole(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        assert_box_close(full, want[name], name)


def assert_box_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """The same dtype, shape and bytes: a box equals the same elements of the whole tensor."""
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
                       ), name


def _assert_own_share(rank: int, f: mf.MCNCFile, stats: ReadStats,
                      model: torch.nn.Module) -> None:
    """The engine's count stays within the boxes' chunks, the boxes are this rank's shards,
    and together they are about a quarter of the file's chunks."""
    local = {name: v.to_local().numel() for name, v in model.state_dict().items()}
    assert {name: box.numel for name, box in stats.boxes} == {
        name: n for name, n in local.items() if n}
    bound = sum(chunk_bound(f, name, box) for name, box in stats.boxes)
    assert stats.chunks_regenerated <= bound
    boundary = 2 * sum(1 for name, _ in stats.boxes if f.entry(name).encoding != "dense")
    share = math.ceil(file_chunks(f) / WORLD)
    assert stats.chunks_regenerated <= share + 2 * boundary, (rank, stats.chunks_regenerated)


# -- two gloo ranks, tensor parallel only --------------------------------------------------------
TP_WORLD = 2


def test_tensor_parallel_ranks_each_rebuild_their_own_shards(model_file: Path,
                                                            tmp_path: Path) -> None:
    """What a serving stack does: a model built on the meta device, ``parallelize_module``'d
    over two gloo ranks (embedding ``RowwiseParallel``, ``up``/``gate`` and the output layer
    ``ColwiseParallel``, ``down`` ``RowwiseParallel``), filled by DCP's own ``load`` from the
    ``.mcnc`` file. Each rank's local shard of every tensor (compressed ones of every theta0
    kind, lora, dense) equals its part of the whole tensor ``mf.load`` gives, byte for byte;
    each rank asked the engine for exactly its boxes and regenerated only their chunks; the
    sharded model computes what the whole one computes."""
    mp.start_processes(_tensor_parallel_rank, args=(str(model_file), str(tmp_path / "store")),
                       nprocs=TP_WORLD, join=True, start_method="spawn")


def _tensor_parallel_rank(rank: int, path: str, store: str) -> None:
    from torch.distributed.tensor import Replicate, distribute_tensor

    init_gloo(rank, TP_WORLD, store)
    try:
        mesh = init_device_mesh("cpu", (TP_WORLD,))
        with torch.device("meta"):
            model = TinyLM()
        parallelize_module(model, mesh, {
            "embed": RowwiseParallel(input_layouts=Replicate()),
            "layers.*.up": ColwiseParallel(), "layers.*.gate": ColwiseParallel(),
            "layers.*.down": RowwiseParallel(),
            "head": ColwiseParallel(output_layouts=Replicate())})
        model.to_empty(device="cpu")
        reader = MCNCStorageReader(path)
        dcp.load(model.state_dict(), storage_reader=reader)

        want = mf.load(path)
        sharded = {name for name, value in model.state_dict().items()
                   if isinstance(value, DTensor) and value.placements != (Replicate(),)}
        assert {"embed.weight", "head.weight", "layers.0.down.weight",
                "layers.1.gate.weight", "layers.1.up.weight"} <= sharded
        boxes = dict(reader.stats.boxes)
        assert len(boxes) == len(reader.stats.boxes)  # one box per tensor on this rank
        for name, value in model.state_dict().items():
            local = value.to_local() if isinstance(value, DTensor) else value
            placements = value.placements if isinstance(value, DTensor) else (Replicate(),)
            own = distribute_tensor(want[name], mesh, placements, src_data_rank=None)
            assert_box_close(local, own.to_local(), name)
            box = boxes[name]
            part = want[name][tuple(slice(a, b) for a, b in zip(box.starts, box.stops,
                                                                   strict=True))]
            assert_box_close(local, part, name)  # the box read is this rank's shard

        with mf.open(path) as f:
            bound = sum(chunk_bound(f, name, box) for name, box in reader.stats.boxes)
            assert reader.stats.chunks_regenerated <= bound  # only its boxes' chunks
            assert reader.stats.chunks_regenerated < file_chunks(f)  # not the whole file
        assert reader.stats.engine_calls == 1
        whole = TinyLM()
        mf.load_into(whole, path)
        tokens = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = whole(tokens)
            # The sharded ``down`` sums its halves' partial products in another order: logits
            # of magnitude ~100 then differ by a few 1e-5 (near-zero ones fail a per-element
            # bound), so the bound is relative to the logits' scale; a wrong shard is off by
            # that whole scale.
            scale = float(expected.abs().max())
            torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5 * scale)
        leave_gloo()
    finally:
        dist.destroy_process_group()


def test_a_tied_model_loads_through_dcp(tmp_path: Path) -> None:
    """``save_model`` stores a tied weight once; the state dict holds both names: the alias
    shares the storage, so it is filled through the name the file holds."""
    from transformers_helpers import llama

    from mcnc_format.torch import MCNCConfig, reparametrize, save_model

    torch.manual_seed(SEED)
    trained = reparametrize(llama(), MCNCConfig(k=4, d=32, hidden=(16, 16)))
    path = save_model(trained, tmp_path / "tied.mcnc")
    with mf.open(path) as f:
        assert "lm_head.weight" not in f
    fresh = llama()
    load(fresh.state_dict(), path, no_dist=True)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.model.embed_tokens.weight, mf.load(path)["model.embed_tokens.weight"])


def test_full_verification_hashes_each_base_once_per_load(model_file: Path,
                                                        hashes: list[str]) -> None:
    """With ``Verify.FULL`` the coordinator hashes each external base in prepare_global_plan;
    its read_data, which opens the file again, finds that verdict in the digest cache rather
    than hashing the base a second time."""
    from mcnc_format.header import ExternalTheta0

    with mf.open(model_file) as f:
        bases = {(e.uri, e.tensor) for t in f.header.tensors for e in t.theta0s()
                 if isinstance(e, ExternalTheta0)}
    assert bases
    model = TinyLM()
    load(model.state_dict(), model_file, no_dist=True,
         options=LoadOptions(verify=mf.Verify.FULL))
    assert len(hashes) == len(bases), hashes
