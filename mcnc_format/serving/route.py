"""The batched forward: each row of a batch through its own adapter, over one base model.

For a call, the rows are grouped by adapter (Punica's segments). A forward hook on every
adapted ``nn.Linear`` of the base (``register_forward_hook``, installed for the call and
removed after it) adds to the base output, for each group ``g`` of rows,

    out[g] += scale_g * (x[g] @ A_g.T) @ B_g.T

the segmented matmul of Punica's SGMV, written in torch: a group of consecutive rows is a
slice (no copy), any other group is gathered and scattered back with ``index_add_``. The
product is the one ``MCNCLoRALinear.forward`` computes (input cast to the factor dtype,
``F.linear`` twice, scale, cast to the output dtype), so a row's output equals that of the
trained model with its adapter.

Rows are the first dimension of what the Linear sees, as in transformers' decoders. A batch
that generation widened by repeating each row ``k`` times (beams, ``num_return_sequences``:
``repeat_interleave``) is mapped back to the rows it came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MCNCError
from .adapter import Factors

__all__ = ["Routing"]

Rows = slice | torch.Tensor


class Routing:
    """The row groups of one call and the factors each uses."""

    def __init__(self, adapters: Sequence[str | None], factors: dict[str, Factors],
                 device: torch.device) -> None:
        self.batch = len(adapters)
        self.device = device
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapters):
            if name is not None:
                rows.setdefault(name, []).append(row)
        self.groups = [(rows[name], factors[name]) for name in rows]
        self.modules = sorted({m for _, f in self.groups for m in f})
        self._selections: dict[int, list[tuple[Rows, Factors]]] = {}

    def selections(self, rows: int) -> list[tuple[Rows, Factors]]:
        """The row groups of a batch of ``rows`` rows: this call's, or its rows repeated."""
        if rows not in self._selections:
            if rows % self.batch:
                raise MCNCError(
                    f"an adapted module saw {rows} rows in a call with {self.batch} adapters "
                    "(one per row): the bank routes by the first dimension, which must be the "
                    "batch or the batch with each row repeated")
            repeat = rows // self.batch
            self._selections[rows] = [(self._rows(members, repeat), factors)
                                      for members, factors in self.groups]
        return self._selections[rows]

    def _rows(self, members: list[int], repeat: int) -> Rows:
        index = torch.tensor(members, dtype=torch.int64)
        if repeat > 1:
            index = (index[:, None] * repeat + torch.arange(repeat)).reshape(-1)
        first, last = int(index[0]), int(index[-1])
        if last - first + 1 == index.numel():
            return slice(first, last + 1)
        return index.to(self.device)

    def hook(self, module_name: str) -> Any:
        """The forward hook of the base Linear named ``module_name``."""

        def add_adapters(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
                         ) -> torch.Tensor:
            x = args[0]
            for rows, factors in self.selections(x.shape[0]):
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
