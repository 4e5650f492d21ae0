"""The typed header of SPEC.md §3-§7: dataclasses with exact ``to_dict``/``parse`` forms.

Parsing goes through ``_Map``, which knows the field path (``tensors[3].theta0.seed``) so every
error names the field, and which rejects unknown keys unless the file is from a newer minor
version (R11). Per-field rules live here; rules that relate entries to each other live in
``validate.py``.

A tensor entry is one frozen dataclass per encoding (``MCNCTensor``, ``LoRATensor``,
``DenseTensor``, ``PackedTensor``, ``UnknownTensor``) and a theta0 one per kind and scheme;
parsing dispatches on ``encoding``, ``kind`` and ``scheme`` through one registry per family.
``TensorEntry.members()`` says which segment members (``MemberEntry``) a tensor is built from.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from . import constants as C
from .constants import Codec, Encoding, Scheme, Theta0Kind
from .errors import HeaderError, UnsupportedFeatureError
from .uri import SCHEME, parse_uri

__all__ = [
    "BlobEntry",
    "BlobTheta0",
    "DenseTensor",
    "ExternalTheta0",
    "FanInUniformTheta0",
    "GeneratorEntry",
    "Header",
    "InlineWeights",
    "LoRATensor",
    "MCNCTensor",
    "MemberEntry",
    "NormalTheta0",
    "PRNGTheta0",
    "PackedTensor",
    "PhiloxWeights",
    "SegmentEntry",
    "TensorEntry",
    "Theta0Entry",
    "UniformTheta0",
    "UnknownSchemeTheta0",
    "UnknownTensor",
    "UnknownTheta0",
    "ZerosTheta0",
]

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


class _Map:
    """A header map being parsed: typed getters that name the field path in errors."""

    def __init__(self, value: Any, path: str, source: str, lenient: bool) -> None:
        if not isinstance(value, dict):
            rule = "R10" if path else "R6"
            raise HeaderError(f"expected a map, got {_kind(value)}", rule=rule, path=source,
                              field=path or "header")
        self.value = value
        self.path = path
        self.source = source
        self.lenient = lenient
        self.seen: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str, rule: str | None = None) -> HeaderError:
        return HeaderError(message, rule=rule, path=self.source, field=self._where(key))

    def unsupported(self, key: str, what: str, value: str, known: str, rule: str
                    ) -> UnsupportedFeatureError:
        """A value this reader does not implement (typically from a newer minor version)."""
        return UnsupportedFeatureError(
            f"unknown {what} {value!r}; this reader knows {known}. Upgrade mcnc-format",
            rule=rule, path=self.source, field=self._where(key))

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.value:
            if default is ...:
                raise self.error(key, "required field is missing; re-write the file with a "
                                 "conforming writer", rule="R10")
            return default
        value = self.value[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if bool not in kinds and isinstance(value, bool):
            raise self.error(key, f"expected {_names(kinds)}, got bool", rule="R10")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {_names(kinds)}, got {_kind(value)}", rule="R10")
        return value

    def uint(self, key: str, limit: int, rule: str = "R10") -> int:
        value: int = self.get(key, int)
        if not 0 <= value <= limit:
            raise self.error(key, f"expected an integer in [0, {limit}], got {value}", rule=rule)
        return value

    def optional_uint(self, key: str, limit: int, rule: str = "R10") -> int | None:
        """``uint`` of an optional field: ``None`` when absent."""
        return self.uint(key, limit, rule) if key in self.value else None

    def finite(self, key: str, default: Any = ..., rule: str = "R71") -> float:
        value: float = self.get(key, float, default)
        if not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value}", rule=rule)
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        value = self.get(key, list)
        if len(value) > C.MAX_RANK:
            raise self.error(key, f"rank {len(value)} exceeds MAX_RANK {C.MAX_RANK}", rule="R43")
        dims = []
        for i, dim in enumerate(value):
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= C.MAX_NUMEL:
                raise self.error(f"{key}[{i}]", f"expected an integer in [0, MAX_NUMEL], got "
                                 f"{dim!r}", rule="R43")
            dims.append(dim)
        if math.prod(dims) > C.MAX_NUMEL:
            raise self.error(key, f"{math.prod(dims)} elements exceed MAX_NUMEL {C.MAX_NUMEL}",
                             rule="R43")
        return tuple(dims)

    def dtype(self, key: str, allowed: tuple[str, ...] | None = None) -> str:
        """A dtype of §1 (R26), or one of ``allowed`` where the format admits only those,
        whatever the name (R44: no minor version adds a dtype, §13)."""
        value: str = self.get(key, str)
        if allowed is not None and value not in allowed:
            raise self.error(key, f"dtype must be one of {', '.join(allowed)}, got {value!r}",
                             rule="R44")
        if value not in C.DTYPE_SIZES:
            raise self.unsupported(key, "dtype", value, ", ".join(C.DTYPE_SIZES), "R26")
        return C.DType(value)

    def child(self, key: str) -> _Map:
        return _Map(self.get(key, dict), self._where(key), self.source, self.lenient)

    def items(self, key: str, limit: int) -> list[_Map]:
        values = self.get(key, list)
        if len(values) > limit:
            raise self.error(key, f"{len(values)} entries exceed the limit {limit}", rule="R13")
        return [
            _Map(v, f"{self._where(key)}[{i}]", self.source, self.lenient)
            for i, v in enumerate(values)
        ]

    def done(self) -> None:
        """Reject keys this reader does not know, unless the file is from a newer minor (R11)."""
        unknown = sorted(str(k) for k in self.value if k not in self.seen)
        if unknown and not self.lenient:
            raise HeaderError(
                f"unknown field(s) {', '.join(unknown)} in a file of this reader's minor version",
                rule="R11", path=self.source, field=self.path or "header")


def _kind(value: Any) -> str:
    return type(value).__name__


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


@dataclass(frozen=True)
class BlobEntry:
    """A stored byte range: §4."""

    offset: int
    length: int
    codec: Codec
    dtype: str
    shape: tuple[int, ...]
    xxh3: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decoded_length(self) -> int:
        return self.numel * C.DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {
            "codec": Codec(self.codec).value,
            "dtype": self.dtype,
            "length": self.length,
            "offset": self.offset,
            "shape": list(self.shape),
            "xxh3": self.xxh3,
        }

    @classmethod
    def parse(cls, m: _Map) -> BlobEntry:
        codec = m.get("codec", str)
        if codec not in C.CODECS:
            raise m.unsupported("codec", "codec", codec, ", ".join(C.CODECS), "R26")
        entry = cls(
            offset=m.uint("offset", _U64),
            length=m.uint("length", _U64),
            codec=Codec(codec),
            dtype=m.dtype("dtype"),
            shape=m.shape("shape"),
            xxh3=m.uint("xxh3", _U64),
        )
        m.done()
        return entry


@dataclass(frozen=True)
class PhiloxWeights:
    """Generator weights drawn from the PRNG under ``seed`` (§5.2)."""

    seed: int
    kind: ClassVar[str] = C.WEIGHTS_PHILOX

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed}


@dataclass(frozen=True)
class InlineWeights:
    """Generator weights stored in the f32 blobs ``blobs``, one per parameter (§5.3)."""

    blobs: tuple[int, ...]
    kind: ClassVar[str] = C.WEIGHTS_INLINE

    def to_dict(self) -> dict[str, Any]:
        return {"blobs": list(self.blobs), "kind": self.kind}


@dataclass(frozen=True)
class GeneratorEntry:
    """A generator: §5. ``weights`` is ``PhiloxWeights`` or ``InlineWeights``."""

    k: int
    d: int
    hidden: tuple[int, ...]
    L: float
    weights: PhiloxWeights | InlineWeights
    omega0: float = 1.0
    bias: bool = True
    normalize: bool = True
    activation: str = C.ACTIVATION_SINE

    @property
    def seed(self) -> int | None:
        """The philox weights' seed; ``None`` for inline weights."""
        return self.weights.seed if isinstance(self.weights, PhiloxWeights) else None

    @property
    def blobs(self) -> tuple[int, ...] | None:
        """The inline weights' blobs; ``None`` for philox weights."""
        return self.weights.blobs if isinstance(self.weights, InlineWeights) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "L": float(self.L),
            "activation": self.activation,
            "bias": self.bias,
            "d": self.d,
            "hidden": list(self.hidden),
            "k": self.k,
            "normalize": self.normalize,
            "omega0": float(self.omega0),
            "weights": self.weights.to_dict(),
        }

    @classmethod
    def parse(cls, m: _Map) -> GeneratorEntry:
        # R31 and R32 first: a generator of an unknown activation or weights kind is refused
        # whatever its other keys hold, which belong to the feature this reader lacks (§3).
        activation = m.get("activation", str)
        if activation != C.ACTIVATION_SINE:
            raise m.unsupported("activation", "activation", activation, "'sin'", "R31")
        w = m.child("weights")
        kind = w.get("kind", str)
        if kind not in (C.WEIGHTS_PHILOX, C.WEIGHTS_INLINE):
            raise m.unsupported("weights.kind", "generator weights kind", kind,
                                "'philox' and 'inline'", "R32")
        k = m.get("k", int)
        d = m.get("d", int)
        if not 1 <= k <= C.MAX_K:
            raise m.error("k", f"expected 1 <= k <= {C.MAX_K}, got {k}", rule="R30")
        if not 1 <= d <= C.MAX_D:
            raise m.error("d", f"expected 1 <= d <= {C.MAX_D}, got {d}", rule="R30")
        hidden = m.get("hidden", list)
        if not 1 <= len(hidden) <= C.MAX_HIDDEN_LAYERS:
            raise m.error("hidden", f"expected 1 to {C.MAX_HIDDEN_LAYERS} widths, got "
                          f"{len(hidden)}", rule="R30")
        for i, width in enumerate(hidden):
            if isinstance(width, bool) or not isinstance(width, int):
                raise m.error(f"hidden[{i}]", f"expected an integer, got {_kind(width)}",
                              rule="R30")
            if not 1 <= width <= C.MAX_HIDDEN_WIDTH:
                raise m.error(f"hidden[{i}]", f"expected 1 <= width <= {C.MAX_HIDDEN_WIDTH}, "
                              f"got {width}", rule="R30")
        widths = (k, *hidden, d)
        count = sum(widths[t] * widths[t + 1] + widths[t + 1] for t in range(len(hidden) + 1))
        if count > C.MAX_GENERATOR_WEIGHTS:
            raise m.error("d", f"widths {list(widths)} need {count} generator weights, over "
                          f"MAX_GENERATOR_WEIGHTS {C.MAX_GENERATOR_WEIGHTS}", rule="R30")
        L = m.finite("L", rule="R34")
        omega0 = m.finite("omega0", rule="R34")
        if L <= 0:
            raise m.error("L", f"expected L > 0, got {L}", rule="R34")
        if omega0 == 0:
            raise m.error("omega0", "expected a non-zero frequency scale", rule="R34")
        bias = m.get("bias", bool)
        normalize = m.get("normalize", bool)
        weights: PhiloxWeights | InlineWeights
        if kind == C.WEIGHTS_PHILOX:
            weights = PhiloxWeights(w.uint("seed", _U32, rule="R30"))
        else:
            raw = w.get("blobs", list)
            for i, b in enumerate(raw):
                if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= _U64:
                    raise w.error(f"blobs[{i}]", f"expected a blob index (an integer in [0, "
                                  f"2^64 - 1]), got {b!r}", rule="R10")
            weights = InlineWeights(tuple(raw))
        w.done()
        m.done()
        return cls(k, d, tuple(hidden), L, weights, omega0, bias, normalize, activation)

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.k, *self.hidden, self.d)

    def parameter_shapes(self) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        for t in range(len(self.hidden) + 1):
            shapes.append((self.widths[t + 1], self.widths[t]))
            if self.bias:
                shapes.append((self.widths[t + 1],))
        return shapes


@dataclass(frozen=True)
class SegmentEntry:
    """A run of chunks sharing one generator: §6.1."""

    generator: int
    m: int
    chunks: int
    alpha: int
    beta: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "chunks": self.chunks,
            "generator": self.generator,
            "m": self.m,
        }

    @classmethod
    def parse(cls, m: _Map) -> SegmentEntry:
        components = m.get("m", int)
        if not 1 <= components <= C.MAX_M:
            raise m.error("m", f"expected 1 <= m <= {C.MAX_M}, got {components}", rule="R40")
        entry = cls(
            generator=m.uint("generator", _U64),
            m=components,
            chunks=m.uint("chunks", _U64),
            alpha=m.uint("alpha", _U64),
            beta=m.uint("beta", _U64),
        )
        m.done()
        return entry


# -- theta0 (§7) -------------------------------------------------------------------------------


def _spec_text(value: str) -> str:
    """The literal written to a file: an enum's ``value``, a raw string (unknown) as it is."""
    return value.value if isinstance(value, enum.Enum) else value


class Theta0Entry(ABC):
    """The base values of a tensor: §7. One frozen dataclass per kind (``ZerosTheta0``,
    ``UniformTheta0``/``FanInUniformTheta0``/``NormalTheta0`` under ``PRNGTheta0``,
    ``BlobTheta0``, ``ExternalTheta0``); kinds and schemes this reader does not know parse to
    ``UnknownTheta0``/``UnknownSchemeTheta0`` (``known`` False, R70/R71: reported when read)."""

    kind: ClassVar[Theta0Kind | str]
    known: ClassVar[bool] = True

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def parse(cls, m: _Map) -> Theta0Entry:
        kind = m.get("kind", str)
        entry = _THETA0_KINDS.get(kind, UnknownTheta0).parse(m)
        m.done()
        return entry

    @classmethod
    def from_dict(cls, value: Any, source: str = "theta0") -> Theta0Entry:
        """A theta0 map outside a header (e.g. a manifest), checked as a header's is."""
        return Theta0Entry.parse(_Map(value, "theta0", source, lenient=False))


@dataclass(frozen=True)
class ZerosTheta0(Theta0Entry):
    kind: ClassVar[Theta0Kind] = Theta0Kind.ZEROS

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value}

    @classmethod
    def parse(cls, m: _Map) -> ZerosTheta0:
        return cls()


@dataclass(frozen=True)
class PRNGTheta0(Theta0Entry):
    """``prng`` theta0 (§7.2): Philox stream ``(seed, stream)``; one subclass per scheme."""

    kind: ClassVar[Theta0Kind] = Theta0Kind.PRNG
    scheme: ClassVar[Scheme | str]
    seed: int
    stream: int

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "scheme": _spec_text(self.scheme),
                               "seed": self.seed, "stream": self.stream}
        out.update({k: float(v) for k, v in self._extra().items()})
        return dict(sorted(out.items()))

    def _extra(self) -> dict[str, float]:
        return {}

    @classmethod
    def parse(cls, m: _Map) -> PRNGTheta0:
        scheme = m.get("scheme", str)
        seed = m.uint("seed", _U32, rule="R71")
        stream = m.uint("stream", _U32, rule="R71")
        if scheme not in _SCHEMES:
            m.seen.update(m.value)
            return UnknownSchemeTheta0(seed, stream, scheme)
        return _SCHEMES[scheme].parse_fields(m, seed, stream)

    @classmethod
    def parse_fields(cls, m: _Map, seed: int, stream: int) -> PRNGTheta0:
        return cls(seed, stream)


@dataclass(frozen=True)
class UniformTheta0(PRNGTheta0):
    scheme: ClassVar[Scheme] = Scheme.UNIFORM
    bound: float

    def _extra(self) -> dict[str, float]:
        return {"bound": self.bound}

    @classmethod
    def parse_fields(cls, m: _Map, seed: int, stream: int) -> UniformTheta0:
        return cls(seed, stream, m.finite("bound"))


@dataclass(frozen=True)
class FanInUniformTheta0(PRNGTheta0):
    scheme: ClassVar[Scheme] = Scheme.FAN_IN_UNIFORM


@dataclass(frozen=True)
class NormalTheta0(PRNGTheta0):
    scheme: ClassVar[Scheme] = Scheme.NORMAL
    mean: float
    std: float

    def _extra(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def parse_fields(cls, m: _Map, seed: int, stream: int) -> NormalTheta0:
        return cls(seed, stream, m.finite("mean"), m.finite("std"))


@dataclass(frozen=True)
class UnknownSchemeTheta0(PRNGTheta0):
    """A scheme this reader does not know (R71: reported when read); its fields are kept
    only as far as every prng theta0 has them."""

    scheme: str  # type: ignore[misc]
    known: ClassVar[bool] = False


@dataclass(frozen=True)
class BlobTheta0(Theta0Entry):
    """``blob`` theta0 (§7.3): the index of the blob holding the values."""

    kind: ClassVar[Theta0Kind] = Theta0Kind.BLOB
    blob: int

    def to_dict(self) -> dict[str, Any]:
        return {"blob": self.blob, "kind": self.kind.value}

    @classmethod
    def parse(cls, m: _Map) -> BlobTheta0:
        return cls(m.uint("blob", _U64))


@dataclass(frozen=True)
class ExternalTheta0(Theta0Entry):
    """``external`` theta0 (§7.4): tensor ``tensor`` of the safetensors file at ``uri``."""

    kind: ClassVar[Theta0Kind] = Theta0Kind.EXTERNAL
    uri: str
    tensor: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "sha256": self.sha256, "tensor": self.tensor,
                "uri": self.uri}

    @classmethod
    def parse(cls, m: _Map) -> ExternalTheta0:
        uri = m.get("uri", str)
        tensor = m.get("tensor", str)
        sha = m.get("sha256", str)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise m.error("sha256", "expected 64 lowercase hex digits", rule="R74")
        if not _valid_uri(uri):
            raise m.error("uri", f"{uri!r} is neither a relative path ('/'-separated names "
                          "of printable ASCII without \\ : * ? \" < > |, none empty, '.', '..', "
                          "ending in '.' or ' ', or a Windows device name such as CON) nor "
                          "hf://ORG/REPO@<40 lowercase hex commit>/PATH", rule="R74")
        return cls(uri, tensor, sha)


@dataclass(frozen=True)
class UnknownTheta0(Theta0Entry):
    """A kind this reader does not know (R70: reported when the tensor is read; the other
    tensors stay readable)."""

    kind: str  # type: ignore[misc]
    known: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def parse(cls, m: _Map) -> UnknownTheta0:
        m.seen.update(m.value)
        return cls(m.value["kind"])


_THETA0_KINDS: dict[str, type[Theta0Entry]] = {
    Theta0Kind.ZEROS.value: ZerosTheta0,
    Theta0Kind.PRNG.value: PRNGTheta0,
    Theta0Kind.BLOB.value: BlobTheta0,
    Theta0Kind.EXTERNAL.value: ExternalTheta0,
}
_SCHEMES: dict[str, type[PRNGTheta0]] = {
    Scheme.UNIFORM.value: UniformTheta0,
    Scheme.FAN_IN_UNIFORM.value: FanInUniformTheta0,
    Scheme.NORMAL.value: NormalTheta0,
}


def _valid_uri(uri: str) -> bool:
    """R74: a relative path (§7.4), or ``hf://ORG/REPO@<40-hex commit>/PATH`` whose PATH is
    one too. No other scheme: a colon can appear in neither."""
    if uri.startswith(SCHEME):
        try:
            hub = parse_uri(uri)
        except ValueError:
            return False
        return hub.pinned and _relative_path(hub.path)
    return _relative_path(uri)


def _relative_path(path: str) -> bool:
    """'/'-separated portable names (§7.4): one spelling per file, resolved alike on every OS
    and never outside the referencing file's folder."""
    return all(_portable_name(part) for part in path.split("/"))


#: Characters of printable ASCII that no name of §7.4 holds: a Windows separator, a drive or
#: stream colon, and the characters Windows refuses in names.
_NOT_IN_NAMES = frozenset('\\:*?"<>|')
#: Names that Windows opens as devices, alone or before a '.' (§7.4).
_DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                           *(f"{port}{i}" for port in ("COM", "LPT") for i in range(10))})


def _portable_name(part: str) -> bool:
    """A name of §7.4: printable ASCII without ``\\ : * ? " < > |`` (so no case folding
    beyond ASCII and no Unicode normalisation), not '.' or '..', not ending in '.' or ' '
    (Windows drops them), not a Windows device name."""
    return (part not in ("", ".", "..") and not part.endswith((".", " "))
            and all(" " <= c <= "~" and c not in _NOT_IN_NAMES for c in part)
            and part.split(".")[0].rstrip(" ").upper() not in _DEVICE_NAMES)


# -- tensors (§6) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberEntry:
    """A run of a segment's values with its theta0 (§6.1): an mcnc tensor, or a LoRA factor
    (A or B, §6.3). ``offset`` is stored or implied by the members before it; a parsed header
    has it resolved (``Header.parse``)."""

    shape: tuple[int, ...]
    dtype: str
    segment: int
    offset: int
    theta0: Theta0Entry

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """The member's map; ``offset`` is left out when it is ``None`` (implied, §6.1)."""
        out = {
            "dtype": self.dtype,
            "offset": self.offset,
            "segment": self.segment,
            "shape": list(self.shape),
            "theta0": self.theta0.to_dict(),
        }
        if self.offset is None:
            del out["offset"]
        return out

    @classmethod
    def parse(cls, m: _Map) -> MemberEntry:
        entry = cls(m.shape("shape"), *_member_fields(m))
        m.done()
        return entry


def _member_fields(m: _Map) -> tuple[str, int, int, Theta0Entry]:
    """dtype, segment, offset (None when implied: ``Header.parse`` resolves it) and theta0 of
    a member's map (§6.1)."""
    # An implied offset is None until ``_resolve_layout`` fills it in (and ``_as_written``
    # drops it again): the one place ``MemberEntry.offset`` is not an int.
    return (m.dtype("dtype", C.FLOAT_DTYPES), m.uint("segment", _U64),
            m.optional_uint("offset", _U64),  # type: ignore[return-value]
            Theta0Entry.parse(m.child("theta0")))


@dataclass(frozen=True)
class TensorEntry(ABC):
    """One named tensor: §6. One frozen dataclass per encoding: ``DenseTensor``,
    ``PackedTensor``, ``MCNCTensor``, ``LoRATensor``, and ``UnknownTensor`` for an encoding
    this reader does not know (``known`` False; R46: reported when the tensor is read)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: ClassVar[Encoding | str]
    known: ClassVar[bool] = True
    #: The values are stored as they are (``dense``, ``packed``), not regenerated.
    stores_values: ClassVar[bool] = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * C.DTYPE_SIZES[self.dtype]

    def members(self) -> tuple[MemberEntry, ...]:
        """The segment members this tensor is built from, in the order they are laid out:
        its own for ``mcnc``, ``(A, B)`` for ``lora``, none otherwise."""
        return ()

    def labelled_members(self) -> tuple[tuple[str, MemberEntry], ...]:
        """``members()`` with the names messages give them: the tensor's name for an mcnc
        tensor, ``NAME:A`` and ``NAME:B`` for a lora tensor's factors."""
        return tuple((self.name, member) for member in self.members())

    def theta0s(self) -> tuple[Theta0Entry, ...]:
        """Every theta0 the tensor is built from: a lora tensor's own, then its members'."""
        return tuple(member.theta0 for member in self.members())

    def with_members(self, members: tuple[MemberEntry, ...]) -> TensorEntry:
        """This entry with ``members()`` replaced (same count and order)."""
        assert not members
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dtype": self.dtype,
            "encoding": _spec_text(self.encoding),
            "name": self.name,
            "shape": list(self.shape),
            **self._fields(),
        }
        return dict(sorted(out.items()))

    @abstractmethod
    def _fields(self) -> dict[str, Any]:
        """The encoding's own fields, as written."""

    @classmethod
    def parse(cls, m: _Map) -> TensorEntry:
        name = m.get("name", str)
        if not name:
            raise m.error("name", "tensor names must be non-empty", rule="R42")
        if len(name.encode("utf-8", "surrogatepass")) > C.MAX_NAME_BYTES:
            raise m.error("name", f"longer than MAX_NAME_BYTES {C.MAX_NAME_BYTES}", rule="R13")
        encoding = m.get("encoding", str)
        entry = _ENCODINGS.get(encoding, UnknownTensor).parse_fields(m, name, m.shape("shape"))
        m.done()
        return entry

    @classmethod
    @abstractmethod
    def parse_fields(cls, m: _Map, name: str, shape: tuple[int, ...]) -> TensorEntry:
        """The entry from its map, given the fields every tensor has."""


@dataclass(frozen=True)
class DenseTensor(TensorEntry):
    """``dense`` (§6.2): the values in blob ``blob``."""

    encoding: ClassVar[Encoding] = Encoding.DENSE
    stores_values: ClassVar[bool] = True
    blob: int

    def _fields(self) -> dict[str, Any]:
        return {"blob": self.blob}

    @classmethod
    def parse_fields(cls, m: _Map, name: str, shape: tuple[int, ...]) -> DenseTensor:
        return cls(name, shape, m.dtype("dtype"), m.uint("blob", _U64))


@dataclass(frozen=True)
class PackedTensor(TensorEntry):
    """``packed`` (§6.4): ``nbytes`` bytes at byte ``start`` of the pack blob ``blob``.
    ``start`` is not stored: it is implied by the packed tensors before it (``Header.parse``
    resolves it; the writer sets it)."""

    encoding: ClassVar[Encoding] = Encoding.PACKED
    stores_values: ClassVar[bool] = True
    blob: int
    start: int

    def _fields(self) -> dict[str, Any]:
        return {"blob": self.blob}

    @classmethod
    def parse_fields(cls, m: _Map, name: str, shape: tuple[int, ...]) -> PackedTensor:
        return cls(name, shape, m.dtype("dtype"), m.uint("blob", _U64),
                   start=None)  # type: ignore[arg-type]  # resolved by Header.parse


@dataclass(frozen=True)
class MCNCTensor(TensorEntry):
    """``mcnc`` (§6.1): a member of segment ``segment`` at element ``offset``."""

    encoding: ClassVar[Encoding] = Encoding.MCNC
    segment: int
    offset: int
    theta0: Theta0Entry

    def members(self) -> tuple[MemberEntry, ...]:
        return (MemberEntry(self.shape, self.dtype, self.segment, self.offset, self.theta0),)

    def with_members(self, members: tuple[MemberEntry, ...]) -> MCNCTensor:
        (m,) = members
        return replace(self, segment=m.segment, offset=m.offset, theta0=m.theta0)

    def _fields(self) -> dict[str, Any]:
        member = self.members()[0].to_dict()
        return {k: v for k, v in member.items() if k in ("offset", "segment", "theta0")}

    @classmethod
    def parse_fields(cls, m: _Map, name: str, shape: tuple[int, ...]) -> MCNCTensor:
        return cls(name, shape, *_member_fields(m))


@dataclass(frozen=True)
class LoRATensor(TensorEntry):
    """``lora`` (§6.3): ``theta0 + scale * B @ A`` with mcnc-encoded factors ``A [r, in]`` and
    ``B [out, r]``."""

    encoding: ClassVar[Encoding] = Encoding.LORA
    theta0: Theta0Entry
    scale: float
    A: MemberEntry
    B: MemberEntry

    def members(self) -> tuple[MemberEntry, ...]:
        return (self.A, self.B)

    def labelled_members(self) -> tuple[tuple[str, MemberEntry], ...]:
        return ((f"{self.name}:A", self.A), (f"{self.name}:B", self.B))

    def theta0s(self) -> tuple[Theta0Entry, ...]:
        return (self.theta0, self.A.theta0, self.B.theta0)

    def with_members(self, members: tuple[MemberEntry, ...]) -> LoRATensor:
        a, b = members
        return replace(self, A=a, B=b)

    def _fields(self) -> dict[str, Any]:
        return {"A": self.A.to_dict(), "B": self.B.to_dict(), "scale": float(self.scale),
                "theta0": self.theta0.to_dict()}

    @classmethod
    def parse_fields(cls, m: _Map, name: str, shape: tuple[int, ...]) -> LoRATensor:
        scale = m.finite("scale", rule="R60")
        return cls(name, shape, m.dtype("dtype", C.FLOAT_DTYPES),
                   Theta0Entry.parse(m.child("theta0")), scale,
                   MemberEntry.parse(m.child("A")), MemberEntry.parse(m.child("B")))


@dataclass(frozen=True)
class UnknownTensor(TensorEntry):
    """An encoding this reader does not know (R46: reported when the tensor is read); only
    what every tensor has is kept, ``dtype`` unchecked."""

    encoding: str  # type: ignore[misc]
    known: ClassVar[bool] = False

    def _fields(self) -> dict[str, Any]:
        return {}

    def unsupported(self, path: str) -> UnsupportedFeatureError:
        """R46: what reading this tensor raises (the file's other tensors stay readable)."""
        return UnsupportedFeatureError(
            f"tensor {self.name!r} uses encoding {self.encoding!r}, unknown to this reader. "
            "Upgrade mcnc-format; the other tensors can be read by name", rule="R46",
            path=path, tensor=self.name)

    @classmethod
    def parse_fields(cls, m: _Map, name: str, shape: tuple[int, ...]) -> UnknownTensor:
        dtype = m.get("dtype", str)
        m.seen.update(m.value)
        return cls(name, shape, dtype, m.value["encoding"])


_ENCODINGS: dict[str, type[TensorEntry]] = {
    Encoding.MCNC.value: MCNCTensor,
    Encoding.DENSE.value: DenseTensor,
    Encoding.PACKED.value: PackedTensor,
    Encoding.LORA.value: LoRATensor,
}


@dataclass
class Header:
    """The whole header: §3. ``minor`` is the file's minor version (kept for R11)."""

    alignment: int = C.DEFAULT_ALIGNMENT
    blobs: list[BlobEntry] = field(default_factory=list)
    generators: list[GeneratorEntry] = field(default_factory=list)
    segments: list[SegmentEntry] = field(default_factory=list)
    tensors: list[TensorEntry] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    minor: int = C.FORMAT_MINOR

    def to_dict(self) -> dict[str, Any]:
        """The header map as a writer emits it (§3, §11): member offsets equal to the implied
        ones (§6.1) are left out."""
        tensors = [t.to_dict() for t in self._as_written()]
        out: dict[str, Any] = {
            "alignment": self.alignment,
            "blobs": [b.to_dict() for b in self.blobs],
            "generators": [g.to_dict() for g in self.generators],
            "metadata": dict(sorted(self.metadata.items())),
            "segments": [s.to_dict() for s in self.segments],
            "tensors": tensors,
        }
        if self.info:
            out["info"] = dict(sorted(self.info.items()))
        return dict(sorted(out.items()))

    def required_minor(self) -> int:
        """The lowest minor version whose features this header uses (§13): 1 when it has a
        packed tensor or leaves a member offset to be implied (which ``to_dict`` does)."""
        uses_1_1 = any(isinstance(t, PackedTensor) or any(m.offset is None for m in t.members())
                       for t in self._as_written())
        return 1 if uses_1_1 else 0

    def _as_written(self) -> list[TensorEntry]:
        """The tensors with each member offset that equals the implied one (§6.1) left out
        (``None``)."""
        end: dict[int, int] = {}
        out = []
        for t in self.tensors:
            members = []
            for member in t.members():
                implied = member.offset == end.get(member.segment, 0)
                end[member.segment] = member.offset + member.numel
                members.append(replace(member, offset=None)  # type: ignore[arg-type]
                               if implied else member)
            out.append(t.with_members(tuple(members)))
        return out

    @classmethod
    def parse(cls, value: Any, source: str, minor: int) -> Header:
        m = _Map(value, "", source, lenient=minor > C.FORMAT_MINOR)
        alignment = m.get("alignment", int)
        if not (C.MIN_ALIGNMENT <= alignment <= C.MAX_ALIGNMENT) or alignment & (alignment - 1):
            raise m.error("alignment", f"expected a power of two in [{C.MIN_ALIGNMENT}, "
                          f"{C.MAX_ALIGNMENT}], got {alignment}", rule="R12")
        header = cls(
            alignment=alignment,
            blobs=[BlobEntry.parse(b) for b in m.items("blobs", C.MAX_BLOBS)],
            generators=[GeneratorEntry.parse(g) for g in m.items("generators",
                                                                  C.MAX_GENERATORS)],
            segments=[SegmentEntry.parse(s) for s in m.items("segments", C.MAX_SEGMENTS)],
            tensors=[TensorEntry.parse(t) for t in m.items("tensors", C.MAX_TENSORS)],
            metadata=_string_map(m, "metadata"),
            info=_info(m),
            minor=minor,
        )
        header.tensors = _resolve_layout(header.tensors)
        m.done()
        return header


def _resolve_layout(tensors: list[TensorEntry]) -> list[TensorEntry]:
    """Fill in what §6.1 and §6.4 imply: a member without ``offset`` starts where the previous
    member of its segment ends (tensor order, a lora tensor's A before its B); a packed tensor
    starts where the previous one of its blob ends."""
    segment_end: dict[int, int] = {}
    pack_end: dict[int, int] = {}

    def place(member: MemberEntry) -> MemberEntry:
        offset = segment_end.get(member.segment, 0) if member.offset is None else member.offset
        segment_end[member.segment] = offset + member.numel
        return replace(member, offset=offset)

    out = []
    for t in tensors:
        t = t.with_members(tuple(place(member) for member in t.members()))
        if isinstance(t, PackedTensor):
            t = replace(t, start=pack_end.get(t.blob, 0))
            pack_end[t.blob] = t.start + t.nbytes
        out.append(t)
    return out


def _info(m: _Map) -> dict[str, str]:
    """The ``info`` map (§3): the keys of §3, strings. Other keys are an error (R11) unless the
    file is from a newer minor version, whose info keys this reader ignores, values and all
    (a newer minor may give them values of any type)."""
    value = _bounded(m, "info", m.get("info", dict, {}))
    unknown = sorted(str(k) for k in value if k not in C.INFO_KEYS)
    if unknown and not m.lenient:
        raise m.error("info", f"unknown key(s) {', '.join(unknown)}; version "
                      f"{C.FORMAT_MAJOR}.{C.FORMAT_MINOR} defines {', '.join(C.INFO_KEYS)}. "
                      "Put free-form facts in metadata", rule="R11")
    known = {k: v for k, v in value.items() if k in C.INFO_KEYS}
    return _checked_strings(m, "info", known)


def _string_map(m: _Map, key: str) -> dict[str, str]:
    return _checked_strings(m, key, m.get(key, dict))


def _bounded(m: _Map, key: str, value: dict[Any, Any]) -> dict[Any, Any]:
    """R13: a metadata or info map has at most MAX_METADATA_ENTRIES entries."""
    if len(value) > C.MAX_METADATA_ENTRIES:
        raise m.error(key, f"{len(value)} entries exceed MAX_METADATA_ENTRIES", rule="R13")
    return value


def _checked_strings(m: _Map, key: str, value: dict[Any, Any]) -> dict[str, str]:
    """R13: string keys with string values of bounded size, at most MAX_METADATA_ENTRIES."""
    for k, v in _bounded(m, key, value).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise m.error(key, f"keys and values must be strings, got {_kind(k)} -> {_kind(v)}",
                          rule="R13")
        if len(v.encode("utf-8", "surrogatepass")) > C.MAX_METADATA_VALUE_BYTES:
            raise m.error(f"{key}.{k}", "value longer than MAX_METADATA_VALUE_BYTES", rule="R13")
    return dict(value)
