"""The batched forward: each row of a batch through its own adapter, over one base model.

For a call, the rows are grouped by adapter (Punica's segments). A forward hook on every
adapted ``nn.Linear`` of the base (``register_forward_hook``, installed for the call and
removed after it) adds to the base output, for each group ``g`` of rows,

    out[g] += scale_g * (x[g] @ A_g.T) @ B_g.T

the segmented matmul of Punica's SGMV. Two routes compute it (``Route``):

- ``TorchRouting``: two ``F.linear`` per group; a group of consecutive rows is a slice (no
  copy), any other group is gathered and scattered back with ``index_add_``. The product
  is the one ``MCNCLoRALinear.forward`` computes (input cast to the factor dtype,
  ``F.linear`` twice, scale, cast to the output dtype), so a row's output equals that of the
  trained model with its adapter.
- ``TritonRouting``: one shrink and one expand launch per adapted module (per factor dtype)
  for all groups (``sgmv.py``), on the factors the bank keeps in slabs (``slab.py``), with the
  same rounding steps.

Rows are the first dimension of what the Linear sees, as in transformers' decoders. A batch
that generation widened by repeating each row ``k`` times (beams, ``num_return_sequences``:
``repeat_interleave``) is mapped back to the rows it came from.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.staging import to_device_async
from ..errors import MCNCError, UsageError
from .adapter import Factors
from .slab import SLAB_DTYPES, FactorSlabs, Slab

__all__ = ["Route", "Routing", "TorchRouting", "TritonRouting"]

Rows = slice | torch.Tensor
Hook = Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]


class Route(enum.Enum):
    """How an ``AdapterBank`` computes the low-rank paths of a batch (docs/serving.md)."""

    #: Two ``F.linear`` per adapter group and module: any device, no Triton.
    TORCH = "torch"
    #: Punica-style SGMV kernels, one shrink and one expand launch per module for all
    #: groups, on factors kept in per-module slabs: CUDA with ``mcnc-format[gpu]``.
    TRITON = "triton"


class Routing(abc.ABC):
    """The row groups of one call (``names[g]``'s rows ``members[g]``) and their hooks."""

    def __init__(self, adapters: Sequence[str | None], modules: list[str],
                 device: torch.device) -> None:
        self.batch = len(adapters)
        self.device = device
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapters):
            if name is not None:
                rows.setdefault(name, []).append(row)
        self.names = list(rows)
        self.members = list(rows.values())
        self.modules = modules

    def repeat(self, rows: int) -> int:
        """How many times generation repeated each of this call's rows to make ``rows``."""
        if rows % self.batch:
            raise MCNCError(
                f"an adapted module saw {rows} rows in a call with {self.batch} adapters "
                "(one per row): the bank routes by the first dimension, which must be the "
                "batch or the batch with each row repeated")
        return rows // self.batch

    @staticmethod
    def expand(members: list[int], repeat: int, tokens: int = 1) -> torch.Tensor:
        """The indices (int64, on the CPU) of a group's rows when each row of the call is
        repeated ``repeat`` times, and each of those holds ``tokens`` consecutive rows."""
        index = torch.tensor(members, dtype=torch.int64)
        per = repeat * tokens
        return (index[:, None] * per + torch.arange(per)).reshape(-1)

    @abc.abstractmethod
    def hook(self, module_name: str) -> Hook:
        """The forward hook of the base Linear named ``module_name``."""

    @contextmanager
    def installed(self, base: nn.Module) -> Iterator[None]:
        """The hooks on the base's adapted Linears for the duration of a call."""
        handles = []
        try:
            for name in self.modules:
                handles.append(base.get_submodule(name).register_forward_hook(self.hook(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()


class TorchRouting(Routing):
    """``Route.TORCH``: per group, ``F.linear`` twice on a slice or a gathered index."""

    def __init__(self, adapters: Sequence[str | None], factors: dict[str, Factors],
                 device: torch.device) -> None:
        modules = sorted({m for name in factors for m in factors[name]})
        super().__init__(adapters, modules, device)
        self.factors = [factors[name] for name in self.names]
        self._selections: dict[int, list[Rows]] = {}

    def selections(self, rows: int) -> list[Rows]:
        """Each group's rows in a batch of ``rows`` rows: this call's, or its rows repeated."""
        if rows not in self._selections:
            repeat = self.repeat(rows)
            self._selections[rows] = [self._rows(self.expand(m, repeat)) for m in self.members]
        return self._selections[rows]

    def _rows(self, index: torch.Tensor) -> Rows:
        first, last = int(index[0]), int(index[-1])
        if last - first + 1 == index.numel():
            return slice(first, last + 1)
        return index.to(self.device)

    def hook(self, module_name: str) -> Hook:
        def add_adapters(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
                         ) -> torch.Tensor:
            x = args[0]
            for rows, factors in zip(self.selections(x.shape[0]), self.factors, strict=True):
                factor = factors.get(module_name)
                if factor is None:
                    continue
                a, b, scale = factor
                delta = F.linear(F.linear(x[rows].to(a.dtype), a), b) * scale
                if isinstance(rows, slice):
                    output[rows] += delta.to(output.dtype)
                else:
                    output.index_add_(0, rows, delta.to(output.dtype))
            return output

        return add_adapters


class TritonRouting(Routing):
    """``Route.TRITON``: per module and slab, one ``sgmv`` over a tile table of all groups.

    The row list (every group's token rows, group after group) and the tile tables are built
    on the CPU once per input shape of the call and copied to the device once; modules whose
    slabs give the groups the same slots share a table."""

    def __init__(self, adapters: Sequence[str | None], slabs: FactorSlabs,
                 device: torch.device) -> None:
        from . import sgmv

        self.kernels = sgmv
        wanted = set(adapters) - {None}
        self.slabs = {module: found for module in sorted({m for m, _ in slabs.slabs})
                      if (found := [s for s in slabs.of_module(module) if wanted & set(s.held)])}
        super().__init__(adapters, list(self.slabs), device)
        self._rows: dict[tuple[int, int], tuple[torch.Tensor, list[int]]] = {}
        self._tiles: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}

    def rows(self, rows: int, tokens: int) -> tuple[torch.Tensor, list[int]]:
        """The row list (int32, on the device) of an input of ``rows x tokens`` rows, and
        each group's first position in it."""
        key = (rows, tokens)
        if key not in self._rows:
            repeat = self.repeat(rows)
            parts = [self.expand(m, repeat, tokens) for m in self.members]
            starts = [0]
            for part in parts:
                starts.append(starts[-1] + part.numel())
            self._rows[key] = (to_device_async(torch.cat(parts).to(torch.int32), self.device),
                               starts)
        return self._rows[key]

    def tiles(self, rows: int, tokens: int, slab: Slab) -> torch.Tensor:
        """The tile table ``[tiles, 3]`` (first position, rows, slot) of ``slab``'s groups."""
        slots = tuple(slab.held[n][0] if n in slab.held else -1 for n in self.names)
        key = (rows, tokens, slots)
        if key not in self._tiles:
            _, starts = self.rows(rows, tokens)
            block = self.kernels.BLOCK_M
            table = [(p, min(block, stop - p), slot)
                     for slot, start, stop in zip(slots, starts[:-1], starts[1:], strict=True)
                     if slot >= 0 for p in range(start, stop, block)]
            self._tiles[key] = to_device_async(
                torch.tensor(table, dtype=torch.int32).reshape(-1, 3), self.device)
        return self._tiles[key]

    def hook(self, module_name: str) -> Hook:
        slabs = self.slabs[module_name]

        def add_adapters(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
                         ) -> torch.Tensor:
            x = args[0]
            if output.requires_grad:
                raise UsageError("Route.TRITON adds the adapters in place, outside autograd: "
                                 "call the bank under torch.no_grad() (generate() does)")
            if output.dtype not in SLAB_DTYPES:
                raise UsageError(f"Route.TRITON writes outputs of {list(SLAB_DTYPES)}, "
                                 f"{module_name!r} returns {output.dtype}: use Route.TORCH")
            if not x.device == output.device == self.device:
                raise UsageError(f"{module_name!r} runs on {output.device} with its input on "
                                 f"{x.device}, the bank's factors are on {self.device}: the "
                                 "adapted layers must run on the bank's device")
            rows = x.shape[0]
            flat_x = x.reshape(-1, x.shape[-1])
            if flat_x.stride(1) != 1:
                flat_x = flat_x.contiguous()
            output = output.contiguous()
            flat_out = output.view(-1, output.shape[-1])
            tokens = flat_x.shape[0] // rows
            index, _ = self.rows(rows, tokens)
            for slab in slabs:
                self.kernels.sgmv(flat_x, flat_out, slab.a, slab.b, slab.scale, index,
                                  self.tiles(rows, tokens, slab))
            return output

        return add_adapters
