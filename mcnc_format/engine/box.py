"""Boxes: the part of a tensor a caller asks for, and the element runs that part covers.

A box is a start and a stop per dimension (steps of one), as ``safe_open(...).get_slice`` and
distributed checkpointing (``storage_offsets`` and ``lengths``) describe shards. Rebuilding a
box needs the tensor's elements in row-major order, so a box is seen as *runs*: the dimensions
after the last partial one are whole, so each run is one contiguous range of elements, and the
runs are indexed by the box's outer dimensions. A row block is one run; a column block of a
matrix is one run per row.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..errors import MCNCIndexError, UsageError

__all__ = ["Box"]


@dataclass(frozen=True)
class Box:
    """Elements ``[starts[i], stops[i])`` of each dimension ``i`` of a tensor of ``shape``;
    ``drop`` lists the dimensions indexed by an integer (removed from the result's shape).
    Derived facts are computed once (the planner asks for them per batch)."""

    shape: tuple[int, ...]
    starts: tuple[int, ...]
    stops: tuple[int, ...]
    drop: tuple[int, ...] = ()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def full(cls, shape: tuple[int, ...]) -> Box:
        return cls(tuple(shape), (0,) * len(shape), tuple(shape))

    @classmethod
    def from_index(cls, shape: tuple[int, ...], index: Any, label: str = "tensor") -> Box:
        """The box of a basic index with steps of one (``strided`` says what an index may
        hold); a step other than one is refused, since a box has none."""
        box, steps = cls.strided(shape, index, label)
        for dim, step in enumerate(steps):
            if step != 1:
                raise UsageError(f"{label}: dimension {dim}: a box takes steps of 1 only, "
                                 f"got {step}; get_slice(name)[...] takes positive steps")
        return box

    @classmethod
    def strided(cls, shape: tuple[int, ...], index: Any, label: str = "tensor"
                ) -> tuple[Box, tuple[int, ...]]:
        """The box spanning a basic index, and the step to take within it per dimension of
        the box (its first element is the first one selected).

        As torch indexes: slices with positive steps (bounds clipped, negative bounds counted
        from the end; bounds may be numpy integers or 0-d integer tensors), integer positions
        (``int``, numpy integers, 0-d integer tensors; negative from the end), one ``...`` and
        ``[]`` (nothing of the first dimension). An integer out of range, more indices than
        dimensions and an unsupported item raise ``MCNCIndexError`` (an ``IndexError``)."""
        if isinstance(index, list) and not index:
            if not shape:
                raise MCNCIndexError(f"{label}: [] selects along dimension 0, and the tensor "
                                     "is 0-d; index it with () or ...")
            return cls(tuple(shape), (0,) * len(shape), (0, *shape[1:])), (1,) * len(shape)
        items = list(index) if isinstance(index, tuple) else [index]
        if sum(item is Ellipsis for item in items) > 1:
            raise MCNCIndexError(f"{label}: an index may hold one '...' only")
        if any(item is Ellipsis for item in items):
            at = next(i for i, item in enumerate(items) if item is Ellipsis)
            fill = len(shape) - (len(items) - 1)
            items[at : at + 1] = [slice(None)] * max(fill, 0)
        if len(items) > len(shape):
            raise MCNCIndexError(f"{label}: too many indices ({len(items)}) for a tensor of "
                                 f"rank {len(shape)}")
        items += [slice(None)] * (len(shape) - len(items))
        starts, stops, steps, drop = [], [], [], []
        for dim, (item, size) in enumerate(zip(items, shape, strict=True)):
            if isinstance(item, slice):
                start, stop, step = _slice_bounds(item, size, f"{label}: dimension {dim}")
                count = len(range(start, stop, step))
                starts.append(start)
                stops.append(start + (count - 1) * step + 1 if count else start)
                steps.append(step if count > 1 else 1)
                continue
            position = _position(item, f"{label}: dimension {dim}")
            if not -size <= position < size:
                raise MCNCIndexError(f"{label}: index {position} is out of bounds for "
                                     f"dimension {dim} with size {size}")
            position += size if position < 0 else 0
            starts.append(position)
            stops.append(position + 1)
            steps.append(1)
            drop.append(dim)
        return (cls(tuple(shape), tuple(starts), tuple(stops), tuple(drop)), tuple(steps))

    @classmethod
    def from_offsets(cls, shape: tuple[int, ...], offsets: tuple[int, ...],
                     lengths: tuple[int, ...], label: str = "tensor") -> Box:
        """The box ``offsets[i] .. offsets[i] + lengths[i]`` (distributed checkpointing's
        ``storage_offsets`` and ``lengths``)."""
        if not len(offsets) == len(lengths) == len(shape):
            raise UsageError(f"{label}: a box of rank {len(offsets)} for a tensor of rank "
                            f"{len(shape)}")
        for dim, (offset, length, size) in enumerate(zip(offsets, lengths, shape, strict=True)):
            if offset < 0 or length < 0 or offset + length > size:
                raise UsageError(f"{label}: dimension {dim}: elements {offset} .. "
                                f"{offset + length} lie outside its size {size}")
        return cls(tuple(shape), tuple(offsets),
                   tuple(o + n for o, n in zip(offsets, lengths, strict=True)))

    def check(self, shape: tuple[int, ...], label: str = "tensor") -> None:
        """Refuse a box made for another shape, with bounds that are not Python integers, or
        reaching outside it."""
        for what, values in (("starts", self.starts), ("stops", self.stops)):
            odd = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
            if odd:
                raise UsageError(f"{label}: a Box's {what} must be Python ints, got "
                                 f"{type(odd[0]).__name__} {odd[0]!r}; convert with int(...)")
        if tuple(shape) != self.shape:
            raise UsageError(f"{label}: a box of a tensor of shape {list(self.shape)} for one of "
                             f"shape {list(shape)}")
        if not len(self.starts) == len(self.stops) == len(shape):
            raise UsageError(f"{label}: a box needs a start and a stop per dimension")
        for dim, (a, b, size) in enumerate(zip(self.starts, self.stops, shape, strict=True)):
            if not 0 <= a <= b <= size:
                raise UsageError(f"{label}: dimension {dim}: elements {a} .. {b} lie outside "
                                 f"its size {size}")
        if any(d not in range(len(shape)) or self.stops[d] - self.starts[d] != 1
               for d in self.drop):
            raise UsageError(f"{label}: a dropped dimension must have one element")

    # -- facts -----------------------------------------------------------------------------
    @cached_property
    def lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.starts, self.stops, strict=True))

    @cached_property
    def numel(self) -> int:
        return math.prod(self.lengths)

    @cached_property
    def result_shape(self) -> tuple[int, ...]:
        """The shape of the tensor handed out (integer-indexed dimensions dropped)."""
        return tuple(n for dim, n in enumerate(self.lengths) if dim not in self.drop)

    @cached_property
    def run_dim(self) -> int:
        """The dimension whose range each run spans: every later dimension is whole."""
        dim = len(self.shape) - 1
        while dim > 0 and self.starts[dim] == 0 and self.stops[dim] == self.shape[dim]:
            dim -= 1
        return max(dim, 0)

    @cached_property
    def run_length(self) -> int:
        """Elements in one run (0 for an empty box)."""
        if not self.shape:
            return 1
        dim = self.run_dim
        return self.lengths[dim] * math.prod(self.shape[dim + 1 :])

    @cached_property
    def runs(self) -> int:
        """How many runs the box has (0 for an empty box)."""
        if self.numel == 0:
            return 0
        return math.prod(self.lengths[: self.run_dim]) if self.shape else 1

    @cached_property
    def contiguous(self) -> bool:
        """Whether the box is one contiguous range of the tensor's elements."""
        return self.runs <= 1

    @cached_property
    def first_element(self) -> int:
        """The row-major index of the box's first element in the tensor."""
        return sum(s * st for s, st in zip(self.starts, _strides(self.shape), strict=True))

    def run_starts(self, first: int, stop: int, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
        """Element index (in the tensor) of the first element of runs ``first .. stop - 1``,
        as int64."""
        run = torch.arange(first, stop, dtype=torch.int64, device=device)
        dim = self.run_dim
        strides = _strides(self.shape)
        offset = torch.full_like(run, self.starts[dim] * strides[dim] if self.shape else 0)
        for outer in reversed(range(dim)):
            length = self.lengths[outer]
            offset += (run % length + self.starts[outer]) * strides[outer]
            run = run // length
        return offset

    def elements(self, first_run: int, stop_run: int, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
        """Element indices (in the tensor) of runs ``first_run .. stop_run - 1``, in the
        box's row-major order, as int64."""
        starts = self.run_starts(first_run, stop_run, device)
        within = torch.arange(self.run_length, dtype=torch.int64, device=device)
        return (starts[:, None] + within[None, :]).reshape(-1)


#: What an index item may be, for error messages.
_ALLOWED = ("a slice with integer bounds and a positive step, an integer position (int, numpy "
            "integer or 0-d integer tensor), '...', or [] for the whole index")


def _position(item: Any, where: str) -> int:
    """An integer index item as an int (bools and arrays of positions are refused)."""
    boolean = isinstance(item, bool) or str(getattr(item, "dtype", "")) in ("bool",
                                                                             "torch.bool")
    if not boolean and getattr(item, "ndim", 0) == 0:
        try:
            return operator.index(item)
        except TypeError:
            pass
    kind = type(item).__name__
    if hasattr(item, "shape"):
        kind += f" of shape {list(item.shape)}"
    raise MCNCIndexError(f"{where}: expected {_ALLOWED}; got {kind}. Select positions from "
                         "the loaded result instead")


def _slice_bounds(item: slice, size: int, where: str) -> tuple[int, int, int]:
    """``slice.indices`` with typed errors: integer bounds and a positive step."""
    try:
        start, stop, step = item.indices(size)
    except TypeError:
        raise MCNCIndexError(f"{where}: expected {_ALLOWED}; got the slice {item}") from None
    except ValueError:  # a zero step
        raise UsageError(f"{where}: slice step cannot be zero") from None
    if step < 0:
        raise UsageError(f"{where}: step must be greater than zero (got {step}); slice with a "
                         "positive step and .flip() the result")
    return start, stop, step


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
