"""``torch.distributed.checkpoint`` folders (DCP), from one process or many ranks.

Layout (``torch.distributed.checkpoint.save`` with its ``FileSystemWriter``)::

    ckpt/
      .metadata            a pickle of DCP's ``Metadata``: every tensor's global shape and
                           dtype, the chunks each rank saved (FSDP2 / tensor-parallel
                           ``DTensor`` shards), and where each chunk lies
      __0_0.distcp ...     one file per rank (and writer thread): each chunk a ``torch.save``
                           archive at the offset ``.metadata`` gives

``.metadata`` is the layout's own index and a pickle, and DCP reads it with plain
``pickle.load``. Here it is read by an unpickler with an explicit allow-list (``ALLOWED``):
DCP's metadata dataclasses, ``torch.Size``, torch dtypes and layouts, ``pathlib`` paths and
nothing else; building those runs no code beyond setting their fields. The chunks are read by
DCP itself (``torch.distributed.checkpoint.load`` into a full-size tensor, one tensor at a
time, no process group), which unpickles them with torch's weights-only unpickler and
reassembles the shards. Non-tensor entries (DCP's "bytes" items, such as a step counter) are
pickles of arbitrary objects and are never read; the entries of an optimizer state saved
beside the model (``{"model": ..., "optim": ...}``) are dropped, and a wrapper prefix all
remaining names share (``model.``) is taken off, each said in the notes.

DCP saves every name of the state dict and knows nothing of tied weights: an output layer tied
to the embedding, which a state dict in memory holds under two names sharing one tensor, is
written twice. Sharing cannot be seen in the folder, so a tie is told from values: two tensors
of the same shape, dtype and bytes, not constant, are one (``LazyTensors.ties``), and the file
stores it once, as ``save_model`` does. Telling them costs one extra read of each tensor whose
shape and dtype another tensor shares.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mcnc_format.converters.checkpoint import TRAINING_STATE_MARKS, WRAPPER_KEYS, Checkpoint
from mcnc_format.converters.layout import LayoutBase, model_weights
from mcnc_format.converters.lazy import LazyTensors, TensorInfo
from mcnc_format.errors import MCNCError, UnsafeCheckpointError
from mcnc_format.reader import tensor_sha256
from mcnc_format.sharing import is_constant
from mcnc_format.torch_compat import require_checkpoint_api

__all__ = ["DistributedCheckpoint", "model_or_fsdp_weights"]

METADATA = ".metadata"
# What torch.save wraps around a chunk's bytes (zip records, pickle, alignment), at most.
CHUNK_OVERHEAD = 64 * 1024
# Where Trainer / Accelerate save an FSDP model with SHARDED_STATE_DICT (accelerate's
# save_fsdp_model: FSDP_MODEL_NAME + "_0", a DCP folder of {"model": state_dict}).
FSDP_MODEL = "pytorch_model_fsdp_0"
_DCP = "torch.distributed.checkpoint.metadata"
ALLOWED = frozenset({
    (_DCP, "Metadata"), (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"), (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"),
    (_DCP, "TensorProperties"), (_DCP, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
})


class _AllowListUnpickler(pickle.Unpickler):
    """Rebuilds only what ``ALLOWED`` names, and torch dtypes; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpointError(
                f"refusing to load: the DCP metadata names {module}.{name}, which is not "
                "among the classes DCP writes there; mcnc never runs pickled code")
        return super().find_class(module, name)


def read_metadata(folder: Path) -> Any:
    """DCP's ``Metadata`` of ``folder``, unpickled with the allow-list."""
    path = folder / METADATA
    try:
        data = path.read_bytes()
        # pickle allocates what a length field (BINBYTES8, LONG4) says before reading it;
        # genops, reading from memory, checks each length against the bytes left and runs
        # nothing
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
        return _AllowListUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc.message}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RuntimeError, RecursionError) as exc:
        # RuntimeError: TensorProperties.__setstate__ refuses an unknown memory format
        raise MCNCError(f"{path}: not readable DCP metadata ({exc}); is the checkpoint "
                        "damaged or truncated?") from exc


class DistributedCheckpoint(LayoutBase):
    name = "torch-dcp"
    description = ("torch.distributed.checkpoint folders (.metadata + *.distcp), one process "
                   "or sharded over ranks (FSDP2, tensor parallel)")

    def recognises(self, path: Path) -> bool:
        return (path.is_dir() and (path / METADATA).is_file()
                and any(path.glob("*.distcp")))

    def read(self, path: Path) -> Checkpoint:
        tensors, notes = self.lazy(path)
        return Checkpoint(path, tensors, notes=notes)

    def lazy(self, path: Path) -> tuple[LazyTensors, list[str]]:
        """The folder's tensors, each read when indexed, and the notes for users."""
        require_checkpoint_api(f"packing the DCP folder {path}")
        metadata = read_metadata(path)
        entries = getattr(metadata, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise MCNCError(f"{path / METADATA}: holds no state_dict_metadata; not DCP "
                            "metadata")
        stored = _stored_bytes(path, metadata)
        infos: dict[str, TensorInfo] = {}
        skipped: list[str] = []
        for fqn, entry in entries.items():
            if isinstance(entry, TensorStorageMetadata):
                infos[fqn] = _checked(path, fqn, entry, stored.get(fqn, 0))
            else:
                skipped.append(fqn)
        infos, prefix, notes = _unwrapped(infos)
        if skipped:
            notes.append(f"not read: the non-tensor entries {', '.join(skipped[:8])}"
                         f"{' ...' if len(skipped) > 8 else ''} (DCP stores them as pickles)")
        reader = _Reader(path, metadata)

        def read(name: str) -> torch.Tensor:
            return reader.tensor(prefix + name, infos[name])

        ties = _ties(infos, read)
        notes += [f"{alias!r} holds the values of {held!r}: one tied weight, which DCP saved "
                  "under both names" for alias, held in ties.items()]
        return LazyTensors(infos, read, str(path), ties), notes


def model_or_fsdp_weights(folder: Path) -> tuple[tuple[LazyTensors, list[Path]] | None,
                                                 list[str]]:
    """``model_weights(folder)``, or else the model an FSDP run saved sharded in the folder
    (``pytorch_model_fsdp_0/``, a DCP folder: what Trainer and Accelerate write with
    ``SHARDED_STATE_DICT`` instead of ``model.safetensors``), and notes saying so."""
    found = model_weights(folder)
    sharded = folder / FSDP_MODEL
    layout = DistributedCheckpoint()
    if found is not None or not layout.recognises(sharded):
        return found, []
    tensors, notes = layout.lazy(sharded)
    return (tensors, [sharded]), [f"read the model FSDP saved sharded in {FSDP_MODEL}/ (DCP)",
                                  *notes]


def _stored_bytes(folder: Path, metadata: Any) -> dict[str, int]:
    """Bytes the chunks of each tensor occupy, after checking that every chunk lies in a
    ``.distcp`` file of the folder (a file name, no path) and within it."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise MCNCError(f"{folder / METADATA}: holds no storage_data; not DCP metadata")
    sizes: dict[str, int] = {}
    totals: dict[str, int] = {}
    for index, where in storage.items():
        name = getattr(where, "relative_path", None)
        offset, length = getattr(where, "offset", None), getattr(where, "length", None)
        if not isinstance(name, str) or Path(name).name != name or not (
                isinstance(offset, int) and isinstance(length, int) and offset >= 0
                and length >= 0):
            raise MCNCError(f"{folder / METADATA}: a chunk of {getattr(index, 'fqn', '?')!r} "
                            f"lies at {name!r} [{offset}, +{length}]; chunks lie in files of "
                            "the checkpoint's folder")
        if name not in sizes:
            file = folder / name
            sizes[name] = file.stat().st_size if file.is_file() else -1
        if offset + length > sizes[name]:
            raise MCNCError(f"{folder / name}: missing or shorter than the chunk of "
                            f"{getattr(index, 'fqn', '?')!r} the metadata places at "
                            f"[{offset}, +{length}]; is the checkpoint complete?")
        fqn = str(getattr(index, "fqn", ""))
        if getattr(where, "transform_descriptors", None):  # compressed (DCP's extensions)
            length = _decompressed(folder, metadata, fqn, where)
        totals[fqn] = totals.get(fqn, 0) + length
    return totals


def _decompressed(folder: Path, metadata: Any, fqn: str, where: Any) -> int:
    """The bytes a compressed chunk (``FileSystemWriter(_extensions=[ZStandard()])``)
    decompresses to, counted by streaming it, not holding it: its length on disk says nothing
    of the tensor's size. A chunk that decompresses to more than the whole tensor its
    metadata declares, plus what ``torch.save`` wraps around it, is refused at that point
    (DCP would decompress it all into memory)."""
    entry = getattr(metadata, "state_dict_metadata", {}).get(fqn)
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    shape = getattr(entry, "size", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(shape, tuple):
        return 0  # not a tensor's chunk: _checked refuses the entry
    cap = math.prod(shape) * dtype.itemsize + CHUNK_OVERHEAD
    transforms = _AllowListReader(folder, metadata).transforms
    count = 0
    try:
        with (folder / where.relative_path).open("rb") as file:
            file.seek(where.offset)
            stream = transforms.transform_load_stream(
                None, where.transform_descriptors, io.BufferedReader(_Slice(file, where.length)))
            while block := stream.read(1 << 20):
                count += len(block)
                if count > cap:
                    raise MCNCError(f"{folder / where.relative_path}: a chunk of {fqn!r} "
                                    f"decompresses to more than the {cap} bytes its tensor "
                                    "can take; the checkpoint is damaged")
    except MCNCError:
        raise
    except Exception as exc:  # the extension's own errors: unknown descriptor, bad frame
        raise MCNCError(f"{folder / where.relative_path}: cannot decompress a chunk of "
                        f"{fqn!r} ({type(exc).__name__}: {exc}); is it damaged?") from exc
    return count


class _Slice(io.RawIOBase):
    """``length`` bytes of ``file`` from where it stands, as a stream."""

    def __init__(self, file: Any, length: int) -> None:
        super().__init__()
        self.file, self.left = file, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.file.readinto(memoryview(buffer)[:min(len(buffer), self.left)]) or 0
        self.left -= count
        return count


def _checked(folder: Path, fqn: str, entry: Any, stored: int) -> TensorInfo:
    """The tensor's shape and dtype, once they are plausible: integers, a torch dtype, and no
    more bytes than its chunks occupy on disk (nothing is allocated from an unchecked size)."""
    shape = getattr(entry, "size", None)
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(shape, tuple) or not all(
            isinstance(n, int) and n >= 0 for n in shape):
        raise MCNCError(f"{folder / METADATA}: tensor {fqn!r} has shape {shape!r} and dtype "
                        f"{dtype!r}; not DCP metadata of a tensor")
    info = TensorInfo(tuple(shape), dtype)
    if info.nbytes > stored:
        raise MCNCError(f"{folder / METADATA}: tensor {fqn!r} ({dtype} {list(shape)}, "
                        f"{info.nbytes} bytes) is larger than its chunks on disk ({stored} "
                        "bytes); the metadata is damaged")
    gap = _untiled(info.shape, getattr(entry, "chunks", None))
    if gap:
        raise MCNCError(f"{folder / METADATA}: the chunks of tensor {fqn!r} ({list(shape)}) "
                        f"{gap}; the metadata is damaged")
    return info


def _untiled(shape: tuple[int, ...], chunks: Any) -> str:
    """What is wrong with ``chunks`` as a tiling of a tensor of ``shape`` ("" if nothing):
    DCP reads each chunk into its box of a tensor allocated uninitialised, so a box outside
    the tensor, two boxes overlapping or a part no box covers would pack leftover memory."""
    if not isinstance(chunks, list):
        return f"are {type(chunks).__name__}, not a list"
    boxes = []
    for chunk in chunks:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (isinstance(offsets, tuple) and isinstance(sizes, tuple)
                and len(offsets) == len(sizes) == len(shape)
                and all(isinstance(n, int) and n >= 0 for n in (*offsets, *sizes))
                and all(o + n <= dim for o, n, dim in zip(offsets, sizes, shape, strict=True))):
            return f"include one at {offsets!r} of size {sizes!r}, outside the tensor"
        if math.prod(sizes):
            boxes.append((offsets, sizes))
    covered = sum(math.prod(sizes) for _, sizes in boxes)
    if covered != math.prod(shape):
        return f"cover {covered} elements of {math.prod(shape)}"
    boxes.sort()  # by the first offset: only boxes starting before one ends can overlap it
    for i, (offsets, sizes) in enumerate(boxes):
        for other, other_sizes in boxes[i + 1:]:
            if shape and other[0] >= offsets[0] + sizes[0]:
                break
            if all(o < p + m and p < o + n
                   for o, n, p, m in zip(offsets, sizes, other, other_sizes, strict=True)):
                return f"overlap at {list(offsets)} and {list(other)}"
    return ""


def _unwrapped(infos: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], str, list[str]]:
    """Drop top-level groups of training state (``optim.*``); then, if every name lies under
    one wrapper key (``model.*``), take that prefix off. Returns the names left, the prefix
    taken off and notes saying both."""
    notes: list[str] = []
    groups = {name.split(".", 1)[0] for name in infos}
    training = sorted(g for g in groups if any(m in g.lower() for m in TRAINING_STATE_MARKS))
    if training and len(groups) > len(training):
        infos = {n: i for n, i in infos.items() if n.split(".", 1)[0] not in training}
        notes.append(f"dropped the training state saved beside the model: {', '.join(training)}")
    groups = {name.split(".", 1)[0] for name in infos}
    if len(groups) == 1 and (wrapper := groups.pop()) in WRAPPER_KEYS and all(
            "." in n for n in infos):
        notes.append(f"packed the state dict under {wrapper!r}")
        return {n[len(wrapper) + 1:]: i for n, i in infos.items()}, wrapper + ".", notes
    return infos, "", notes


def _ties(infos: dict[str, TensorInfo], read: Callable[[str], torch.Tensor]
          ) -> dict[str, str]:
    """``{name: earlier name}`` for the tensors DCP saved twice because they are one tensor
    (tied weights; DCP writes every name of the state dict, and keeps no sharing): same shape,
    dtype and bytes, and not constant (equal ones of fresh norms tell nothing of a tie). Only
    tensors that share their shape and dtype with another are read here, one at a time."""
    groups: dict[TensorInfo, list[str]] = {}
    for name, info in infos.items():
        groups.setdefault(info, []).append(name)
    ties: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        first: dict[str, str] = {}
        for name in names:
            tensor = read(name)
            if not is_constant(tensor):
                held = first.setdefault(tensor_sha256(tensor), name)
                if held != name:
                    ties[name] = held
    return ties


class _Reader:
    """Reads one full tensor through DCP, with the allow-listed metadata."""

    def __init__(self, folder: Path, metadata: Any) -> None:
        self.folder = folder
        self.metadata = metadata

    def tensor(self, fqn: str, info: TensorInfo) -> torch.Tensor:
        reader = _AllowListReader(self.folder, self.metadata)
        target = torch.empty(info.shape, dtype=info.dtype)
        try:
            with warnings.catch_warnings():  # DCP warns that it loads in one process: intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({fqn: target}, storage_reader=reader, no_dist=True)
        except (CheckpointException, Exception) as exc:  # a BaseException: DCP wraps its
            # readers' failures (a truncated chunk's EOFError) in it
            raise MCNCError(f"{self.folder}: cannot read tensor {fqn!r} ({_reason(exc)}); is "
                            "a *.distcp file missing or truncated?") from exc
        return target


def _reason(exc: BaseException) -> str:
    """One line saying why DCP failed: the first rank's exception, not the tracebacks a
    ``CheckpointException`` prints."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _AllowListReader(FileSystemReader):
    """DCP's file reader with the metadata read once, by the allow-list unpickler."""

    def __init__(self, folder: Path, metadata: Any) -> None:
        super().__init__(folder)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return self._metadata
