"""What a caller can ask of a load, and what it is told while the load runs."""

from __future__ import annotations

import difflib
import enum
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..errors import UnknownOptionError, UsageError

E = TypeVar("E", bound=enum.Enum)

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "MEASURED_ON_GPU",
    "MIN_WORKSPACE_BYTES",
    "GpuPath",
    "LoadOptions",
    "Precision",
    "Progress",
    "Verify",
    "check_keywords",
]

DEFAULT_STAGING_BYTES = 64 << 20
MIN_WORKSPACE_BYTES = 32 << 20
#: On accelerators, whose batches are launched rather than run: fewer, larger ones.
MIN_DEVICE_WORKSPACE_BYTES = 64 << 20
#: Device memory beyond the outputs, as a fraction of the outputs, when that is more than
#: ``MIN_WORKSPACE_BYTES``: larger batches for larger loads.
WORKSPACE_FRACTION = 0.02


class Precision(str, enum.Enum):
    """How the fused kernel computes the output layer's product (SPEC.md §10.1)."""

    #: The fastest product a recorded GPU run measured within each output dtype's bound
    #: (``MEASURED_ON_GPU``): today ``IEEE`` everywhere. ``BF16X3`` joins for float16 and
    #: bfloat16 outputs on GPUs whose tensor cores multiply bfloat16 once a GPU run records it.
    AUTO = "auto"
    #: float32 FMA: the most accurate; within the bound of every output dtype.
    IEEE = "ieee"
    #: For float16 and bfloat16 outputs, operands split into bfloat16 high and low parts and
    #: three tensor-core products summed in float32 (within the bound of 16-bit outputs
    #: only: wider outputs keep ``IEEE``).
    BF16X3 = "bf16x3"
    #: Triton's three TF32 tensor-core products, which emulate float32.
    TF32X3 = "tf32x3"

    @classmethod
    def of(cls, value: str | Precision) -> Precision:
        return _member(cls, value, "precision")


class GpuPath(enum.Enum):
    """The GPU code paths a load can take that only a GPU run can prove (docs/gpu.md's table
    names the run that measured each, or says it never ran)."""

    #: The fused regeneration kernel with float32 FMA products.
    KERNEL_IEEE = "kernel-ieee"
    #: The fused regeneration kernel with split bfloat16 tensor-core products.
    KERNEL_BF16X3 = "kernel-bf16x3"
    #: The one-pass lora merge kernel (``triton_kernels.lora_merge``).
    LORA_MERGE_KERNEL = "lora-merge-kernel"
    #: Philox generator weights and uniform theta0 drawn in one Triton launch.
    PHILOX_KERNEL = "philox-kernel"


#: The paths a recorded GPU run measured correct: what ``Precision.AUTO`` and
#: ``use_triton=None`` may pick. Any other path runs only when asked for by name
#: (``precision=...``, ``use_triton=True``). Add a path here only with the results file of the
#: run that measured it (benchmarks/results/) and its row in docs/gpu.md.
MEASURED_ON_GPU: frozenset[GpuPath] = frozenset({GpuPath.KERNEL_IEEE})


def _member(kind: type[E], value: object, what: str) -> E:
    """``kind(value)``, or a ``UsageError`` naming the values there are."""
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(repr(m.value) for m in kind)
        raise UsageError(f"{what}={value!r} is not one of {names}") from None


class Verify(str, enum.Enum):
    """What a load checks of the bytes it reads (SPEC.md §4 R24, §7.4 R75)."""

    #: Every blob's XXH3-64 on first use, and every external base's SHA-256 on every load
    #: call (``get_tensor``, a ``get_slice`` box, ``tensors``, ``stream``, one DCP load) that
    #: reads it, also while the file stays open.
    FULL = "full"
    #: Blob checksums as FULL; an external base's SHA-256 only when the digest cache
    #: (``engine/digests.py``) has no record of this very file (device, inode, size, mtime,
    #: ctime) holding the pinned digest; that identity is read again at every load call.
    #: The default: a changed or replaced base is hashed again; see docs/gpu.md for what it
    #: trusts and what it cannot see.
    CACHED = "cached"
    #: Nothing: for files this process wrote itself.
    NONE = "none"

    @classmethod
    def of(cls, value: bool | str | Verify) -> Verify:
        """``True`` is ``CACHED``, ``False`` is ``NONE``."""
        if isinstance(value, bool):
            return cls.CACHED if value else cls.NONE
        return _member(cls, value, "verify")


@dataclass(frozen=True)
class Progress:
    """Reported after each tensor is handed out. ``chunks_regenerated`` counts the chunks the
    load has rebuilt so far: a box rebuilds only the chunks that cover it."""

    name: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    chunks_regenerated: int


@dataclass(frozen=True)
class LoadOptions:
    """Knobs of a load; the defaults suit a CPU, or a GPU with a few GB to spare.

    ``staging_bytes``: pinned host memory for the staging buffers together (CUDA). Byte
    counts are positive ints (``from_keywords`` checks them).
    ``workspace_bytes``: memory beyond the outputs that sizes the regeneration batches
    (default ``max(32 MiB, 2 % of the outputs)`` on the CPU, ``max(64 MiB, 2 %)`` elsewhere).
    ``use_triton``: ``None`` picks the fused kernel on CUDA when Triton is installed; ``True``
    forces it (on the CPU only under ``TRITON_INTERPRET=1``); ``False`` keeps the torch path.
    ``precision``: the kernel's output-layer product (``Precision``; ``AUTO`` by default).
    ``verify``: what is checked of the bytes read (``Verify``; ``True`` is ``CACHED``, the
    default, ``False`` is ``NONE``).
    ``progress``: called with a ``Progress`` after each tensor (the keyword also takes
    ``True``: a progress bar on a terminal, ``mcnc_format.progress.ProgressBar``).
    """

    staging_bytes: int = DEFAULT_STAGING_BYTES
    workspace_bytes: int | None = None
    use_triton: bool | None = None
    precision: Precision = Precision.AUTO
    verify: Verify = Verify.CACHED
    progress: Callable[[Progress], None] | None = None

    def workspace_for(self, output_bytes: int, on_cpu: bool) -> int:
        """The workspace of a load whose outputs take ``output_bytes``."""
        if self.workspace_bytes is not None:
            return self.workspace_bytes
        floor = MIN_WORKSPACE_BYTES if on_cpu else MIN_DEVICE_WORKSPACE_BYTES
        return max(floor, int(output_bytes * WORKSPACE_FRACTION))

    @classmethod
    def from_keywords(cls, call: str, keywords: Mapping[str, Any],
                      accepted: Iterable[str] = ()) -> LoadOptions:
        """The options given as keywords to ``call`` (``load``, ``stream``, ``MCNCFile`` ...),
        which may also take the ``accepted`` keywords of its own; any other keyword is
        refused (``check_keywords``). Values are checked here (``Precision.of``,
        ``Verify.of``, ``progress_callback``), so every entry point accepts the same
        spellings."""
        names = [f.name for f in fields(cls)]
        check_keywords(call, keywords, (*names, *accepted))
        given = {name: keywords[name] for name in names if name in keywords}
        for name in ("staging_bytes", "workspace_bytes"):
            if given.get(name) is not None:
                given[name] = _byte_count(name, given[name])
        if not isinstance(given.get("use_triton"), bool | None):
            raise UsageError(f"use_triton={given['use_triton']!r}: give True (the Triton "
                             "kernels), False (the torch path) or None (the kernels where "
                             "they are measured)")
        if "precision" in given:
            given["precision"] = Precision.of(given["precision"])
        if "verify" in given:
            given["verify"] = Verify.of(given["verify"])
        if "progress" in given:
            from ..progress import progress_callback  # rich: only when asked for

            given["progress"] = progress_callback(given["progress"])
        if given.get("staging_bytes") is None:
            given.pop("staging_bytes", None)
        return cls(**given)


def _byte_count(name: str, value: Any) -> int:
    """``value`` as a positive number of bytes (any integer: numpy's too), or a
    ``UsageError``: a string or float would fail deep inside the planner, and a negative
    count would silently load as the smallest."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise UsageError(f"{name}={value!r}: give a positive number of bytes as an int "
                         f"({name}=64 << 20 for 64 MiB)")
    return count


def check_keywords(call: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse keywords ``call`` does not take, naming the closest valid one: a misspelled
    option silently ignored would load something other than what was asked."""
    allowed = sorted(set(allowed))
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownOptionError(f"{call}() got an unexpected keyword {name!r}{hint} "
                                     f"It takes: {', '.join(allowed)}")
