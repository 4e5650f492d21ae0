"""``AdapterBank``: many MCNC-LoRA adapters over one base model, rebuilt from kilobytes.

An adapter added to the bank keeps on the device only what its file stores of it: each
segment's alpha and beta (``m (k + 1)`` values per chunk of ``d`` factor values) and the
generator drawn from its seed (shared by every adapter drawn from the same seed). Factors
(``A``, ``B`` per adapted module) are rebuilt from them when a batch needs them, one engine
call per group of segments sharing a generator, and kept in a least-recently-used cache of at
most ``factor_cache_bytes``; with ``Route.TRITON`` the cache keeps them in per-module slabs
(``slab.py``) that the SGMV kernels read. docs/serving.md has the API, the cost model and
the limits.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..devices import check_device
from ..engine.backend import default_backend, triton_refusal
from ..engine.fused import FusedGenerator
from ..engine.resolve import Resolver
from ..errors import UsageError
from ..reader import MCNCFile
from .adapter import Factors, GeneratorKey, ResidentAdapter, base_sha256
from .route import Route, Routing, TorchRouting, TritonRouting
from .slab import SLAB_DTYPES, FactorSlabs

__all__ = ["AdapterBank", "BankStats"]


@dataclass(frozen=True)
class BankStats:
    """What the bank holds. ``resident_bytes``: alpha and beta (and any stored factor theta0)
    of every adapter; ``generators``, ``generator_bytes``: the prepared generators, shared by
    adapters drawn from one seed; ``cached``, ``factor_bytes``: the adapters whose factors
    are in the cache (least recently used first) and their bytes; ``rebuilds``: adapters
    rebuilt since the bank was made; ``slab_bytes``: what ``Route.TRITON``'s slabs hold for
    the cached factors (padded ranks and free slots included; 0 with ``Route.TORCH``)."""

    adapters: int
    resident_bytes: int
    generators: int
    generator_bytes: int
    cached: tuple[str, ...]
    factor_bytes: int
    rebuilds: int
    slab_bytes: int


class AdapterBank:
    """MCNC-LoRA adapters of one ``base_model`` on ``device``, served per row of a batch.

    ``bank(input_ids, adapters=[name or None per row], **model_kwargs)`` returns what
    ``base_model(input_ids, **model_kwargs)`` returns, each row through its adapter (``None``:
    the base alone); ``bank.generate(...)`` likewise for ``base_model.generate``. The base
    model is not modified: forward hooks on its adapted ``nn.Linear`` layers exist only during
    a call. Not safe to call from several threads at once. ``route`` picks how the low-rank
    paths are computed (``Route.TORCH``, the default, or ``Route.TRITON``: docs/serving.md).
    """

    def __init__(self, base_model: nn.Module, *, device: torch.device | str,
                 factor_cache_bytes: int, route: Route = Route.TORCH) -> None:
        if isinstance(factor_cache_bytes, bool) or not isinstance(factor_cache_bytes, int) or (
                factor_cache_bytes <= 0):
            raise UsageError(f"factor_cache_bytes must be a positive int, got "
                             f"{factor_cache_bytes!r}")
        if not isinstance(route, Route):
            raise UsageError(f"route must be a Route ({', '.join(map(str, Route))}), got "
                             f"{route!r}")
        self.base_model = base_model
        self.device = check_device(device)
        self.factor_cache_bytes = factor_cache_bytes
        self.route = route
        if route is Route.TRITON:
            _check_triton(self.device)
        self._adapters: dict[str, ResidentAdapter] = {}
        self._generators: dict[GeneratorKey, FusedGenerator] = {}
        # Route.TORCH keeps each adapter's factors here; Route.TRITON keeps them in the slabs
        # (the entry's factors are None) so that one launch reaches every adapter's.
        self._cache: OrderedDict[str, tuple[Factors | None, int]] = OrderedDict()
        self._slabs = FactorSlabs()
        self._rebuilds = 0
        self._serving = False  # a call's forward or generate is running

    # -- adapters --------------------------------------------------------------------------
    def add(self, name: str, source: str | os.PathLike[str], *, check_base: bool = True,
            resolver: Resolver | None = None) -> None:
        """Register the adapter file ``source`` (a path or ``hf://`` URI) as ``name``;
        ``resolver`` reads it, as in ``mcnc_format.open`` (``HubResolver(token=...)`` for a
        private repository).

        Refused with an ``MCNCError`` when it adapts a module the base lacks or has another
        shape, or, with ``check_base``, when what it records of the base (SHA-256 pins of
        external theta0, stored tensors) differs from the base model's weights."""
        self._refuse_while_serving(f"add adapter {name!r}")
        if name in self._adapters:
            raise UsageError(f"an adapter named {name!r} is in the bank; remove it first")
        load = object()  # keys this load's inline generators: never another file's
        try:
            adapter = ResidentAdapter.load(
                name, source, self.base_model, self.device,
                lambda f, index, m: self._generator(load, f, index, m),
                lambda name: base_sha256(self.base_model, name), check_base, resolver)
        except BaseException:
            self._drop_unused_generators()  # those this failed load registered
            raise
        problem = None
        if adapter.factor_bytes > self.factor_cache_bytes:
            problem = (f"its factors take {adapter.factor_bytes} bytes, more than "
                       f"factor_cache_bytes={self.factor_cache_bytes}")
        elif self.route is Route.TRITON:
            problem = _triton_refusal(adapter)
        if problem is not None:
            self._drop_unused_generators()
            raise UsageError(f"adapter {name!r}: {problem}")
        self._adapters[name] = adapter

    def remove(self, name: str) -> None:
        """Forget adapter ``name``: its alpha/beta, cached factors and unshared generators."""
        self._refuse_while_serving(f"remove adapter {name!r}")
        self._adapter(name)
        del self._adapters[name]
        self._uncache(name)
        self._drop_unused_generators()

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def names(self) -> list[str]:
        return list(self._adapters)

    # -- factors ---------------------------------------------------------------------------
    def prepare(self, names: Sequence[str | None]) -> dict[str, Factors]:
        """Rebuild the factors of ``names`` (``None`` ignored) that the cache lacks, evicting
        the least recently used others to stay within ``factor_cache_bytes``; returns them
        (with ``Route.TRITON``, views of the slabs, valid until the bank's next call: a later
        adapter may reuse their slots. ``factors`` returns copies)."""
        self._refuse_while_serving("prepare adapters")
        return {name: self._cached(name) for name in self._fill(names)}

    def _fill(self, names: Sequence[str | None]) -> list[str]:
        """``prepare``'s work; the distinct names, now cached."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        adapters = [self._adapter(n) for n in wanted]
        need = sum(a.factor_bytes for a in adapters)
        if need > self.factor_cache_bytes:
            raise UsageError(
                f"the factors of adapters {wanted} take {need} bytes together, more than "
                f"factor_cache_bytes={self.factor_cache_bytes}: split the batch or raise it")
        missing = [a for a in adapters if a.name not in self._cache]
        cached = sum(size for _, size in self._cache.values())
        room = cached + sum(a.factor_bytes for a in missing) - self.factor_cache_bytes
        for victim in [n for n in self._cache if n not in wanted]:
            if room <= 0:
                break
            room -= self._uncache(victim)
        for adapter in missing:
            factors = adapter.rebuild(self._generators)
            if self.route is Route.TRITON:
                self._slabs.put(adapter.name, factors)
                self._cache[adapter.name] = (None, adapter.factor_bytes)
            else:
                self._cache[adapter.name] = (factors, adapter.factor_bytes)
            self._rebuilds += 1
        for name in wanted:
            self._cache.move_to_end(name)
        return wanted

    def _cached(self, name: str) -> Factors:
        factors = self._cache[name][0]
        return self._slabs.factors(name) if factors is None else factors

    def _uncache(self, name: str) -> int:
        """Evict ``name``'s factors (if cached); the bytes freed."""
        entry = self._cache.pop(name, None)
        if entry is None:
            return 0
        self._slabs.free(name)
        return entry[1]

    def factors(self, name: str) -> Factors:
        """Adapter ``name``'s factors ``{module: (A, B, scale)}``, rebuilt if not cached: the
        caller's to keep (with ``Route.TRITON``, copied out of the slabs, whose slots later
        adapters reuse)."""
        factors = self.prepare([name])[name]
        if self.route is Route.TRITON:
            factors = {m: (a.clone(), b.clone(), scale) for m, (a, b, scale) in factors.items()}
        return factors

    def stats(self) -> BankStats:
        generator_bytes = sum(_generator_bytes(g) for g in self._generators.values())
        return BankStats(len(self._adapters),
                         sum(a.resident_bytes for a in self._adapters.values()),
                         len(self._generators), generator_bytes, tuple(self._cache),
                         sum(size for _, size in self._cache.values()), self._rebuilds,
                         self._slabs.nbytes)

    # -- serving ---------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, *, adapters: Sequence[str | None],
                 **model_kwargs: Any) -> Any:
        """``base_model(input_ids, **model_kwargs)`` with row ``i`` through ``adapters[i]``."""
        routing = self._routing(input_ids, adapters)
        with self._serving_call(), routing.installed(self.base_model):
            return self.base_model(input_ids, **model_kwargs)

    def generate(self, input_ids: torch.Tensor, *, adapters: Sequence[str | None],
                 **generate_kwargs: Any) -> Any:
        """``base_model.generate(input_ids, **generate_kwargs)`` with row ``i`` (and the beams
        or sequences generated from it) through ``adapters[i]``."""
        routing = self._routing(input_ids, adapters)
        with self._serving_call(), routing.installed(self.base_model):
            return self.base_model.generate(input_ids, **generate_kwargs)

    @contextmanager
    def _serving_call(self) -> Iterator[None]:
        self._serving = True
        try:
            yield
        finally:
            self._serving = False

    def _refuse_while_serving(self, what: str) -> None:
        """A call routes its rows to the factors cached when it began (``Route.TRITON``: to
        slab slots, read again at every step): adding, removing or preparing adapters during
        it (a generate callback, another thread) could evict or move them, and rows would go
        on through another adapter, or none, without a word."""
        if self._serving:
            raise UsageError(f"cannot {what} while the bank serves a call (from a callback "
                             "of generate, or another thread): one call at a time. Do it "
                             "after the call returns")

    def _routing(self, input_ids: torch.Tensor, adapters: Sequence[str | None]) -> Routing:
        self._refuse_while_serving("start another call")
        if isinstance(adapters, str) or len(adapters) != input_ids.shape[0]:
            raise UsageError(f"adapters must name one adapter (or None) per row: "
                             f"{input_ids.shape[0]} rows, got {adapters!r}")
        wanted = self._fill(adapters)
        if self.route is Route.TRITON:
            return TritonRouting(adapters, self._slabs, self.device)
        return TorchRouting(adapters, {name: self._cached(name) for name in wanted},
                            self.device)

    # -- internals -------------------------------------------------------------------------
    def _adapter(self, name: str) -> ResidentAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise UsageError(f"no adapter named {name!r} in the bank; it holds "
                             f"{sorted(self._adapters)[:8]} (add it with bank.add)") from None

    def _generator(self, load: object, f: MCNCFile, index: int, m: int) -> GeneratorKey:
        """Hold the file's generator ``index`` for ``m`` components; adapters drawn from the
        same seed and architecture share it (``load`` keys an inline one to its load)."""
        spec = f.generator_spec(index)
        key: GeneratorKey = ((spec, m, "seed") if spec.seed is not None
                             else (load, index, m, "inline"))
        if key not in self._generators:
            self._generators[key] = f.context.generators.fused(
                index, m, self.device, default_backend(self.device).draw_weights())
        return key

    def _drop_unused_generators(self) -> None:
        used = {g.generator for a in self._adapters.values() for g in a.groups}
        for key in [k for k in self._generators if k not in used]:
            del self._generators[key]


def _check_triton(device: torch.device) -> None:
    """Route.TRITON needs Triton, and compiled kernels need a CUDA device (the interpreter,
    ``TRITON_INTERPRET=1`` at Triton's import, runs them on any device: tests)."""
    refusal = triton_refusal("Route.TRITON")
    if refusal is not None:
        raise UsageError(f"{refusal}; or use Route.TORCH")
    from ..engine import triton_kernels

    if device.type != "cuda" and triton_kernels.compiled():
        raise UsageError(f"Route.TRITON runs its kernels on CUDA devices, not {device}: use "
                         "Route.TORCH (TRITON_INTERPRET=1 interprets them anywhere, for tests)")


def _triton_refusal(adapter: ResidentAdapter) -> str | None:
    """Why the slabs cannot hold ``adapter``'s factors, if they cannot."""
    for module, (a, b) in adapter.factor_dtypes().items():
        if a != b or a not in SLAB_DTYPES:
            return (f"{module!r} has factors of {a} (A) and {b} (B): Route.TRITON takes A "
                    f"and B of one dtype of {list(SLAB_DTYPES)}; use Route.TORCH")
    return None


def _generator_bytes(fused: FusedGenerator) -> int:
    extra = [fused.stacked, fused.gram, fused.gram_bias]
    return sum(t.nbytes for t in [*fused.weights.flat(), *extra] if t is not None)
