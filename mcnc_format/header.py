"""The typed header of SPEC.md §3-§7: dataclasses with exact ``to_dict``/``parse`` forms.

Parsing goes through ``_Map``, which knows the field path (``tensors[3].theta0.seed``) so every
error names the field, and which rejects unknown keys unless the file is from a newer minor
version (R11). Per-field rules live here; rules that relate entries to each other live in
``validate.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from . import constants as C
from .errors import HeaderError, UnsupportedFeatureError
from .uri import SCHEME, parse_uri

__all__ = [
    "BlobEntry",
    "FactorEntry",
    "GeneratorEntry",
    "Header",
    "SegmentEntry",
    "TensorEntry",
    "Theta0Entry",
]

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


class _Map:
    """A header map being parsed: typed getters that name the field path in errors."""

    def __init__(self, value: Any, path: str, source: str, lenient: bool) -> None:
        if not isinstance(value, dict):
            rule = "R10" if path else "R6"
            raise HeaderError(f"{source}: {path or 'header'}: expected a map, got {_kind(value)} "
                              f"({rule})")
        self.value = value
        self.path = path
        self.source = source
        self.lenient = lenient
        self.seen: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> HeaderError:
        return HeaderError(f"{self.source}: {self._where(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.value:
            if default is ...:
                raise self.error(key, "required field is missing (R10); re-write the file "
                                 "with a conforming writer")
            return default
        value = self.value[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if bool not in kinds and isinstance(value, bool):
            raise self.error(key, f"expected {_names(kinds)}, got bool (R10)")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {_names(kinds)}, got {_kind(value)} (R10)")
        return value

    def uint(self, key: str, limit: int, default: Any = ..., rule: str = "R10") -> int:
        value = self.get(key, int, default)
        if value is default:
            return value
        if not 0 <= value <= limit:
            raise self.error(key, f"expected an integer in [0, {limit}], got {value} ({rule})")
        return value

    def finite(self, key: str, default: Any = ..., rule: str = "R71") -> float:
        value = self.get(key, float, default)
        if not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value} ({rule})")
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        value = self.get(key, list)
        if len(value) > C.MAX_RANK:
            raise self.error(key, f"rank {len(value)} exceeds MAX_RANK {C.MAX_RANK} (R43)")
        dims = []
        for i, dim in enumerate(value):
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= C.MAX_NUMEL:
                raise self.error(f"{key}[{i}]", f"expected an integer in [0, MAX_NUMEL], got "
                                 f"{dim!r} (R43)")
            dims.append(dim)
        if math.prod(dims) > C.MAX_NUMEL:
            raise self.error(key, f"{math.prod(dims)} elements exceed MAX_NUMEL {C.MAX_NUMEL} "
                             "(R43)")
        return tuple(dims)

    def dtype(self, key: str, allowed: tuple[str, ...] | None = None) -> str:
        value = self.get(key, str)
        if value not in C.DTYPE_SIZES:
            raise UnsupportedFeatureError(
                f"{self.source}: {self._where(key)}: unknown dtype {value!r}; this reader knows "
                f"{', '.join(C.DTYPE_SIZES)} (R26). Upgrade mcnc-format."
            )
        if allowed is not None and value not in allowed:
            raise self.error(key, f"dtype must be one of {', '.join(allowed)}, got {value!r} "
                             "(R44)")
        return value

    def child(self, key: str) -> _Map:
        return _Map(self.get(key, dict), self._where(key), self.source, self.lenient)

    def items(self, key: str, limit: int) -> list[_Map]:
        values = self.get(key, list)
        if len(values) > limit:
            raise self.error(key, f"{len(values)} entries exceed the limit {limit} (R13)")
        return [
            _Map(v, f"{self._where(key)}[{i}]", self.source, self.lenient)
            for i, v in enumerate(values)
        ]

    def done(self) -> None:
        """Reject keys this reader does not know, unless the file is from a newer minor (R11)."""
        unknown = sorted(str(k) for k in self.value if k not in self.seen)
        if unknown and not self.lenient:
            raise HeaderError(
                f"{self.source}: {self.path or 'header'}: unknown field(s) {', '.join(unknown)} "
                "in a file of this reader's minor version (R11)"
            )


def _kind(value: Any) -> str:
    return type(value).__name__


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


@dataclass(frozen=True)
class BlobEntry:
    """A stored byte range: §4."""

    offset: int
    length: int
    codec: str
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
            "codec": self.codec,
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
            raise UnsupportedFeatureError(
                f"{m.source}: {m.path}.codec: unknown codec {codec!r}; this reader knows "
                f"{', '.join(C.CODECS)} (R26). Upgrade mcnc-format."
            )
        entry = cls(
            offset=m.uint("offset", _U64),
            length=m.uint("length", _U64),
            codec=codec,
            dtype=m.dtype("dtype"),
            shape=m.shape("shape"),
            xxh3=m.uint("xxh3", _U64),
        )
        m.done()
        return entry


@dataclass(frozen=True)
class GeneratorEntry:
    """A generator: §5. Exactly one of ``seed`` (philox weights) and ``blobs`` (inline)."""

    k: int
    d: int
    hidden: tuple[int, ...]
    L: float
    omega0: float = 1.0
    bias: bool = True
    normalize: bool = True
    seed: int | None = None
    blobs: tuple[int, ...] | None = None
    activation: str = C.ACTIVATION_SINE

    def to_dict(self) -> dict[str, Any]:
        weights: dict[str, Any]
        if self.seed is not None:
            weights = {"kind": C.WEIGHTS_PHILOX, "seed": self.seed}
        else:
            weights = {"blobs": list(self.blobs or ()), "kind": C.WEIGHTS_INLINE}
        return {
            "L": float(self.L),
            "activation": self.activation,
            "bias": self.bias,
            "d": self.d,
            "hidden": list(self.hidden),
            "k": self.k,
            "normalize": self.normalize,
            "omega0": float(self.omega0),
            "weights": weights,
        }

    @classmethod
    def parse(cls, m: _Map) -> GeneratorEntry:
        k = m.get("k", int)
        d = m.get("d", int)
        if not 1 <= k <= C.MAX_K:
            raise m.error("k", f"expected 1 <= k <= {C.MAX_K}, got {k} (R30)")
        if not 1 <= d <= C.MAX_D:
            raise m.error("d", f"expected 1 <= d <= {C.MAX_D}, got {d} (R30)")
        hidden = m.get("hidden", list)
        if not 1 <= len(hidden) <= C.MAX_HIDDEN_LAYERS:
            raise m.error("hidden", f"expected 1 to {C.MAX_HIDDEN_LAYERS} widths, got "
                          f"{len(hidden)} (R30)")
        for i, width in enumerate(hidden):
            if isinstance(width, bool) or not isinstance(width, int):
                raise m.error(f"hidden[{i}]", f"expected an integer, got {_kind(width)} (R30)")
            if not 1 <= width <= C.MAX_HIDDEN_WIDTH:
                raise m.error(f"hidden[{i}]", f"expected 1 <= width <= {C.MAX_HIDDEN_WIDTH}, "
                              f"got {width} (R30)")
        widths = (k, *hidden, d)
        weights = sum(widths[t] * widths[t + 1] + widths[t + 1] for t in range(len(hidden) + 1))
        if weights > C.MAX_GENERATOR_WEIGHTS:
            raise m.error("d", f"widths {list(widths)} need {weights} generator weights, over "
                          f"MAX_GENERATOR_WEIGHTS {C.MAX_GENERATOR_WEIGHTS} (R30)")
        activation = m.get("activation", str)
        if activation != C.ACTIVATION_SINE:
            raise UnsupportedFeatureError(
                f"{m.source}: {m.path}.activation: unknown activation {activation!r}; "
                f"this reader knows 'sin' (R31). Upgrade mcnc-format."
            )
        L = m.finite("L", rule="R34")
        omega0 = m.finite("omega0", rule="R34")
        if L <= 0:
            raise m.error("L", f"expected L > 0, got {L} (R34)")
        if omega0 == 0:
            raise m.error("omega0", "expected a non-zero frequency scale (R34)")
        bias = m.get("bias", bool)
        normalize = m.get("normalize", bool)
        w = m.child("weights")
        kind = w.get("kind", str)
        seed: int | None = None
        blobs: tuple[int, ...] | None = None
        if kind == C.WEIGHTS_PHILOX:
            seed = w.uint("seed", _U32, rule="R30")
        elif kind == C.WEIGHTS_INLINE:
            raw = w.get("blobs", list)
            for i, b in enumerate(raw):
                if isinstance(b, bool) or not isinstance(b, int):
                    raise w.error(f"blobs[{i}]", f"expected a blob index, got {_kind(b)} (R33)")
            blobs = tuple(raw)
        else:
            raise UnsupportedFeatureError(
                f"{m.source}: {m.path}.weights.kind: unknown generator weights kind {kind!r}; "
                "this reader knows 'philox' and 'inline' (R32). Upgrade mcnc-format."
            )
        w.done()
        m.done()
        return cls(k, d, tuple(hidden), L, omega0, bias, normalize, seed, blobs, activation)

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
        entry = cls(
            generator=m.uint("generator", _U64),
            m=m.uint("m", _U64),
            chunks=m.uint("chunks", _U64),
            alpha=m.uint("alpha", _U64),
            beta=m.uint("beta", _U64),
        )
        if not 1 <= entry.m <= C.MAX_M:
            raise m.error("m", f"expected 1 <= m <= {C.MAX_M}, got {entry.m} (R40)")
        m.done()
        return entry


@dataclass(frozen=True)
class Theta0Entry:
    """The base values of a tensor: §7. Fields beyond ``kind`` depend on the kind."""

    kind: str
    scheme: str | None = None
    seed: int | None = None
    stream: int | None = None
    bound: float | None = None
    mean: float | None = None
    std: float | None = None
    blob: int | None = None
    uri: str | None = None
    tensor: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for key in ("scheme", "seed", "stream", "bound", "mean", "std", "blob", "uri", "tensor",
                    "sha256"):
            value = getattr(self, key)
            if value is not None:
                out[key] = float(value) if key in ("bound", "mean", "std") else value
        return dict(sorted(out.items()))

    @classmethod
    def parse(cls, m: _Map) -> Theta0Entry:
        kind = m.get("kind", str)
        if kind == C.THETA0_ZEROS:
            entry = cls(kind)
        elif kind == C.THETA0_PRNG:
            entry = cls._parse_prng(m)
        elif kind == C.THETA0_BLOB:
            entry = cls(kind, blob=m.uint("blob", _U64))
        elif kind == C.THETA0_EXTERNAL:
            entry = cls._parse_external(m)
        else:
            # R70: reported when the tensor is read; other tensors stay readable.
            entry = cls(kind)
            m.seen.update(m.value)
        m.done()
        return entry

    @classmethod
    def _parse_prng(cls, m: _Map) -> Theta0Entry:
        scheme = m.get("scheme", str)
        seed = m.uint("seed", _U32, rule="R71")
        stream = m.uint("stream", _U32, rule="R71")
        if scheme == C.SCHEME_UNIFORM:
            return cls(C.THETA0_PRNG, scheme, seed, stream, bound=m.finite("bound"))
        if scheme == C.SCHEME_FAN_IN_UNIFORM:
            return cls(C.THETA0_PRNG, scheme, seed, stream)
        if scheme == C.SCHEME_NORMAL:
            return cls(C.THETA0_PRNG, scheme, seed, stream, mean=m.finite("mean"),
                       std=m.finite("std"))
        m.seen.update(m.value)
        return cls(C.THETA0_PRNG, scheme, seed, stream)

    @classmethod
    def _parse_external(cls, m: _Map) -> Theta0Entry:
        uri = m.get("uri", str)
        tensor = m.get("tensor", str)
        sha = m.get("sha256", str)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise m.error("sha256", "expected 64 lowercase hex digits (R74)")
        if not _valid_uri(uri):
            raise m.error("uri", f"{uri!r} is neither a relative path without '..' nor "
                          "hf://ORG/REPO@<40-hex commit>/PATH (R74)")
        return cls(C.THETA0_EXTERNAL, uri=uri, tensor=tensor, sha256=sha)

    @property
    def known(self) -> bool:
        if self.kind == C.THETA0_PRNG:
            return self.scheme in (C.SCHEME_UNIFORM, C.SCHEME_FAN_IN_UNIFORM, C.SCHEME_NORMAL)
        return self.kind in (C.THETA0_ZEROS, C.THETA0_BLOB, C.THETA0_EXTERNAL)


def _valid_uri(uri: str) -> bool:
    if uri.startswith(SCHEME):
        try:
            return parse_uri(uri).pinned
        except ValueError:
            return False
    if not uri or uri.startswith(("/", "\\")) or ":" in uri.split("/")[0]:
        return False
    return ".." not in uri.replace("\\", "/").split("/")


@dataclass(frozen=True)
class FactorEntry:
    """An mcnc-encoded LoRA factor (A or B): §6.3."""

    shape: tuple[int, ...]
    dtype: str
    segment: int
    offset: int  # §6.1: stored, or implied by the members before it (Header.parse fills it)
    theta0: Theta0Entry

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "offset": self.offset,
            "segment": self.segment,
            "shape": list(self.shape),
            "theta0": self.theta0.to_dict(),
        }

    @classmethod
    def parse(cls, m: _Map) -> FactorEntry:
        entry = cls(
            shape=m.shape("shape"),
            dtype=m.dtype("dtype", C.FLOAT_DTYPES),
            segment=m.uint("segment", _U64),
            offset=m.uint("offset", _U64, default=None),  # type: ignore[arg-type]
            theta0=Theta0Entry.parse(m.child("theta0")),
        )
        m.done()
        return entry


@dataclass(frozen=True)
class TensorEntry:
    """One named tensor: §6. Which optional fields are set depends on ``encoding``."""

    name: str
    encoding: str
    shape: tuple[int, ...]
    dtype: str
    segment: int | None = None
    offset: int | None = None
    theta0: Theta0Entry | None = None
    blob: int | None = None
    scale: float | None = None
    A: FactorEntry | None = None
    B: FactorEntry | None = None
    start: int | None = None  # packed: byte offset in its pack blob, implied (§6.4), not stored

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * C.DTYPE_SIZES[self.dtype]

    @property
    def known(self) -> bool:
        return self.encoding in C.KNOWN_ENCODINGS

    @property
    def stored_dense(self) -> bool:
        """Whether the values are stored as they are (``dense`` or ``packed``)."""
        return self.encoding in (C.ENCODING_DENSE, C.ENCODING_PACKED)

    def as_factor(self) -> FactorEntry:
        """The mcnc fields of this entry, shaped like a LoRA factor (one code path for both)."""
        assert self.segment is not None and self.offset is not None and self.theta0 is not None
        return FactorEntry(self.shape, self.dtype, self.segment, self.offset, self.theta0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dtype": self.dtype,
            "encoding": self.encoding,
            "name": self.name,
            "shape": list(self.shape),
        }
        if self.encoding == C.ENCODING_MCNC:
            assert self.theta0 is not None
            out.update(segment=self.segment, offset=self.offset, theta0=self.theta0.to_dict())
        elif self.stored_dense:
            out["blob"] = self.blob
        elif self.encoding == C.ENCODING_LORA:
            assert self.theta0 is not None and self.A is not None and self.B is not None
            out.update(A=self.A.to_dict(), B=self.B.to_dict(), scale=float(self.scale or 0.0),
                       theta0=self.theta0.to_dict())
        return dict(sorted(out.items()))

    @classmethod
    def parse(cls, m: _Map) -> TensorEntry:
        name = m.get("name", str)
        if not name:
            raise m.error("name", "tensor names must be non-empty (R42)")
        if len(name.encode("utf-8", "surrogatepass")) > C.MAX_NAME_BYTES:
            raise m.error("name", f"longer than MAX_NAME_BYTES {C.MAX_NAME_BYTES} (R13)")
        encoding = m.get("encoding", str)
        shape = m.shape("shape")
        if encoding in (C.ENCODING_DENSE, C.ENCODING_PACKED):
            entry = cls(name, encoding, shape, m.dtype("dtype"), blob=m.uint("blob", _U64))
        elif encoding == C.ENCODING_MCNC:
            entry = cls(
                name, encoding, shape, m.dtype("dtype", C.FLOAT_DTYPES),
                segment=m.uint("segment", _U64),
                offset=m.uint("offset", _U64, default=None),
                theta0=Theta0Entry.parse(m.child("theta0")),
            )
        elif encoding == C.ENCODING_LORA:
            scale = m.finite("scale", rule="R60")
            entry = cls(
                name, encoding, shape, m.dtype("dtype", C.FLOAT_DTYPES),
                theta0=Theta0Entry.parse(m.child("theta0")),
                scale=scale,
                A=FactorEntry.parse(m.child("A")),
                B=FactorEntry.parse(m.child("B")),
            )
        else:
            # R46: unknown encodings are reported when read; keep what every tensor has.
            dtype = m.get("dtype", str)
            m.seen.update(m.value)
            entry = cls(name, encoding, shape, dtype)
        m.done()
        return entry


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
        tensors = [t.to_dict() for t in self.tensors]
        implied: dict[int, int] = {}
        for entry, out_entry in zip(self.tensors, tensors, strict=True):
            if entry.encoding == C.ENCODING_MCNC:
                _omit_implied_offset(entry.as_factor(), out_entry, implied)
            elif entry.encoding == C.ENCODING_LORA:
                assert entry.A is not None and entry.B is not None
                _omit_implied_offset(entry.A, out_entry["A"], implied)
                _omit_implied_offset(entry.B, out_entry["B"], implied)
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
        encoded = self.to_dict()["tensors"]
        uses_1_1 = any(
            t["encoding"] == C.ENCODING_PACKED
            or (t["encoding"] == C.ENCODING_MCNC and "offset" not in t)
            or (t["encoding"] == C.ENCODING_LORA and ("offset" not in t["A"]
                                                      or "offset" not in t["B"]))
            for t in encoded)
        return 1 if uses_1_1 else 0

    @classmethod
    def parse(cls, value: Any, source: str, minor: int) -> Header:
        m = _Map(value, "", source, lenient=minor > C.FORMAT_MINOR)
        alignment = m.get("alignment", int)
        if not (C.MIN_ALIGNMENT <= alignment <= C.MAX_ALIGNMENT) or alignment & (alignment - 1):
            raise m.error("alignment", f"expected a power of two in [{C.MIN_ALIGNMENT}, "
                          f"{C.MAX_ALIGNMENT}], got {alignment} (R12)")
        header = cls(
            alignment=alignment,
            blobs=[BlobEntry.parse(b) for b in m.items("blobs", C.MAX_BLOBS)],
            generators=[GeneratorEntry.parse(g) for g in m.items("generators",
                                                                  C.MAX_GENERATORS)],
            segments=[SegmentEntry.parse(s) for s in m.items("segments", C.MAX_SEGMENTS)],
            tensors=[TensorEntry.parse(t) for t in m.items("tensors", C.MAX_TENSORS)],
            metadata=_string_map(m, "metadata"),
            info=_string_map(m, "info", default={}),
            minor=minor,
        )
        header.tensors = _resolve_layout(header.tensors)
        unknown_info = sorted(set(header.info) - set(C.INFO_KEYS))
        if unknown_info and not m.lenient:
            raise m.error("info", f"unknown key(s) {', '.join(unknown_info)}; version 1.0 defines "
                          f"{', '.join(C.INFO_KEYS)} (R11). Put free-form facts in metadata.")
        m.done()
        return header


def _omit_implied_offset(member: FactorEntry, out: dict[str, Any], implied: dict[int, int]
                         ) -> None:
    if member.offset == implied.get(member.segment, 0):
        del out["offset"]
    implied[member.segment] = member.offset + member.numel


def _resolve_layout(tensors: list[TensorEntry]) -> list[TensorEntry]:
    """Fill in what §6.1 and §6.4 imply: a member without ``offset`` starts where the previous
    member of its segment ends (tensor order, a lora tensor's A before its B); a packed tensor
    starts where the previous one of its blob ends."""
    segment_end: dict[int, int] = {}
    pack_end: dict[int, int] = {}

    def place(segment: int, offset: int | None, numel: int) -> int:
        if offset is None:
            offset = segment_end.get(segment, 0)
        segment_end[segment] = offset + numel
        return offset

    def place_factor(factor: FactorEntry) -> FactorEntry:
        return replace(factor, offset=place(factor.segment, factor.offset, factor.numel))

    out = []
    for t in tensors:
        if t.encoding == C.ENCODING_MCNC:
            assert t.segment is not None
            t = replace(t, offset=place(t.segment, t.offset, t.numel))
        elif t.encoding == C.ENCODING_LORA:
            assert t.A is not None and t.B is not None
            t = replace(t, A=place_factor(t.A), B=place_factor(t.B))
        elif t.encoding == C.ENCODING_PACKED:
            assert t.blob is not None
            t = replace(t, start=pack_end.get(t.blob, 0))
            pack_end[t.blob] = t.start + t.nbytes  # type: ignore[operator]
        out.append(t)
    return out


def _string_map(m: _Map, key: str, default: Any = ...) -> dict[str, str]:
    value = m.get(key, dict, default)
    if len(value) > C.MAX_METADATA_ENTRIES:
        raise m.error(key, f"{len(value)} entries exceed MAX_METADATA_ENTRIES (R13)")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise m.error(key, f"keys and values must be strings, got {_kind(k)} -> {_kind(v)} "
                          "(R13)")
        if len(v.encode("utf-8", "surrogatepass")) > C.MAX_METADATA_VALUE_BYTES:
            raise m.error(f"{key}.{k}", "value longer than MAX_METADATA_VALUE_BYTES (R13)")
    return dict(value)
