"""Where a load runs: one typed backend, chosen once per load (``choose_backend``).

Everything that differs between devices lives here, so the executor has no device branches:
how outputs are allocated (pre-faulted host pages on the CPU, the compute stream's pool on
CUDA), how bytes reach the device (a ``CopyEngine``), how much memory is free, which device is
current during a step, how a lora box is merged, how a seeded generator's weights are drawn,
and whether the fused Triton kernels rebuild a target (``capabilities``: data the planner
reads, not a callback into the executor).

- ``CpuTorch``: the torch path on the CPU (the reference every other backend is tested
  against). A compiled CPU path would be one more class here.
- ``CudaTorch``: the same arithmetic with torch on a GPU; pinned staging and a copy stream.
- ``DeviceTorch``: the same on any other accelerator torch offers (``mps``, ``xpu``).
- ``CudaTriton``: ``CudaTorch`` with the fused regeneration kernel (``triton_kernels``).
- ``InterpretedTriton``: the Triton kernels on the CPU under ``TRITON_INTERPRET=1`` (tests).

``Precision.AUTO`` and ``use_triton=None`` pick only paths a recorded GPU run measured correct
(``options.MEASURED_ON_GPU``; docs/gpu.md lists each path and the run behind it): a path never
run on a GPU is used only when asked for by name.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .. import hostmem
from ..errors import UsageError
from ..generator import GeneratorSpec, GeneratorWeights
from ..header import MemberEntry, Theta0Entry
from .fused import DEVICE_MERGE_BLOCK_ELEMENTS, MERGE_BLOCK_ELEMENTS, lora_merge
from .options import MEASURED_ON_GPU, GpuPath, LoadOptions, Precision
from .staging import CopyEngine, CudaCopyEngine, SyncCopyEngine
from .theta0 import KernelTheta0, behaviour, is_stored

if TYPE_CHECKING:
    from .triton_kernels import MemberJob

__all__ = [
    "MIN_TRITON",
    "Backend",
    "CpuTorch",
    "CudaTorch",
    "CudaTriton",
    "DeviceTorch",
    "InterpretedTriton",
    "KernelCapabilities",
    "choose_backend",
    "default_backend",
    "installed_triton",
    "triton_available",
    "triton_refusal",
    "triton_too_old",
]


#: The oldest Triton the kernels are written for (``libdevice``, the NVIDIA backend package):
#: the ``mcnc-format[gpu]`` extra's floor. torch 2.3's CUDA builds install Triton 2.3.
MIN_TRITON = (3, 0)
#: The distributions that install the ``triton`` package (release and PyTorch's own builds).
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton")


@functools.cache
def installed_triton() -> str | None:
    """The installed Triton's version, read without importing it (``None``: not installed;
    ``""``: importable but without a distribution's metadata, such as a source checkout)."""
    if importlib.util.find_spec("triton") is None:
        return None
    for name in _TRITON_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return ""


def triton_too_old(version: str) -> bool:
    """Whether Triton ``version`` predates ``MIN_TRITON`` (an unreadable version is taken to
    be new enough: a source checkout is a developer's)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) < MIN_TRITON


def triton_refusal(feature: str) -> str | None:
    """Why the Triton kernels cannot serve ``feature`` here, as an error message's start, or
    ``None`` where they can."""
    version = installed_triton()
    if version is None:
        return f"{feature} needs Triton: pip install 'mcnc-format[gpu]'"
    if triton_too_old(version):
        floor = ".".join(map(str, MIN_TRITON))
        return (f"{feature} needs Triton {floor} or newer, and Triton {version} is installed "
                f"(torch 2.3 installs 2.3): pip install 'triton>={floor}'")
    return None


def triton_available() -> bool:
    """Whether Triton new enough for the kernels (``MIN_TRITON``, the ``mcnc-format[gpu]``
    extra) is installed: ``use_triton=None`` on CUDA takes the torch path otherwise."""
    return triton_refusal("") is None


@dataclass(frozen=True)
class KernelCapabilities:
    """What the fused kernel rebuilds, as data for the planner: members whose output dtype
    it stores and whose theta0 it evaluates (a dense theta0 of any dtype is read as a staged
    base). The planner sizes batches for the torch path where the kernel does not apply."""

    dtypes: frozenset[torch.dtype]

    def takes(self, member: MemberEntry | None, dtype: torch.dtype) -> bool:
        if member is None or dtype not in self.dtypes:
            return False
        theta0 = member.theta0
        return is_stored(theta0) or behaviour(theta0).kernel_form(theta0, member.shape) is not None


class Backend:
    """What every backend does, as the CPU does it: the torch path over host memory.
    Subclasses override where their device differs."""

    #: The fused kernels' capabilities, ``None`` where no kernel runs (the executor then
    #: builds no kernel job, so the kernel methods below are never called).
    capabilities: KernelCapabilities | None = None
    #: Whether the device's memory is host memory: bytes read from the file are used where
    #: they were read instead of being copied to the device.
    host_memory = True

    def __init__(self, device: torch.device, options: LoadOptions) -> None:
        self.device = device
        self.options = options

    # -- memory and copies ---------------------------------------------------------------
    def copy_engine(self) -> CopyEngine:
        return SyncCopyEngine(self.device)

    def on_device(self) -> contextlib.AbstractContextManager[object]:
        """The device made current for one step's work (never held across a yield)."""
        return contextlib.nullcontext()

    def output(self, numel: int, dtype: torch.dtype, engine: CopyEngine
               ) -> tuple[torch.Tensor, bool]:
        """A target's flat storage and whether it is known to hold zeros. On the CPU: zeroed,
        pre-faulted huge pages (a fresh page costs a fault per 4 KiB otherwise)."""
        return hostmem.zeros(numel, dtype), True

    def workspace_bytes(self, output_bytes: int) -> int:
        return self.options.workspace_for(output_bytes, True)

    def free_bytes(self) -> int | None:
        """Memory a load may still take on the device, ``None`` where it is not known."""
        return None

    def describe_memory(self) -> str:
        return "device memory exhausted"

    # -- compute -------------------------------------------------------------------------
    def draw_weights(self) -> DrawWeights | None:
        """How a seeded generator's weights are drawn here (``None``: torch's own draw)."""
        return None

    def draw_uniform(self) -> DrawUniform | None:
        """One-launch uniform draws from element 0 (``None``: ``philox.uniform_signed``)."""
        return None

    def lora_merge(self, out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float,
                   base: torch.Tensor | None) -> None:
        """``out = base + scale * (B @ A)`` with §6.3's roundings, in cache-sized row blocks."""
        lora_merge(out, b, a, scale, base, MERGE_BLOCK_ELEMENTS)

    def product(self, stored: torch.dtype, output: torch.dtype, drawn: bool) -> Precision:
        """The output-layer product for a member stored as ``stored``, loaded as ``output``:
        the torch path always multiplies in float32 (IEEE)."""
        return Precision.IEEE

    # -- kernels (only backends with ``capabilities``) ----------------------------------------
    def kernel_theta0(self, entry: Theta0Entry, shape: tuple[int, ...],
                      base: torch.Tensor | None) -> KernelTheta0:
        raise NotImplementedError(f"{type(self).__name__} runs no kernel")

    def member_job(self, dest: torch.Tensor, row0: int, row1: int, first_local: int,
                   theta0: KernelTheta0, theta_first: int) -> MemberJob:
        raise NotImplementedError(f"{type(self).__name__} runs no kernel")

    def regenerate_members(self, left: torch.Tensor, stacked: torch.Tensor, has_bias: bool,
                           jobs: Sequence[MemberJob], precision: Precision,
                           split: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} runs no kernel")

    def regenerate_rows(self, left: torch.Tensor, stacked: torch.Tensor, has_bias: bool,
                        rows: torch.Tensor, theta0: KernelTheta0, precision: Precision,
                        row_elements: torch.Tensor | None,
                        split: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} runs no kernel")


class DrawWeights(Protocol):
    """Draws a seeded generator's weights (§5.2) on a device."""

    def __call__(self, spec: GeneratorSpec, device: torch.device) -> GeneratorWeights: ...


class DrawUniform(Protocol):
    """``philox.uniform_signed(seed, stream, 0, count, bound)`` on a device."""

    def __call__(self, seed: int, stream: int, count: int, bound: float,
                 device: torch.device) -> torch.Tensor: ...


class CpuTorch(Backend):
    """The torch path on the CPU: the reference every other backend is tested against."""


class DeviceTorch(Backend):
    """The torch path on an accelerator other than CUDA (``mps``, ``xpu``, ...): device
    memory for outputs and staging, synchronous copies."""

    host_memory = False

    def output(self, numel: int, dtype: torch.dtype, engine: CopyEngine
               ) -> tuple[torch.Tensor, bool]:
        return engine.output_empty((numel,), dtype), False

    def workspace_bytes(self, output_bytes: int) -> int:
        return self.options.workspace_for(output_bytes, False)


class CudaTorch(DeviceTorch):
    """The torch path on a CUDA device: pinned staging, a copy stream, device memory."""

    def copy_engine(self) -> CopyEngine:
        return CudaCopyEngine(self.device)

    def on_device(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.device(self.device)

    def free_bytes(self) -> int | None:
        """Free device memory, counting what torch's allocator holds in reserve."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_reserved(self.device)
                   - torch.cuda.memory_allocated(self.device))

    def describe_memory(self) -> str:
        free, total = torch.cuda.mem_get_info(self.device)
        return f"{free} of {total} bytes free"

    def lora_merge(self, out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float,
                   base: torch.Tensor | None) -> None:
        lora_merge(out, b, a, scale, base, DEVICE_MERGE_BLOCK_ELEMENTS)


class _TritonKernels(Backend):
    """The fused Triton kernels on top of a torch backend (mixed in first)."""

    def __init__(self, device: torch.device, options: LoadOptions) -> None:
        super().__init__(device, options)
        from . import triton_kernels

        self._tk = triton_kernels
        self.capabilities = KernelCapabilities(frozenset(triton_kernels.KERNEL_DTYPES))
        #: Paths used unless measured: asked for by name (``use_triton=True``) or recorded.
        self._explicit = options.use_triton is True

    def _allowed(self, path: GpuPath) -> bool:
        return self._explicit or self.device.type != "cuda" or path in MEASURED_ON_GPU

    def draw_weights(self) -> DrawWeights | None:
        return self._tk.draw_generator_weights if self._allowed(GpuPath.PHILOX_KERNEL) else None

    def draw_uniform(self) -> DrawUniform | None:
        return self._tk.philox_uniform if self._allowed(GpuPath.PHILOX_KERNEL) else None

    def lora_merge(self, out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float,
                   base: torch.Tensor | None) -> None:
        if out.dtype in self._tk.KERNEL_DTYPES and a.numel() and self._allowed(
                GpuPath.LORA_MERGE_KERNEL):
            self._tk.lora_merge(out, b, a, scale, base)  # the same bits, one pass
        else:
            super().lora_merge(out, b, a, scale, base)

    def product(self, stored: torch.dtype, output: torch.dtype, drawn: bool) -> Precision:
        """``kernel_precision`` of the wider of the stored and output dtypes (a float32
        tensor loaded as bfloat16 keeps float32's product, so it equals the float32 load
        rounded once)."""
        bound = output if output.itemsize >= stored.itemsize else stored
        return self._tk.kernel_precision(self.options.precision, bound, self.device, drawn)

    def kernel_theta0(self, entry: Theta0Entry, shape: tuple[int, ...],
                      base: torch.Tensor | None) -> KernelTheta0:
        theta0 = self._tk.kernel_theta0(entry, shape, base)
        if theta0 is None:  # capabilities.takes admits only theta0 the kernel evaluates
            raise UsageError(f"the kernel cannot evaluate theta0 {entry.kind!r}")
        return theta0

    def member_job(self, dest: torch.Tensor, row0: int, row1: int, first_local: int,
                   theta0: KernelTheta0, theta_first: int) -> MemberJob:
        return self._tk.MemberJob(dest, row0, row1, first_local, theta0, theta_first)

    def regenerate_members(self, left: torch.Tensor, stacked: torch.Tensor, has_bias: bool,
                           jobs: Sequence[MemberJob], precision: Precision,
                           split: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self._tk.regenerate_members(left, stacked, has_bias, jobs, precision, split=split)

    def regenerate_rows(self, left: torch.Tensor, stacked: torch.Tensor, has_bias: bool,
                        rows: torch.Tensor, theta0: KernelTheta0, precision: Precision,
                        row_elements: torch.Tensor | None,
                        split: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self._tk.fused_regenerate(left, stacked, has_bias, rows, 0, theta0, precision,
                                  row_elements=row_elements, split=split)


class CudaTriton(_TritonKernels, CudaTorch):
    """The fused kernel on a CUDA device."""


class InterpretedTriton(_TritonKernels, CpuTorch):
    """The fused kernel on the CPU, under ``TRITON_INTERPRET=1`` (what the tests check the
    kernels with, without a GPU)."""


def choose_backend(device: torch.device, options: LoadOptions) -> Backend:
    """The backend of a load on ``device``: the Triton kernels on CUDA when Triton is
    installed (``use_triton=None``) or when asked for (``True``; on the CPU only under the
    interpreter), the torch path otherwise."""
    use = options.use_triton
    refusal = triton_refusal("use_triton=True") if use else None
    if refusal is not None:
        raise UsageError(f"{refusal}; or pass use_triton=False (or leave it unset) for the "
                         "torch path")
    if device.type == "cuda":
        if use is False or (use is None and not triton_available()):
            return CudaTorch(device, options)
        return CudaTriton(device, options)
    if use:
        from . import triton_kernels

        if triton_kernels.compiled() or device.type != "cpu":
            raise UsageError(
                f"use_triton=True on {device}: the Triton kernels run on CUDA devices (or on "
                "the CPU under TRITON_INTERPRET=1, for tests); load onto a CUDA device or "
                "leave use_triton unset")
        return InterpretedTriton(device, options)
    return CpuTorch(device, options) if device.type == "cpu" else DeviceTorch(device, options)


def default_backend(device: torch.device) -> Backend:
    """The backend a load on ``device`` gets without options (what resident rebuilds, such
    as the adapter bank's, use to draw weights and theta0)."""
    return choose_backend(device, LoadOptions())


