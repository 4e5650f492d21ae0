"""The MCNC generator ``phi``: a frozen sine MLP from ``[-L, L]^k`` to the unit sphere in R^d.

SPEC.md §5 defines it. Layer ``t`` computes ``x_t = sin(W_t x_{t-1} + b_t)`` for the hidden
layers (the first pre-activation multiplied by ``omega0``), then ``y = W_out x + b_out``, then
``phi = y / ||y||`` when ``normalize`` is set. Weights come from the spec's Philox stream (a
seed is all the file stores) or are stored inline.

The hidden sine layers amplify rounding (inputs reach ``|alpha| = L = 20``), so they always
run in IEEE float32: autocast off, TF32 off. This module is the single source of truth for
the generator, shared by training (``mcnc_format.torch``) and loading.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import philox
from .constants import generator_bias_stream, generator_weight_stream

__all__ = [
    "ORDERED_BELOW",
    "GeneratorSpec",
    "GeneratorWeights",
    "ieee_fp32",
    "layer_bounds",
    "ordered_matmul",
    "row_stable_matmul",
]


@dataclass(frozen=True)
class GeneratorSpec:
    """The architecture of a generator and where its weights come from.

    ``seed`` set: weights are drawn from Philox (§5.2); ``inline`` set: the weights are given
    as float32 tensors ``[W_1, b_1, ..., W_out, b_out]`` (biases omitted when ``bias`` is
    false), for generators drawn or trained elsewhere.
    """

    k: int
    d: int
    hidden: tuple[int, ...] = (32, 32)
    L: float = 20.0
    omega0: float = 1.0
    bias: bool = True
    normalize: bool = True
    seed: int | None = 0
    inline: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.inline is not None:
            object.__setattr__(self, "inline", tuple(self.inline))
        if (self.seed is None) == (self.inline is None):
            raise ValueError("a GeneratorSpec needs exactly one of seed= or inline=")

    @property
    def widths(self) -> tuple[int, ...]:
        """Layer widths from input to output: ``(k, *hidden, d)``."""
        return (self.k, *self.hidden, self.d)

    @property
    def n_layers(self) -> int:
        return len(self.hidden) + 1

    def parameter_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``[W_1, b_1, ..., W_out, b_out]`` in storage order (§5.3)."""
        shapes: list[tuple[int, ...]] = []
        widths = self.widths
        for t in range(self.n_layers):
            shapes.append((widths[t + 1], widths[t]))
            if self.bias:
                shapes.append((widths[t + 1],))
        return shapes

    def weights(self, device: torch.device | str = "cpu") -> GeneratorWeights:
        """The float32 weights on ``device``: drawn from Philox or taken from ``inline``."""
        if self.inline is not None:
            tensors = [t.detach().to(device=device, dtype=torch.float32) for t in self.inline]
            return GeneratorWeights.from_flat(self, tensors)
        return GeneratorWeights.from_flat(self, draw_philox_weights(self, device))


def layer_bounds(spec: GeneratorSpec, layer: int) -> tuple[float, float]:
    """(weight bound, bias bound) of layer ``layer`` (0-based) per §5.2, as float32 values.

    First layer: ``1 / k`` (SIREN's first-layer scale; ``L`` sets the frequency).
    Later layers: ``sqrt(6 / fan_in)`` (SIREN's hidden scale: unit-variance pre-activations).
    Biases: ``1 / sqrt(fan_in)`` (PyTorch's Linear default).
    Computed in float64 with correctly rounded division and sqrt, then rounded to float32.
    """
    fan_in = spec.widths[layer]
    weight = 1.0 / fan_in if layer == 0 else math.sqrt(6.0 / fan_in)
    bias = 1.0 / math.sqrt(fan_in)
    return philox.round_to_f32(weight), philox.round_to_f32(bias)


def draw_philox_weights(spec: GeneratorSpec, device: torch.device | str) -> list[torch.Tensor]:
    """Draw ``[W_1, b_1, ..., W_out, b_out]`` from Philox: layer t's weight from stream 2t, its
    bias from stream 2t + 1, each row-major from element 0, uniform on ``[-bound, bound)``."""
    assert spec.seed is not None
    tensors: list[torch.Tensor] = []
    widths = spec.widths
    for t in range(spec.n_layers):
        w_bound, b_bound = layer_bounds(spec, t)
        fan_out, fan_in = widths[t + 1], widths[t]
        w = philox.uniform_signed(
            spec.seed, generator_weight_stream(t), 0, fan_out * fan_in, w_bound, device
        )
        tensors.append(w.reshape(fan_out, fan_in))
        if spec.bias:
            b = philox.uniform_signed(
                spec.seed, generator_bias_stream(t), 0, fan_out, b_bound, device
            )
            tensors.append(b)
    return tensors


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """Run the enclosed float32 math in IEEE precision: no autocast, no TF32 (§10).

    PyTorch has two sets of precision switches and refuses to read the legacy ones once the
    newer ``fp32_precision`` ones were used, so this speaks whichever the process uses. The
    switches are process-wide: matrix products another thread runs meanwhile also run in IEEE
    precision.
    """
    with _matmul_precision_ieee(), torch.autocast(device_type=device.type, enabled=False):
        yield


@contextlib.contextmanager
def _matmul_precision_ieee() -> Iterator[None]:
    try:
        legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.get_float32_matmul_precision())
    except RuntimeError:  # the process uses the fp32_precision API
        legacy = None
    if legacy is not None:
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy[:2]
            torch.set_float32_matmul_precision(legacy[2])
        return
    switches = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    saved = [s.fp32_precision for s in switches]
    try:
        for switch in switches:
            switch.fp32_precision = "ieee"
        yield
    finally:
        for switch, value in zip(switches, saved, strict=True):
            switch.fp32_precision = value


@dataclass
class GeneratorWeights:
    """A generator's float32 weights on one device, with the pieces regeneration reuses."""

    spec: GeneratorSpec
    hidden_weights: list[torch.Tensor]
    hidden_biases: list[torch.Tensor | None]
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None

    @classmethod
    def from_flat(cls, spec: GeneratorSpec, tensors: Sequence[torch.Tensor]) -> GeneratorWeights:
        shapes = spec.parameter_shapes()
        if len(tensors) != len(shapes):
            raise ValueError(f"generator needs {len(shapes)} weight tensors, got {len(tensors)}")
        for i, (t, shape) in enumerate(zip(tensors, shapes, strict=True)):
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"generator weight {i}: expected shape {shape}, got {tuple(t.shape)}"
                )
        step = 2 if spec.bias else 1
        weights = list(tensors[::step])
        biases: list[torch.Tensor | None] = (
            list(tensors[1::2]) if spec.bias else [None] * len(weights)
        )
        return cls(spec, weights[:-1], biases[:-1], weights[-1], biases[-1])

    def flat(self) -> list[torch.Tensor]:
        """``[W_1, b_1, ..., W_out, b_out]``, the storage order of §5.3."""
        out: list[torch.Tensor] = []
        for w, b in zip(
            [*self.hidden_weights, self.out_weight],
            [*self.hidden_biases, self.out_bias],
            strict=True,
        ):
            out.append(w)
            if b is not None:
                out.append(b)
        return out

    @property
    def device(self) -> torch.device:
        return self.out_weight.device

    def hidden(self, alpha: torch.Tensor) -> torch.Tensor:
        """Last hidden activation ``[..., width]`` for ``alpha [..., k]``, in IEEE float32,
        each row computed alike whatever the other rows (``row_stable_matmul``)."""
        x = alpha.to(torch.float32)
        with ieee_fp32(x.device):
            for t, (w, b) in enumerate(zip(self.hidden_weights, self.hidden_biases, strict=True)):
                x = row_stable_matmul(x, w.T)
                if b is not None:
                    x = x + b
                if t == 0 and self.spec.omega0 != 1.0:
                    x = x * self.spec.omega0
                x = torch.sin(x)
        return x

    def __call__(self, alpha: torch.Tensor) -> torch.Tensor:
        """``phi(alpha)`` as float32 ``[..., d]``; differentiable in ``alpha`` (for training).

        Everything runs in IEEE float32 even under a caller's autocast, so a model trained
        through this function has exactly the weights a reader regenerates."""
        h = self.hidden(alpha)
        with ieee_fp32(h.device):
            y = h @ self.out_weight.T
            if self.out_bias is not None:
                y = y + self.out_bias
            if self.spec.normalize:
                y = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        return y

    def gram(self, dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(W'W, W'b, b'b)`` of the output layer, for row norms without a second pass:
        ``||W h + b||^2 = h'(W'W)h + 2 h'(W'b) + b'b`` (SPEC.md §10.2). Computed in float64
        where the device has it, returned in ``dtype``."""
        wide = torch.float64 if self.device.type in ("cpu", "cuda") else torch.float32
        w = self.out_weight.to(wide)
        gram = (w.T @ w).to(dtype)
        if self.out_bias is None:
            return gram, None, None
        b = self.out_bias.to(wide)
        return gram, (w.T @ b).to(dtype), (b @ b).to(dtype)


def ordered_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` (``x [..., n]``, ``w [n, p]``) summed over ``n`` in index order, each product
    and each sum rounded to ``x``'s dtype: IEEE arithmetic whose result for a row does not
    depend on the other rows. A BLAS product picks its kernel (and tile, and thread split)
    from the shapes, which changes the last bits of a row with the batch it is computed in;
    the generator's small inner products (``k``, the hidden widths) cost little this way, and
    a box of a tensor then equals the same elements of the whole tensor bit for bit."""
    out = x[..., 0:1] * w[0]
    for j in range(1, w.shape[0]):
        out = out + x[..., j : j + 1] * w[j]
    return out


#: Products with fewer output columns than this take ``ordered_matmul``. For such narrow
#: products BLAS rounded a row differently with its position in the batch (seen with MKL on a
#: 2-core EPYC for 8 columns, even with whole row tiles); wider ones agreed for any row of
#: whole tiles, and ``ordered_matmul``'s loop would cost several times the product there.
ORDERED_BELOW = 32


def row_stable_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` whose rows do not depend on the other rows of ``x`` when ``x`` comes in whole
    row tiles: ``ordered_matmul`` for narrow products, BLAS otherwise."""
    if w.shape[1] < ORDERED_BELOW:
        return ordered_matmul(x, w)
    return x @ w
