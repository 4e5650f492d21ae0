"""Coverage-guided fuzzer (atheris) of the decoders that read untrusted bytes: the preamble
(``container.read_preamble``), the header (``container.decode_header``, ``header.Header.parse``,
``validate.validate_header``) and the blobs (``container.decode_blob``).

The only exceptions allowed out of them are ``MCNCError`` subclasses; anything else (a
``KeyError``, ``struct.error``, ``RecursionError``, ``OverflowError`` ...) is a finding.

Checksums would stop a fuzzer at the first byte it changes, so the first input byte picks
how the rest is used:

* ``0``: the bytes are a whole file, checksums and all (the reader's path);
* ``1``: the bytes are the stored header: a preamble with its length and checksum is put in
  front, so mutations reach msgpack decoding, field parsing and validation; blobs are decoded
  without their checksum (which ``0`` covers);
* ``2``: as ``1``, the header zstd-compressed first (header codec 1).

Seeds: the spec's test vectors (``spec/vectors``), each in all three forms.

    python tests/fuzz/fuzz_decoders.py CORPUS_DIR -max_total_time=30
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["mcnc_format", "msgpack"]):
    from mcnc_format import constants as C
    from mcnc_format.container import (
        Preamble,
        checksum,
        decode_blob,
        decode_header,
        encode_preamble,
        read_preamble,
    )
    from mcnc_format.errors import MCNCError
    from mcnc_format.validate import validate_header

import zstandard

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
#: Blobs larger than this are not decoded (a fuzzer's input is small anyway).
MAX_BLOB = 1 << 20
SOURCE = "fuzz.mcnc"


def decode_file(data: bytes, check: bool) -> None:
    """What the reader does with a file's bytes: preamble, header, validation, every blob."""
    preamble = read_preamble(data[: C.PREAMBLE_SIZE], len(data), SOURCE)
    raw = data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + preamble.header_length]
    header = decode_header(raw, preamble, SOURCE)
    validate_header(header, preamble.header_length, len(data), SOURCE)
    for index, blob in enumerate(header.blobs):
        if blob.length <= MAX_BLOB and blob.decoded_length <= MAX_BLOB:
            stored = memoryview(data)[blob.offset : blob.offset + blob.length]
            decode_blob(stored, blob, f"blobs[{index}]", SOURCE, check)


def wrap_header(header: bytes, codec: int, rest: bytes = b"") -> bytes:
    """A file whose stored header is ``header`` (its preamble says so), then ``rest``."""
    stored = (zstandard.ZstdCompressor(write_content_size=True).compress(header)
              if codec == C.HEADER_CODEC_ZSTD else header)
    return encode_preamble(stored, header_codec=codec) + stored + rest


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    try:
        if mode == 0:
            decode_file(body, check=True)
        else:
            split = body.find(b"\0\0\0\0MCNC-REST")
            header, rest = (body, b"") if split < 0 else (body[:split], body[split + 13:])
            codec = C.HEADER_CODEC_MSGPACK if mode == 1 else C.HEADER_CODEC_ZSTD
            decode_file(wrap_header(header, codec, rest), check=False)
    except MCNCError:
        pass


def seeds(corpus: Path) -> None:
    """The spec's vectors, each as a whole file and as a header (plain and zstd)."""
    if any(corpus.iterdir()):
        return
    for n, path in enumerate(sorted(VECTORS.rglob("*.mcnc"))):
        data = path.read_bytes()
        (corpus / f"vector-{n}-file").write_bytes(b"\0" + data)
        try:
            preamble: Preamble = read_preamble(data[: C.PREAMBLE_SIZE], len(data), SOURCE)
        except MCNCError:
            continue
        stored = data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + preamble.header_length]
        if checksum(stored) != preamble.header_xxh3:
            continue
        try:
            header = (zstandard.ZstdDecompressor().decompress(stored)
                      if preamble.header_codec == C.HEADER_CODEC_ZSTD else stored)
        except zstandard.ZstdError:  # a vector of a bad frame: its file form is the seed
            continue
        rest = data[C.PREAMBLE_SIZE + preamble.header_length:]
        (corpus / f"vector-{n}-header").write_bytes(b"\1" + header + b"\0\0\0\0MCNC-REST" + rest)
        (corpus / f"vector-{n}-zstd").write_bytes(b"\2" + header)


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        seeds(corpus)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
