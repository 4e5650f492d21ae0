"""Whole-file verification: every byte checked, every tensor rebuilt, nothing kept.

``open`` validates the header and checks a blob's checksum only when a tensor needs it, which
is right for loading but says nothing about the parts a load did not touch. ``verify_file``
is the opposite trade: it reads the whole file once and reports every rule it breaks, so a
file can be checked after a download or before it is published. It checks

- the preamble, the header checksum and every header rule (``open``'s validation),
- the XXH3-64 checksum of every blob and the decoding of every zstd blob (R24, R25),
- that padding bytes are zero (R22, which readers skip when loading),
- that every tensor regenerates on the CPU, with finite values for mcnc and lora tensors,
- that external theta0 references resolve and match their pinned SHA-256 (R75).

Regeneration is one load through the engine whose outputs are checked and dropped as they are
handed out (the engine's own batches, in its smallest workspace); a tensor of more than
``batch_values`` values is rebuilt box by box. Memory stays bounded whatever the model's
size.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import constants as C
from .engine.box import Box
from .engine.options import MIN_WORKSPACE_BYTES, Progress, Verify
from .engine.resolve import Resolver
from .engine.source import sweep_bytes
from .errors import (
    ChecksumError,
    ExternalReferenceError,
    ExternalReferenceMissing,
    FormatError,
    HubOfflineError,
    MCNCError,
    MCNCFileNotFoundError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from .header import (
    BlobTheta0,
    DenseTensor,
    ExternalTheta0,
    Header,
    PackedTensor,
    TensorEntry,
    Theta0Entry,
    UnknownTensor,
)
from .reader import MCNCFile

__all__ = ["Problem", "VerifyReport", "verify_file"]

DEFAULT_BATCH_VALUES = 1 << 25  # 128 MiB of float32 output per regeneration batch


#: Checks whose problems say the file could not be judged here, not that it is damaged.
UNSUPPORTED = "unsupported"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Problem:
    """One broken rule. ``check`` names the stage that found it: ``structure`` (preamble,
    header, blob placement), ``checksum``, ``padding``, ``regeneration``, ``finite``,
    ``external`` (a base checkpoint that is not the pinned one, or lacks the tensor),
    ``unavailable`` (a base checkpoint that cannot be opened here, so the tensors built on it
    could not be checked) or ``unsupported`` (a feature this reader does not implement, so the
    file could not be judged). ``rule`` (the SPEC.md rule number), ``field`` (the header field
    path) and ``tensor`` are the error's own fields (``MCNCError``), ``None`` where it has
    none; ``tensors`` lists every tensor the same problem was found in (one missing base
    checkpoint is one problem, whatever the number of tensors built on it)."""

    check: str
    message: str
    rule: str | None = None
    field: str | None = None
    tensor: str | None = None
    tensors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "message": self.message, "rule": self.rule,
                "field": self.field, "tensor": self.tensor, "tensors": list(self.tensors)}


@dataclass
class VerifyReport:
    """What ``verify_file`` found. ``ok`` is true when no problem was found.

    ``counts`` holds ``blobs``, ``blob_bytes`` (stored bytes checksummed), ``tensors`` (rebuilt),
    ``values`` (elements rebuilt), ``segments``, ``external_references`` (resolved and
    hash-checked), ``skipped_tensors`` (not rebuilt because a blob they need is damaged) and
    ``nonfinite_dense_values`` (NaN or inf in dense tensors: legal, e.g. attention masks, so
    reported in ``notes`` rather than as a problem).
    """

    path: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        """``valid``; ``invalid`` (the file breaks a rule); ``incomplete`` when the only
        problems are base checkpoints that cannot be opened here (the file's own bytes hold:
        verify again where its bases are); ``unverifiable`` when the only problems are
        features this reader does not implement (a newer file: upgrade and verify again),
        with or without unavailable bases."""
        checks = {p.check for p in self.problems}
        if not checks:
            return "valid"
        if checks == {UNAVAILABLE}:
            return "incomplete"
        if checks <= {UNSUPPORTED, UNAVAILABLE}:
            return "unverifiable"
        return "invalid"

    def add(self, check: str, exc_or_message: BaseException | str, tensor: str | None = None
            ) -> None:
        """A problem from an ``MCNCError`` (its fields), or from a message about ``tensor``;
        the same problem found again for another tensor adds that tensor to it."""
        if isinstance(exc_or_message, MCNCError):
            exc = exc_or_message
            problem = Problem(check, str(exc), exc.rule, exc.field, exc.tensor or tensor)
        else:
            problem = Problem(check, str(exc_or_message), tensor=tensor)
        for i, seen in enumerate(self.problems):
            if (seen.check, seen.message, seen.rule, seen.field) == (
                    problem.check, problem.message, problem.rule, problem.field):
                if problem.tensor is not None and problem.tensor not in seen.tensors:
                    self.problems[i] = replace(seen, tensors=(*seen.tensors, problem.tensor))
                return
        self.problems.append(replace(problem, tensors=(problem.tensor,) if problem.tensor
                                     else ()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "status": self.status,
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
            "counts": dict(self.counts),
            "seconds": self.seconds,
        }


def verify_file(path: str | os.PathLike[str], *, batch_values: int = DEFAULT_BATCH_VALUES,
                resolver: Resolver | None = None,
                progress: Callable[[Progress], None] | bool | None = None) -> VerifyReport:
    """Check everything about the ``.mcnc`` file at ``path`` and report what is wrong.
    ``progress`` is called after each tensor is rebuilt and checked, with the counts of the
    whole file; ``True`` draws them as a bar on a terminal, as for a load
    (``mcnc_format.progress.ProgressBar``).

    A damaged or non-conforming file gives a report with problems; this raises
    ``MCNCError`` only when the check cannot run at all (the path cannot be opened or read,
    or memory runs out).
    """
    from .progress import progress_callback  # rich: not imported with this module

    callback = progress_callback(progress, "verifying")
    started = time.perf_counter()
    report = VerifyReport(str(path))
    report.counts = dict.fromkeys(
        ("blobs", "blob_bytes", "tensors", "values", "segments", "external_references",
         "skipped_tensors", "nonfinite_dense_values"), 0)
    mcnc_file = _open(path, report, resolver)
    if mcnc_file is not None:
        with mcnc_file:
            _Verifier(mcnc_file, report, batch_values, callback).run()
    report.seconds = time.perf_counter() - started
    return report


def _open(path: str | os.PathLike[str], report: VerifyReport, resolver: Resolver | None
          ) -> MCNCFile | None:
    if Path(path).is_dir():
        raise MCNCError(f"{path}: is a directory, not an .mcnc file")
    try:
        return MCNCFile(path, verify=Verify.FULL, resolver=resolver)
    except (UnsupportedVersionError, UnsupportedFeatureError) as exc:
        report.add(UNSUPPORTED, exc)
    except FormatError as exc:
        report.add("checksum" if isinstance(exc, ChecksumError) else "structure", exc)
    except MCNCFileNotFoundError:  # a FileNotFoundError already, naming the file
        raise
    except OSError as exc:
        raise MCNCError(f"{path}: cannot read: {exc}") from exc
    return None


class _Verifier:
    """One verification pass over an open file, recording problems in ``report``."""

    def __init__(self, f: MCNCFile, report: VerifyReport, batch_values: int,
                 progress: Callable[[Progress], None] | None = None) -> None:
        self.f = f
        self.header: Header = f.header
        self.report = report
        self.batch_values = max(1, batch_values)
        self.bad_blobs: set[int] = set()
        self.checked: set[str] = set()
        self.progress = progress
        self.bytes_total = sum(_dense_bytes(t) for t in self.header.tensors)
        self.bytes_done = 0
        self.chunks = 0  # regenerated by the streams before the current one
        self.stream_chunks = 0  # regenerated by the current stream so far

    def run(self) -> None:
        self.check_bytes()
        self.report.counts["segments"] = len(self.header.segments)
        self.regenerate_all()

    # -- bytes -----------------------------------------------------------------------------
    def check_bytes(self) -> None:
        for index, problem in sweep_bytes(self.f.context.blobs, self.f.header_length):
            if index is None:
                self.report.add("padding", problem)
            elif problem is not None:
                self.report.add("checksum" if isinstance(problem, ChecksumError)
                                else "structure", problem)
                self.bad_blobs.add(index)
            else:
                self.report.counts["blobs"] += 1
                self.report.counts["blob_bytes"] += self.header.blobs[index].length

    # -- tensors ---------------------------------------------------------------------------
    def regenerate_all(self) -> None:
        """Every tensor the bytes allow, through the engine as one load whose outputs are
        checked and dropped as they are handed out (the engine's batches bound its memory: a
        small workspace, the tensors in flight); a tensor larger than ``batch_values`` values
        is rebuilt box by box. A tensor that fails is reported on its own: the load stops
        there and the tensors not yet checked are rebuilt one by one."""
        pending: list[TensorEntry] = []
        for t in self.header.tensors:
            if isinstance(t, UnknownTensor):
                self.report.add(UNSUPPORTED, t.unsupported(self.f.label))
            elif self.bad_blobs & set(_blobs_of(self.header, t)):
                self.report.counts["skipped_tensors"] += 1
            elif t.numel > self.batch_values:
                self.rebuild(t, self.regenerate_in_boxes)
            else:
                pending.append(t)
        try:
            for name, value in self.stream([t.name for t in pending]):
                self.check_values(self.f.entry(name), value)
        except MemoryError as exc:  # DeviceMemoryError too: the check cannot run
            raise MCNCError(f"{self.f.label}: verification ran out of memory: {exc}") from exc
        except (MCNCError, RuntimeError, ValueError):
            for t in pending:  # find which fail: the rest one by one
                if t.name not in self.checked:
                    self.rebuild(t, self.regenerate_one)

    def rebuild(self, t: TensorEntry, how: Callable[[TensorEntry], None]) -> None:
        """Rebuild ``t`` alone with ``how``; a failure is reported as ``t``'s problem."""
        try:
            how(t)
        except MemoryError as exc:
            raise MCNCError(f"{self.f.label}: verification ran out of memory: {exc}") from exc
        except (MCNCError, RuntimeError, ValueError) as exc:
            self.report.add(_check_of(exc), exc if isinstance(exc, MCNCError) else
                            f"{self.f.label}: tensor {t.name!r} cannot be rebuilt: "
                            f"{type(exc).__name__}: {exc}", t.name)

    def regenerate_one(self, t: TensorEntry) -> None:
        for _, value in self.stream([t.name]):
            self.check_values(t, value)

    def regenerate_in_boxes(self, t: TensorEntry) -> None:
        """A tensor larger than a batch, rebuilt box by box (each at most ``batch_values``
        values) and checked as it goes: memory stays bounded whatever its declared size."""
        nonfinite = 0
        for box in _boxes_within(t.shape, self.batch_values):
            for _, value in self.stream([t.name], {t.name: box}):
                if value.is_floating_point():
                    nonfinite += int((~torch.isfinite(value)).sum())
        self.checked.add(t.name)
        self.report.counts["tensors"] += 1
        self.report.counts["external_references"] += _external_count(t)
        self.report.counts["values"] += t.numel
        self.report_nonfinite(t, nonfinite)
        self.report_progress(t)

    def stream(self, names: list[str], boxes: dict[str, Box] | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """The engine's stream of ``names`` on the CPU, in a workspace of its smallest size
        (memory stays bounded whatever the file's size), its chunks counted for
        ``progress``."""
        self.chunks += self.stream_chunks
        self.stream_chunks = 0
        options = replace(self.f.options, workspace_bytes=MIN_WORKSPACE_BYTES)
        if self.progress is not None:
            options = replace(options, progress=self.count_chunks)
        return self.f.stream(names, "cpu", boxes=boxes, options=options)

    def count_chunks(self, progress: Progress) -> None:
        self.stream_chunks = progress.chunks_regenerated

    def report_progress(self, t: TensorEntry) -> None:
        self.bytes_done += _dense_bytes(t)
        if self.progress is not None:
            self.progress(Progress(t.name, self.report.counts["tensors"], len(self.header.tensors),
                                   self.bytes_done, self.bytes_total,
                                   self.chunks + self.stream_chunks))

    def check_values(self, t: TensorEntry, value: torch.Tensor) -> None:
        self.checked.add(t.name)
        self.report.counts["tensors"] += 1
        self.report.counts["external_references"] += _external_count(t)
        self.report.counts["values"] += value.numel()
        if value.is_floating_point():
            self.report_nonfinite(t, int((~torch.isfinite(value)).sum()))
        self.report_progress(t)

    def report_nonfinite(self, t: TensorEntry, nonfinite: int) -> None:
        if not nonfinite:
            return
        where = f"tensor {t.name!r} ({t.encoding}, {t.dtype})"
        if t.stores_values:
            self.report.counts["nonfinite_dense_values"] += nonfinite
            self.report.notes.append(f"{where} holds {nonfinite} NaN/inf values (stored so)")
            return
        self.report.add("finite", f"{self.f.label}: {where} regenerates to {nonfinite} "
                        f"non-finite values out of {t.numel}: alpha, beta or theta0 hold "
                        "NaN/inf, or the values overflow the output dtype", t.name)


def _boxes_within(shape: tuple[int, ...], limit: int) -> Iterator[Box]:
    """Row-major boxes of at most ``limit`` values that tile a tensor of ``shape``: ranges of
    the first dimension whose trailing block fits, for every index of the ones before it."""
    dim = 0
    while dim < len(shape) and math.prod(shape[dim + 1 :]) > limit:
        dim += 1
    step = max(1, limit // math.prod(shape[dim + 1 :]))
    for outer in itertools.product(*(range(n) for n in shape[:dim])):
        for start in range(0, shape[dim], step):
            stop = min(start + step, shape[dim])
            yield Box(shape, (*outer, start, *(0 for _ in shape[dim + 1 :])),
                      (*(i + 1 for i in outer), stop, *shape[dim + 1 :]))


def _dense_bytes(t: TensorEntry) -> int:
    return t.numel * C.DTYPE_SIZES.get(t.dtype, 4)


def _check_of(exc: BaseException) -> str:
    if isinstance(exc, ExternalReferenceMissing | HubOfflineError):
        return UNAVAILABLE
    if isinstance(exc, ExternalReferenceError):
        return "external"
    if isinstance(exc, UnsupportedFeatureError):
        return UNSUPPORTED
    if isinstance(exc, ChecksumError):
        return "checksum"
    if isinstance(exc, FormatError):
        return "structure"
    return "regeneration"


def _theta0s(t: TensorEntry) -> list[tuple[str, Theta0Entry]]:
    """Every theta0 that rebuilding ``t`` reads, labelled as in messages (``name:A``)."""
    return list(zip(("", ":A", ":B"), t.theta0s(), strict=False))


def _blobs_of(header: Header, t: TensorEntry) -> list[int]:
    """Every blob that rebuilding ``t`` reads."""
    blobs: list[int] = [t.blob] if isinstance(t, DenseTensor | PackedTensor) else []
    for member in t.members():
        seg = header.segments[member.segment]
        blobs += [seg.alpha, seg.beta]
        blobs += header.generators[seg.generator].blobs or ()
    blobs += [th.blob for _, th in _theta0s(t)
              if isinstance(th, BlobTheta0)]
    return blobs


def _external_count(t: TensorEntry) -> int:
    return sum(1 for _, th in _theta0s(t) if isinstance(th, ExternalTheta0))
