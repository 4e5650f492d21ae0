"""Large zero-filled CPU output buffers, backed by transparent huge pages and pre-faulted.

Regeneration (and a base read straight into its output) writes every output value once, so
for a freshly allocated tensor the kernel's page faults, one per 4 KiB page, cost about as
much as the arithmetic (docs/benchmarks.md, "Design measurements"). An anonymous mapping
advised with ``MADV_HUGEPAGE`` faults in 2 MiB pages instead, and ``MADV_POPULATE_WRITE``
(Linux 5.14) has the kernel fault them all in one call, before the matrix product's threads
start: faults taken inside the product, or a parallel ``zero_`` racing the BLAS threads that
still spin from the last product, cost several times as much. Anonymous mappings are
zero-filled, so the buffer can be accumulated into (``addmm``) without a clearing pass. Where
the advice is not available the mapping behaves like any other.
"""

from __future__ import annotations

import contextlib
import mmap

import torch

__all__ = ["HUGE_PAGE_MIN_BYTES", "zeros"]

HUGE_PAGE_MIN_BYTES = 8 << 20
# Linux's value; Python's mmap module names it only from 3.13 on.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def zeros(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled CPU tensor of ``dtype``; at least ``HUGE_PAGE_MIN_BYTES`` big, it lives
    in its own huge-page-advised, pre-faulted mapping, released when the tensor (and its
    views) are freed."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):  # e.g. Windows
        return torch.zeros(numel, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Kernels without transparent huge pages, or older than 5.14, refuse: no harm done.
        with contextlib.suppress(OSError):
            region.madvise(mmap.MADV_HUGEPAGE)
        with contextlib.suppress(OSError):
            region.madvise(_MADV_POPULATE_WRITE)
    return torch.frombuffer(region, dtype=dtype, count=numel)
