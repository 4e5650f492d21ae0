"""``MCNCConfig``: what to compress and how, in one frozen, JSON-serialisable value.

The config travels inside the reparametrized model's state dict (``manifest.py``), so every
field is a plain number, string or tuple of those. Validation happens here, once, so that the
rest of the package can trust its fields; each error names the field and the allowed range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .. import constants as C
from ..dtypes import from_torch
from ..errors import ReparametrizeError
from ..generator import GeneratorSpec

__all__ = [
    "ALPHA_INIT_STREAM_BASE",
    "CHUNKING_MODEL",
    "CHUNKING_TENSOR",
    "THETA0_MODULE",
    "THETA0_PRNG",
    "THETA0_STREAM_BASE",
    "MCNCConfig",
    "require_config",
]

CHUNKING_TENSOR = "tensor"
CHUNKING_MODEL = "model"
THETA0_PRNG = "prng"
THETA0_MODULE = "module"

# Philox streams under ``MCNCConfig.seed``. The generator uses streams 0 .. 2 * n_layers - 1
# (< 18, SPEC.md §5.2); the theta0 of the i-th compressed tensor uses THETA0_STREAM_BASE + i
# (written into the file); the initial alpha of segment s uses ALPHA_INIT_STREAM_BASE + s
# (training only: alpha itself is stored). Disjoint ranges keep the three uncorrelated.
THETA0_STREAM_BASE = 1 << 16
ALPHA_INIT_STREAM_BASE = 1 << 24


@dataclass(frozen=True)
class MCNCConfig:
    """How ``reparametrize`` and ``add_mcnc_lora`` compress a model.

    Generator (SPEC.md §5): ``k`` inputs, chunks of ``d`` values, ``hidden`` widths, input
    bound ``L``, first-layer frequency ``omega0``, Philox ``seed`` (which also keys theta0 and
    the initial alpha, see the stream constants above). ``m`` components per chunk.

    Selection: ``include`` is a tuple of ``fnmatch`` patterns over parameter names
    (``"layers.*.fc1.weight"``); ``None`` selects the weights of Linear, Conv and Embedding
    layers. ``exclude`` patterns remove names from the selection. Norms and biases stay dense
    unless a pattern includes them.

    ``chunking``: ``"tensor"`` gives every compressed tensor its own segment (its chunks never
    straddle two tensors); ``"model"`` flattens the whole selection into one segment, as the
    paper does. ``theta0``: ``"prng"`` starts from a fresh draw of PyTorch's default init
    schemes from the spec's Philox stream (only a seed is stored); ``"module"`` starts from the
    module's current weights (fine-tuning; they are stored or referenced). ``alpha_dtype`` and
    ``beta_dtype`` are the storage dtypes (``"f32"``, ``"f16"``, ``"bf16"`` or a torch dtype);
    training keeps float32 parameters and the forward rounds them to these dtypes, so the
    trained function is exactly the stored one. ``beta_init`` is the value every beta starts
    at (docs/torch.md explains why 0). ``train_dense`` leaves the parameters that are not
    compressed trainable; by default only alpha and beta are.
    """

    k: int = 16
    d: int = 1600
    m: int = 1
    hidden: tuple[int, ...] = (32, 32)
    L: float = 20.0
    omega0: float = 1.0
    seed: int = 0
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    chunking: str = CHUNKING_TENSOR
    theta0: str = THETA0_PRNG
    alpha_dtype: str = "f32"
    beta_dtype: str = "f32"
    beta_init: float = 0.0
    train_dense: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "hidden", _widths(self.hidden))
        if self.include is not None:
            set_(self, "include", _patterns(self.include, "include"))
        set_(self, "exclude", _patterns(self.exclude, "exclude"))
        set_(self, "alpha_dtype", _storage_dtype(self.alpha_dtype, "alpha_dtype"))
        set_(self, "beta_dtype", _storage_dtype(self.beta_dtype, "beta_dtype"))
        set_(self, "L", _real(self.L, "L"))
        set_(self, "omega0", _real(self.omega0, "omega0"))
        set_(self, "beta_init", _real(self.beta_init, "beta_init"))
        if not isinstance(self.train_dense, bool):
            raise ReparametrizeError(f"MCNCConfig.train_dense: expected True or False, got "
                                     f"{self.train_dense!r}")
        _check_int(self.k, "k", 1, C.MAX_K)
        _check_int(self.d, "d", 1, C.MAX_D)
        _check_int(self.m, "m", 1, C.MAX_M)
        _check_int(self.seed, "seed", 0, 0xFFFFFFFF)
        if not 1 <= len(self.hidden) <= C.MAX_HIDDEN_LAYERS:
            raise ReparametrizeError(f"MCNCConfig.hidden: expected 1 to {C.MAX_HIDDEN_LAYERS} "
                                     f"widths, got {len(self.hidden)}")
        if not (math.isfinite(self.L) and self.L > 0):
            raise ReparametrizeError(f"MCNCConfig.L: expected a finite bound > 0, got {self.L}")
        if not math.isfinite(self.omega0) or self.omega0 == 0:
            raise ReparametrizeError(f"MCNCConfig.omega0: expected a finite non-zero value, got "
                                     f"{self.omega0}")
        if not math.isfinite(self.beta_init):
            raise ReparametrizeError(f"MCNCConfig.beta_init must be finite, got {self.beta_init}")
        _check_choice(self.chunking, "chunking", (CHUNKING_TENSOR, CHUNKING_MODEL))
        _check_choice(self.theta0, "theta0", (THETA0_PRNG, THETA0_MODULE))

    def generator(self) -> GeneratorSpec:
        """The generator every segment of this config uses (drawn from ``seed``)."""
        return GeneratorSpec(k=self.k, d=self.d, hidden=self.hidden, L=self.L,
                             omega0=self.omega0, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        out = asdict(self)
        for key in ("hidden", "include", "exclude"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MCNCConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ReparametrizeError(f"MCNCConfig: unknown fields {unknown}; this state dict was "
                                     "written by a newer mcnc-format. Upgrade mcnc-format.")
        return cls(**values)


def require_config(value: object, caller: str) -> MCNCConfig:
    """``value`` if it is an ``MCNCConfig``; checked before ``caller`` touches the model, since
    a dict or the class itself would otherwise fail on a missing attribute halfway through."""
    if isinstance(value, MCNCConfig):
        return value
    hint = ("the class itself; call it: MCNCConfig(...)" if value is MCNCConfig
            else f"a {type(value).__name__}; build one with MCNCConfig(**values)")
    raise ReparametrizeError(f"{caller}: config must be an MCNCConfig, got {hint}")


def _widths(values: Any) -> tuple[int, ...]:
    """``hidden`` as a tuple of ints. Checked before converting: ``int()`` would turn 16.5 into
    16, ``True`` into 1, and iterating the string ``"32"`` gives the widths (3, 2)."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ReparametrizeError(f"MCNCConfig.hidden: expected a sequence of integer widths "
                                 f"such as (32, 32), got {values!r}")
    widths = tuple(int(w) if isinstance(w, numbers.Integral) and not isinstance(w, bool) else w
                   for w in values)  # numpy integers become ints (the manifest is JSON)
    for width in widths:
        _check_int(width, "hidden", 1, C.MAX_HIDDEN_WIDTH)
    return widths


def _real(value: Any, name: str) -> float:
    """A float field as ``float``; strings and booleans are refused, not converted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ReparametrizeError(f"MCNCConfig.{name}: expected a number, got {value!r}")
    return float(value)


def _patterns(values: Any, name: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, Sequence):
        raise ReparametrizeError(f"MCNCConfig.{name}: expected a sequence of fnmatch pattern "
                                 f"strings, got {values!r}")
    out = tuple(values)
    if not all(isinstance(p, str) and p for p in out):
        raise ReparametrizeError(f"MCNCConfig.{name}: expected non-empty fnmatch pattern "
                                 f"strings, got {out!r}")
    return out


def _storage_dtype(value: Any, name: str) -> str:
    if isinstance(value, torch.dtype):
        value = from_torch(value)
    if value not in C.ALPHA_BETA_DTYPES:
        raise ReparametrizeError(f"MCNCConfig.{name}: expected one of {C.ALPHA_BETA_DTYPES} "
                                 f"(or torch.float32/float16/bfloat16), got {value!r}")
    return str(value)


def _check_int(value: Any, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ReparametrizeError(f"MCNCConfig.{name}: expected an integer in [{low}, {high}], "
                                 f"got {value!r}")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ReparametrizeError(f"MCNCConfig.{name}: expected one of {choices}, got {value!r}")
