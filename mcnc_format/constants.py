"""Every literal of ``spec/SPEC.md`` in one place, named as the spec names it.

``tests/test_spec_tables.py`` checks that the spec's tables and these values agree.
"""

from __future__ import annotations

import enum


class SpecLiteral(str, enum.Enum):
    """A string the spec defines; compares and hashes equal to it, formats as it. Emit
    ``.value`` when writing (a ``StrEnum`` for Python 3.10)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

# §2 Preamble
MAGIC = b"\x89MCNC\r\n\x1a"
PREAMBLE_SIZE = 32
HEADER_CODEC_MSGPACK = 0
HEADER_CODEC_ZSTD = 1
HEADER_CODECS = (HEADER_CODEC_MSGPACK, HEADER_CODEC_ZSTD)
HEADER_ZSTD_THRESHOLD = 4096
FORMAT_MAJOR = 1
FORMAT_MINOR = 1

# §3 Alignment
DEFAULT_ALIGNMENT = 64
MIN_ALIGNMENT = 64
MAX_ALIGNMENT = 1 << 20

# §9 Limits
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_RANK = 8
MAX_TENSORS = 1_000_000
MAX_BLOBS = 4_000_000
MAX_GENERATORS = 256
MAX_SEGMENTS = 1_000_000
MAX_NAME_BYTES = 1024
MAX_METADATA_ENTRIES = 10_000
MAX_METADATA_VALUE_BYTES = 1 << 20
MAX_K = 1024
MAX_D = 1 << 24
MAX_HIDDEN_LAYERS = 8
MAX_HIDDEN_WIDTH = 4096
MAX_M = 64
MAX_GENERATOR_WEIGHTS = 1 << 26
MAX_NUMEL = 1 << 48
MAX_ZSTD_RATIO = 4096
ZSTD_MIN_DECODED_ALLOWANCE = 1 << 20
#: The first bytes of every Zstandard frame (RFC 8878 §3.1.1); a skippable frame has others.
ZSTD_FRAME_MAGIC = bytes.fromhex("28B52FFD")
MAX_STREAM_ELEMENTS = 1 << 66  # 2**64 Philox blocks of 4 words

# §3 Structured facts in the header's `info` map
INFO_KEYS = ("base_model", "license", "producer", "source")

# §4 Blob codecs
class Codec(SpecLiteral):
    RAW = "raw"
    ZSTD = "zstd"


CODECS = tuple(c.value for c in Codec)

# §4 Dtypes
class DType(SpecLiteral):
    """A dtype of §1, by its spec name (``header.py`` types every parsed dtype as one)."""

    F64 = "f64"
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I64 = "i64"
    I32 = "i32"
    I16 = "i16"
    I8 = "i8"
    U8 = "u8"
    BOOL = "bool"


#: name -> item size in bytes
DTYPE_SIZES = {
    DType.F64.value: 8,
    DType.F32.value: 4,
    DType.F16.value: 2,
    DType.BF16.value: 2,
    DType.I64.value: 8,
    DType.I32.value: 4,
    DType.I16.value: 2,
    DType.I8.value: 1,
    DType.U8.value: 1,
    DType.BOOL.value: 1,
}
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16")
ALPHA_BETA_DTYPES = ("f32", "f16", "bf16")

# §5 Generators
ACTIVATION_SINE = "sin"
WEIGHTS_PHILOX = "philox"
WEIGHTS_INLINE = "inline"

# §6 Tensor encodings
class Encoding(SpecLiteral):
    MCNC = "mcnc"
    DENSE = "dense"
    PACKED = "packed"  # since 1.1
    LORA = "lora"


PACK_DTYPE = "u8"
# Writer policy, not a rule: plain tensors below this many bytes share one packed blob (§6.4).
PACK_MAX_TENSOR_BYTES = 64 << 10

# §7 theta0 kinds and PRNG schemes
class Theta0Kind(SpecLiteral):
    ZEROS = "zeros"
    PRNG = "prng"
    BLOB = "blob"
    EXTERNAL = "external"


class Scheme(SpecLiteral):
    """Schemes of ``prng`` theta0 (§7.2)."""

    UNIFORM = "uniform"
    FAN_IN_UNIFORM = "fan_in_uniform"
    NORMAL = "normal"


# §8 Philox4x32-10 constants (Salmon et al., SC'11)
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# §5 Streams used to draw generator weights: layer t (0-based) draws its weight matrix
# from stream 2t and its bias from stream 2t + 1, under the generator's seed.
def generator_weight_stream(layer: int) -> int:
    return 2 * layer


def generator_bias_stream(layer: int) -> int:
    return 2 * layer + 1


# §10 Numerics: a conforming reader's error bound against the float64 reference
REGEN_RTOL = 1e-5
REGEN_RTOL_16 = 1e-4  # f16 and bf16 tensors, before their rounding
NORMAL_ATOL = 2.0**-18
