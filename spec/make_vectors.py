"""Regenerate the test vectors of SPEC.md §14: ``python spec/make_vectors.py [OUT_DIR]``.

Writes into ``OUT_DIR`` (default: ``spec/vectors`` beside this script), byte-identically on
every run:

- valid vectors ``NAME.mcnc``, each beside ``NAME.expected.safetensors``: every tensor as the
  float64 reference (``mcnc_format.reference``) computes it from the writer's inputs, rounded
  once to the tensor's dtype;
- invalid vectors ``invalid/RNN-description.mcnc``, each breaking one rule of §12, built from a
  valid file by editing its header (checksums and blob layout recomputed, except where the
  broken rule is about them);
- ``philox.json`` (Philox words, Random123 known answers, uniform and normal values);
- ``index.json`` (every vector, machine-readable) and ``README.md`` (the same, for people).

All test data is drawn from the spec's own Philox stream under a per-vector key, so the
vectors depend on no NumPy or torch random generator. zstd blobs depend on the libzstd
version (any conforming decoder reads them; only regeneration needs the same library).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard
from safetensors.torch import save as safetensors_bytes

import mcnc_format as mf
from mcnc_format import constants as C
from mcnc_format import reference
from mcnc_format.container import checksum
from mcnc_format.header import (
    ExternalTheta0,
    FanInUniformTheta0,
    Header,
    NormalTheta0,
    UniformTheta0,
    ZerosTheta0,
)
from mcnc_format.validate import align_up
from mcnc_format.writer import DeclaredTheta0, StoredTheta0

DEFAULT_OUT = Path(__file__).resolve().parent / "vectors"
INVALID_DIR = "invalid"
EXTERNAL_BASE = "external-base.safetensors"
_PREAMBLE = struct.Struct("<8sHHIQQ")

# --------------------------------------------------------------------------------------------
# Deterministic inputs
# --------------------------------------------------------------------------------------------


class _Data:
    """Inputs drawn from Philox (§8) under a key derived from the vector's name: the same
    numbers on every machine and every library release, and independent between vectors."""

    def __init__(self, name: str) -> None:
        self.seed = zlib.crc32(name.encode())
        self.stream = 0

    def signed(self, shape: tuple[int, ...], scale: float) -> torch.Tensor:
        """float32 values ``scale * s`` with ``s`` the exact uniforms of §8.2 in [-1, 1)."""
        self.stream += 1
        words = reference.stream_words_ref(self.seed, self.stream, 0, math.prod(shape))
        values = (reference.signed_unit_ref(words) * scale).astype(np.float32)
        return torch.from_numpy(values).reshape(shape)

    def segment(self, spec: mf.GeneratorSpec, shapes: list[tuple[int, ...]], m: int,
                dtype: torch.dtype = torch.float32, codec: str = C.Codec.RAW) -> mf.Segment:
        """A segment sized for members of ``shapes``: alpha in [-L, L), beta in [-0.5, 0.5)."""
        chunks = -(-sum(math.prod(s) for s in shapes) // spec.d)
        alpha = self.signed((chunks, m, spec.k), spec.L).to(dtype)
        beta = self.signed((chunks, m), 0.5).to(dtype)
        return mf.Segment(spec, alpha, beta, codec)

    def inline_generator(self, k: int, d: int, hidden: tuple[int, ...], bias: bool,
                         normalize: bool, L: float) -> mf.GeneratorSpec:
        """A generator with stored weights, drawn at SIREN's scales (§5.2's bounds)."""
        widths = (k, *hidden, d)
        weights: list[torch.Tensor] = []
        for t in range(len(widths) - 1):
            w_bound = 1.0 / k if t == 0 else math.sqrt(6.0 / widths[t])
            weights.append(self.signed((widths[t + 1], widths[t]), w_bound))
            if bias:
                weights.append(self.signed((widths[t + 1],), 1.0 / math.sqrt(widths[t])))
        return mf.GeneratorSpec(k=k, d=d, hidden=hidden, L=L, bias=bias, normalize=normalize,
                                seed=None, inline=tuple(weights))


# --------------------------------------------------------------------------------------------
# The float64 reference evaluation of the writer's inputs (§6, §7, §10)
# --------------------------------------------------------------------------------------------


def _delta64(segment: mf.Segment) -> np.ndarray:
    """``sum_j beta[c, j] * phi64(alpha[c, j])`` for every chunk, flattened to ``chunks * d``."""
    spec = segment.generator
    if spec.inline is None:
        weights = reference.generator_weights_ref(spec)
    else:
        weights = [t.numpy() for t in spec.inline]
    alpha = segment.alpha.to(torch.float64).numpy()
    beta = segment.beta.to(torch.float64).numpy()
    phi = reference.phi_ref(weights, spec, alpha)
    return np.einsum("cm,cmd->cd", beta, phi).reshape(-1)


def _theta0_64(theta0: mf.Theta0, shape: tuple[int, ...],
               externals: dict[tuple[str, str], torch.Tensor]) -> np.ndarray:
    """theta0 of §7 in float64: exact PRNG maps, ``z64`` for normals, widened blobs."""
    if isinstance(theta0, StoredTheta0):
        return theta0.tensor.to(torch.float64).reshape(-1).numpy()
    assert isinstance(theta0, DeclaredTheta0)
    e = theta0.entry
    n = math.prod(shape)
    if isinstance(e, ZerosTheta0):
        return np.zeros(n)
    if isinstance(e, UniformTheta0 | FanInUniformTheta0):
        bound = e.bound if isinstance(e, UniformTheta0) else 1.0 / math.sqrt(math.prod(shape[1:]))
        return reference.uniform_signed_ref(e.seed, e.stream, 0, n, bound).astype(float)
    if isinstance(e, NormalTheta0):
        z64 = reference.normal_ref(e.seed, e.stream, 0, n)
        return float(np.float32(e.mean)) + float(np.float32(e.std)) * z64
    assert isinstance(e, ExternalTheta0)
    return externals[(e.uri, e.tensor)].to(torch.float64).reshape(-1).numpy()


def _round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: a second rounding to any format at least two bits
    narrower (f16, bf16) then equals one correct rounding of ``x`` (no double rounding)."""
    y = x.astype(np.float32)
    inexact = y.astype(np.float64) != x
    bits = y.view(np.uint32).copy()
    fix = inexact & ((bits & 1) == 0)
    toward_zero = np.abs(y.astype(np.float64)) > np.abs(x)
    bits[fix & toward_zero] -= 1
    bits[fix & ~toward_zero] += 1
    return bits.view(np.float32)


def round_to_dtype(x64: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values once, to nearest even, to a float dtype of the format."""
    if dtype == torch.float64:
        return torch.from_numpy(x64.copy())
    if dtype == torch.float32:
        return torch.from_numpy(x64.astype(np.float32))
    return torch.from_numpy(_round_to_odd_f32(x64)).to(dtype)


@dataclass
class _Valid:
    """One valid vector: the writer's inputs and what it covers."""

    name: str
    covers: str
    tensors: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    alignment: int = C.DEFAULT_ALIGNMENT
    externals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    edit: Callable[[RawFile], None] | None = None
    minor: int = C.FORMAT_MINOR
    unsupported: dict[str, str] = field(default_factory=dict)
    header_codec: int = C.HEADER_CODEC_MSGPACK
    transform: Callable[[bytes], bytes] | None = None  # of the encoded header (RawFile.encode)


def expected_tensors(vector: _Valid) -> dict[str, torch.Tensor]:
    """Every tensor of ``vector`` by the float64 reference, rounded once to its dtype.

    Segment members are laid out as the writer lays them out (§11): in order of first use,
    a lora tensor's A before its B.
    """
    externals = {(uri, name): t for uri, ts in vector.externals.items() for name, t in ts.items()}
    deltas: dict[int, np.ndarray] = {}
    fill: dict[int, int] = {}

    def member64(value: mf.MCNC) -> np.ndarray:
        key = id(value.segment)
        if key not in deltas:
            deltas[key] = _delta64(value.segment)
            fill[key] = 0
        n = math.prod(value.shape)
        start = fill[key]
        fill[key] += n
        return _theta0_64(value.theta0, value.shape, externals) + deltas[key][start:start + n]

    out: dict[str, torch.Tensor] = {}
    for name, value in vector.tensors.items():
        if isinstance(value, mf.Dense):
            out[name] = value.tensor.clone()
        elif isinstance(value, torch.Tensor):
            out[name] = value.clone()
        elif isinstance(value, mf.MCNC):
            out[name] = round_to_dtype(member64(value), value.dtype).reshape(value.shape)
        else:
            a = member64(value.A).reshape(value.A.shape)
            b = member64(value.B).reshape(value.B.shape)
            shape = (value.B.shape[0], value.A.shape[1])
            merged = _theta0_64(value.theta0, shape, externals).reshape(shape)
            merged = merged + value.scale * (b @ a)
            out[name] = round_to_dtype(merged.reshape(-1), value.dtype).reshape(shape)
    return {k: v for k, v in out.items() if k not in vector.unsupported}


# --------------------------------------------------------------------------------------------
# Raw files: a header as a plain msgpack dict plus blob payloads, laid out as §2-§4 say
# --------------------------------------------------------------------------------------------


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def pack(value: Any) -> bytes:
    """msgpack as §11 prescribes: sorted keys, float64 floats, str strings."""
    return msgpack.packb(_sorted(value), use_bin_type=True, use_single_float=False)


@dataclass
class RawFile:
    """An ``.mcnc`` file taken apart, to be edited and put together again."""

    header: dict[str, Any]
    payloads: list[bytes]
    minor: int = C.FORMAT_MINOR

    @classmethod
    def parse(cls, data: bytes) -> RawFile:
        _, _, minor, _, length, _ = _PREAMBLE.unpack_from(data)
        header = msgpack.unpackb(data[C.PREAMBLE_SIZE:C.PREAMBLE_SIZE + length], raw=False)
        payloads = [data[b["offset"]:b["offset"] + b["length"]] for b in header["blobs"]]
        return cls(header, payloads, minor)

    def add_blob(self, payload: bytes, dtype: str, shape: list[int], codec: str = C.Codec.RAW
                 ) -> int:
        self.header["blobs"].append({"codec": codec, "dtype": dtype, "length": 0, "offset": 0,
                                     "shape": shape, "xxh3": 0})
        self.payloads.append(payload)
        return len(self.payloads) - 1

    def encode(self, *, major: int = C.FORMAT_MAJOR, header_codec: int = C.HEADER_CODEC_MSGPACK,
               gap_before: dict[int, int] | None = None, alignment: int | None = None,
               transform: Callable[[bytes], bytes] | None = None) -> bytearray:
        """The file's bytes with every blob's offset, length and xxh3 recomputed.

        ``gap_before[i]`` extra bytes go before blob ``i`` (to misplace it); ``transform`` edits
        the encoded header bytes (the preamble's length and checksum follow the edit).
        """
        gaps = gap_before or {}
        align = alignment or self.header["alignment"]
        blobs = self.header["blobs"]
        for blob, payload in zip(blobs, self.payloads, strict=True):
            blob["length"] = len(payload)
            blob["xxh3"] = checksum(payload)
        header_bytes = b""
        for _ in range(32):
            position = align_up(C.PREAMBLE_SIZE + len(header_bytes), align)
            for i, (blob, payload) in enumerate(zip(blobs, self.payloads, strict=True)):
                position = align_up(position, align) + gaps.get(i, 0)
                blob["offset"] = position
                position += len(payload)
            encoded = pack(self.header)
            encoded = transform(encoded) if transform else encoded
            if encoded == header_bytes:
                break
            header_bytes = encoded
        else:
            raise AssertionError("the header's size and the blob offsets did not settle")
        out = bytearray(_PREAMBLE.pack(C.MAGIC, major, self.minor, header_codec,
                                       len(header_bytes), checksum(header_bytes)))
        out += header_bytes
        if not blobs:
            out += bytes(align_up(len(out), align) - len(out))
        for blob, payload in zip(blobs, self.payloads, strict=True):
            out += bytes(blob["offset"] - len(out))
            out += payload
        return out


def _save_bytes(tensors: dict[str, Any], **kwargs: Any) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.mcnc"
        mf.save(path, tensors, **kwargs)
        return path.read_bytes()


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})


def _sha256(tensor: torch.Tensor) -> str:
    flat = tensor.contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Valid vectors
# --------------------------------------------------------------------------------------------


def _basic() -> _Valid:
    data = _Data("basic")
    gen = mf.GeneratorSpec(k=4, d=16, hidden=(32,), L=20.0, seed=1)
    seg = data.segment(gen, [(6, 8)], m=1)
    return _Valid("basic", "philox generator, one hidden layer, bias, normalize, m = 1, f32 "
                  "alpha/beta, raw, one tensor per segment (3 whole chunks, implied offset), "
                  "theta0 zeros, f32 output, a small f32 tensor packed (§6.4)", {
                      "layer.weight": mf.MCNC(seg, (6, 8)),
                      "layer.bias": data.signed((8,), 0.1),
                  })


def _deep() -> _Valid:
    data = _Data("deep-generator")
    gen = mf.GeneratorSpec(k=3, d=24, hidden=(16, 16, 8), L=2.0, omega0=3.0, bias=False,
                           normalize=False, seed=0xFFFFFFFF)
    seg = data.segment(gen, [(5, 10)], m=3)
    return _Valid("deep-generator", "three hidden layers, no bias, no normalization, "
                  "omega0 = 3, L = 2, seed 2^32 - 1, m = 3, partial last chunk, f64 output, "
                  "theta0 prng uniform", {
                      "w": mf.MCNC(seg, (5, 10), torch.float64,
                                   mf.Theta0.uniform(0.02, seed=9, stream=4)),
                  })


def _shared() -> _Valid:
    data = _Data("shared-segment")
    gen = mf.GeneratorSpec(k=8, d=32, hidden=(64, 64), L=20.0, seed=12345)
    shapes = [(4, 8, 3), (4,), (7, 5), (7,)]
    seg = data.segment(gen, shapes, m=2, dtype=torch.float16, codec=C.Codec.ZSTD)
    return _Valid("shared-segment", "two hidden layers, four members in one segment with a "
                  "partial last chunk, f16 alpha/beta in zstd, f32/f16/bf16 outputs, theta0 "
                  "fan_in_uniform (rank 3), uniform, normal (mean 0.1, std 0.02) and zeros", {
                      "a.weight": mf.MCNC(seg, shapes[0], torch.float32,
                                          mf.Theta0.fan_in_uniform(seed=3, stream=0)),
                      "a.bias": mf.MCNC(seg, shapes[1], torch.float16,
                                        mf.Theta0.uniform(1 / math.sqrt(24), seed=3, stream=1)),
                      "b.weight": mf.MCNC(seg, shapes[2], torch.bfloat16,
                                          mf.Theta0.normal(seed=5, stream=2, mean=0.1,
                                                           std=0.02)),
                      "b.bias": mf.MCNC(seg, shapes[3]),
                  })


def _several() -> _Valid:
    data = _Data("several-generators")
    g1 = mf.GeneratorSpec(k=2, d=8, hidden=(16,), L=10.0, seed=11)
    g2 = mf.GeneratorSpec(k=5, d=12, hidden=(8, 8), L=20.0, seed=11)
    g3 = data.inline_generator(k=3, d=10, hidden=(12,), bias=True, normalize=True, L=5.0)
    s1 = data.segment(g1, [(3, 8)], m=1, dtype=torch.bfloat16)
    s2 = data.segment(g2, [(20,)], m=2)
    s3 = data.segment(g3, [(2, 2, 5)], m=1)
    s4 = data.segment(g1, [(9,)], m=3, dtype=torch.bfloat16, codec=C.Codec.ZSTD)
    return _Valid("several-generators", "two philox generators and one inline generator; two "
                  "segments sharing one generator; bf16 alpha/beta (raw and zstd); m = 1, 2, "
                  "3; bf16 output", {
                      "enc": mf.MCNC(s1, (3, 8)),
                      "mid": mf.MCNC(s2, (20,)),
                      "dec": mf.MCNC(s3, (2, 2, 5), torch.bfloat16),
                      "enc2": mf.MCNC(s4, (9,)),
                  })


def _high_frequency() -> _Valid:
    data = _Data("high-frequency")
    gen = mf.GeneratorSpec(k=4, d=16, hidden=(32, 32), L=20.0, omega0=30.0, seed=6)
    seg = data.segment(gen, [(4, 8)], m=2)
    return _Valid("high-frequency", "omega0 = 30 at L = 20: the first sine layer's argument "
                  "reaches P of several hundred, so §10.1's tolerance grows by P / 20", {
                      "w": mf.MCNC(seg, (4, 8), theta0=mf.Theta0.uniform(0.05, seed=2,
                                                                         stream=0)),
                  })


def _theta0_sources() -> _Valid:
    name = "theta0-sources"
    data = _Data(name)
    gen = mf.GeneratorSpec(k=4, d=16, hidden=(32,), L=20.0, seed=2024)
    shapes = [(3, 7), (4, 6), (5, 4), (2, 2, 3, 3)]
    seg = data.segment(gen, shapes, m=1)
    base = data.signed(shapes[1], 0.2).to(torch.bfloat16)
    uri = f"{name}.base.safetensors"
    return _Valid(name, "theta0 stored as an f16 blob, external (bf16 tensor in a safetensors "
                  "file beside the vector, sha256-pinned), normal (mean 0, std 1), "
                  "fan_in_uniform on a rank-4 conv weight", {
                      "stored": mf.MCNC(seg, shapes[0], torch.float32,
                                        mf.Theta0.stored(data.signed(shapes[0], 0.3)
                                                         .to(torch.float16))),
                      "external": mf.MCNC(seg, shapes[1], torch.float32,
                                          mf.Theta0.external(uri, "base.weight", _sha256(base))),
                      "embed": mf.MCNC(seg, shapes[2], torch.float32,
                                       mf.Theta0.normal(seed=1, stream=0)),
                      "conv.weight": mf.MCNC(seg, shapes[3], torch.float32,
                                             mf.Theta0.fan_in_uniform(seed=1, stream=1)),
                  }, externals={uri: {"base.weight": base}})


def _dense() -> _Valid:
    data = _Data("dense")
    words = torch.from_numpy(reference.stream_words_ref(data.seed, 99, 0, 64).astype(np.int64))
    pattern = torch.arange(256, dtype=torch.float32).remainder(7) * 0.25
    return _Valid("dense", "dense tensors (each in its own blob, §6.2) of every dtype, a "
                  "rank-0 and an empty tensor, zstd dense tensors, metadata and info; no 1.1 "
                  "feature, so minor 0", {
                      "f64": mf.Dense(data.signed((2, 3), 1e3).to(torch.float64) / 3),
                      "f32": mf.Dense(data.signed((3, 4), 2.0)),
                      "f16": mf.Dense(data.signed((5,), 4.0).to(torch.float16)),
                      "bf16": mf.Dense(data.signed((5,), 4.0).to(torch.bfloat16)),
                      "i64": mf.Dense((words[:4] << 31) - (1 << 62)),
                      "i32": mf.Dense((words[4:10] - (1 << 31)).to(torch.int32)),
                      "i16": mf.Dense((words[10:13] & 0xFFFF).to(torch.int16)),
                      "i8": mf.Dense(((words[13:17] & 0xFF) - 128).to(torch.int8)),
                      "u8": mf.Dense((words[17:24] & 0xFF).to(torch.uint8)),
                      "bool": mf.Dense((words[24:30] & 1).to(torch.bool).reshape(2, 3)),
                      "scalar": mf.Dense(torch.tensor(-1.5)),
                      "empty": mf.Dense(torch.zeros(0, 3)),
                      "zstd.f32": mf.Dense(pattern, C.Codec.ZSTD),
                      "zstd.i64": mf.Dense(words[:64] & 3, C.Codec.ZSTD),
                  }, metadata={"description": "dense tensors of every dtype", "format": "pt"},
                  info={"base_model": "none", "license": "CC0-1.0",
                        "producer": "spec/make_vectors.py", "source": "synthetic"}, minor=0)


def _packed_values(data: _Data) -> dict[str, torch.Tensor]:
    """Small tensors of every dtype of §1, sized so that most start unaligned in a pack."""
    words = torch.from_numpy(reference.stream_words_ref(data.seed, 99, 0, 32).astype(np.int64))
    return {
        "bool": (words[:6] & 1).to(torch.bool).reshape(2, 3),
        "f64": data.signed((3,), 1e3).to(torch.float64) / 3,
        "i8": ((words[6:11] & 0xFF) - 128).to(torch.int8),
        "f32": data.signed((2, 3), 2.0),
        "scalar": torch.tensor(-1.5),
        "f16": data.signed((3,), 4.0).to(torch.float16),
        "empty": torch.zeros(0, 3),
        "bf16": data.signed((5,), 4.0).to(torch.bfloat16),
        "i64": (words[11:14] << 31) - (1 << 62),
        "u8": (words[14:20] & 0xFF).to(torch.uint8),
        "i32": (words[20:23] - (1 << 31)).to(torch.int32),
        "i16": (words[23:26] & 0xFFFF).to(torch.int16),
    }


def _packed() -> _Valid:
    data = _Data("packed")
    gen = mf.GeneratorSpec(k=3, d=8, hidden=(8,), L=10.0, seed=21)
    seg = data.segment(gen, [(2, 5), (7,)], m=1)
    small = _packed_values(data)
    tensors: dict[str, Any] = {}
    for name, value in small.items():
        tensors[f"p.{name}"] = value
        if name == "bool":
            tensors["w1"] = mf.MCNC(seg, (2, 5))
        elif name == "f16":
            tensors["own.f32"] = mf.Dense(data.signed((4,), 1.0))
        elif name == "bf16":
            tensors["w2"] = mf.MCNC(seg, (7,))
    starts, position = [], 0
    for value in small.values():
        starts.append(f"{position}")
        position += value.numel() * value.element_size()
    return _Valid("packed", "packed tensors (§6.4) of every dtype sharing one raw u8 pack blob "
                  f"({position} bytes: bool, f64, i8, f32, a rank-0 f32, f16, an empty f32, "
                  f"bf16, i64, u8, i32, i16 at byte offsets {', '.join(starts)}, most unaligned "
                  "for their dtype), interleaved with two mcnc members of one segment (implied "
                  "offsets) and a dense tensor with its own blob", tensors)


def _split_pack(f: RawFile) -> None:
    """Move every second packed tensor's bytes into a new zstd pack blob (§6.4 allows any
    number of packs, raw or zstd): the tensors of the two packs alternate in tensor order."""
    packed = [t for t in f.header["tensors"] if t["encoding"] == C.Encoding.PACKED]
    index = packed[0]["blob"]
    data = f.payloads[index]
    kept, moved, position = b"", b"", 0
    for i, t in enumerate(packed):
        size = math.prod(t["shape"]) * C.DTYPE_SIZES[t["dtype"]]
        if i % 2:
            moved += data[position:position + size]
        else:
            kept += data[position:position + size]
        position += size
    assert position == len(data)
    f.payloads[index] = kept
    f.header["blobs"][index]["shape"] = [len(kept)]
    zstd = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    second = f.add_blob(zstd.compress(moved), C.PACK_DTYPE, [len(moved)], C.Codec.ZSTD)
    for t in packed[1::2]:
        t["blob"] = second


def _packed_two_blobs() -> _Valid:
    data = _Data("packed-two-blobs")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=10.0, seed=22)
    seg = data.segment(gen, [(3, 3)], m=1)
    small = _packed_values(data)
    tensors: dict[str, Any] = {f"p.{name}": small[name]
                               for name in ("f32", "i16", "bf16", "u8", "f64", "bool", "i64")}
    tensors["w"] = mf.MCNC(seg, (3, 3))
    return _Valid("packed-two-blobs", "two pack blobs, one raw and one zstd, whose packed "
                  "tensors alternate in tensor order (f32, bf16, f64, i64 in the raw one; i16, "
                  "u8, bool in the zstd one): each pack's tensors are consecutive in its own "
                  "bytes", tensors, edit=_split_pack)


def _lora() -> _Valid:
    data = _Data("lora")
    gen = mf.GeneratorSpec(k=4, d=16, hidden=(32,), L=20.0, seed=77)
    seg_a = data.segment(gen, [(2, 12)], m=1)
    seg_b = data.segment(gen, [(10, 2)], m=1)
    shared = data.segment(gen, [(3, 6), (5, 3)], m=2)
    return _Valid("lora", "lora tensors: factors in their own segments with a fan_in_uniform "
                  "theta0 (f32 output), and both factors in one segment with zeros theta0 "
                  "(bf16 output; B's implied offset follows A); the expected file holds the "
                  "merged tensors", {
                      "fc.weight": mf.LoRA(mf.MCNC(seg_a, (2, 12)), mf.MCNC(seg_b, (10, 2)),
                                           scale=2.0,
                                           theta0=mf.Theta0.fan_in_uniform(seed=4, stream=0)),
                      "q_proj.weight": mf.LoRA(mf.MCNC(shared, (3, 6)), mf.MCNC(shared, (5, 3)),
                                               scale=0.5, dtype=torch.bfloat16),
                  })


def _aligned() -> _Valid:
    data = _Data("alignment-4096")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=4.0, seed=3)
    seg = data.segment(gen, [(4, 4)], m=1)
    return _Valid("alignment-4096", "alignment 4096 (direct I/O): header and blobs padded to "
                  "4 KiB", {"w": mf.MCNC(seg, (4, 4)), "b": data.signed((3,), 1.0)},
                  alignment=4096)


def _compressed_header() -> _Valid:
    data = _Data("compressed-header")
    gen = mf.GeneratorSpec(k=3, d=16, hidden=(8,), L=20.0, seed=11)
    shapes = [(2, 3)] * 51
    seg = data.segment(gen, shapes, m=1)
    tensors = {f"model.layers.{i // 3}.mlp.{('up', 'down', 'gate')[i % 3]}_proj.weight":
               mf.MCNC(seg, shape) for i, shape in enumerate(shapes)}
    return _Valid("compressed-header", "a header of over 4 KiB of msgpack (51 tensors with "
                  "long names in one segment, offsets implied), stored zstd-compressed "
                  "(header_codec 1)", tensors, header_codec=C.HEADER_CODEC_ZSTD)


def _no_tensors() -> _Valid:
    return _Valid("no-tensors", "no tensors and no blobs: the file ends at data_start; "
                  "minor 0", {}, metadata={"note": "an empty model"}, minor=0)


def _explicit_offsets(f: RawFile) -> None:
    """Write out every member offset that the writer left implied (§6.1): walking the tensors
    in order, a member without one starts where the previous member of its segment ends (the
    reader's resolution: a parsed header's entries hold every offset)."""
    parsed = Header.parse(f.header, "vector", f.minor)
    f.header["tensors"] = [t.to_dict() for t in parsed.tensors]


def _reorder_with_explicit_offsets(f: RawFile) -> None:
    """A 1.0 file: every offset explicit, the tensors reordered so that the members of the
    segment appear in the opposite order of their offsets."""
    _explicit_offsets(f)
    f.minor = 0
    order = ["l", "bias", "b", "a"]
    f.header["tensors"] = [_tensor(f, name) for name in order]
    assert [t["offset"] for t in (_tensor(f, "l")["A"], _tensor(f, "l")["B"],
                                  _tensor(f, "b"), _tensor(f, "a"))] == [17, 23, 12, 0]


def _explicit_offsets_vector() -> _Valid:
    data = _Data("explicit-offsets")
    gen = mf.GeneratorSpec(k=4, d=8, hidden=(16,), L=20.0, seed=31)
    seg = data.segment(gen, [(3, 4), (5,), (2, 3), (4, 2)], m=2)
    return _Valid("explicit-offsets", "a minor-0 file (1.0 features only): every member offset "
                  "explicit, and the members of one segment listed against their offsets' "
                  "order (lora \"l\" with A at 17 and B at 23, then \"b\" at 12, then \"a\" at "
                  "0), so implying offsets from tensor order would be wrong; a dense tensor", {
                      "a": mf.MCNC(seg, (3, 4), theta0=mf.Theta0.uniform(0.1, seed=3, stream=1)),
                      "b": mf.MCNC(seg, (5,)),
                      "l": mf.LoRA(mf.MCNC(seg, (2, 3)), mf.MCNC(seg, (4, 2)), scale=1.5),
                      "bias": mf.Dense(data.signed((4,), 1.0)),
                  }, minor=0, edit=_reorder_with_explicit_offsets)


NEWER_MINOR = C.FORMAT_MINOR + 1


def _add_unknown_keys(f: RawFile) -> None:
    """Keys a newer minor's writer might add, at every level; this reader ignores them
    (R11)."""
    f.minor = NEWER_MINOR
    h = f.header
    assert _tensor(f, "layer.bias")["encoding"] == C.Encoding.PACKED
    h["compression_report"] = {"ratio": 12.5, "by": ["layer"]}
    h["blobs"][0]["filters"] = ["shuffle"]
    h["generators"][0]["init"] = "siren"
    h["generators"][0]["weights"]["counter_layout"] = 1
    h["segments"][0]["trained_steps"] = 1000
    h["tensors"][0]["quantization"] = None
    h["tensors"][0]["theta0"]["note"] = "from the base model"
    _tensor(f, "layer.bias")["byte_order"] = "little"
    h["info"] = {"producer": "spec/make_vectors.py", "training": {"steps": 1000}}
    h["tensors"][0]["scales"] = f.add_blob(struct.pack("<3f", 0.5, 0.25, 0.125), "f32", [3])


def _minor_newer() -> _Valid:
    vector = _basic()
    vector.name = "minor-newer"
    vector.covers = (f"minor version {NEWER_MINOR} with unknown keys at every level (top, "
                     "blob, generator, weights, segment, mcnc and packed tensor, theta0, and "
                     "an info key whose value is a map): a "
                     f"{C.FORMAT_MAJOR}.{C.FORMAT_MINOR} reader ignores them (R11); one unknown "
                     "key references a blob of its own, which the reader does not count as "
                     "unused (R45, §13)")
    vector.minor = NEWER_MINOR
    vector.edit = _add_unknown_keys
    return vector


def _add_unknown_encoding(f: RawFile) -> None:
    """A newer minor's encodings and theta0 kind; the tensors that use them are unsupported.
    "future-member" keeps its place in the segment, so the member after it needs an explicit
    offset (§6.1: implied offsets count only the members a reader knows)."""
    f.minor = NEWER_MINOR
    h = f.header
    indices = f.add_blob(struct.pack("<4q", 0, 3, 5, 7), "i64", [4])
    values = f.add_blob(struct.pack("<4f", 0.5, -1.0, 2.0, 0.25), "f32", [4])
    h["tensors"].append({"dtype": "f32", "encoding": "sparse-coo", "indices": indices,
                         "name": "sparse", "shape": [2, 4], "values": values})
    future = _tensor(f, "future-member")
    assert "offset" not in future and "offset" not in _tensor(f, "after")
    future.update(encoding="mcnc-q8", offset=16, codebook_bits=8)
    _tensor(f, "after")["offset"] = 19
    _tensor(f, "future-theta0")["theta0"] = {"kind": "lowrank", "rank": 2, "seed": 5}


def _minor_unknown_encoding() -> _Valid:
    data = _Data("minor-newer-unknown-encoding")
    gen = mf.GeneratorSpec(k=4, d=16, hidden=(32,), L=20.0, seed=8)
    seg = data.segment(gen, [(4, 4), (3,), (2, 2), (3, 3)], m=1)
    return _Valid("minor-newer-unknown-encoding", f"minor version {NEWER_MINOR}: a tensor with "
                  "an unknown encoding and its own blobs; a segment member with an unknown "
                  "encoding at offset 16, followed by \"after\" at an explicit offset 19 and a "
                  "member with an unknown theta0 kind at an implied one (23); reading any of "
                  "the three raises UnsupportedFeatureError (R46, R70), the other tensors load",
                  {
                      "known": mf.MCNC(seg, (4, 4)),
                      "future-member": mf.MCNC(seg, (3,)),
                      "after": mf.MCNC(seg, (2, 2)),
                      "future-theta0": mf.MCNC(seg, (3, 3)),
                      "bias": data.signed((4,), 1.0),
                  }, minor=NEWER_MINOR, edit=_add_unknown_encoding,
                  unsupported={"future-member": "UnsupportedFeatureError",
                               "future-theta0": "UnsupportedFeatureError",
                               "sparse": "UnsupportedFeatureError"})


def _integer_floats(f: RawFile) -> None:
    """Float fields given as msgpack integers (§3): L = 20, a lora scale of 2."""
    f.header["generators"][0]["L"] = 20
    _tensor(f, "l")["scale"] = 2


def _single_floats(header: bytes) -> bytes:
    """The header with every float as a msgpack float32 (each value is one exactly)."""
    value = msgpack.unpackb(header, raw=False)
    single = msgpack.packb(value, use_bin_type=True, use_single_float=True)
    assert msgpack.unpackb(single, raw=False) == value and b"\xca" in single
    return single


def _float_forms() -> _Valid:
    data = _Data("float-forms")
    gen = mf.GeneratorSpec(k=4, d=16, hidden=(16,), L=20.0, seed=4)
    seg = data.segment(gen, [(4, 6), (2, 4), (6, 2)], m=1)
    return _Valid("float-forms", "float fields in the other forms a reader accepts (§3): L "
                  "and a lora scale as msgpack integers (20, 2), omega0 and a uniform theta0's "
                  "bound as msgpack float32; they mean what float64 20.0, 2.0, 1.0 and 0.25 "
                  "mean", {
                      "w": mf.MCNC(seg, (4, 6), theta0=mf.Theta0.uniform(0.25, 3, 0)),
                      "l": mf.LoRA(mf.MCNC(seg, (2, 4)), mf.MCNC(seg, (6, 2)), 2.0),
                  }, edit=_integer_floats, transform=_single_floats)


VALID: list[Callable[[], _Valid]] = [
    _basic, _deep, _high_frequency, _shared, _several, _theta0_sources, _dense, _packed,
    _packed_two_blobs, _lora, _explicit_offsets_vector, _aligned, _compressed_header,
    _no_tensors, _minor_newer, _minor_unknown_encoding, _float_forms,
]


def _write_valid(out: Path, vector: _Valid) -> None:
    for uri, tensors in vector.externals.items():
        (out / uri).write_bytes(_safetensors(tensors))
    data = _save_bytes(vector.tensors, metadata=vector.metadata, info=vector.info,
                       alignment=vector.alignment)
    if vector.edit is not None:
        raw = RawFile.parse(data)
        vector.edit(raw)
        data = bytes(raw.encode(transform=vector.transform))
    minor, header_codec = _PREAMBLE.unpack_from(data)[2:4]
    assert minor == vector.minor, (vector.name, minor)
    assert header_codec == vector.header_codec, (vector.name, header_codec)
    (out / f"{vector.name}.mcnc").write_bytes(data)
    (out / f"{vector.name}.expected.safetensors").write_bytes(
        _safetensors(expected_tensors(vector)))


# --------------------------------------------------------------------------------------------
# Invalid vectors: bases (valid files from the writer) and one edit each
# --------------------------------------------------------------------------------------------


def _base_simple() -> bytes:
    data = _Data("invalid-simple")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=4.0, seed=1)
    seg = data.segment(gen, [(3, 4)], m=1)
    return _save_bytes({"w": mf.MCNC(seg, (3, 4), theta0=mf.Theta0.uniform(0.1, 7, 0)),
                        "b": mf.Dense(data.signed((4,), 1.0))}, metadata={"note": "base"})


def _base_shared() -> bytes:
    data = _Data("invalid-shared")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=4.0, seed=1)
    seg = data.segment(gen, [(3, 4), (5,)], m=1)
    return _save_bytes({"w": mf.MCNC(seg, (3, 4)), "v": mf.MCNC(seg, (5,))})


def _base_inline() -> bytes:
    data = _Data("invalid-inline")
    gen = data.inline_generator(k=2, d=4, hidden=(4,), bias=True, normalize=True, L=4.0)
    seg = data.segment(gen, [(2, 4)], m=1)
    return _save_bytes({"w": mf.MCNC(seg, (2, 4))})


def _base_lora() -> bytes:
    data = _Data("invalid-lora")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=4.0, seed=1)
    seg = data.segment(gen, [(1, 3), (2, 1)], m=1)
    return _save_bytes({"lora": mf.LoRA(mf.MCNC(seg, (1, 3)), mf.MCNC(seg, (2, 1)), 0.5),
                        "b": data.signed((4,), 1.0)})


def _base_zstd() -> bytes:
    pattern = torch.arange(16, dtype=torch.float32).remainder(3)
    return _save_bytes({"z": mf.Dense(pattern, C.Codec.ZSTD), "b": torch.ones(4)})


def _base_theta0_blob() -> bytes:
    data = _Data("invalid-theta0-blob")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=4.0, seed=1)
    seg = data.segment(gen, [(3, 4)], m=1)
    theta0 = mf.Theta0.stored(data.signed((3, 4), 0.5).to(torch.float16))
    return _save_bytes({"w": mf.MCNC(seg, (3, 4), theta0=theta0)})


def _base_packed() -> bytes:
    data = _Data("invalid-packed")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=4.0, seed=1)
    seg = data.segment(gen, [(3, 4)], m=1)
    return _save_bytes({"p": data.signed((3,), 1.0),
                        "w": mf.MCNC(seg, (3, 4)),
                        "q": torch.arange(3, dtype=torch.int16),
                        "r": torch.arange(6, dtype=torch.uint8),
                        "d": mf.Dense(torch.arange(24, dtype=torch.uint8))})


def _external_tensors() -> dict[str, torch.Tensor]:
    data = _Data("invalid-external")
    return {"base": data.signed((3, 4), 0.5), "other": data.signed((2, 2), 0.5),
            "int": torch.arange(12, dtype=torch.int32).reshape(3, 4)}


def _base_external() -> bytes:
    data = _Data("invalid-external-vector")
    gen = mf.GeneratorSpec(k=2, d=8, hidden=(8,), L=4.0, seed=1)
    seg = data.segment(gen, [(3, 4)], m=1)
    sha = _sha256(_external_tensors()["base"])
    theta0 = mf.Theta0.external(EXTERNAL_BASE, "base", sha)
    return _save_bytes({"w": mf.MCNC(seg, (3, 4), theta0=theta0), "b": torch.ones(2)})


BASES: dict[str, Callable[[], bytes]] = {
    "simple": _base_simple, "shared": _base_shared, "inline": _base_inline,
    "lora": _base_lora, "zstd": _base_zstd, "theta0-blob": _base_theta0_blob,
    "external": _base_external, "packed": _base_packed,
}


@dataclass(frozen=True)
class _Invalid:
    """One invalid vector: the rule it breaks, how a reader must fail, and the edit."""

    name: str
    error: str
    stage: str
    tensor: str | None
    base: str
    edit: Callable[[RawFile], bytes]

    @property
    def rule(self) -> str:
        return f"R{int(self.name[1:3])}"

    @property
    def description(self) -> str:
        return " ".join((self.edit.__doc__ or "").split())


INVALID: list[_Invalid] = []


def _invalid(name: str, error: str, base: str = "simple", stage: str = "open",
             tensor: str | None = None) -> Callable[[Callable[[RawFile], bytes]], Any]:
    def register(edit: Callable[[RawFile], bytes]) -> Callable[[RawFile], bytes]:
        INVALID.append(_Invalid(name, error, stage, tensor, base, edit))
        return edit
    return register


def _replace_once(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    """A header transform replacing one placeholder with bytes of the same length."""
    assert len(old) == len(new)

    def transform(header: bytes) -> bytes:
        assert header.count(old) == 1
        return header.replace(old, new)
    return transform


def _tensor(f: RawFile, name: str) -> dict[str, Any]:
    return next(t for t in f.header["tensors"] if t["name"] == name)


def _assign(header: dict[str, Any], path: str, value: Any) -> None:
    """Set the header field at ``path``: '/'-separated map keys and list indices, where a
    tensor may be named instead of indexed (``tensors/w/theta0/seed``)."""
    *parents, last = path.split("/")
    node: Any = header
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() else next(
                t for t in node if t["name"] == part)
        else:
            node = node[part]
    node[int(last) if isinstance(node, list) else last] = value


def _field(name: str, path: str, value: Any, description: str, error: str = "HeaderError",
           base: str = "simple", stage: str = "open", tensor: str | None = None,
           minor: int | None = None) -> None:
    """Register a vector that differs from its base in one header field (and, when
    ``minor`` is given, has that minor version)."""
    def edit(f: RawFile) -> bytes:
        _assign(f.header, path, value)
        if minor is not None:
            f.minor = minor
        return bytes(f.encode())

    edit.__doc__ = description
    INVALID.append(_Invalid(name, error, stage, tensor, base, edit))


USF = "UnsupportedFeatureError"
EXT = "ExternalReferenceError"
_READ_W = {"stage": "read", "tensor": "w"}

# Vectors that change one header field of their base (descriptions name the broken field).
_field("R10-bool-for-int", "generators/0/k", True, 'Generator "k" is true (a bool).')
_field("R10-negative-offset", "tensors/w/offset", -1,
       'mcnc tensor "w" has offset -1 (offsets are unsigned).')
_field("R11-unknown-key", "extra", 1, f'A minor-{C.FORMAT_MINOR} file (the reader\'s own minor) '
       'with an unknown top-level key "extra".', minor=C.FORMAT_MINOR)
_field("R11-unknown-nested-key", "tensors/w/theta0/note", "x",
       f'A minor-{C.FORMAT_MINOR} file with an unknown key "note" in a theta0 map.',
       minor=C.FORMAT_MINOR)
_field("R11-unknown-packed-key", "tensors/p/start", 0,
       f'A minor-{C.FORMAT_MINOR} file with an unknown key "start" in a packed tensor.',
       base="packed", minor=C.FORMAT_MINOR)
_field("R11-unknown-info-key", "info", {"producer": "x", "trained_on": "synthetic"},
       f'A minor-{C.FORMAT_MINOR} file whose info map has a key '
       f'{C.FORMAT_MAJOR}.{C.FORMAT_MINOR} does not define ("trained_on").',
       minor=C.FORMAT_MINOR)
_field("R12-alignment-not-power-of-two", "alignment", 96,
       "alignment 96; the blobs are laid out at multiples of 96.")
_field("R12-alignment-below-64", "alignment", 32,
       "alignment 32 (a power of two below the minimum 64); the blobs are laid out at 32.")
_field("R13-name-too-long", "tensors/b/name", "b" * (C.MAX_NAME_BYTES + 1),
       'Tensor "b" is renamed to 1025 bytes (MAX_NAME_BYTES + 1).')
_field("R13-metadata-value-not-str", "metadata/note", 1, "A metadata value is the integer 1.")
_field("R13-info-value-not-str", "info", {"license": 1},
       'The info key "license", which §3 defines, has the integer value 1.')
_field("R26-unknown-codec", "blobs/2/codec", "lz4", 'Blob 2 has codec "lz4".', USF)
_field("R30-hidden-too-wide", "generators/0/hidden", [C.MAX_HIDDEN_WIDTH + 1],
       "A philox generator's hidden width is 4097 (MAX_HIDDEN_WIDTH + 1).")
_field("R30-too-many-hidden-layers", "generators/0/hidden", [8] * (C.MAX_HIDDEN_LAYERS + 1),
       "A generator with 9 hidden layers (MAX_HIDDEN_LAYERS + 1).")
_field("R30-no-hidden-layers", "generators/0/hidden", [], "A generator with no hidden layer.")
_field("R30-philox-seed-over-u32", "generators/0/weights/seed", 1 << 32,
       "A philox generator's seed is 2^32 (seeds are uint32).")
_field("R31-activation", "generators/0/activation", "relu", 'activation "relu".', USF)
_field("R32-weights-kind", "generators/0/weights", {"kind": "torch", "seed": 1},
       'Generator weights of kind "torch" (not portable, not in the spec).', USF)
_field("R33-inline-shape", "blobs/0/shape", [2, 4],
       "An inline generator's first weight blob (W_1, [4, 2]) is declared [2, 4].",
       base="inline")
_field("R34-L-zero", "generators/0/L", 0.0, "L = 0.")
_field("R34-omega0-zero", "generators/0/omega0", 0.0, "omega0 = 0.")
_field("R34-omega0-infinite", "generators/0/omega0", math.inf, "omega0 = +inf.")
_field("R34-L-infinite", "generators/0/L", math.inf, "L = +inf.")
_field("R40-m-negative", "segments/0/m", -1, "m = -1 (the alpha and beta blobs unchanged).")
_field("R41-gap", "tensors/v/offset", 13, 'Member "v" starts at 13, leaving element 12 of the '
       "segment uncovered (the segment still has ceil(18 / 8) = 3 chunks).", base="shared")
_field("R42-empty-name", "tensors/b/name", "", 'Dense tensor "b" is renamed to "".')
_field("R43-negative-dim", "tensors/w/shape", [-3, -4],
       'mcnc tensor "w" has shape [-3, -4] (numel 12, as before).')
_field("R43-numel-over-limit", "tensors/w/shape", [1 << 25, 1 << 24],
       'mcnc tensor "w" has shape [2^25, 2^24]: 2^49 elements, over MAX_NUMEL = 2^48.')
_field("R44-mcnc-int-dtype", "tensors/w/dtype", "i32", 'mcnc tensor "w" has dtype i32.')
_field("R44-lora-int-dtype", "tensors/lora/dtype", "u8", 'lora tensor "lora" has dtype u8.',
       base="lora")
_field("R45-dangling-generator", "segments/0/generator", 1,
       "The segment references generator 1; the file has one generator.")
_field("R51-dense-dtype-mismatch", "tensors/b/dtype", "f16",
       'Dense tensor "b" is f16 while its blob is f32.')
_field("R51-dense-shape-mismatch", "tensors/b/shape", [2, 2],
       'Dense tensor "b" has shape [2, 2] while its blob has shape [4].')
_field("R60-factor-shapes", "tensors/lora/B/shape", [3, 1], 'lora "lora" of shape [2, 3] with '
       "A [1, 3] and B [3, 1] (B should be [2, 1]); the segment's 6 values still fill one "
       "chunk.", base="lora")
_field("R60-rank-3-shape", "tensors/lora/shape", [2, 3, 1], "A lora tensor of shape [2, 3, 1].",
       base="lora")
_field("R60-scale-nan", "tensors/lora/scale", math.nan, "lora scale is NaN.", base="lora")
_field("R70-unknown-theta0-kind", "tensors/w/theta0", {"kind": "lowrank", "rank": 2},
       'Tensor "w" has theta0 kind "lowrank" (unknown).', USF, **_READ_W)
_field("R71-seed-over-u32", "tensors/w/theta0/seed", 1 << 32, "A prng theta0 with seed 2^32.")
_field("R71-stream-negative", "tensors/w/theta0/stream", -1, "A prng theta0 with stream -1.")
_field("R71-bound-infinite", "tensors/w/theta0/bound", math.inf,
       "A uniform theta0 with bound +inf.")
_field("R71-unknown-scheme", "tensors/w/theta0",
       {"kind": "prng", "scale": 0.1, "scheme": "laplace", "seed": 7, "stream": 0},
       'A prng theta0 with scheme "laplace" (unknown).', USF, **_READ_W)
_field("R72-fan-in-rank-1", "tensors/v/theta0",
       {"kind": "prng", "scheme": "fan_in_uniform", "seed": 1, "stream": 0},
       'fan_in_uniform theta0 on the rank-1 tensor "v".', base="shared")
_field("R73-theta0-blob-shape", "blobs/2/shape", [4, 3],
       'Tensor "w" [3, 4] has a theta0 blob of shape [4, 3].', base="theta0-blob")
_field("R73-theta0-blob-int", "blobs/2/dtype", "i16",
       'Tensor "w"\'s theta0 blob is i16 (not a float dtype).', base="theta0-blob")
_field("R74-uri-dotdot", "tensors/w/theta0/uri", f"../{INVALID_DIR}/{EXTERNAL_BASE}",
       f'External theta0 uri "../{INVALID_DIR}/{EXTERNAL_BASE}" (a ".." component).',
       base="external")
_field("R74-uri-absolute", "tensors/w/theta0/uri", f"/tmp/{EXTERNAL_BASE}",
       f'External theta0 uri "/tmp/{EXTERNAL_BASE}" (absolute).', base="external")
_field("R74-uri-dot-component", "tensors/w/theta0/uri", f"./{EXTERNAL_BASE}",
       f'External theta0 uri "./{EXTERNAL_BASE}" (a "." component).', base="external")
_field("R74-uri-backslash", "tensors/w/theta0/uri", f".\\{EXTERNAL_BASE}",
       f'External theta0 uri ".\\{EXTERNAL_BASE}": the base beside the file on Windows, a '
       "missing file of that name elsewhere.", base="external")
_field("R74-uri-other-scheme", "tensors/w/theta0/uri", f"file:{EXTERNAL_BASE}",
       f'External theta0 uri "file:{EXTERNAL_BASE}" (a scheme other than hf://).',
       base="external")
_field("R74-hf-revision-not-a-commit", "tensors/w/theta0/uri",
       "hf://org/repo@main/model.safetensors", 'External theta0 uri '
       '"hf://org/repo@main/model.safetensors" (a branch, not a 40-hex commit).',
       base="external")
_field("R75-sha256-mismatch", "tensors/w/theta0/sha256",
       hashlib.sha256(b"another base").hexdigest(),
       "The pinned sha256 is that of other bytes (the base checkpoint changed).", EXT,
       base="external", **_READ_W)
_field("R75-tensor-missing", "tensors/w/theta0/tensor", "base.weight",
       'The external file has no tensor "base.weight".', EXT, base="external", **_READ_W)
_field("R75-shape-mismatch", "tensors/w/theta0/tensor", "other",
       'The external tensor "other" is [2, 2]; the tensor needs [3, 4].', EXT, base="external",
       **_READ_W)
_field("R75-dtype-int", "tensors/w/theta0",
       {"kind": "external", "sha256": _sha256(_external_tensors()["int"]), "tensor": "int",
        "uri": EXTERNAL_BASE},
       'The external tensor "int" has the tensor\'s shape [3, 4] and its pinned sha256, but '
       "dtype I32 (base weights are floating point).", EXT, base="external", **_READ_W)
_field("R75-file-missing", "tensors/w/theta0/uri", "missing.safetensors",
       'The external file "missing.safetensors" does not exist beside the vector.', EXT,
       base="external", **_READ_W)

# Revision 4 (SPEC.md §15): what a second implementer would otherwise have to guess.
_field("R44-mcnc-unknown-dtype", "tensors/w/dtype", "f8e4m3", 'mcnc tensor "w" has dtype '
       '"f8e4m3", which §1 does not name: R44 (an mcnc tensor is f64, f32, f16 or bf16), not '
       "R26's unsupported feature, since no minor version adds a dtype.")
_field("R41-overlap-newer-minor", "tensors/v/offset", 11, f'A minor-{NEWER_MINOR} file (newer '
       'than the reader) whose member "v" starts at 11, overlapping the last element of "w": '
       "a reader that cannot see every member still refuses an overlap between the members it "
       "knows (§13).", base="shared", minor=NEWER_MINOR)
_HEX40 = "0123456789abcdef" * 2 + "01234567"
for _name, _uri, _why in (
    ("R74-uri-trailing-dot", f"{EXTERNAL_BASE}.", "ends in '.', which Windows drops"),
    ("R74-uri-trailing-space", f"{EXTERNAL_BASE} ", "ends in a space, which Windows drops"),
    ("R74-uri-device-name", "con.safetensors", "is the Windows device CON before a '.'"),
    ("R74-uri-non-ascii", "e\u0301xternal-base.safetensors", "holds a combining accent (NFD "
     "'é'), which macOS may normalise and other systems do not"),
    ("R74-uri-wildcard", "external-base*.safetensors", "holds '*', which Windows refuses in "
     "names"),
    ("R74-hf-repo-syntax", f"hf://org/my--repo@{_HEX40}/{EXTERNAL_BASE}", "names a repository "
     "with '--', which the Hub does not allow"),
    ("R74-hf-revision-uppercase", f"hf://org/repo@{_HEX40.upper()}/{EXTERNAL_BASE}",
     "pins the commit in uppercase hex (one spelling: lowercase)"),
):
    _field(_name, "tensors/w/theta0/uri", _uri, f"External theta0 uri {_uri!r} {_why}.",
           base="external")
_field("R75-uri-case", "tensors/w/theta0/uri", "External-Base.safetensors", 'External theta0 '
       f'uri "External-Base.safetensors" where the file is "{EXTERNAL_BASE}": names match '
       "exactly, so it is missing also where the file system folds case.", EXT,
       base="external", **_READ_W)


@_invalid("R12-alignment-negative", "HeaderError")
def _(f: RawFile) -> bytes:
    """alignment -64, the blobs laid out at 64: an integer outside the range R12 gives is an
    error of R12, not R10 (§3)."""
    f.header["alignment"] = -64
    return bytes(f.encode(alignment=64))


@_invalid("R06-bin-key", "HeaderError")
def _(f: RawFile) -> bytes:
    """The metadata map's key "note" is a msgpack bin, not a str: a reader decoding both as
    bytes would see {"note": "base"}, a strict one a non-string key."""
    f.header["metadata"] = {b"note": "base"}
    return bytes(f.encode())


@_invalid("R06-bin-value", "HeaderError")
def _(f: RawFile) -> bytes:
    """Tensor "b"'s encoding is the msgpack bin "dense" instead of the str."""
    _tensor(f, "b")["encoding"] = _tensor(f, "b")["encoding"].encode()
    return bytes(f.encode())


@_invalid("R06-bin-under-unknown-key", "HeaderError")
def _(f: RawFile) -> bytes:
    """A minor-2 file (newer than the reader) whose unknown top-level key "digest" holds a
    msgpack bin: unknown keys are ignored whatever their values, but no value anywhere in a
    header is a bin (§3)."""
    f.minor = NEWER_MINOR
    f.header["digest"] = bytes(8)
    return bytes(f.encode())


@_invalid("R13-info-value-too-long", "HeaderError")
def _(f: RawFile) -> bytes:
    """The info key "source" holds MAX_METADATA_VALUE_BYTES + 1 bytes ('a' repeated; the
    header is zstd-compressed, header_codec 1)."""
    f.header["info"] = {"source": "a" * (C.MAX_METADATA_VALUE_BYTES + 1)}
    zstd = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    return bytes(f.encode(header_codec=C.HEADER_CODEC_ZSTD, transform=zstd.compress))


@_invalid("R25-lone-skippable-frame", "FormatError", base="zstd", stage="read", tensor="e")
def _(f: RawFile) -> bytes:
    """An empty zstd f32 tensor "e" whose blob is a lone Zstandard skippable frame with no
    content (50 2A 4D 18 00 00 00 00): it decodes to the 0 bytes the tensor needs, but a
    skippable frame is not a Zstandard frame (RFC 8878)."""
    blob = f.add_blob(struct.pack("<II", 0x184D2A50, 0), "f32", [0], C.Codec.ZSTD)
    f.header["tensors"].append({"blob": blob, "dtype": "f32", "encoding": "dense", "name": "e",
                                "shape": [0]})
    return bytes(f.encode())


@_invalid("R31-activation-before-other-fields", "UnsupportedFeatureError")
def _(f: RawFile) -> bytes:
    """A minor-1 file whose generator has activation "siren-film", a key "film" 1.1 does not
    know, no omega0 and no hidden layer: R31 is checked before the generator's other keys,
    which belong to the unknown activation (§3)."""
    gen = f.header["generators"][0]
    gen.update(activation="siren-film", film=[1.0, 0.0], hidden=[])
    del gen["omega0"]
    return bytes(f.encode())


@_invalid("R32-weights-kind-before-other-fields", "UnsupportedFeatureError")
def _(f: RawFile) -> bytes:
    """A minor-1 file whose generator weights have kind "lowrank" with a key "rank" 1.1 does
    not know and no seed, and whose k is MAX_K + 1: R32 is checked before the generator's
    other keys (§3)."""
    gen = f.header["generators"][0]
    gen.update(k=C.MAX_K + 1, weights={"kind": "lowrank", "rank": 2})
    return bytes(f.encode())


# Vectors that need more than one field changed, or bytes outside the header.


# R1-R6: the preamble and the header's bytes


@_invalid("R01-bad-magic", "FormatError")
def _(f: RawFile) -> bytes:
    """The magic's first byte is 0x88 instead of 0x89."""
    data = f.encode()
    data[0] = 0x88
    return bytes(data)


@_invalid("R01-text-mode-newlines", "FormatError")
def _(f: RawFile) -> bytes:
    """The file went through a text-mode transfer: the magic's CR LF became LF (the file is
    one byte shorter from there on)."""
    data = bytes(f.encode())
    return data[:5] + data[6:]


@_invalid("R01-shorter-than-preamble", "FormatError")
def _(f: RawFile) -> bytes:
    """Only the first 20 bytes of a file: shorter than the 32-byte preamble."""
    return bytes(f.encode()[:20])


@_invalid("R02-major-2", "UnsupportedVersionError")
def _(f: RawFile) -> bytes:
    """Major version 2 (a format this reader does not implement); otherwise a valid 1.1
    file."""
    return bytes(f.encode(major=2))


@_invalid("R02-major-0", "UnsupportedVersionError")
def _(f: RawFile) -> bytes:
    """Major version 0."""
    return bytes(f.encode(major=0))


@_invalid("R03-unknown-header-codec", "FormatError")
def _(f: RawFile) -> bytes:
    """header_codec is 2 (only 0, msgpack, and 1, zstd-compressed msgpack, exist)."""
    return bytes(f.encode(header_codec=2))


@_invalid("R06-zstd-header-not-zstd", "HeaderError")
def _(f: RawFile) -> bytes:
    """header_codec says zstd but the header bytes are plain msgpack."""
    return bytes(f.encode(header_codec=C.HEADER_CODEC_ZSTD))


@_invalid("R04-header-length-over-limit", "FormatError")
def _(f: RawFile) -> bytes:
    """header_length is MAX_HEADER_BYTES + 1 (the reader must not try to allocate it)."""
    data = f.encode()
    struct.pack_into("<Q", data, 16, C.MAX_HEADER_BYTES + 1)
    return bytes(data)


@_invalid("R04-header-past-end", "FormatError")
def _(f: RawFile) -> bytes:
    """header_length runs 1 byte past the end of the file."""
    data = f.encode()
    struct.pack_into("<Q", data, 16, len(data) - C.PREAMBLE_SIZE + 1)
    return bytes(data)


@_invalid("R05-header-checksum", "ChecksumError")
def _(f: RawFile) -> bytes:
    """One byte of the header (in a metadata value, so it still decodes) changed after the
    checksum was taken."""
    data = f.encode()
    position = data.index(b"base", C.PREAMBLE_SIZE)
    data[position] = ord("B")
    return bytes(data)


@_invalid("R06-trailing-bytes", "HeaderError")
def _(f: RawFile) -> bytes:
    """The header is a valid msgpack map followed by one more msgpack value (nil);
    header_length and the checksum include it."""
    return bytes(f.encode(transform=lambda h: h + b"\xc0"))


@_invalid("R06-duplicate-key", "HeaderError")
def _(f: RawFile) -> bytes:
    """Tensor "w"'s map has the key "shape" twice, [4, 3] and then [3, 4]: a reader keeping the
    first value and one keeping the last would both read a valid header, with different
    shapes."""
    _tensor(f, "w")["shapd"] = [4, 3]  # sorts just before "shape"; renamed below
    return bytes(f.encode(transform=_replace_once(b"\xa5shapd", b"\xa5shape")))


@_invalid("R06-duplicate-metadata-key", "HeaderError")
def _(f: RawFile) -> bytes:
    """The metadata map has the key "note" twice ("other", then "base")."""
    f.header["metadata"]["nota"] = "other"  # sorts just before "note"; renamed below
    return bytes(f.encode(transform=_replace_once(b"\xa4nota", b"\xa4note")))


@_invalid("R06-zstd-header-trailing-bytes", "HeaderError")
def _(f: RawFile) -> bytes:
    """A zstd-compressed header (header_codec 1) whose frame is followed by 4 zero bytes;
    header_length and the checksum include them."""
    zstd = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    return bytes(f.encode(header_codec=C.HEADER_CODEC_ZSTD,
                          transform=lambda h: zstd.compress(h) + bytes(4)))


@_invalid("R06-not-a-map", "HeaderError")
def _(f: RawFile) -> bytes:
    """The header is a msgpack array holding the map."""
    return bytes(f.encode(transform=lambda h: b"\x91" + h))


@_invalid("R06-invalid-utf8", "HeaderError")
def _(f: RawFile) -> bytes:
    """A metadata value is a msgpack str holding invalid UTF-8 (FF FE FF FE)."""
    f.header["metadata"]["note"] = "@@@@"
    return bytes(f.encode(transform=_replace_once(b"\xa4@@@@", b"\xa4\xff\xfe\xff\xfe")))


@_invalid("R06-ext-type", "HeaderError")
def _(f: RawFile) -> bytes:
    """A metadata value is a msgpack ext value (fixext 4), which the header never holds."""
    f.header["metadata"]["note"] = "@@@@@"
    return bytes(f.encode(transform=_replace_once(b"\xa5@@@@@", b"\xd6\x01\x00\x00\x00\x00")))


@_invalid("R06-truncated-msgpack", "HeaderError")
def _(f: RawFile) -> bytes:
    """The header's last 5 bytes are missing (header_length and checksum match the cut
    bytes); the blobs follow at the places the cut header implies."""
    return bytes(f.encode(transform=lambda h: h[:-5]))


# R10-R13: fields, unknown keys, alignment, limits


@_invalid("R10-missing-field", "HeaderError")
def _(f: RawFile) -> bytes:
    """Tensor "w" has no "shape"."""
    del _tensor(f, "w")["shape"]
    return bytes(f.encode())


@_invalid("R10-missing-top-level-field", "HeaderError")
def _(f: RawFile) -> bytes:
    """The header has no "metadata" (required, even when empty)."""
    del f.header["metadata"]
    return bytes(f.encode())


@_invalid("R10-wrong-type", "HeaderError")
def _(f: RawFile) -> bytes:
    """"alignment" is the string "64"."""
    f.header["alignment"] = "64"
    return bytes(f.encode(alignment=64))


@_invalid("R13-too-many-generators", "HeaderError")
def _(f: RawFile) -> bytes:
    """257 generators (MAX_GENERATORS + 1); copies of the first, the extra ones unused."""
    f.header["generators"] *= C.MAX_GENERATORS + 1
    return bytes(f.encode())


# R20-R26: blobs


@_invalid("R20-blob-after-gap", "FormatError")
def _(f: RawFile) -> bytes:
    """Blob 1 starts one alignment unit (64 bytes) after the place §4 gives it; the gap is
    zero and the file ends at the end of the last blob."""
    return bytes(f.encode(gap_before={1: 64}))


@_invalid("R20-blob-unaligned", "FormatError")
def _(f: RawFile) -> bytes:
    """Blob 2 (the last) starts 8 bytes after an aligned offset."""
    return bytes(f.encode(gap_before={2: 8}))


@_invalid("R21-truncated", "FormatError")
def _(f: RawFile) -> bytes:
    """The last byte of the file is missing."""
    return bytes(f.encode()[:-1])


@_invalid("R21-trailing-bytes", "FormatError")
def _(f: RawFile) -> bytes:
    """64 zero bytes follow the last blob."""
    return bytes(f.encode() + bytes(64))


@_invalid("R22-nonzero-padding", "FormatError", stage="verify")
def _(f: RawFile) -> bytes:
    """A padding byte between the header and the first blob is 0x01. Every tensor reads
    correctly: only a full verification (check_padding) detects it."""
    data = f.encode()
    end = C.PREAMBLE_SIZE + _PREAMBLE.unpack_from(data)[4]
    assert f.header["blobs"][0]["offset"] > end, "no padding to damage"
    data[end] = 1
    return bytes(data)


@_invalid("R23-raw-length-mismatch", "HeaderError")
def _(f: RawFile) -> bytes:
    """The raw f32 blob of shape [4] holds (and declares) 12 bytes instead of 16."""
    f.payloads[2] = f.payloads[2][:12]
    return bytes(f.encode())


@_invalid("R23-zstd-ratio", "HeaderError", base="zstd")
def _(f: RawFile) -> bytes:
    """A u8 tensor of 2 MiB stored as a zstd frame of a few dozen bytes: more than
    max(4096 * length, 1 MiB) decoded bytes, which a reader must refuse before decoding."""
    size = 2 << 20
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True,
                                     write_checksum=False).compress(bytes(size))
    f.payloads[0] = frame
    f.header["blobs"][0].update(dtype="u8", shape=[size])
    _tensor(f, "z").update(dtype="u8", shape=[size])
    return bytes(f.encode())


@_invalid("R24-blob-checksum", "ChecksumError", stage="read", tensor="b")
def _(f: RawFile) -> bytes:
    """One byte of dense tensor "b"'s blob changed after its checksum was taken."""
    data = f.encode()
    data[f.header["blobs"][2]["offset"]] ^= 0x40
    return bytes(data)


@_invalid("R25-frame-declares-other-size", "FormatError", base="zstd", stage="read",
          tensor="z")
def _(f: RawFile) -> bytes:
    """The zstd frame of "z" declares (and holds) 60 bytes; its f32 [16] blob needs 64."""
    f.payloads[0] = zstandard.ZstdCompressor(level=3, write_content_size=True,
                                             write_checksum=False).compress(bytes(60))
    return bytes(f.encode())


@_invalid("R25-frame-size-lie", "FormatError", base="zstd", stage="read", tensor="z")
def _(f: RawFile) -> bytes:
    """The zstd frame of "z" declares 64 bytes (as the header needs) but its data decodes to
    60: the content-size byte of the frame header was changed from 60 to 64."""
    frame = bytearray(zstandard.ZstdCompressor(level=3, write_content_size=True,
                                               write_checksum=False).compress(bytes(range(60))))
    assert frame[4] == 0x20 and frame[5] == 60, "expected a single-segment frame, 1-byte size"
    frame[5] = 64
    f.payloads[0] = bytes(frame)
    return bytes(f.encode())


@_invalid("R25-frame-without-size", "FormatError", base="zstd", stage="read", tensor="z")
def _(f: RawFile) -> bytes:
    """The zstd frame of "z" does not declare its content size (which §4 requires)."""
    raw = torch.arange(16, dtype=torch.float32).remainder(3).numpy().tobytes()
    f.payloads[0] = zstandard.ZstdCompressor(level=3, write_content_size=False,
                                             write_checksum=False).compress(raw)
    return bytes(f.encode())


@_invalid("R25-bytes-after-frame", "FormatError", base="zstd", stage="read", tensor="z")
def _(f: RawFile) -> bytes:
    """The blob of "z" is its zstd frame followed by a 12-byte Zstandard skippable frame
    (magic 0x184D2A50, 4 bytes of content), which many decoders pass over silently."""
    f.payloads[0] += struct.pack("<II", 0x184D2A50, 4) + b"mcnc"
    return bytes(f.encode())


@_invalid("R26-unknown-packed-dtype", "UnsupportedFeatureError", base="packed")
def _(f: RawFile) -> bytes:
    """Packed tensor "q" (3 values) has dtype "f8e4m3": its size, and so where packed tensor
    "r" after it starts, are unknown."""
    assert _tensor(f, "q")["encoding"] == C.Encoding.PACKED
    _tensor(f, "q")["dtype"] = "f8e4m3"
    return bytes(f.encode())


@_invalid("R27-bool-byte-2", "FormatError", stage="read", tensor="b")
def _(f: RawFile) -> bytes:
    """Dense tensor "b" and its blob are bool [4] holding the bytes 01 00 02 01."""
    f.header["blobs"][2].update(dtype="bool")
    _tensor(f, "b")["dtype"] = "bool"
    f.payloads[2] = bytes([1, 0, 2, 1])
    return bytes(f.encode())


@_invalid("R26-unknown-dtype", "UnsupportedFeatureError")
def _(f: RawFile) -> bytes:
    """Dense tensor "b" and its blob have dtype "f8e4m3" (4 bytes of shape [4])."""
    f.header["blobs"][2].update(dtype="f8e4m3")
    _tensor(f, "b")["dtype"] = "f8e4m3"
    f.payloads[2] = bytes(4)
    return bytes(f.encode())


# R30-R34: generators


@_invalid("R30-k-zero", "HeaderError")
def _(f: RawFile) -> bytes:
    """k = 0, with the alpha blob shaped [chunks, m, 0] to match."""
    f.header["generators"][0]["k"] = 0
    f.header["blobs"][0]["shape"][2] = 0
    f.payloads[0] = b""
    return bytes(f.encode())


@_invalid("R30-d-over-limit", "HeaderError")
def _(f: RawFile) -> bytes:
    """d = MAX_D + 1; the segment's one chunk covers its 12 values."""
    f.header["generators"][0]["d"] = C.MAX_D + 1
    f.header["segments"][0]["chunks"] = 1
    for index, shape in ((0, [1, 1, 2]), (1, [1, 1])):
        f.header["blobs"][index]["shape"] = shape
        f.payloads[index] = f.payloads[index][:4 * math.prod(shape)]
    return bytes(f.encode())


@_invalid("R33-inline-dtype", "HeaderError", base="inline")
def _(f: RawFile) -> bytes:
    """An inline generator's first weight blob is f16 instead of f32."""
    blob = f.header["blobs"][0]
    blob["dtype"] = "f16"
    values = np.frombuffer(f.payloads[0], dtype=np.float32).astype(np.float16)
    f.payloads[0] = values.tobytes()
    return bytes(f.encode())


@_invalid("R10-negative-inline-blob-index", "HeaderError", base="inline")
def _(f: RawFile) -> bytes:
    """The inline generator's output bias (blob 3) is moved to the end of the blob list and
    referenced as blob -1: negative indexing would find it, and every blob would look used
    exactly once. Blob indices are unsigned."""
    gen = f.header["generators"][0]
    assert gen["weights"]["blobs"] == [0, 1, 2, 3] and len(f.payloads) == 6
    f.header["blobs"].append(f.header["blobs"].pop(3))
    f.payloads.append(f.payloads.pop(3))
    gen["weights"]["blobs"] = [0, 1, 2, -1]
    for seg in f.header["segments"]:
        seg["alpha"] -= 1
        seg["beta"] -= 1
    return bytes(f.encode())


@_invalid("R33-inline-count", "HeaderError", base="inline")
def _(f: RawFile) -> bytes:
    """A bias-free inline generator lists 3 weight blobs (W_1, b_1, W_out) where 2 (W_1,
    W_out) are needed."""
    gen = f.header["generators"][0]
    gen["bias"] = False
    gen["weights"]["blobs"] = gen["weights"]["blobs"][:3]
    del f.header["blobs"][3]
    del f.payloads[3]
    for seg in f.header["segments"]:
        seg["alpha"] -= 1
        seg["beta"] -= 1
    return bytes(f.encode())


# R40-R46: segments and tensors


@_invalid("R40-alpha-shape", "HeaderError")
def _(f: RawFile) -> bytes:
    """The alpha blob is [2, 1, 3] for a generator with k = 2."""
    f.header["blobs"][0]["shape"] = [2, 1, 3]
    f.payloads[0] = f.payloads[0] + f.payloads[0][:8]
    return bytes(f.encode())


@_invalid("R40-beta-dtype", "HeaderError")
def _(f: RawFile) -> bytes:
    """The beta blob is f64."""
    f.header["blobs"][1]["dtype"] = "f64"
    values = np.frombuffer(f.payloads[1], dtype=np.float32).astype(np.float64)
    f.payloads[1] = values.tobytes()
    return bytes(f.encode())


@_invalid("R40-m-zero", "HeaderError")
def _(f: RawFile) -> bytes:
    """m = 0, with alpha [2, 0, 2] and beta [2, 0] (empty) to match."""
    f.header["segments"][0]["m"] = 0
    f.header["blobs"][0]["shape"] = [2, 0, 2]
    f.header["blobs"][1]["shape"] = [2, 0]
    f.payloads[0] = f.payloads[1] = b""
    return bytes(f.encode())


@_invalid("R40-m-over-limit", "HeaderError")
def _(f: RawFile) -> bytes:
    """m = 65 (MAX_M + 1), with alpha and beta blobs of matching shapes."""
    m = C.MAX_M + 1
    f.header["segments"][0]["m"] = m
    f.header["blobs"][0]["shape"] = [2, m, 2]
    f.header["blobs"][1]["shape"] = [2, m]
    f.payloads[0] = np.full(2 * m * 2, 0.5, dtype=np.float32).tobytes()
    f.payloads[1] = np.full(2 * m, 0.01, dtype=np.float32).tobytes()
    return bytes(f.encode())


@_invalid("R41-overlap", "HeaderError", base="shared")
def _(f: RawFile) -> bytes:
    """Member "v" starts at 11, overlapping the last element of "w" (16 values, 2 chunks)."""
    _tensor(f, "v")["offset"] = 11
    seg = f.header["segments"][0]
    seg["chunks"] = 2
    for index in (seg["alpha"], seg["beta"]):
        blob = f.header["blobs"][index]
        blob["shape"][0] = 2
        f.payloads[index] = f.payloads[index][:len(f.payloads[index]) * 2 // 3]
    return bytes(f.encode())


@_invalid("R41-explicit-offset-moves-implied", "HeaderError", base="shared")
def _(f: RawFile) -> bytes:
    """Member "w" (12 values) has an explicit offset 5 and "v" (5 values) none, so "v" is
    implied to start where "w" ends, at 17: elements 0-4 of the segment belong to no member
    (the segment's 3 chunks of 8 still hold the 22 values)."""
    assert "offset" not in _tensor(f, "w") and "offset" not in _tensor(f, "v")
    _tensor(f, "w")["offset"] = 5
    return bytes(f.encode())


@_invalid("R41-chunk-count", "HeaderError")
def _(f: RawFile) -> bytes:
    """The segment has 3 chunks (alpha and beta sized to match) for 12 values of d = 8,
    which need 2."""
    seg = f.header["segments"][0]
    seg["chunks"] = 3
    for index in (seg["alpha"], seg["beta"]):
        f.header["blobs"][index]["shape"][0] = 3
        f.payloads[index] = f.payloads[index] + f.payloads[index][:len(f.payloads[index]) // 2]
    return bytes(f.encode())


@_invalid("R41-segment-without-members", "HeaderError")
def _(f: RawFile) -> bytes:
    """A second segment, with its own alpha and beta blobs, that no tensor uses."""
    first = f.header["segments"][0]
    alpha = f.add_blob(f.payloads[first["alpha"]], "f32", [2, 1, 2])
    beta = f.add_blob(f.payloads[first["beta"]], "f32", [2, 1])
    f.header["segments"].append(dict(first, alpha=alpha, beta=beta))
    return bytes(f.encode())


@_invalid("R42-duplicate-name", "HeaderError")
def _(f: RawFile) -> bytes:
    """Two dense tensors named "b", each with its own blob."""
    index = f.add_blob(f.payloads[2], "f32", [4])
    f.header["tensors"].append(dict(_tensor(f, "b"), blob=index))
    return bytes(f.encode())


@_invalid("R43-rank-9", "HeaderError")
def _(f: RawFile) -> bytes:
    """Dense tensor "b" and its blob have rank 9 (shape [1, 1, 1, 1, 1, 1, 1, 2, 2])."""
    shape = [1] * 7 + [2, 2]
    _tensor(f, "b")["shape"] = shape
    f.header["blobs"][2]["shape"] = list(shape)
    return bytes(f.encode())


@_invalid("R45-dangling-blob", "HeaderError")
def _(f: RawFile) -> bytes:
    """Dense tensor "b" references blob 7 (the file has 3); its former blob 2 is used by a
    new tensor "c", so no blob is left unused."""
    f.header["tensors"].append(dict(_tensor(f, "b"), name="c"))
    _tensor(f, "b")["blob"] = 7
    return bytes(f.encode())


@_invalid("R45-unused-blob", "HeaderError")
def _(f: RawFile) -> bytes:
    """A fourth blob (f32 [4]) that no entry references."""
    f.add_blob(f.payloads[2], "f32", [4])
    return bytes(f.encode())


@_invalid("R45-blob-used-twice", "HeaderError")
def _(f: RawFile) -> bytes:
    """A second dense tensor "c" uses blob 2, which "b" already uses."""
    f.header["tensors"].append(dict(_tensor(f, "b"), name="c"))
    return bytes(f.encode())


@_invalid("R45-dangling-segment", "HeaderError")
def _(f: RawFile) -> bytes:
    """Tensor "w" references segment 1 (the file has one); a copy "w0" of "w" keeps
    segment 0 in use."""
    f.header["tensors"].insert(0, dict(_tensor(f, "w"), name="w0"))
    _tensor(f, "w")["segment"] = 1
    return bytes(f.encode())


@_invalid("R46-unknown-encoding", "UnsupportedFeatureError", stage="read", tensor="sparse")
def _(f: RawFile) -> bytes:
    """A minor-1 file (the reader's own minor) with a tensor "sparse" of encoding
    "sparse-coo" that references a blob of its own; opening works and the other tensors load,
    reading "sparse" fails."""
    assert f.minor == C.FORMAT_MINOR
    index = f.add_blob(struct.pack("<2f", 1.0, 2.0), "f32", [2])
    f.header["tensors"].append({"dtype": "f32", "encoding": "sparse-coo", "name": "sparse",
                                "shape": [2, 2], "values": index})
    return bytes(f.encode())


# Packed tensors (§6.4): who may use a pack blob (R45), its dtype, rank and size (R52)


def _pack_index(f: RawFile) -> int:
    index = _tensor(f, "p")["blob"]
    assert f.header["blobs"][index]["dtype"] == C.PACK_DTYPE
    return index


@_invalid("R45-pack-blob-used-by-dense", "HeaderError", base="packed")
def _(f: RawFile) -> bytes:
    """Dense tensor "d" (u8 [24]) uses the pack blob of the packed tensors "p", "q" and "r"
    (u8 [24] too, so "d" matches it as §6.2 asks); its own blob is gone."""
    d = _tensor(f, "d")
    index = d["blob"]
    assert index == len(f.payloads) - 1 and f.header["blobs"][_pack_index(f)]["shape"] == [24]
    d["blob"] = _pack_index(f)
    del f.header["blobs"][index]
    del f.payloads[index]
    return bytes(f.encode())


@_invalid("R52-pack-blob-f32", "HeaderError", base="packed")
def _(f: RawFile) -> bytes:
    """The pack blob of "p", "q" and "r" (24 bytes) has dtype f32 and shape [6]."""
    f.header["blobs"][_pack_index(f)].update(dtype="f32", shape=[6])
    return bytes(f.encode())


@_invalid("R52-pack-blob-rank-2", "HeaderError", base="packed")
def _(f: RawFile) -> bytes:
    """The pack blob of "p", "q" and "r" (24 bytes) has shape [2, 12]."""
    f.header["blobs"][_pack_index(f)]["shape"] = [2, 12]
    return bytes(f.encode())


@_invalid("R52-pack-longer-than-tensors", "HeaderError", base="packed")
def _(f: RawFile) -> bytes:
    """The pack blob holds 28 bytes (u8 [28]); its packed tensors "p", "q" and "r" take 24."""
    index = _pack_index(f)
    f.payloads[index] += bytes(4)
    f.header["blobs"][index]["shape"] = [28]
    return bytes(f.encode())


@_invalid("R52-pack-shorter-than-tensors", "HeaderError", base="packed")
def _(f: RawFile) -> bytes:
    """The pack blob holds 20 bytes (u8 [20]); its packed tensors "p", "q" and "r" take 24,
    so "r" would run 4 bytes past its end."""
    index = _pack_index(f)
    f.payloads[index] = f.payloads[index][:20]
    f.header["blobs"][index]["shape"] = [20]
    return bytes(f.encode())


# R51-R75: dense, lora and theta0


@_invalid("R60-rank-0-factors", "HeaderError", base="lora")
def _(f: RawFile) -> bytes:
    """lora factors of rank r = 0: A [0, 3] and B [2, 0] (the segment keeps a placeholder
    member so that it is still used)."""
    lora = _tensor(f, "lora")
    lora["A"]["shape"] = [0, 3]
    lora["B"]["shape"] = [2, 0]
    lora["B"]["offset"] = 0
    f.header["tensors"].append({"dtype": "f32", "encoding": "mcnc", "name": "fill",
                                "offset": 0, "segment": 0, "shape": [5],
                                "theta0": {"kind": "zeros"}})
    return bytes(f.encode())


@_invalid("R74-sha256-uppercase", "HeaderError", base="external")
def _(f: RawFile) -> bytes:
    """The pinned sha256 is in uppercase hex."""
    theta0 = _tensor(f, "w")["theta0"]
    theta0["sha256"] = theta0["sha256"].upper()
    return bytes(f.encode())


@_invalid("R74-sha256-short", "HeaderError", base="external")
def _(f: RawFile) -> bytes:
    """The pinned sha256 has 63 hex digits."""
    theta0 = _tensor(f, "w")["theta0"]
    theta0["sha256"] = theta0["sha256"][:63]
    return bytes(f.encode())


# --------------------------------------------------------------------------------------------
# philox.json
# --------------------------------------------------------------------------------------------

KNOWN_ANSWERS = [  # Random123 kat_vectors, philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
]

STREAM_CASES = [  # (seed, stream, start element, count)
    (0, 0, 0, 8),
    (1, 0, 0, 8),
    (0, 1, 0, 8),
    (0x12345678, 0x9ABCDEF0, 5, 11),
    (0xFFFFFFFF, 0xFFFFFFFF, 1_000_003, 9),
    (42, 7, 4 * (2**32 - 1) - 2, 12),  # blocks 2^32 - 2 .. 2^32: counter word 1 goes 0 -> 1
    (42, 7, 4 * 2**32, 4),
    (3, 2, 4 * 2**40 + 1, 6),
    (9, 9, 4 * (2**62 - 2), 8),
]


def _hex(words: np.ndarray | tuple[int, ...]) -> list[str]:
    return [f"{int(w):08x}" for w in words]


def philox_json() -> str:
    known = [{"counter": _hex(c), "key": _hex(k), "output": _hex(o)} for c, k, o in KNOWN_ANSWERS]
    for case in known:
        counter = tuple(int(w, 16) for w in case["counter"])
        key = tuple(int(w, 16) for w in case["key"])
        assert _hex(reference.philox4x32_ref(counter, key)) == case["output"]  # type: ignore
    streams = [{"seed": s, "stream": t, "start": a, "count": n,
                "words": _hex(reference.stream_words_ref(s, t, a, n))}
               for s, t, a, n in STREAM_CASES]
    uniform = []
    for seed, stream, start, count, bound in [(5, 0, 0, 6, 1.0), (5, 1, 3, 6, 0.125),
                                              (77, 2, 4 * 2**32 + 1, 5, 1 / math.sqrt(3))]:
        values = reference.uniform_signed_ref(seed, stream, start, count, bound)
        uniform.append({"seed": seed, "stream": stream, "start": start, "count": count,
                        "bound": bound, "float32_bits": _hex(values.view(np.uint32))})
    normal = []
    for seed, stream, start, count in [(1, 0, 0, 6), (2, 3, 7, 5), (9, 1, 2 * 2**32 + 1, 4)]:
        # 13 significant digits: far finer than NORMAL_ATOL, and immune to the last-bit
        # differences between float64 log/cos implementations.
        z64 = reference.normal_ref(seed, stream, start, count)
        normal.append({"seed": seed, "stream": stream, "start": start, "count": count,
                       "z64": [float(f"{z:.12e}") for z in z64]})
    doc = {
        "description": "Philox4x32-10 of SPEC.md §8: key (seed, stream), block b = counter "
                       "(b mod 2^32, b >> 32, 0, 0), element i = word i mod 4 of block i div 4. "
                       "Words are uint32 in hex. 'uniform' gives the exact float32 bits of "
                       "§8.2; 'normal' the float64 z64 of §8.3 (13 significant digits), "
                       "which a reader meets within NORMAL_ATOL * max(1, |z64|).",
        "known_answers": known,
        "streams": streams,
        "uniform": uniform,
        "normal": normal,
    }
    return _json_one_case_per_line(doc)


def _json_one_case_per_line(doc: dict[str, Any]) -> str:
    """JSON with one line per list entry: easy to read and to diff."""
    parts = []
    for key in sorted(doc):
        value = doc[key]
        if isinstance(value, list):
            cases = ",\n".join(f"  {json.dumps(case, sort_keys=True)}" for case in value)
            parts.append(f"{json.dumps(key)}: [\n{cases}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


# --------------------------------------------------------------------------------------------
# index.json and README.md
# --------------------------------------------------------------------------------------------

STAGES = {
    "open": "opening the file (preamble and header checks, before any blob is read)",
    "read": "reading the named tensor; the file opens and its other tensors load",
    "verify": "a full verification (padding, R22); opening and reading every tensor succeed",
}


def index_json(valid: list[_Valid]) -> str:
    doc = {
        "valid": [{"file": f"{v.name}.mcnc", "expected": f"{v.name}.expected.safetensors",
                   "minor": v.minor, "covers": v.covers, "unsupported": v.unsupported}
                  for v in valid],
        "invalid": [{"file": f"{INVALID_DIR}/{v.name}.mcnc", "rule": v.rule, "error": v.error,
                     "stage": v.stage, "tensor": v.tensor, "description": v.description}
                    for v in sorted(INVALID, key=lambda v: v.name)],
        "stages": STAGES,
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


README_HEAD = """\
# Test vectors for the `.mcnc` format 1.1

Generated by `python spec/make_vectors.py [OUT_DIR]` (byte-identical on every run with the
same zstd library, except f64 expected values: float64 `sin` and matrix products differ in
the last bit between math libraries, so those agree to 1e-12 relative); do not edit by hand.
`index.json` lists everything below in machine-readable form.

## Valid vectors

Each `NAME.mcnc` has a `NAME.expected.safetensors` beside it holding every tensor the reader
must return, computed in float64 by `mcnc_format.reference` from the writer's inputs (the same
float32 generator weights, alpha, beta and theta0; normals as `z64`) and rounded once, to
nearest even, to the tensor's dtype. lora tensors are stored merged
(`theta0 + scale * B @ A`, all in float64; every lora factor here is f32, so whether a reader
rounds factors to their dtype before the product does not matter).

Each file declares the lowest minor version whose features it uses (SPEC.md §13): minor 1 when
it has a packed tensor (§6.4) or leaves a member offset implied (§6.1), as the reference writer
does wherever it can, else minor 0. `packed.mcnc` and `packed-two-blobs.mcnc` cover the packed
encoding, `dense.mcnc` dense tensors in their own blobs, `explicit-offsets.mcnc` a 1.0 file
whose members carry explicit offsets out of tensor order, and the `minor-newer` vectors a file
of minor 2, newer than the reader's.

How a reader is checked against them (`tests/test_vectors.py` does exactly this):

- dense and packed tensors: bit for bit;
- mcnc tensors and lora factors: SPEC.md §10.1 per segment chunk `c`,
  `||(v_c - e_c) / rtol|| <= max(1, P / 20) * (||theta0_c|| + sum_j |beta_cj|
  ||phi64(alpha_cj)||) + ||a_c / rtol|| + ||r_c / rtol||`, each element divided by the
  `rtol` of its tensor's dtype (`REGEN_RTOL`, or `REGEN_RTOL_16` for f16 and bf16), where `e`
  is the expected tensor, `P` the generator's first-layer bound and `a_c` the normal theta0
  allowance of §10.1 (`|float32(std)| * NORMAL_ATOL * max(1, |z64|)` per element whose theta0
  is normal, §8.3), and `r` two roundings per element: the reader's to the tensor's dtype
  (half an ulp when narrower than f32) and the expected file's own (half an ulp; for f64,
  1e-12 relative: the float64 reference's own reproducibility across math libraries).
  Members sharing a chunk are checked together;
- merged lora tensors: element by element, the factors' chunk bounds propagated through
  `fl(fl(scale * fl(B @ A)) + theta0)` (see `_check_lora` in the test), plus the same two
  roundings.

"unsupported tensors" must raise `UnsupportedFeatureError` when read, while the others load.

| vector | minor | covers | unsupported tensors |
|---|---|---|---|
"""

README_INVALID = """
`theta0-sources.base.safetensors` is the external theta0 that `theta0-sources.mcnc` pins by
sha256 (uri relative to the vector's directory).

## Invalid vectors

Each `invalid/RNN-description.mcnc` breaks the one rule of SPEC.md §12 it is named after; its
checksums and blob layout are otherwise correct (edits that change sizes change the blobs to
match). A reader must raise the given `MCNCError` subclass (or a subclass of it) at the given
stage:

- **open**: opening the file (preamble and header checks, before any blob is read);
- **read**: reading the named tensor; the file opens and its other tensors load;
- **verify**: only a full verification detects it (R22, padding: §12 lets readers skip it
  otherwise); opening and reading every tensor succeed.

`invalid/external-base.safetensors` is the external file the R74/R75 vectors point at.

| file | rule | error | stage | tensor | what is wrong |
|---|---|---|---|---|---|
"""

README_TAIL = """
Every rule of §12 can be broken by a file and has at least one vector here. R11's other half,
a newer minor version whose unknown keys a reader ignores, is the valid `minor-newer.mcnc`.

## philox.json

- `known_answers`: Random123's known answers for Philox4x32-10 (counter, key, output).
- `streams`: words of stream `(seed, stream)` from element `start`, including elements of
  blocks >= 2^32 (counter word 1 non-zero) and a run crossing block 2^32.
- `uniform`: the exact float32 bits of §8.2's `float32(bound) * s`.
- `normal`: `z64` of §8.3 to 13 significant digits; a reader's float32 `z` is within
  `NORMAL_ATOL * max(1, |z64|)`.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme(valid: list[_Valid]) -> str:
    rows = [f"| `{v.name}.mcnc` | {v.minor} | {_cell(v.covers)} | "
            f"{', '.join(f'`{n}`' for n in v.unsupported) or '-'} |" for v in valid]
    bad = [f"| `{v.name}.mcnc` | {v.rule} | {v.error} | {v.stage} | "
           f"{f'`{v.tensor}`' if v.tensor else '-'} | {_cell(v.description)} |"
           for v in sorted(INVALID, key=lambda v: v.name)]
    return README_HEAD + "\n".join(rows) + "\n" + README_INVALID + "\n".join(bad) + "\n" + \
        README_TAIL


# --------------------------------------------------------------------------------------------


def generate(out: Path) -> None:
    """Write every vector into ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INVALID_DIR).mkdir(exist_ok=True)
    valid = [make() for make in VALID]
    for vector in valid:
        _write_valid(out, vector)
    (out / INVALID_DIR / EXTERNAL_BASE).write_bytes(_safetensors(_external_tensors()))
    bases = {name: make() for name, make in BASES.items()}
    for vector in sorted(INVALID, key=lambda v: v.name):
        raw = RawFile.parse(bases[vector.base])
        (out / INVALID_DIR / f"{vector.name}.mcnc").write_bytes(vector.edit(copy.deepcopy(raw)))
    (out / "philox.json").write_text(philox_json())
    (out / "index.json").write_text(index_json(valid))
    (out / "README.md").write_text(readme(valid))


def main(argv: list[str]) -> None:
    if len(argv) > 2 or (len(argv) == 2 and argv[1].startswith("-")):
        raise SystemExit("usage: python spec/make_vectors.py [OUT_DIR]")
    generate(Path(argv[1]) if len(argv) == 2 else DEFAULT_OUT)


if __name__ == "__main__":
    main(sys.argv)
