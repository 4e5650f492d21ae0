"""``MCNCStorageReader``: a ``.mcnc`` file as a storage of distributed checkpointing (DCP).

DCP asks a storage for two things. ``read_metadata`` declares what the checkpoint holds: here
every tensor of the file, its shape and dtype, stored as ONE chunk covering the whole tensor
(a file is not sharded, whatever the model it is loaded into). From that and the state dict,
DCP's planner works out on each rank a ``ReadItem`` per local shard: the box of the tensor the
rank holds (``storage_offsets``, ``lengths``). ``read_data`` then hands those boxes to the one
engine (``MCNCFile.stream(boxes=...)``), which rebuilds only the chunks covering them, on the
device of the destination tensor, and copies each box into ``planner.resolve_tensor(item)``.

Nothing crosses ranks but DCP's own small plan messages: each rank reads the header, the
alpha/beta rows of its chunks, and the byte ranges of stored values (dense tensors, stored and
external theta0) its boxes cover.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from .. import api
from ..dtypes import to_torch
from ..engine.box import Box
from ..engine.options import LoadOptions, Progress, Verify
from ..engine.resolve import Resolver
from ..errors import MCNCError, UsageError
from ..reader import MCNCFile

__all__ = ["MCNCStorageReader", "ReadStats"]

#: A destination tensor, and the read item that fills it.
Work = tuple[ReadItem, torch.Tensor]


@dataclass
class ReadStats:
    """What one rank's last ``read_data`` did: the boxes it filled (tensor name and box), the
    engine loads it ran (``engine_calls``: one per device and output dtype, and one more for
    each further box of one tensor) and the chunks those loads regenerated, as the engine
    counted them (``Progress.chunks_regenerated``)."""

    boxes: list[tuple[str, Box]] = field(default_factory=list)
    engine_calls: int = 0
    chunks_regenerated: int = 0

    @property
    def elements(self) -> int:
        return sum(box.numel for _, box in self.boxes)


class MCNCStorageReader(StorageReader):
    """Read a ``.mcnc`` file (a path or an ``hf://`` URI) into any state dict DCP can load:
    plain tensors, FSDP2 and tensor-parallel DTensors, 2-D meshes.

    ``strict``: the file's tensors must all be in the state dict (checked on the coordinator
    over every rank's plan); a state dict tensor missing from the file is DCP's planner's
    error, or ``MCNCLoadPlanner``'s ``UsageError``. ``cast``: rebuild floating tensors in the
    state dict's dtype (rounded once, from float32) instead of refusing a dtype that differs
    from the file's. ``options``: the engine's ``LoadOptions`` (its ``progress`` is still
    called). ``resolver``: where names and theta0 references are read from.
    ``stats`` holds this rank's ``ReadStats`` after a load.
    """

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = True, cast: bool = False,
                 options: LoadOptions | None = None, resolver: Resolver | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.strict = strict
        self.cast = cast
        self.options = options or LoadOptions()
        self.resolver = resolver
        self.stats = ReadStats()
        self.is_coordinator = False
        self._pins_checked = False  # by this reader's prepare_global_plan, in this load
        # (size, header checksum) of the file read_metadata opened, for prepare_global_plan
        self._contents: tuple[int, int] | None = None

    # -- DCP's protocol ----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.stats = ReadStats()
        self._pins_checked = False

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return os.fspath(checkpoint_id).endswith(".mcnc")

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every tensor of the file as one chunk of its whole shape (tensors of an encoding
        this reader does not know are left out: they cannot be read, R46).

        A file that cannot be read does not raise here: DCP retries a raising
        ``read_metadata`` and then reports only ``AssertionError("metadata is None")``, which
        loses the error. It comes back as metadata declaring nothing, with the ``MCNCError``
        in ``storage_data``; ``set_up_storage_reader``, DCP's next call on this rank, raises
        it, and DCP hands it to every rank intact (docs/distributed.md, Errors)."""
        declared: dict[str, Any] = {}
        try:
            with self._opened() as f:
                tensors = f.header.tensors
                self._contents = (f.file_size, f.context.preamble.header_xxh3)
        except MCNCError as exc:
            return Metadata(state_dict_metadata={}, storage_data=exc,
                            storage_meta=StorageMeta(checkpoint_id=self.path))
        for t in tensors:
            if not t.known:
                continue
            shape = torch.Size(t.shape)
            declared[t.name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=to_torch(t.dtype)), size=shape,
                chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)])
        return Metadata(state_dict_metadata=declared,
                        storage_meta=StorageMeta(checkpoint_id=self.path))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        """Raises the error ``read_metadata`` met reading the file, if any."""
        if isinstance(metadata.storage_data, MCNCError):
            raise metadata.storage_data
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """The plan, carrying what identifies the file this rank opened (its size and header
        checksum; the header holds every blob's checksum) to the coordinator."""
        return replace(plan, storage_data=self._contents)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: with ``strict``, every tensor of the file must be read by some
        rank (a model built from another config reads a subset). The SHA-256 pins of external
        bases are checked here, once, before any rank reads: with ``Verify.CACHED`` (the
        default) ranks on this machine then find the record in the digest cache and read only
        their boxes of the base, never all of it."""
        _require_one_file(plans, self.path)
        wanted = {item.storage_index.fqn for plan in plans for item in plan.items}
        with self._opened() as f:
            f.check_references([t.name for t in f.header.tensors if t.name in wanted])
            if self.strict:
                unread = [t.name for t in f.header.tensors
                          if t.known and t.numel > 0 and t.name not in wanted]
                if unread:
                    raise UsageError(
                        f"{len(unread)} tensors of the file are not in the state dict: "
                        f"{unread[:5]}{'...' if len(unread) > 5 else ''}. Build the model "
                        "from the file's config, or pass strict=False to load the tensors "
                        "both hold", path=self.path, tensor=unread[0])
        self._pins_checked = True
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        """Rebuild this rank's boxes: every destination is checked first, then the boxes on
        one device in one output dtype go to the engine together (a tensor with several
        boxes on this rank takes one load per further box)."""
        stats = ReadStats()
        # The pins this reader checked in prepare_global_plan, moments ago, are in the digest
        # cache (a changed or replaced base is not): Verify.FULL need not hash them again.
        verify = (Verify.CACHED if self._pins_checked and self.options.verify is Verify.FULL
                  else self.options.verify)
        try:
            with self._opened(verify) as f:
                work = [(item, planner.resolve_tensor(item).detach()) for item in plan.items]
                groups: dict[tuple[torch.device, torch.dtype | None], list[Work]] = {}
                for item, dest in work:
                    groups.setdefault(self._output(f, item, dest), []).append((item, dest))
                for (device, dtype), group in groups.items():
                    for round_ in _one_box_per_tensor(group):
                        self._read(f, round_, device, dtype, planner, stats)
        finally:
            self.stats = stats
        done: torch.futures.Future[None] = torch.futures.Future()
        done.set_result(None)
        return done

    # -- the rest ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _opened(self, verify: Verify | None = None) -> Iterator[MCNCFile]:
        """The file for one step of DCP's protocol, closed when the step ends: between steps
        (where a planner may fail, or the load be abandoned) nothing stays open."""
        with api.open(self.path, verify=verify or self.options.verify,
                      resolver=self.resolver) as f:
            yield f

    def _output(self, f: MCNCFile, item: ReadItem, dest: torch.Tensor
                ) -> tuple[torch.device, torch.dtype | None]:
        """Where and as what the engine produces ``item``'s box: the destination's device, and
        the file's dtype (``None``) unless ``cast`` asks for the destination's float dtype."""
        name = item.storage_index.fqn
        stored = to_torch(f.entry(name).dtype)
        if tuple(dest.shape) != tuple(item.lengths):
            raise UsageError(f"the planner resolved a destination of shape {list(dest.shape)} "
                             f"for a box of shape {list(item.lengths)}", path=self.path,
                             tensor=name)
        if dest.dtype == stored:
            return dest.device, None
        if self.cast and stored.is_floating_point and dest.dtype.is_floating_point:
            return dest.device, dest.dtype
        raise UsageError(
            f"tensor {name!r} is {stored} in the file, the state dict holds {dest.dtype}. "
            f"Build the model in {stored}"
            + (", or pass cast=True to rebuild it in the state dict's dtype"
               if stored.is_floating_point and dest.dtype.is_floating_point else ""),
            path=self.path, tensor=name)

    def _read(self, f: MCNCFile, work: dict[str, Work], device: torch.device,
              dtype: torch.dtype | None, planner: LoadPlanner, stats: ReadStats) -> None:
        """One engine load of ``work`` (one box per tensor), each box copied into its
        destination as soon as the engine hands it out."""
        boxes = {name: Box.from_offsets(f.entry(name).shape, tuple(item.storage_offsets),
                                        tuple(item.lengths), f"{self.path}: {name}")
                 for name, (item, _) in work.items()}
        chunks = [0]
        options = replace(self.options, progress=_counting(chunks, self.options.progress))
        with torch.no_grad():
            for name, value in f.stream(list(boxes), device, dtype, boxes=boxes,
                                        options=options):
                item, dest = work[name]
                dest.copy_(value)
                planner.commit_tensor(item, dest)
        stats.boxes += boxes.items()
        stats.engine_calls += 1
        stats.chunks_regenerated += chunks[0]


def _require_one_file(plans: list[LoadPlan], path: str) -> None:
    """Every rank opened the same file: each rank opens its own path (a node-local copy, say),
    and a stale or other copy on one node would otherwise fill that rank's shards from another
    model, silently."""
    first = plans[0].storage_data
    for rank, plan in enumerate(plans):
        if plan.storage_data != first:
            raise MCNCError(
                f"rank {rank} opened another file than rank 0 ({_described(plan.storage_data)}"
                f" against {_described(first)}): every rank must load the same file; is a "
                "copy on some node stale or damaged? Compare them (sha256sum)", path=path)


def _described(contents: Any) -> str:
    size, header = contents if isinstance(contents, tuple) else ("?", 0)
    return f"{size} bytes, header checksum {header:016x}"


def _one_box_per_tensor(group: list[Work]) -> list[dict[str, Work]]:
    """Split ``group`` into loads that ask for each tensor once: the first box of every
    tensor, then the second box of the tensors that have two, and so on."""
    rounds: list[dict[str, Work]] = []
    for item, dest in group:
        name = item.storage_index.fqn
        for round_ in rounds:
            if name not in round_:
                round_[name] = (item, dest)
                break
        else:
            rounds.append({name: (item, dest)})
    return rounds


def _counting(chunks: list[int], then: Callable[[Progress], None] | None
              ) -> Callable[[Progress], None]:
    """A progress callback that keeps the load's chunk count in ``chunks[0]`` and passes the
    report on to the caller's own callback."""
    def report(progress: Progress) -> None:
        chunks[0] = progress.chunks_regenerated
        if then is not None:
            then(progress)
    return report
