"""Slabs: the cached factors of one module for every adapter, where one launch reaches them.

The Triton route (``sgmv.py``) adds the low-rank paths of all the adapters of a batch to a
module's output in one launch pair, so the kernel must find every adapter's factors from a
slot number. A ``Slab`` holds, for one adapted module and one factor dtype, ``A [slots,
r_max, in]``, ``B [slots, out, r_max]`` and ``scale [slots]`` (float32) on the device; an
adapter's factors are copied into a free slot once, when the bank rebuilds them, and its
slot is freed when the cache evicts it. Ranks below ``r_max`` are padded with zeros, which
add nothing to the products. A slab grows (slots doubled, ``r_max`` raised to a new rank)
by reallocating and never shrinks, but it is dropped when its last adapter leaves: it holds
at most twice the most adapters it held at once, each padded to the largest rank it held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapter import Factors

__all__ = ["SLAB_DTYPES", "FactorSlabs", "Slab"]

#: Factor dtypes a slab (and the kernels) take.
SLAB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FIRST_SLOTS = 4


@dataclass
class Slab:
    """One module's factors of one dtype, one slot per cached adapter."""

    a: torch.Tensor  # [slots, r_max, in]
    b: torch.Tensor  # [slots, out, r_max]
    scale: torch.Tensor  # [slots], float32
    #: adapter name -> (slot, rank, scale as the adapter's file gives it)
    held: dict[str, tuple[int, int, float]] = field(default_factory=dict)

    @classmethod
    def empty(cls, a: torch.Tensor, b: torch.Tensor) -> Slab:
        """A slab for factors shaped and typed like ``a [r, in]``, ``b [out, r]``."""
        rank, features = a.shape
        kwargs = {"dtype": a.dtype, "device": a.device}
        return cls(torch.zeros(_FIRST_SLOTS, rank, features, **kwargs),
                   torch.zeros(_FIRST_SLOTS, b.shape[0], rank, **kwargs),
                   torch.zeros(_FIRST_SLOTS, dtype=torch.float32, device=a.device))

    def put(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Copy ``name``'s factors into a free slot, zero past their rank."""
        rank = a.shape[0]
        used = {slot for slot, _, _ in self.held.values()}
        slot = next((s for s in range(self.a.shape[0]) if s not in used), None)
        if slot is None or rank > self.a.shape[1]:
            self._grow(self.a.shape[0] * (2 if slot is None else 1), max(rank, self.a.shape[1]))
            slot = next(s for s in range(self.a.shape[0]) if s not in used)
        self.a[slot].zero_()
        self.a[slot, :rank].copy_(a)
        self.b[slot].zero_()
        self.b[slot, :, :rank].copy_(b)
        self.scale[slot] = scale
        self.held[name] = (slot, rank, scale)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``name``'s ``A [r, in]``, ``B [out, r]`` (views of its slot) and scale."""
        slot, rank, scale = self.held[name]
        return self.a[slot, :rank], self.b[slot, :, :rank], scale

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + self.scale.nbytes

    def _grow(self, slots: int, rank: int) -> None:
        old_slots, old_rank = self.a.shape[:2]
        a = self.a.new_zeros(slots, rank, self.a.shape[2])
        b = self.b.new_zeros(slots, self.b.shape[1], rank)
        a[:old_slots, :old_rank] = self.a
        b[:old_slots, :, :old_rank] = self.b
        scale = self.scale.new_zeros(slots)
        scale[:old_slots] = self.scale
        self.a, self.b, self.scale = a, b, scale


class FactorSlabs:
    """Every slab of a bank, keyed by module and factor dtype."""

    def __init__(self) -> None:
        self.slabs: dict[tuple[str, torch.dtype], Slab] = {}

    def put(self, name: str, factors: Factors) -> None:
        """Copy adapter ``name``'s factors into its modules' slabs (``A`` and ``B`` of one
        module share a dtype of ``SLAB_DTYPES``: the bank checks it when adding)."""
        for module, (a, b, scale) in factors.items():
            key = (module, a.dtype)
            if key not in self.slabs:
                self.slabs[key] = Slab.empty(a, b)
            self.slabs[key].put(name, a, b, scale)

    def free(self, name: str) -> None:
        """Free adapter ``name``'s slots; drop the slabs it leaves empty."""
        for key, slab in list(self.slabs.items()):
            if slab.held.pop(name, None) is not None and not slab.held:
                del self.slabs[key]

    def factors(self, name: str) -> Factors:
        """Adapter ``name``'s factors ``{module: (A, B, scale)}``, views of its slots."""
        out: Factors = {}
        for (module, _), slab in self.slabs.items():
            if name in slab.held:
                out[module] = slab.factors(name)
        return out

    def of_module(self, module: str) -> list[Slab]:
        return [slab for (m, _), slab in self.slabs.items() if m == module]

    @property
    def nbytes(self) -> int:
        return sum(slab.nbytes for slab in self.slabs.values())
