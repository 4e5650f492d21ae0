"""``mcnc pack PATH`` for the layouts training stacks write, each written here by the real tool:
torch.distributed.checkpoint (one process; FSDP2 shards and a tensor-parallel model from two
gloo ranks; a model with tied weights), a ``save_pretrained`` shard set, an Accelerate
``save_state`` folder and a Lightning ``.ckpt``. Each packs to the bytes ``save_model``
writes for the same model; training state is dropped and said; pickles of training state
are never unpickled; unknown folders are refused with the known layouts.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from dist_helpers import init_gloo, leave_gloo, requires_current_distributed
from layout_helpers import batch, booby_trapped_pickle, config, mlp, run_pack, trained
from safetensors.torch import load_file, save_file
from torch import nn

import mcnc_format as mf
from mcnc_format.converters.pack import pack
from mcnc_format.errors import MCNCError, UnsafeCheckpointError
from mcnc_format.header import ExternalTheta0
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, reparametrize, save_model

#: Lightning's checkpoints name classes beyond tensors, which an older torch's weights-only
#: reader cannot be told to allow (torch_compat.safe_globals refuses them there).
needs_safe_globals = pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"),
                                        reason="needs torch.serialization.safe_globals")


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


@pytest.fixture(autouse=True)
def _quiet_dcp() -> None:
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


def _same_as_save_model(model: nn.Module, packed: Path, tmp_path: Path) -> None:
    save_model(model, tmp_path / "direct.mcnc")
    assert packed.read_bytes() == (tmp_path / "direct.mcnc").read_bytes()


# -- torch.distributed.checkpoint ------------------------------------------------------------
@requires_current_distributed
def test_dcp_from_one_process_with_optimizer_state(seed: int, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model, optimizer = trained(seed)
    folder = tmp_path / "ckpt"
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 3},
             checkpoint_id=folder, no_dist=True)
    code, out, err = run_pack([str(folder), str(tmp_path / "out.mcnc")], monkeypatch, capsys)
    assert code == 0, err
    assert "converter torch-dcp" in out
    assert "dropped the training state saved beside the model: optim" in err
    assert "packed the state dict under 'model'" in err
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)
    chunks = next(folder.glob("*.distcp"))
    chunks.write_bytes(bytes(chunks.stat().st_size))  # same length, no torch archive
    with pytest.raises(MCNCError, match="cannot read tensor"):
        pack(folder, tmp_path / "again.mcnc")
    chunks.write_bytes(b"")
    with pytest.raises(MCNCError, match="missing or shorter than the chunk"):
        pack(folder, tmp_path / "again.mcnc")


@requires_current_distributed
def test_dcp_metadata_naming_another_class_is_refused_unexecuted(seed: int, tmp_path: Path
                                                                 ) -> None:
    model, _ = trained(seed, steps=1)
    folder = tmp_path / "ckpt"
    dcp.save(model.state_dict(), checkpoint_id=folder, no_dist=True)
    marker = tmp_path / "ran"
    booby_trapped_pickle(folder / ".metadata", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        pack(folder, tmp_path / "out.mcnc")
    assert not marker.exists()
    (folder / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MCNCError, match="not readable DCP metadata"):
        pack(folder, tmp_path / "out.mcnc")


WORLD = 2


@requires_current_distributed
def test_dcp_fsdp2_and_tp_shards_from_gloo_ranks(seed: int, tmp_path: Path) -> None:
    """Two gloo ranks save the trained model collectively, sharded two ways: FSDP2
    (``fully_shard``: alpha, beta and theta0 become DTensors split on dim 0) and every float
    tensor a DTensor split on its last dim (alpha along ``k``, which no tensor-parallel plan
    does; ``parallelize_module`` itself is the next test). Each folder packs to the file
    ``save_model`` writes for the unsharded model."""
    model, _ = trained(seed)
    torch.save(model.state_dict(), tmp_path / "trained.pt")
    mp.start_processes(_sharding_rank, args=(seed, str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    save_model(model, tmp_path / "direct.mcnc")
    for name, dim in (("fsdp2", 0), ("tp", 2)):
        folder = tmp_path / name
        metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own test file
        chunks = metadata.state_dict_metadata["mcnc_alpha_0"].chunks
        assert len(chunks) == WORLD, f"{name}: alpha was not saved in shards by both ranks"
        assert {c.offsets[dim] for c in chunks} != {0}, f"{name}: not split on dim {dim}"
        assert len(list(folder.glob("*.distcp"))) == WORLD
        result = pack(folder, tmp_path / f"{name}.mcnc")
        assert result.converter == "torch-dcp"
        assert (tmp_path / f"{name}.mcnc").read_bytes() == (tmp_path / "direct.mcnc").read_bytes()


def _sharding_rank(rank: int, seed: int, directory: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    init_gloo(rank, WORLD, f"{directory}/store")
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        trained_state = torch.load(f"{directory}/trained.pt", weights_only=True)
        model = reparametrize(mlp(seed), config(seed))
        model.load_state_dict(trained_state)
        fully_shard(model, mesh=mesh)
        state = model.state_dict()
        assert type(state["mcnc_alpha_0"]).__name__ == "DTensor"
        dcp.save(state, checkpoint_id=f"{directory}/fsdp2")
        split = {k: distribute_tensor(v, mesh, [Shard(v.dim() - 1)])
                 if v.is_floating_point() and v.dim() else v for k, v in trained_state.items()}
        dcp.save(split, checkpoint_id=f"{directory}/tp")
        leave_gloo()
    finally:
        torch.distributed.destroy_process_group()



@requires_current_distributed
def test_dcp_of_a_tensor_parallel_model_packs_as_the_unsharded_model(seed: int, tmp_path: Path
                                                                    ) -> None:
    """Real tensor parallelism: a transformer-like model whose embedding and output layer are
    compressed (alpha and beta, replicated on both ranks) and whose blocks train dense,
    ``parallelize_module``'d over two gloo ranks (``up``/``gate`` ``ColwiseParallel``, ``down``
    ``RowwiseParallel``), trains two steps and saves its state dict with DCP. The folder holds
    each rank's row block of ``up``, column block of ``down`` and one copy of the replicated
    tensors, and packs to the bytes ``save_model`` writes for the unsharded model holding the
    same values (gathered by rank 0)."""
    mp.start_processes(_tensor_parallel_rank, args=(seed, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    saved = pickle.loads((tmp_path / "tp" / ".metadata").read_bytes())  # our own test file
    chunks = {name: [tuple(c.offsets) for c in entry.chunks]
              for name, entry in saved.state_dict_metadata.items()}
    assert sorted(chunks["layers.0.up.weight"]) == [(0, 0), (20, 0)]  # rows: colwise
    assert sorted(chunks["layers.1.down.weight"]) == [(0, 0), (0, 20)]  # columns: rowwise
    assert chunks["layers.0.down.bias"] == [(0,)] and chunks["mcnc_alpha_0"] == [(0, 0, 0)]
    result = pack(tmp_path / "tp", tmp_path / "tp.mcnc")
    assert result.converter == "torch-dcp"
    assert (tmp_path / "tp.mcnc").read_bytes() == (tmp_path / "direct.mcnc").read_bytes()


def _tensor_parallel_config(seed: int) -> MCNCConfig:
    return MCNCConfig(k=4, d=64, hidden=(16,), seed=seed % 2**32,
                      include=["embed.weight", "head.weight"], train_dense=True)


def _tensor_parallel_rank(rank: int, seed: int, directory: str) -> None:
    from dist_helpers import VOCAB, TinyLM
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    init_gloo(rank, WORLD, f"{directory}/store")
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(seed)
        model = reparametrize(TinyLM(), _tensor_parallel_config(seed))
        torch.manual_seed(seed)
        unsharded = reparametrize(TinyLM(), _tensor_parallel_config(seed))
        for layer in model.layers:
            parallelize_module(layer, mesh, {"up": ColwiseParallel(), "gate": ColwiseParallel(),
                                             "down": RowwiseParallel()})
        state = model.state_dict()
        assert state["layers.0.up.weight"].placements == (Shard(0),)
        assert state["layers.0.down.weight"].placements == (Shard(1),)
        assert state["layers.0.down.bias"].placements == (Replicate(),)
        assert not isinstance(state["mcnc_alpha_0"], DTensor)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (4, 6), generator=g)
        with torch.no_grad():
            assert torch.allclose(model(tokens), unsharded(tokens), atol=1e-5)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                     lr=0.05)
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = model.state_dict()
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
        if rank == 0:
            unsharded.load_state_dict(full)
            save_model(unsharded, f"{directory}/direct.mcnc")
        dcp.save(state, checkpoint_id=f"{directory}/tp")
        leave_gloo()
    finally:
        torch.distributed.destroy_process_group()


@requires_current_distributed
@pytest.mark.parametrize("tie", ["dense", "compressed"])
def test_dcp_of_a_tied_model_packs_as_its_state_dict(tie: str, seed: int, tmp_path: Path
                                                      ) -> None:
    """A Llama with ``tie_word_embeddings``: ``lm_head.weight`` is the embedding's weight.
    Kept dense (trained, not compressed) the state dict holds it under both names, and DCP,
    which knows nothing of ties, saves two copies; compressed, the state dict holds its alpha
    and beta once. Either way the folder packs to the bytes a packed ``torch.save`` of the
    same state dict and ``save_model`` give: the tie stored once, under its first name, and
    tied again by ``load_into``. The untrained norms (all ones, equal but not tied) stay."""
    from transformers_helpers import llama, train

    torch.manual_seed(seed)
    include = ["*.q_proj.weight", "*.v_proj.weight"] if tie == "dense" else None
    model = train(reparametrize(llama(), MCNCConfig(k=4, d=32, hidden=(16,),
                                                    seed=seed % 2**32, include=include,
                                                    train_dense=tie == "dense")), steps=1)
    state = model.state_dict()
    dcp.save(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    saved = pickle.loads((tmp_path / "ckpt" / ".metadata").read_bytes())  # our own test file
    twice = {"model.embed_tokens.weight", "lm_head.weight"} <= set(saved.state_dict_metadata)
    assert twice == (tie == "dense")
    torch.save(state, tmp_path / "state.pt")
    pack(tmp_path / "state.pt", tmp_path / "plain.mcnc")
    result = pack(tmp_path / "ckpt", tmp_path / "dcp.mcnc")
    _same_as_save_model(model, tmp_path / "dcp.mcnc", tmp_path)
    assert (tmp_path / "dcp.mcnc").read_bytes() == (tmp_path / "plain.mcnc").read_bytes()
    with mf.open(tmp_path / "dcp.mcnc") as f:
        assert "lm_head.weight" not in f and "model.norm.weight" in f
    assert any("'lm_head.weight'" in note for note in result.notes) == (tie == "dense")
    fresh = llama()
    mf.load_into(fresh, tmp_path / "dcp.mcnc")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)

# -- save_pretrained shard sets ----------------------------------------------------------------
@pytest.mark.parametrize("path", ["folder", "index"])
def test_safetensors_shard_set(path: str, seed: int, tmp_path: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    model, _ = trained(seed)
    folder = tmp_path / "model"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir()
    save_torch_state_dict(state, folder, max_shard_size=300)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    source = folder if path == "folder" else folder / "model.safetensors.index.json"
    result = pack(source, tmp_path / "out.mcnc")
    assert result.converter == "safetensors-shards"
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)
    shards[1].unlink()
    with pytest.raises(MCNCError, match="missing; copy the whole checkpoint folder"):
        pack(source, tmp_path / "again.mcnc")


def _shard_set(seed: int, folder: Path) -> tuple[nn.Module, Path]:
    """A trained model saved as a shard set of at least two shards; its index."""
    from huggingface_hub import save_torch_state_dict

    model, _ = trained(seed)
    folder.mkdir()
    save_torch_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, folder,
                          max_shard_size=300)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    return model, folder / "model.safetensors.index.json"


def test_shard_index_that_disagrees_with_its_shards_is_refused(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A shard from another save lacking a tensor the index lists, an index listing nothing
    or nested past the JSON decoder's depth: each one line, exit 2; never a model packed
    without the tensor, an IndexError or a RecursionError."""
    _, index = _shard_set(seed, tmp_path / "model")
    document = json.loads(index.read_text())
    shard = index.parent / document["weight_map"]["2.bias"]
    kept = {n: t for n, t in load_file(shard).items() if n != "2.bias"}
    save_file(kept, shard, metadata={"format": "pt"})
    for damage, match in ((None, "lists tensors that no shard holds: '2.bias'"),
                          ({"weight_map": {}}, "weight_map lists no tensors"),
                          ("[" * 100_000 + "]" * 100_000, "not a shard index")):
        if damage is not None:
            index.write_text(damage if isinstance(damage, str) else json.dumps(damage))
        code, _, err = run_pack([str(index.parent), str(tmp_path / "out.mcnc")], monkeypatch,
                                capsys)
        assert code == 2 and re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.mcnc").exists()


def test_bin_shards_holding_one_tensor_twice_are_refused(seed: int, tmp_path: Path) -> None:
    """``pytorch_model-*.bin`` shards from two saves both hold a tensor: which is the model's
    cannot be told (safetensors shards were already refused; .bin ones kept the last)."""
    model, _ = trained(seed)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    state = model.state_dict()
    names = list(state)
    first, second = {n: state[n] for n in names[:3]}, {n: state[n] for n in names[2:]}
    second[names[2]] = second[names[2]] + 1
    torch.save(first, folder / "pytorch_model-1.bin")
    torch.save(second, folder / "pytorch_model-2.bin")
    weight_map = {n: "pytorch_model-1.bin" for n in first}
    weight_map.update({n: "pytorch_model-2.bin" for n in names[3:]})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "optimizer.bin").write_bytes(b"")  # an Accelerate folder
    with pytest.raises(MCNCError, match=f"tensor '{re.escape(names[2])}' is also in"):
        pack(folder, tmp_path / "out.mcnc")
    torch.save({n: t for n, t in second.items() if n != names[2]}, folder / "pytorch_model-2.bin")
    pack(folder, tmp_path / "out.mcnc")
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)


def test_trainer_state_nested_past_the_json_decoder_only_loses_the_step_note(
        seed: int, tmp_path: Path) -> None:
    """``trainer_state.json`` is read for a note; one the decoder cannot read (nested deeper
    than it recurses) gives no note, not a RecursionError."""
    model, _ = trained(seed)
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")
    (folder / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    result = pack(folder, tmp_path / "out.mcnc")
    assert result.converter == "hf-trainer"
    assert not any("global step" in note for note in result.notes)
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)


@requires_current_distributed
@pytest.mark.parametrize(("layout", "saved"), [("hf-trainer", "sharded"),
                                               ("accelerate-state", "sharded"),
                                               ("accelerate-state", "full")])
def test_fsdp_state_dicts_inside_trainer_and_accelerate_folders(
        layout: str, saved: str, seed: int, tmp_path: Path) -> None:
    """With FSDP's SHARDED_STATE_DICT, Trainer and Accelerate write the model as the DCP
    folder ``pytorch_model_fsdp_0/`` (``{"model": state_dict}``, accelerate's
    ``save_fsdp_model``) and the optimizer as ``optimizer_0/``; with FULL_STATE_DICT,
    ``save_state`` writes ``pytorch_model_fsdp.bin``. Neither has ``model.safetensors``, and
    the folder was refused as holding no model weights. It packs as the model, and the
    training state is still never opened."""
    model, optimizer = trained(seed)
    folder = tmp_path / "checkpoint-3"
    if saved == "sharded":
        dcp.save({"model": model.state_dict()}, checkpoint_id=folder / "pytorch_model_fsdp_0",
                 no_dist=True)
    else:
        folder.mkdir()
        torch.save(model.state_dict(), folder / "pytorch_model_fsdp.bin")
    dcp.save({"optimizer": optimizer.state_dict()}, checkpoint_id=folder / "optimizer_0",
             no_dist=True)
    marker = tmp_path / "ran"
    if layout == "hf-trainer":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
        booby_trapped_pickle(folder / "rng_state.pth", marker)
    else:
        booby_trapped_pickle(folder / "random_states_0.pkl", marker)
    result = pack(folder, tmp_path / "out.mcnc")
    assert result.converter == layout
    assert saved == "full" or any("pytorch_model_fsdp_0/" in n for n in result.notes)
    assert any("optimizer_0" in note and "not read" in note for note in result.notes)
    assert not marker.exists()
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)


# -- Accelerate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_accelerate_save_state(safe: bool, seed: int, tmp_path: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = reparametrize(mlp(seed), config(seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = batch(seed)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
    folder = tmp_path / "state"
    accelerator.save_state(folder, safe_serialization=safe)
    marker = tmp_path / "ran"
    for name in ("random_states_0.pkl", "optimizer.bin"):
        assert (folder / name).is_file()
        booby_trapped_pickle(folder / name, marker)
    result = pack(folder, tmp_path / "out.mcnc")
    assert result.converter == "accelerate-state"
    assert any("optimizer.bin" in note and "random_states_0.pkl" in note
               for note in result.notes)
    assert not marker.exists()
    _same_as_save_model(accelerator.unwrap_model(model), tmp_path / "out.mcnc", tmp_path)


def test_a_symlink_loop_in_the_folder_is_only_a_file_not_read(seed: int, tmp_path: Path
                                                              ) -> None:
    """A stray link that points at itself beside the weights: the note of unread files
    resolved every entry, and ``Path.resolve`` raised RuntimeError ("Symlink loop")."""
    model, _ = trained(seed)
    folder = tmp_path / "state"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")
    booby_trapped_pickle(folder / "optimizer.bin", tmp_path / "ran")
    (folder / "loop").symlink_to("loop")
    result = pack(folder, tmp_path / "out.mcnc")
    assert result.converter == "accelerate-state"
    assert any("loop" in note and "optimizer.bin" in note for note in result.notes)
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)


# -- Lightning -------------------------------------------------------------------------------------
@needs_safe_globals
def test_lightning_ckpt(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()  # an AttributeDict in the checkpoint
            self.model = reparametrize(mlp(seed), config(seed))

        def training_step(self, data: list[torch.Tensor], _index: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.model(data[0]), data[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad],
                                    lr=self.hparams.lr)

    module = Module()
    x, y = batch(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = lightning.Trainer(max_steps=2, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    capsys.readouterr()
    code, out, err = run_pack([str(tmp_path / "last.ckpt"), str(tmp_path / "out.mcnc")],
                              monkeypatch, capsys)
    assert code == 0, err
    assert "converter lightning-ckpt" in out
    assert "optimizer_states" in err and "hyper_parameters" in err
    _same_as_save_model(module, tmp_path / "out.mcnc", tmp_path)
    assert torch.equal(mf.load(tmp_path / "out.mcnc")["model.2.bias"], module.model[2].bias)


@needs_safe_globals
def test_lightning_ckpt_with_another_class_is_refused(seed: int, tmp_path: Path) -> None:
    model, _ = trained(seed, steps=1)
    torch.save({"state_dict": model.state_dict(), "callbacks": {"x": nn.Identity()}},
               tmp_path / "bad.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        pack(tmp_path / "bad.ckpt", tmp_path / "out.mcnc")


# -- the command -----------------------------------------------------------------------------
def test_list_converters(monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_pack(["--list-converters"], monkeypatch, capsys)
    assert code == 0
    names = [line.split("\t")[0] for line in out.splitlines()]
    assert names[0] == "mcnc-torch"
    assert {"torch-dcp", "hf-trainer", "accelerate-state", "lightning-ckpt",
            "safetensors-shards"} <= set(names)


def test_unrecognised_folder_is_refused_with_the_known_layouts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    code, out, err = run_pack([str(tmp_path / "stuff"), str(tmp_path / "out.mcnc")],
                              monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    for name in ("torch-dcp", "hf-trainer", "accelerate-state", "safetensors-shards"):
        assert name in err
    code, _, err = run_pack([], monkeypatch, capsys)
    assert code == 2 and "CHECKPOINT and OUT" in err


def test_converter_option_forces_a_layout(seed: int, tmp_path: Path) -> None:
    """A folder without its layout's marker file reads as that layout when named."""
    model, _ = trained(seed)
    folder = tmp_path / "state"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "renamed.bin")
    with pytest.raises(MCNCError, match="no converter recognises"):
        pack(folder, tmp_path / "out.mcnc")
    (folder / "renamed.bin").rename(folder / "model.safetensors")
    result = pack(folder, tmp_path / "out.mcnc", converter="accelerate-state")
    assert result.converter == "accelerate-state"
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)
    with pytest.raises(MCNCError, match="holds no model weights"):
        pack(tmp_path, tmp_path / "other.mcnc", converter="hf-trainer")


def test_lora_shard_set_packs_against_its_base(seed: int, tmp_path: Path) -> None:
    """An MCNC-LoRA model's shard set with ``--base`` gives the file a plain state dict gives
    with ``--base``: the adapter alone."""
    from huggingface_hub import save_torch_state_dict

    base = mlp(seed)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()},
              tmp_path / "base.safetensors")
    model = add_mcnc_lora(base, config(seed), target_modules=["0", "2"], rank=3, lora_alpha=6)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "mcnc_alpha" in name:
                parameter.add_(0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "shards").mkdir()
    save_torch_state_dict(state, tmp_path / "shards", max_shard_size=400)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    pack(tmp_path / "plain.pt", tmp_path / "plain.mcnc", base=tmp_path / "base.safetensors")
    pack(tmp_path / "shards", tmp_path / "shards.mcnc", base=tmp_path / "base.safetensors")
    assert (tmp_path / "shards.mcnc").read_bytes() == (tmp_path / "plain.mcnc").read_bytes()
    assert mf.open(tmp_path / "shards.mcnc").info["base_model"] == "base.safetensors"


def test_a_sharded_base_is_referenced_shard_by_shard(seed: int, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """A large base is saved sharded: ``--base`` its index references each theta0 in the
    shard holding it, and the adapter loads onto the base as with a one-file base. Before,
    the index was refused, and one shard given as the base said the others' tensors were
    missing from "the base the adapter was trained on"."""
    from huggingface_hub import save_torch_state_dict

    base = mlp(seed)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, tmp_path / "base.safetensors")
    (tmp_path / "sharded").mkdir()
    save_torch_state_dict(state, tmp_path / "sharded", max_shard_size=300)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = set(weight_map.values())
    assert weight_map["0.weight"] != weight_map["2.weight"]  # each over max_shard_size
    model = add_mcnc_lora(base, config(seed), target_modules=["0", "2"], rank=3, lora_alpha=6)
    torch.save(model.state_dict(), tmp_path / "adapter.pt")
    code, _, err = run_pack([str(tmp_path / "adapter.pt"), str(tmp_path / "out.mcnc"),
                             "--base", str(index)], monkeypatch, capsys)
    assert code == 0, err
    pack(tmp_path / "adapter.pt", tmp_path / "one.mcnc", base=tmp_path / "base.safetensors")
    with mf.open(tmp_path / "out.mcnc") as f:
        assert f.info["base_model"] == "sharded/model.safetensors.index.json"
        uris = {theta0.uri for t in f.header.tensors
                if isinstance(theta0 := getattr(t, "theta0", None), ExternalTheta0)}
    assert uris == {f"sharded/{weight_map[n]}" for n in ("0.weight", "2.weight")}
    want = mf.load(tmp_path / "one.mcnc")
    got = mf.load(tmp_path / "out.mcnc")
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    first = sorted(shards)[0]
    code, _, err = run_pack([str(tmp_path / "adapter.pt"), str(tmp_path / "bad.mcnc"),
                             "--base", str(tmp_path / "sharded" / first)], monkeypatch, capsys)
    assert code == 2 and "of a sharded base, its *.safetensors.index.json" in err, err


@requires_current_distributed
def test_mapping_file_over_a_folder_layout(seed: int, tmp_path: Path) -> None:
    """``--mapping`` renames what a layout converter reads: a foreign MCNC state dict saved
    by DCP packs to the tensors the same state dict gives as a ``.pt`` file."""
    import json

    from test_converters import FOREIGN_MAPPING, _foreign_checkpoint

    path, expected, _ = _foreign_checkpoint(seed, tmp_path)
    state = torch.load(path, weights_only=True)["model"]
    dcp.save(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({**FOREIGN_MAPPING, "strip_prefix": "net."}))
    result = pack(tmp_path / "ckpt", tmp_path / "out.mcnc", mapping=mapping)
    assert result.converter == "mapping"
    loaded = mf.load(tmp_path / "out.mcnc")
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(loaded[name], value, atol=1e-5 * (value.norm().item() + 1)), name


@requires_current_distributed
def test_dcp_metadata_sizes_and_paths_are_checked(seed: int, tmp_path: Path) -> None:
    """A shape larger than the chunks on disk, or a chunk outside the folder, is refused
    before anything is allocated or read."""
    from dataclasses import replace

    from torch.distributed.checkpoint.filesystem import FileSystemReader

    model, _ = trained(seed, steps=1)
    folder = tmp_path / "ckpt"
    dcp.save(model.state_dict(), checkpoint_id=folder, no_dist=True)
    original = FileSystemReader(folder).read_metadata()  # our own test file
    for damage, match in (("size", "larger than its chunks"), ("path", "lie in files of")):
        metadata = pickle.loads(pickle.dumps(original))
        if damage == "size":
            entry = metadata.state_dict_metadata["mcnc_alpha_0"]
            entry.size = torch.Size([10**12, *entry.size[1:]])
        else:
            index = next(iter(metadata.storage_data))
            info = metadata.storage_data[index]
            metadata.storage_data[index] = replace(info, relative_path="../elsewhere.distcp")
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(MCNCError, match=match):
            pack(folder, tmp_path / "out.mcnc")


@requires_current_distributed
def test_dcp_chunks_that_do_not_tile_their_tensor_are_refused(seed: int, tmp_path: Path) -> None:
    """DCP reads each chunk into its box of a tensor allocated uninitialised: chunks covering
    half of it (a rank's entry lost), overlapping or lying outside it would pack leftover
    memory. Each is refused from the metadata, before anything is read."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    model, _ = trained(seed, steps=1)
    folder = tmp_path / "ckpt"
    dcp.save(model.state_dict(), checkpoint_id=folder, no_dist=True)
    original = FileSystemReader(folder).read_metadata()  # our own test file
    name = "0.bias"
    rows = original.state_dict_metadata[name].size[0]  # one chunk: the whole tensor
    half = rows // 2

    def boxes(*pieces: tuple[int, ...]) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size([start]), sizes=torch.Size(n))
                for start, *n in pieces]

    for chunks, match in ((boxes((0, half)), rf"cover {half} elements of {rows}"),
                          (boxes((0, half + 1), (half, rows - half)), "cover"),
                          # as many elements as the tensor, one twice and one never
                          (boxes((half, rows - half - 1), (0, half + 1)),
                           rf"overlap at \[0\] and \[{half}\]"),
                          (boxes((1, rows)), "outside the tensor"),
                          (boxes((0, rows, 1)), "outside the tensor")):
        metadata = pickle.loads(pickle.dumps(original))
        metadata.state_dict_metadata[name].chunks = chunks
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(MCNCError, match=match):
            pack(folder, tmp_path / "out.mcnc")
    assert not (tmp_path / "out.mcnc").exists()


@requires_current_distributed
def test_dcp_damage_is_one_line_and_allocates_nothing_it_names(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A ``.metadata`` whose bytes field claims 2**62 bytes is refused before pickle
    allocates them (a MemoryError escaped); a damaged chunk file is one line naming torch's
    reason, not DCP's per-rank tracebacks."""
    model, _ = trained(seed, steps=1)
    folder = tmp_path / "ckpt"
    dcp.save(model.state_dict(), checkpoint_id=folder, no_dist=True)
    good = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b".")
    out = str(tmp_path / "out.mcnc")
    code, _, err = run_pack([str(folder), out], monkeypatch, capsys)
    assert code == 2 and "not readable DCP metadata" in err, err
    assert len(err.strip().splitlines()) == 1
    metadata = pickle.loads(good)
    metadata.state_dict_metadata["0.bias"].size = 40  # not a shape (a TypeError escaped)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    code, _, err = run_pack([str(folder), out], monkeypatch, capsys)
    assert code == 2 and "'0.bias' has shape 40" in err, err
    (folder / ".metadata").write_bytes(good)
    for shard in folder.glob("*.distcp"):
        data = shard.read_bytes()
        shard.write_bytes(data[:-64] + bytes(64))  # the zip's central directory zeroed
    code, _, err = run_pack([str(folder), out], monkeypatch, capsys)
    assert code == 2 and "cannot read tensor" in err and "RuntimeError:" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@requires_current_distributed
def test_dcp_compressed_chunks_are_sized_by_what_they_decompress_to(seed: int, tmp_path: Path
                                                                    ) -> None:
    """DCP's ZStandard extension compresses each chunk: a zero buffer's chunk is a few hundred
    bytes on disk, and the check that a tensor fits its chunks refused the checkpoint as
    damaged. Chunks are now sized by streaming their decompression, and one that decompresses
    to more than its tensor can take (a zstd bomb: DCP would inflate it all in memory) is
    refused at that point."""
    from dataclasses import replace

    import zstandard
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    model, _ = trained(seed)
    model.register_buffer("mask", torch.zeros(100_000))
    folder = tmp_path / "ckpt"
    dcp.save(model.state_dict(), storage_writer=FileSystemWriter(folder, _extensions=[ZStandard()]),
             no_dist=True)
    pack(folder, tmp_path / "out.mcnc")
    _same_as_save_model(model, tmp_path / "out.mcnc", tmp_path)

    metadata = FileSystemReader(folder).read_metadata()  # our own test file
    index = next(i for i in metadata.storage_data if i.fqn == "0.bias")
    where = metadata.storage_data[index]
    shard = folder / where.relative_path
    bomb = zstandard.ZstdCompressor().compress(bytes(8 << 20))  # 8 MiB of zeros, kilobytes
    offset = shard.stat().st_size
    with shard.open("ab") as file:
        file.write(bomb)
    metadata.storage_data[index] = replace(where, offset=offset, length=len(bomb))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(MCNCError, match=r"'0\.bias' decompresses to more than the \d+ bytes"):
        pack(folder, tmp_path / "bomb.mcnc")
