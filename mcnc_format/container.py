"""Bytes of the container (SPEC.md §2-§4): preamble, header encoding, blob codecs.

Everything here works on ``bytes``-like objects and knows nothing of torch, so the reader,
the writer and the verifier share one definition of each byte.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import xxhash
import zstandard

from . import constants as C
from .errors import ChecksumError, FormatError, HeaderError, UnsupportedVersionError
from .header import BlobEntry, Header

__all__ = [
    "Preamble",
    "checksum",
    "compress_header",
    "decode_blob",
    "decode_header",
    "encode_blob",
    "encode_header",
    "encode_preamble",
    "header_level",
    "read_preamble",
]

_PREAMBLE = struct.Struct("<8sHHIQQ")
ZSTD_LEVEL = 3
HEADER_ZSTD_LEVEL = 19


def checksum(data: bytes | memoryview) -> int:
    """XXH3-64 with seed 0 (§2)."""
    return xxhash.xxh3_64_intdigest(data)


class Preamble:
    """The fixed 32 bytes at the start of a file."""

    def __init__(self, minor: int, header_length: int, header_xxh3: int,
                 header_codec: int = C.HEADER_CODEC_MSGPACK) -> None:
        self.minor = minor
        self.header_length = header_length
        self.header_xxh3 = header_xxh3
        self.header_codec = header_codec


def encode_preamble(header_bytes: bytes, minor: int = C.FORMAT_MINOR,
                    header_codec: int = C.HEADER_CODEC_MSGPACK) -> bytes:
    """The preamble for stored header bytes (msgpack, or zstd-compressed msgpack)."""
    return _PREAMBLE.pack(C.MAGIC, C.FORMAT_MAJOR, minor, header_codec, len(header_bytes),
                          checksum(header_bytes))


#: Versions above these are not newer releases but damage: major versions grow one at a time.
_PLAUSIBLE_MAJOR = 100
_PLAUSIBLE_MINOR = 1000


def read_preamble(data: bytes | memoryview, file_size: int, source: str) -> Preamble:
    """Parse and check the preamble: R1-R4."""
    head = bytes(data[:8])
    if head != C.MAGIC[: len(head)] or not head:
        raise FormatError(
            f"not an .mcnc file: it does not start with the 8-byte magic {C.MAGIC!r}. Check the "
            "path, or re-download the file if it was damaged", rule="R1", path=source)
    if file_size < C.PREAMBLE_SIZE:
        raise FormatError(
            f"the file is truncated: it has {file_size} bytes, fewer than the "
            f"{C.PREAMBLE_SIZE}-byte preamble that follows the magic. Re-download or re-write it",
            rule="R1", path=source)
    _, major, minor, header_codec, header_length, header_xxh3 = _PREAMBLE.unpack(
        bytes(data[: C.PREAMBLE_SIZE])
    )
    if major != C.FORMAT_MAJOR:
        raise UnsupportedVersionError(_version_message(major, minor), rule="R2", path=source)
    if header_codec not in C.HEADER_CODECS:
        raise FormatError(f"header_codec is {header_codec:#x}, expected 0 (msgpack) or 1 "
                          "(zstd-compressed msgpack)", rule="R3", path=source)
    if header_length > C.MAX_HEADER_BYTES:
        raise FormatError(f"header_length {header_length} exceeds MAX_HEADER_BYTES "
                          f"{C.MAX_HEADER_BYTES}", rule="R4", path=source)
    if C.PREAMBLE_SIZE + header_length > file_size:
        raise FormatError(
            f"header_length {header_length} runs past the end of the {file_size}-byte file: "
            "the file is truncated. Re-download or re-write it", rule="R4", path=source)
    return Preamble(minor, header_length, header_xxh3, header_codec)


def _version_message(major: int, minor: int) -> str:
    """R2's message: a newer format asks for a newer release; a version no release can have
    written (0, or absurdly high, as random bytes after the magic give) is damage."""
    if C.FORMAT_MAJOR < major < _PLAUSIBLE_MAJOR and minor < _PLAUSIBLE_MINOR:
        return (f"format version {major}.{minor}; this reader implements major version "
                f"{C.FORMAT_MAJOR}. Use an mcnc-format release that reads version {major}")
    return (f"the preamble gives format version {major}.{minor}, which no mcnc-format "
            f"release writes (this one reads {C.FORMAT_MAJOR}.x): the bytes after the magic "
            "are damaged. Re-download or re-write the file")


def encode_header(header: Header) -> bytes:
    """Deterministic msgpack (§3, §11): sorted keys, float64 floats, smallest int forms."""
    packed: bytes = msgpack.packb(header.to_dict(), use_bin_type=True, use_single_float=False)
    return packed


#: A writer's attempts at compressing the header (§11): one zstd level each.
HEADER_LEVEL_ATTEMPTS = 19


def header_level(msgpack_length: int, attempt: int) -> int:
    """The zstd level of a writer's ``attempt``-th try (0-based) at a header of
    ``msgpack_length`` bytes (§11): 19, 18, ..., 1 (headers are small, and the strongest level
    costs milliseconds and saves ~5 % of them); above 1 MiB 3, 2, 1, 4, 5, ..., 19 (level 19
    runs at a few MB/s). A later attempt is made only when a compressed header's size keeps
    moving the data start across an alignment boundary (``_Layout._settle``)."""
    if msgpack_length <= 1 << 20:
        return HEADER_ZSTD_LEVEL - attempt
    levels: tuple[int, ...] = (ZSTD_LEVEL, 2, 1, *range(4, HEADER_ZSTD_LEVEL + 1))
    return levels[attempt]


def compress_header(msgpack_bytes: bytes, level: int) -> tuple[int, bytes]:
    """``(header_codec, stored bytes)``: zstd at ``level`` when that is smaller (tensor names
    and repeated keys compress about 9x, which is what keeps the header small beside alpha and
    beta), the plain msgpack otherwise."""
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                          write_checksum=False)
    packed = compressor.compress(msgpack_bytes)
    if len(packed) < len(msgpack_bytes):
        return C.HEADER_CODEC_ZSTD, packed
    return C.HEADER_CODEC_MSGPACK, msgpack_bytes


def _decompress_header(stored: bytes | memoryview, source: str) -> bytes:
    """R6 for zstd headers: one frame, nothing after it, with a declared content size within
    MAX_HEADER_BYTES, decoded exactly."""
    if not _is_zstd_frame(stored):
        raise HeaderError("the header does not start with a Zstandard frame (magic 28 B5 2F "
                          "FD; a skippable frame is not one)", rule="R6", path=source)
    try:
        size = zstandard.get_frame_parameters(stored).content_size
        if not 0 <= size <= C.MAX_HEADER_BYTES:
            raise HeaderError(f"the zstd header frame declares {size} bytes; it must declare a "
                              f"size of at most MAX_HEADER_BYTES {C.MAX_HEADER_BYTES}",
                              rule="R6", path=source)
        decoded = _decompress_one_frame(stored, size)
    except zstandard.ZstdError as exc:
        raise HeaderError(f"the zstd-compressed header is invalid: {exc}", rule="R6",
                          path=source) from exc
    if len(decoded) != size:
        raise HeaderError(f"the zstd header decoded to {len(decoded)} bytes, its frame "
                          f"declares {size}", rule="R6", path=source)
    return decoded


def _decompress_one_frame(stored: bytes | memoryview, size: int) -> bytes:
    """The content of exactly one Zstandard frame (§2, §4): bytes after it are an error, so
    that no two readers can disagree on what the stored bytes hold."""
    return zstandard.ZstdDecompressor().decompress(stored, max_output_size=size,
                                                   allow_extra_data=False)


def _is_zstd_frame(stored: bytes | memoryview) -> bool:
    """True when ``stored`` starts a Zstandard frame: a skippable frame (magic
    ``0x184D2A5?``) is not one (RFC 8878 §3.1.2), even though decoders pass over it."""
    return bytes(stored[:4]) == C.ZSTD_FRAME_MAGIC


class _NotThisDataModel(ValueError):
    """msgpack the header never holds (R6): a map with a key twice or a non-string key, a
    ``bin`` value."""


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """msgpack's ``object_pairs_hook``: a map, refusing a key given twice (R6). Keeping the
    first or the last would let two readers see different headers behind one checksum. Keys
    are ``str`` and values never ``bin`` (§3), in every map."""
    value = dict(pairs)
    for key, item in pairs:
        if type(key) is not str:
            raise _NotThisDataModel(f"a map has the non-string key {key!r}; map keys are msgpack "
                                "str")
        if type(item) is bytes:
            raise _NotThisDataModel(f"the key {key!r} holds a msgpack bin value; the header holds "
                                "no bin")
    if len(value) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotThisDataModel(f"a map has the key {key!r} twice")
            seen.add(key)
    return value


def _no_bin(items: list[Any]) -> list[Any]:
    """msgpack's ``list_hook``: an array, refusing a ``bin`` element (§3, R6)."""
    if any(type(item) is bytes for item in items):
        raise _NotThisDataModel("an array holds a msgpack bin value; the header holds no bin")
    return items


def decode_header(raw: bytes | memoryview, preamble: Preamble, source: str) -> Header:
    """Check the header checksum (R5), decompress and decode msgpack (R6) and parse fields
    (R10-R13)."""
    if checksum(raw) != preamble.header_xxh3:
        raise ChecksumError(
            "the header does not match its XXH3-64 checksum: the file was damaged after "
            "writing. Re-download or re-write it", rule="R5", path=source)
    if preamble.header_codec == C.HEADER_CODEC_ZSTD:
        raw = _decompress_header(raw, source)
    try:
        value: Any = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, max_ext_len=0,
            object_pairs_hook=_unique_keys, list_hook=_no_bin,
        )
    except _NotThisDataModel as exc:
        raise HeaderError(f"the header is not valid msgpack for this format: {exc}. Re-write "
                          "the file with a conforming writer", rule="R6", path=source) from exc
    except Exception as exc:  # msgpack raises several unrelated classes for bad input
        raise HeaderError(f"the header is not one valid msgpack map: {exc}", rule="R6",
                          path=source) from exc
    return Header.parse(value, source, preamble.minor)


def encode_blob(raw: bytes | memoryview, codec: str) -> bytes:
    """Stored bytes for ``codec`` (§4). zstd at a fixed level with content size, no checksum."""
    if codec == C.Codec.RAW:
        return bytes(raw)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                          write_checksum=False)
    return compressor.compress(raw)


def decode_blob(
    stored: memoryview, blob: BlobEntry, path: str, source: str, verify: bool = True
) -> memoryview | bytes:
    """Decoded bytes of a blob: checksum (R24), then one zstd frame with its declared size and
    nothing after it (R25)."""
    if verify and checksum(stored) != blob.xxh3:
        raise ChecksumError(
            "the bytes do not match their XXH3-64 checksum: the file was damaged after "
            "writing. Re-download or re-write it", rule="R24", path=source, field=path)
    if blob.codec == C.Codec.RAW:
        return stored
    expected = blob.decoded_length
    if not _is_zstd_frame(stored):
        raise FormatError("a zstd blob is one Zstandard frame (magic 28 B5 2F FD; a skippable "
                          "frame is not one), also when it decodes to nothing", rule="R25",
                          path=source, field=path)
    try:
        params = zstandard.get_frame_parameters(stored)
        if params.content_size != expected:
            raise FormatError(
                f"the zstd frame declares {params.content_size} bytes, the header {expected}",
                rule="R25", path=source, field=path)
        decoded = _decompress_one_frame(stored, expected)
    except zstandard.ZstdError as exc:
        raise FormatError(f"invalid zstd data (one frame, nothing after it): {exc}",
                          rule="R25", path=source, field=path) from exc
    if len(decoded) != expected:
        raise FormatError(
            f"zstd data decoded to {len(decoded)} bytes, expected {expected}", rule="R25",
            path=source, field=path)
    return decoded
