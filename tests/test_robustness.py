"""Damaged and hostile files fail with an MCNCError, and nothing else (SPEC.md §2, §9, §12).

Every damaged variant of a few small valid files is opened and fully loaded in a worker
subprocess whose address space is capped (RLIMIT_AS: a file of a few hundred bytes must not
make the reader allocate a gigabyte) and where each case runs under an alarm (no hangs).
The worker is this file run as a script; it reports every case whose outcome breaks the rules:

- truncated at every byte offset: an MCNCError;
- every single bit flipped: an MCNCError, or the very same tensors bit for bit when the bit
  lies in padding (then ``check_padding`` must report it) or in the minor version (a reader
  reads newer minor versions, §13);
- header bits flipped *with the header checksum fixed* (a fixed-seed sample), and every bit
  of the zstd blobs flipped with their checksums fixed: an MCNCError or a successful load,
  never another exception (these reach the parser, the validator and the zstd decoder);
- crafted headers with valid checksums and hostile values: an MCNCError of the expected class.

In-process: damaged external theta0 files (R75), and writer input validation (a WriteError
naming the problem, and no file left behind).
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import xxhash
import zstandard

import mcnc_format as mf
from mcnc_format import MCNC, Dense, GeneratorSpec, LoRA, Segment, Theta0
from mcnc_format.header import LoRATensor
from mcnc_format.reader import tensor_sha256

ADDRESS_SPACE_MARGIN = 1 << 30  # what the worker may allocate beyond its start-up footprint
CASE_ALARM_S = 30  # a case taking this long is a hang, whatever the machine's load
SAMPLED_BITS = 1000  # of the larger file; the small one has every bit flipped
SAMPLED_HEADER_BITS = 1000
MINOR_FIELD = range(10 * 8, 12 * 8)  # preamble bytes 10-11, in bits

# -- small valid files ------------------------------------------------------------------------


def _seed() -> int:
    value = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"MCNC_TEST_SEED={value}")
    return value


def write_small(path: Path, seed: int) -> None:
    """About 500 bytes, every bit of which is flipped: a segment of two members sharing a
    partial last chunk, raw f32 alpha (64 bytes) and beta, and metadata sized so that only 8
    bytes of padding precede the first blob (each padding case costs a full load)."""
    rng = torch.Generator().manual_seed(seed)
    gen = GeneratorSpec(k=4, d=8, hidden=(4,), L=3.0, seed=seed % 2**32)
    segment = Segment(gen, torch.rand(2, 2, 4, generator=rng) * 6 - 3,
                      torch.randn(2, 2, generator=rng))
    tensors = {
        "w": MCNC(segment, (2, 4), theta0=Theta0.uniform(0.5, seed % 2**32, 1)),
        "b": MCNC(segment, (3,), dtype=torch.float16),
    }
    for pad in range(64):
        mf.save(path, tensors, metadata={"pad": "x" * pad})
        (header_length,) = struct.unpack_from("<Q", path.read_bytes(), 16)
        if (32 + header_length) % 64 == 56:
            return
    raise AssertionError("no metadata length gives 8 bytes of padding")


def write_rich(path: Path, seed: int) -> None:
    """An inline generator, a lora tensor with a stored theta0, a zstd bf16 dense tensor and
    two packed tensors (f16 and bool, 9 bytes in one raw pack blob)."""
    rng = torch.Generator().manual_seed(seed)
    base = GeneratorSpec(k=2, d=6, hidden=(3,), L=2.0, bias=False, seed=0)
    inline = tuple(torch.randn(s, generator=rng) * 0.5 for s in base.parameter_shapes())
    gen = GeneratorSpec(k=2, d=6, hidden=(3,), L=2.0, bias=False, seed=None, inline=inline)
    seg = Segment(gen, torch.rand(2, 2, 2, generator=rng) * 4 - 2, torch.randn(2, 2,
                                                                             generator=rng))
    lora = LoRA(A=MCNC(seg, (1, 3)), B=MCNC(seg, (4, 1)), scale=0.5,
                theta0=Theta0.stored(torch.randn(4, 3, generator=rng).bfloat16()))
    mf.save(path, {
        "q": lora,
        "v": MCNC(seg, (3,), theta0=Theta0.normal(7, 3, 0.0, 0.1)),
        "scale": Dense(torch.randn(2, generator=rng).bfloat16(), "zstd"),
        "norm": torch.randn(3, generator=rng).half(),
        "mask": torch.randint(0, 2, (3,), generator=rng).bool(),
    }, metadata={"k": "v"})


# -- the worker ---------------------------------------------------------------------------------


class _Hang(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang(f"no result after {CASE_ALARM_S} s")


def _load_everything(path: Path) -> dict[str, torch.Tensor]:
    """What a user might call: open, summary, per-tensor info, all tensors, lora factors."""
    with mf.open(path) as f:
        f.summary()
        for name in f.keys():  # noqa: SIM118 (MCNCFile is not a dict)
            f.tensor_info(name)
        out = f.tensors()
        for name in f.keys():  # noqa: SIM118 (MCNCFile is not a dict)
            if isinstance(f.entry(name), LoRATensor):
                a, b, _ = f.get_lora_factors(name)
                out[f"{name}:A"], out[f"{name}:B"] = a, b
        return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


def _outcome(path: Path, reference: dict[str, torch.Tensor] | None) -> tuple[str, str]:
    """(kind, detail): kind is 'mcnc' (an MCNCError), 'same', 'different' or 'bad'."""
    signal.alarm(CASE_ALARM_S)
    try:
        loaded = _load_everything(path)
    except mf.MCNCError as exc:
        return "mcnc", type(exc).__name__
    except BaseException as exc:  # the point: catch everything that is not an MCNCError
        return "bad", f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        signal.alarm(0)
    if reference is not None and _same(loaded, reference):
        return "same", ""
    return "different", ""


def _padding_error(path: Path) -> bool:
    with mf.open(path) as f:
        try:
            f.check_padding()
        except mf.FormatError:
            return True
    return False


def _cap_address_space() -> None:
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    limit = vm + ADDRESS_SPACE_MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _rechecksum(data: bytearray) -> None:
    (length,) = struct.unpack_from("<Q", data, 16)
    struct.pack_into("<Q", data, 24, xxhash.xxh3_64_intdigest(bytes(data[32 : 32 + length])))


def _header(data: bytes) -> dict[str, Any]:
    (length,) = struct.unpack_from("<Q", data, 16)
    return msgpack.unpackb(data[32 : 32 + length], raw=False)


def _padding_bits(data: bytes) -> set[int]:
    header = _header(data)
    (length,) = struct.unpack_from("<Q", data, 16)
    position, gaps = 32 + length, []
    for blob in header["blobs"]:
        gaps.append((position, blob["offset"]))
        position = blob["offset"] + blob["length"]
    return {8 * byte + bit for start, stop in gaps for byte in range(start, stop)
            for bit in range(8)}


def _variants(mode: str, data: bytes, bits: list[int] | None) -> Iterator[tuple[str, bytes]]:
    """(case label, mutated bytes) for each case of a mode."""
    if mode == "truncate":
        for size in range(len(data)):
            yield f"truncate@{size}", data[:size]
        return
    if mode == "flip":
        for bit in bits if bits is not None else range(8 * len(data)):
            mutated = bytearray(data)
            mutated[bit // 8] ^= 1 << (bit % 8)
            yield f"bit{bit}", bytes(mutated)
        return
    if mode == "flip_header_fixed":
        (length,) = struct.unpack_from("<Q", data, 16)
        for bit in bits if bits is not None else range(32 * 8, (32 + length) * 8):
            mutated = bytearray(data)
            mutated[bit // 8] ^= 1 << (bit % 8)
            _rechecksum(mutated)
            yield f"header-bit{bit}", bytes(mutated)
        return
    if mode == "flip_zstd_fixed":
        header = _header(data)
        for index, blob in enumerate(header["blobs"]):
            if blob["codec"] != "zstd":
                continue
            for bit in range(blob["offset"] * 8, (blob["offset"] + blob["length"]) * 8):
                mutated = bytearray(data)
                mutated[bit // 8] ^= 1 << (bit % 8)
                fixed = copy.deepcopy(header)
                stored = bytes(mutated[blob["offset"] : blob["offset"] + blob["length"]])
                fixed["blobs"][index]["xxh3"] = xxhash.xxh3_64_intdigest(stored)
                raw = msgpack.packb(fixed, use_bin_type=True, use_single_float=False)
                (length,) = struct.unpack_from("<Q", data, 16)
                if len(raw) != length:
                    continue  # the new checksum needs another msgpack int size; rare
                mutated[32 : 32 + length] = raw
                _rechecksum(mutated)
                yield f"zstd-blob{index}-bit{bit}", bytes(mutated)
        return
    raise ValueError(mode)


def _run_job(job: dict[str, Any], scratch: Path, reference: dict[str, torch.Tensor] | None
             ) -> dict[str, Any]:
    """Every case of one job; returns the count and the cases that broke the rules."""
    failures: list[str] = []
    cases = 0
    if job["mode"] == "files":
        for path, expected in job["expected"].items():
            cases += 1
            kind, detail = _outcome(Path(path), None)
            if kind != "mcnc" or not _subclass(detail, expected):
                failures.append(f"{Path(path).name}: expected {expected}, got {kind} {detail}")
        return {"cases": cases, "failures": failures}
    original = Path(job["file"]).read_bytes()
    padding = _padding_bits(original)
    for label, mutated in _variants(job["mode"], original, job.get("bits")):
        cases += 1
        scratch.write_bytes(mutated)
        kind, detail = _outcome(scratch, reference)
        bit = int(label[3:]) if label.startswith("bit") else None
        if kind == "bad":
            failures.append(f"{label}: {detail}")
        elif job["mode"] == "truncate" and kind != "mcnc":
            failures.append(f"{label}: loaded without an error ({kind})")
        elif job["mode"] == "flip" and kind == "different":
            failures.append(f"{label}: different weights without an error")
        elif job["mode"] == "flip" and kind == "same":
            if bit in padding and not _padding_error(scratch):
                failures.append(f"{label}: padding damage not reported by check_padding")
            elif bit not in padding and bit not in MINOR_FIELD:
                failures.append(f"{label}: damage outside padding went unnoticed")
    return {"cases": cases, "failures": failures}


def worker(spec_path: str) -> None:
    """Run the jobs of a JSON spec under the memory cap; write their results as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    signal.signal(signal.SIGALRM, _on_alarm)
    scratch = Path(spec["scratch"])
    references = {name: _load_everything(Path(job["file"])) if "file" in job else None
                  for name, job in spec["jobs"].items()}  # also warms torch up
    _cap_address_space()
    results = {}
    for name, job in spec["jobs"].items():
        started = time.monotonic()
        results[name] = _run_job(job, scratch, references[name])
        print(f"{name}: {results[name]['cases']} cases in {time.monotonic() - started:.1f} s",
              file=sys.stderr)
    Path(spec["result"]).write_text(json.dumps(results))


def _subclass(name: str, expected: str) -> bool:
    cls = getattr(mf, name, None)
    return isinstance(cls, type) and issubclass(cls, getattr(mf, expected))


def run_worker(jobs: dict[str, dict[str, Any]], directory: Path, timeout: float = 600
               ) -> dict[str, Any]:
    """Run ``jobs`` in one capped subprocess (one torch import for all of them)."""
    # Cases are written and re-read thousands of times: keep them in memory where possible.
    shm = Path("/dev/shm")
    scratch = shm / f"mcnc-robustness-{os.getpid()}.mcnc" if shm.is_dir() else directory / "c"
    spec = {"jobs": jobs, "scratch": str(scratch),
            "result": str(directory / "results.json")}
    spec_path = directory / "jobs.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, str(spec_path)], capture_output=True,
                          text=True, timeout=timeout)
    scratch.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stderr)
    return json.loads((directory / "results.json").read_text())


# -- damaged files ---------------------------------------------------------------------------


def _sample(population: range, count: int, seed: int) -> list[int]:
    order = torch.randperm(len(population), generator=torch.Generator().manual_seed(seed))
    return sorted(population[i] for i in order[:count].tolist())


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("valid")
    seed = _seed()
    files = {"small": directory / "small.mcnc", "rich": directory / "rich.mcnc"}
    write_small(files["small"], seed)
    write_rich(files["rich"], seed)
    return files


@pytest.fixture(scope="module")
def results(valid_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    """All damaged-file jobs, run once in one worker; the tests below check their parts."""
    directory = tmp_path_factory.mktemp("work")
    small, rich = (str(valid_files[n]) for n in ("small", "rich"))
    (header_length,) = struct.unpack_from("<Q", valid_files["small"].read_bytes(), 16)
    jobs = {
        "truncate_small": {"mode": "truncate", "file": small},
        "truncate_rich": {"mode": "truncate", "file": rich},
        "flip_small": {"mode": "flip", "file": small},
        "flip_rich": {"mode": "flip", "file": rich, "bits": _sample(
            range(8 * valid_files["rich"].stat().st_size), SAMPLED_BITS, 1234)},
        "flip_header_fixed": {"mode": "flip_header_fixed", "file": small, "bits": _sample(
            range(8 * 32, 8 * (32 + header_length)), SAMPLED_HEADER_BITS, 4321)},
        "flip_zstd_fixed": {"mode": "flip_zstd_fixed", "file": rich},
        "crafted": {"mode": "files", "expected": write_crafted(directory)},
    }
    return run_worker(jobs, directory)


def _report(result: dict[str, Any]) -> str:
    failures = result["failures"]
    return f"{len(failures)} of {result['cases']} cases broke the rules:\n" + "\n".join(
        failures[:40])


@pytest.mark.parametrize("name", ["small", "rich"])
def test_truncated_at_every_offset(name: str, valid_files: dict[str, Path],
                                   results: dict[str, Any]) -> None:
    result = results[f"truncate_{name}"]
    assert result["cases"] == valid_files[name].stat().st_size
    assert not result["failures"], _report(result)


def test_every_bit_flipped(valid_files: dict[str, Path], results: dict[str, Any]) -> None:
    result = results["flip_small"]
    assert result["cases"] == 8 * valid_files["small"].stat().st_size
    assert not result["failures"], _report(result)


def test_sampled_bits_flipped(results: dict[str, Any]) -> None:
    result = results["flip_rich"]
    assert result["cases"] == SAMPLED_BITS
    assert not result["failures"], _report(result)


@pytest.mark.parametrize("job", ["flip_header_fixed", "flip_zstd_fixed"])
def test_flips_behind_valid_checksums(job: str, results: dict[str, Any]) -> None:
    result = results[job]
    assert result["cases"] > 0
    assert not result["failures"], _report(result)


@pytest.mark.parametrize("name", ["small", "rich"])
def test_padding_damage_found_by_check_padding(name: str, valid_files: dict[str, Path],
                                               tmp_path: Path) -> None:
    """Padding is outside every checksum: loads still work, ``check_padding`` reports it."""
    data = bytearray(valid_files[name].read_bytes())
    padding = sorted(_padding_bits(bytes(data)))
    assert padding, "the test file needs padding"
    position = padding[-1] // 8  # the small file: before the first blob; rich: between blobs
    data[position] = 0x80
    damaged = tmp_path / "pad.mcnc"
    damaged.write_bytes(bytes(data))
    assert _same(_load_everything(damaged), _load_everything(valid_files[name]))
    with mf.open(damaged) as f, pytest.raises(mf.FormatError, match="R22"):
        f.check_padding()


# -- crafted headers with valid checksums -------------------------------------------------------


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def craft(header: Any, payloads: list[bytes], *, place: bool = True,
          raw_header: bytes | None = None, preamble: dict[str, int] | None = None) -> bytes:
    """A file with ``header`` (re-encoded, blob offsets re-placed unless ``place`` is off) and
    valid checksums; ``raw_header`` replaces the encoding, ``preamble`` overrides fields."""
    alignment = header.get("alignment") if isinstance(header, dict) else None
    if alignment not in [1 << i for i in range(6, 21)]:
        alignment = 64  # the header's value is the hostile part; place blobs sensibly anyway
    raw = raw_header
    while raw_header is None:
        encoded = msgpack.packb(header, use_bin_type=True, use_single_float=False)
        if encoded == raw or not place:
            raw = encoded
            break
        raw = encoded
        position = 32 + len(raw)
        for blob, payload in zip(header.get("blobs", []), payloads, strict=False):
            position = _align(position, alignment)
            blob["offset"] = position
            position += len(payload)
    assert raw is not None
    body = bytearray(raw)
    position = 32 + len(raw)
    blobs = header.get("blobs", []) if isinstance(header, dict) else []
    for blob, payload in zip(blobs, payloads, strict=False):
        start = blob["offset"] if isinstance(blob.get("offset"), int) else position
        body += bytes(max(0, start - position)) + payload
        position = max(position, start) + len(payload)
    fields = {"magic": 0, "major": 1, "minor": 0, "reserved": 0, "length": len(raw),
              "xxh3": xxhash.xxh3_64_intdigest(raw), **(preamble or {})}
    head = struct.pack("<8sHHIQQ", b"\x89MCNC\r\n\x1a", fields["major"], fields["minor"],
                       fields["reserved"], fields["length"], fields["xxh3"])
    return head + bytes(body)


def _base(tmp_path: Path) -> tuple[dict[str, Any], list[bytes]]:
    """A valid file's header and blob payloads to mutate: one segment with two members (one
    with a stored theta0), a lora tensor, a dense tensor and two packed tensors (f16, bool)."""
    rng = torch.Generator().manual_seed(5)
    gen = GeneratorSpec(k=2, d=4, hidden=(3,), seed=9)
    seg = Segment(gen, torch.rand(3, 1, 2, generator=rng), torch.randn(3, 1, generator=rng))
    path = tmp_path / "base.mcnc"
    mf.save(path, {
        "a": MCNC(seg, (2, 2), theta0=Theta0.stored(torch.randn(2, 2, generator=rng))),
        "b": MCNC(seg, (3,)),
        "l": LoRA(A=MCNC(seg, (1, 2)), B=MCNC(seg, (3, 1)), scale=2.0),
        "d": Dense(torch.arange(6, dtype=torch.int32), "zstd"),
        "p": torch.randn(3, generator=rng).half(),
        "q": torch.tensor([True, False, True, True, False]),
    })
    data = path.read_bytes()
    header = _header(data)
    payloads = [data[b["offset"] : b["offset"] + b["length"]] for b in header["blobs"]]
    return header, payloads


def _tensor(header: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in header["tensors"] if t["name"] == name)


def _dense_blob(header: dict[str, Any], payloads: list[bytes], stored: bytes, codec: str,
                dtype: str, shape: list[int]) -> None:
    """Replace the dense tensor's blob (and its tensor entry's dtype and shape)."""
    payloads[DENSE_BLOB] = stored
    header["blobs"][DENSE_BLOB].update(codec=codec, length=len(stored), shape=shape,
                                       dtype=dtype, xxh3=xxhash.xxh3_64_intdigest(stored))
    header["tensors"][DENSE_TENSOR].update(dtype=dtype, shape=shape)


def _zstd(data: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(data)


DENSE_TENSOR = 3  # "d" in _base's file
DENSE_BLOB = 3
PACKED_TENSORS = (4, 5)  # "p" (3 f16) and "q" (5 bool), in the last blob, the pack
PACK_BLOB = 4
PACK_BYTES = 3 * 2 + 5


def _pack_payload(header: dict[str, Any], payloads: list[bytes], stored: bytes) -> None:
    """Replace the pack blob's bytes (the same length: the packed tensors still tile it)."""
    assert len(stored) == PACK_BYTES
    payloads[PACK_BLOB] = stored
    header["blobs"][PACK_BLOB]["xxh3"] = xxhash.xxh3_64_intdigest(stored)
Mutation = Callable[[dict[str, Any], list[bytes]], bytes | None]


def _set(path: str, value: Any) -> Mutation:
    """Set a field by a dotted path such as ``generators.0.k``; the header stays consistent
    otherwise, so the checks of that field are what the case exercises."""
    def mutate(header: dict[str, Any], payloads: list[bytes]) -> None:
        node: Any = header
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


def _deep_nesting(header: dict[str, Any], payloads: list[bytes]) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True, use_single_float=False)
    # Replace the metadata value with 100,000 nested one-element arrays.
    nested = b"\x91" * 100_000 + b"\xa1x"
    marker = msgpack.packb("metadata") + b"\x80"
    assert marker in raw
    return craft(header, payloads, raw_header=raw.replace(
        marker, msgpack.packb("metadata") + b"\x81\xa1k" + nested))


def _raw_header(raw: bytes) -> Mutation:
    return lambda header, payloads: craft(header, payloads, raw_header=raw)


def _huge_generator(header: dict[str, Any], payloads: list[bytes]) -> None:
    """A 4096-wide layer and d = 2^24 behind a one-chunk segment would make an output layer of
    2^36 floats (256 GiB): MAX_GENERATOR_WEIGHTS refuses it at open (R30)."""
    header["generators"][0].update(hidden=[4096], d=1 << 24)
    header["segments"][0]["chunks"] = 1
    for index, shape in ((0, [1, 1, 2]), (1, [1, 1])):
        payloads[index] = payloads[index][: 4 * math.prod(shape)]
        header["blobs"][index].update(shape=shape, length=len(payloads[index]),
                                      xxh3=xxhash.xxh3_64_intdigest(payloads[index]))


def _huge_output(header: dict[str, Any], payloads: list[bytes]) -> None:
    """A 200-byte file claiming 2^37 values: zstd alpha/beta within the 1 MiB allowance
    of §4 give 2^17 chunks of d = 2^20. A reader must fail cleanly when it cannot allocate."""
    chunks = 1 << 17
    header["generators"][0]["d"] = 1 << 20
    header["segments"][0]["chunks"] = chunks
    for index, shape in ((0, [chunks, 1, 2]), (1, [chunks, 1])):
        payloads[index] = _zstd(bytes(4 * math.prod(shape)))
        header["blobs"][index].update(codec="zstd", shape=shape, length=len(payloads[index]),
                                      xxh3=xxhash.xxh3_64_intdigest(payloads[index]))
    del payloads[2:], header["blobs"][2:]
    member = header["tensors"][0]
    member.update(shape=[chunks << 20], theta0={"kind": "zeros"})
    header["tensors"] = [member]


CRAFTED: dict[str, tuple[Mutation, str]] = {
    "header_length_huge": (lambda h, p: craft(h, p, preamble={"length": 2**63}), "FormatError"),
    "header_length_max": (lambda h, p: craft(h, p, preamble={"length": 64 << 20}),
                          "FormatError"),
    "major_2": (lambda h, p: craft(h, p, preamble={"major": 2}), "UnsupportedVersionError"),
    "reserved": (lambda h, p: craft(h, p, preamble={"reserved": 1}), "FormatError"),
    "not_a_map": (_raw_header(msgpack.packb([1, 2, 3])), "HeaderError"),
    "trailing_bytes": (lambda h, p: craft(h, p, raw_header=msgpack.packb(h) + b"\xc0"),
                       "HeaderError"),
    "ext_type": (lambda h, p: craft(h, p, raw_header=msgpack.packb(
        {**h, "metadata": {"k": msgpack.ExtType(5, b"xx")}})), "HeaderError"),
    "timestamp_ext": (lambda h, p: craft(h, p, raw_header=msgpack.packb(h).replace(
        msgpack.packb("metadata") + b"\x80",
        msgpack.packb("metadata") + b"\x81\xa1k\xd6\xff\x00\x00\x00\x01")), "HeaderError"),
    "invalid_utf8": (lambda h, p: craft(h, p, raw_header=msgpack.packb(h).replace(
        msgpack.packb("metadata") + b"\x80",
        msgpack.packb("metadata") + b"\x81\xa1k\xa2\xff\xfe")), "HeaderError"),
    "deep_nesting": (_deep_nesting, "HeaderError"),
    "int_key_top": (lambda h, p: craft(h, p, raw_header=msgpack.packb({**h, 1: 2})),
                    "HeaderError"),
    "bytes_key_top": (lambda h, p: craft(h, p, raw_header=msgpack.packb(
        {**h, b"alignment": 64}, use_bin_type=True)), "HeaderError"),
    "bytes_key_metadata": (_set("metadata", {b"k": "v"}), "HeaderError"),
    "metadata_not_str": (_set("metadata", {"k": 1}), "HeaderError"),
    "info_not_str": (_set("info", {"producer": ["x"]}), "HeaderError"),
    "missing_blobs": (lambda h, p: craft({k: v for k, v in h.items() if k != "blobs"}, []),
                      "HeaderError"),
    "unknown_top_key": (_set("extra", 1), "HeaderError"),
    "alignment_bool": (_set("alignment", True), "HeaderError"),
    "alignment_not_pow2": (_set("alignment", 96), "HeaderError"),
    "alignment_huge": (_set("alignment", 1 << 40), "HeaderError"),
    "k_negative": (_set("generators.0.k", -1), "HeaderError"),
    "k_bool": (_set("generators.0.k", True), "HeaderError"),
    "k_float": (_set("generators.0.k", 2.0), "HeaderError"),
    "d_huge": (_set("generators.0.d", 1 << 40), "HeaderError"),
    "hidden_negative": (_set("generators.0.hidden", [-3]), "HeaderError"),
    "hidden_too_wide": (_set("generators.0.hidden", [1 << 20]), "HeaderError"),
    "hidden_empty": (_set("generators.0.hidden", []), "HeaderError"),
    "hidden_deep": (_set("generators.0.hidden", [3] * 9), "HeaderError"),
    "L_nan": (_set("generators.0.L", math.nan), "HeaderError"),
    "L_negative": (_set("generators.0.L", -1.0), "HeaderError"),
    "omega0_inf": (_set("generators.0.omega0", math.inf), "HeaderError"),
    "omega0_zero": (_set("generators.0.omega0", 0.0), "HeaderError"),
    "seed_negative": (_set("generators.0.weights.seed", -1), "HeaderError"),
    "seed_u64": (_set("generators.0.weights.seed", 1 << 40), "HeaderError"),
    "weights_kind": (_set("generators.0.weights.kind", "torch"), "UnsupportedFeatureError"),
    "activation": (_set("generators.0.activation", "relu"), "UnsupportedFeatureError"),
    "huge_generator": (_huge_generator, "HeaderError"),
    "huge_output": (_huge_output, "DeviceMemoryError"),
    "m_zero": (_set("segments.0.m", 0), "HeaderError"),
    "m_huge": (_set("segments.0.m", 1 << 62), "HeaderError"),
    "chunks_huge": (_set("segments.0.chunks", 1 << 40), "HeaderError"),
    "chunks_negative": (_set("segments.0.chunks", -1), "HeaderError"),
    "segment_generator_missing": (_set("segments.0.generator", 7), "HeaderError"),
    "alpha_blob_out_of_range": (_set("segments.0.alpha", (1 << 64) - 1), "HeaderError"),
    "alpha_is_beta": (_set("segments.0.alpha", 1), "HeaderError"),
    "shape_numel_huge": (_set("tensors.3.shape", [1 << 40, 1 << 40]), "HeaderError"),
    "shape_negative": (_set("tensors.3.shape", [-6]), "HeaderError"),
    "shape_rank_9": (_set("tensors.3.shape", [1] * 9), "HeaderError"),
    "shape_bool": (_set("tensors.3.shape", [True] * 6), "HeaderError"),
    "shape_not_list": (_set("tensors.3.shape", 6), "HeaderError"),
    "blob_shape_huge_raw": (_set("blobs.0.shape", [1 << 24, 1 << 24]), "MCNCError"),
    "blob_length_huge": (_set("blobs.3.length", 1 << 62), "MCNCError"),
    "blob_offset_negative": (lambda h, p: (h["blobs"][0].update(offset=-64), craft(
        h, p, place=False))[1], "MCNCError"),
    "blob_offset_overlap": (lambda h, p: (h["blobs"][1].update(offset=h["blobs"][0]["offset"]),
                                          craft(h, p, place=False))[1], "FormatError"),
    "blob_codec": (_set("blobs.0.codec", "lz4"), "UnsupportedFeatureError"),
    "blob_dtype": (_set("blobs.0.dtype", "f8"), "UnsupportedFeatureError"),
    "blob_xxh3_negative": (_set("blobs.0.xxh3", -1), "HeaderError"),
    "blob_xxh3_wrong": (_set("blobs.0.xxh3", 12345), "ChecksumError"),
    "zstd_ratio_bomb": (lambda h, p: _dense_blob(h, p, _zstd(bytes(1 << 21)), "zstd", "u8",
                                                 [1 << 21]), "HeaderError"),
    "zstd_no_content_size": (lambda h, p: _dense_blob(h, p, _zstd(bytes(range(24)), False),
                                                      "zstd", "u8", [24]), "FormatError"),
    "zstd_lying_size": (lambda h, p: _dense_blob(h, p, _lying_frame()[0], "zstd", "u8",
                                                 [_lying_frame()[1]]), "FormatError"),
    "zstd_garbage": (lambda h, p: _dense_blob(h, p, b"\x28\xb5\x2f\xfd" + bytes(range(40)),
                                              "zstd", "u8", [24]), "FormatError"),
    "dense_bool_byte_2": (lambda h, p: _dense_blob(h, p, bytes([0, 1, 2, 0, 1, 0]), "raw",
                                                   "bool", [6]), "FormatError"),
    "dense_dtype_mismatch": (_set("tensors.3.dtype", "f32"), "HeaderError"),
    "dense_blob_shared": (_set("tensors.3.blob", 0), "HeaderError"),
    "duplicate_names": (_set("tensors.1.name", "a"), "HeaderError"),
    "empty_name": (_set("tensors.1.name", ""), "HeaderError"),
    "name_too_long": (_set("tensors.1.name", "n" * 2000), "HeaderError"),
    "member_overlap": (_set("tensors.1.offset", 2), "HeaderError"),
    "member_offset_huge": (_set("tensors.1.offset", 1 << 63), "HeaderError"),
    "mcnc_dtype_int": (_set("tensors.1.dtype", "i32"), "HeaderError"),
    "theta0_kind": (_set("tensors.1.theta0", {"kind": "pickle"}), "UnsupportedFeatureError"),
    "theta0_scheme": (_set("tensors.1.theta0", {"kind": "prng", "scheme": "x", "seed": 1,
                                                 "stream": 1}), "UnsupportedFeatureError"),
    "theta0_bound_nan": (_set("tensors.1.theta0", {"kind": "prng", "scheme": "uniform",
                                                    "seed": 1, "stream": 1,
                                                    "bound": math.nan}), "HeaderError"),
    "theta0_stream_u64": (_set("tensors.1.theta0", {"kind": "prng", "scheme": "normal",
                                                     "seed": 1, "stream": 1 << 33, "mean": 0.0,
                                                     "std": 1.0}), "HeaderError"),
    "fan_in_rank_1": (_set("tensors.1.theta0", {"kind": "prng", "scheme": "fan_in_uniform",
                                                 "seed": 1, "stream": 1}), "HeaderError"),
    "external_absolute": (_set("tensors.1.theta0", {"kind": "external", "uri": "/etc/passwd",
                                                     "tensor": "x", "sha256": "0" * 64}),
                          "HeaderError"),
    "external_dotdot": (_set("tensors.1.theta0", {"kind": "external", "uri": "a/../../x",
                                                   "tensor": "x", "sha256": "0" * 64}),
                        "HeaderError"),
    "external_missing": (_set("tensors.1.theta0", {"kind": "external", "uri": "nothere.st",
                                                    "tensor": "x", "sha256": "0" * 64}),
                         "ExternalReferenceError"),
    "theta0_blob_int": (lambda h, p: _set("blobs.2.dtype", "i32")(h, p), "HeaderError"),
    "lora_scale_nan": (_set("tensors.2.scale", math.nan), "HeaderError"),
    "lora_rank_mismatch": (_set("tensors.2.A.shape", [2, 1]), "HeaderError"),
    "lora_rank_3": (_set("tensors.2.shape", [3, 2, 1]), "HeaderError"),
    "unknown_encoding": (_set("tensors.3.encoding", "vq"), "UnsupportedFeatureError"),
    # packed (§6.4, R52)
    "packed_bool_byte_2": (lambda h, p: _pack_payload(h, p, bytes(6) + bytes([1, 0, 2, 1, 0])),
                           "FormatError"),
    "packed_shape_huge": (_set("tensors.4.shape", [1 << 40, 1 << 40]), "HeaderError"),
    "packed_overruns_pack": (_set("tensors.5.shape", [6]), "HeaderError"),
    "packed_short_of_pack": (_set("tensors.5.shape", [2, 2]), "HeaderError"),
    "packed_dtype_wider": (_set("tensors.5.dtype", "f64"), "HeaderError"),
    "packed_blob_out_of_range": (_set("tensors.5.blob", (1 << 64) - 1), "HeaderError"),
    "packed_blob_is_dense": (_set("tensors.5.blob", DENSE_BLOB), "HeaderError"),
    "pack_blob_used_by_dense": (_set("tensors.3.blob", PACK_BLOB), "HeaderError"),
    "pack_blob_i8": (_set("blobs.4.dtype", "i8"), "HeaderError"),
    "pack_blob_rank_2": (_set("blobs.4.shape", [1, PACK_BYTES]), "HeaderError"),
    "packed_unknown_key": (_set("tensors.4.offset", 0), "HeaderError"),
    "packed_without_blob": (lambda h, p: (h["tensors"][4].pop("blob"), None)[1], "HeaderError"),
}


def _lying_frame() -> tuple[bytes, int]:
    """A frame that holds 4096 bytes but declares fewer: (frame, declared size)."""
    frame = bytearray(_zstd(bytes(range(256)) * 16))
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == 4096
    # Frame header (RFC 8878 §3.1.1.1): magic, descriptor, [window], content size field.
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    width = {0: single_segment, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    offset = 5 + (0 if single_segment else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[descriptor & 3]
    declared = 24 if width == 1 else 300
    stored = declared - 256 if width == 2 else declared
    frame[offset : offset + width] = stored.to_bytes(width, "little")
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == declared
    return bytes(frame), declared


def write_crafted(directory: Path) -> dict[str, str]:
    """Write every CRAFTED file; returns path -> the MCNCError class name it must raise."""
    header, payloads = _base(directory)
    assert _tensor(header, "d") is header["tensors"][DENSE_TENSOR] and len(payloads) == 5
    assert header["tensors"][DENSE_TENSOR]["blob"] == DENSE_BLOB
    assert [header["tensors"][i]["encoding"] for i in PACKED_TENSORS] == ["packed"] * 2
    assert {header["tensors"][i]["blob"] for i in PACKED_TENSORS} == {PACK_BLOB}
    assert header["blobs"][PACK_BLOB]["shape"] == [PACK_BYTES]
    expected: dict[str, str] = {}
    for name, (mutate, error) in CRAFTED.items():
        h, p = copy.deepcopy(header), list(payloads)
        data = mutate(h, p)
        path = directory / f"{name}.mcnc"
        path.write_bytes(data if isinstance(data, bytes) else craft(h, p))
        expected[str(path)] = error
    return expected


def test_crafted_headers(results: dict[str, Any]) -> None:
    result = results["crafted"]
    assert result["cases"] == len(CRAFTED)
    assert not result["failures"], _report(result)


def test_unknown_encoding_leaves_other_tensors_readable(tmp_path: Path) -> None:
    header, payloads = _base(tmp_path)
    _set("tensors.3.encoding", "vq")(header, payloads)
    path = tmp_path / "vq.mcnc"
    path.write_bytes(craft(header, payloads))
    with mf.open(path) as f:
        assert set(f.tensors(["a", "b", "l", "p", "q"])) == {"a", "b", "l", "p", "q"}
        with pytest.raises(mf.UnsupportedFeatureError, match="'vq'"):
            f.get_tensor("d")


# -- external references (R75) -------------------------------------------------------------


def _external_file(tmp_path: Path, base: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    gen = GeneratorSpec(k=2, d=4, hidden=(3,), seed=3)
    segment = Segment(gen, torch.rand(3, 1, 2), torch.randn(3, 1))
    path = tmp_path / "ext.mcnc"
    mf.save(path, {"w": MCNC(segment, (3, 4), theta0=Theta0.external(
        "base.safetensors", "w", tensor_sha256(base)))})
    return path


@pytest.mark.parametrize("damage", ["changed", "reshaped", "renamed", "missing", "garbage",
                                    "truncated"])
def test_external_reference_damage(damage: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(8))
    path = _external_file(tmp_path, base)
    reference = tmp_path / "base.safetensors"
    assert mf.load(path)["w"].shape == (3, 4)
    if damage == "changed":
        base[1, 2] += 1e-3
        save_file({"w": base}, str(reference))
    elif damage == "reshaped":
        save_file({"w": base.reshape(4, 3)}, str(reference))
    elif damage == "renamed":
        save_file({"v": base}, str(reference))
    elif damage == "missing":
        reference.unlink()
    elif damage == "garbage":
        reference.write_bytes(b"\xff" * 64)
    else:
        reference.write_bytes(reference.read_bytes()[:-5])
    with pytest.raises(mf.ExternalReferenceError, match=r"base\.safetensors"):
        mf.load(path)


# -- writer input validation ---------------------------------------------------------------------


def _gen() -> GeneratorSpec:
    return GeneratorSpec(k=3, d=4, hidden=(5,), seed=1)


def _segment(chunks: int = 1, **kw: Any) -> Segment:
    return Segment(_gen(), kw.get("alpha", torch.rand(chunks, 1, 3)),
                   kw.get("beta", torch.rand(chunks, 1)), kw.get("codec", "raw"))


WRITER_CASES: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Any], str]] = {
    "alpha_shape": (lambda: {"w": MCNC(_segment(alpha=torch.rand(1, 1, 2)), (4,))}, {},
                    "alpha must have shape"),
    "alpha_rank": (lambda: {"w": MCNC(_segment(alpha=torch.rand(3)), (4,))}, {},
                   "alpha must have shape"),
    "beta_shape": (lambda: {"w": MCNC(_segment(beta=torch.rand(2, 1)), (4,))}, {},
                   "beta must have shape"),
    "chunk_count": (lambda: {"w": MCNC(_segment(chunks=3), (4,))}, {}, "chunks"),
    "alpha_dtype": (lambda: {"w": MCNC(_segment(alpha=torch.rand(1, 1, 3).double()), (4,))},
                    {}, "float32, float16 or bfloat16"),
    "m_too_big": (lambda: {"w": MCNC(_segment(alpha=torch.rand(1, 65, 3),
                                              beta=torch.rand(1, 65)), (4,))}, {}, "m must"),
    "int_mcnc_dtype": (lambda: {"w": MCNC(_segment(), (4,), dtype=torch.int32)}, {},
                       "floating point"),
    "bad_codec": (lambda: {"w": Dense(torch.ones(3), "gzip")}, {}, "codec"),
    "bad_segment_codec": (lambda: {"w": MCNC(_segment(codec="lz4"), (4,))}, {}, "codec"),
    "metadata_value": (lambda: {"w": torch.ones(2)}, {"metadata": {"k": 1}}, "metadata"),
    "metadata_key": (lambda: {"w": torch.ones(2)}, {"metadata": {1: "v"}}, "metadata"),
    "sparse": (lambda: {"w": torch.eye(3).to_sparse()}, {}, "sparse"),
    "unsupported_dtype": (lambda: {"w": torch.ones(2, dtype=torch.complex64)}, {},
                          "complex64"),
    "empty_name": (lambda: {"": torch.ones(2)}, {}, "non-empty"),
    "not_a_tensor": (lambda: {"w": [1.0, 2.0]}, {}, "expected a torch.Tensor"),
    "stored_theta0_shape": (lambda: {"w": MCNC(_segment(), (4,),
                                               theta0=Theta0.stored(torch.ones(5)))}, {},
                            "theta0"),
    "lora_shapes": (lambda: {"w": LoRA(A=MCNC(_segment(), (2, 2)),
                                       B=MCNC(_segment(), (2, 3)), scale=1.0)}, {},
                    "LoRA factors"),
    "lora_scale_nan": (lambda: {"w": LoRA(A=MCNC(_segment(), (1, 2)),
                                          B=MCNC(_segment(), (2, 1)), scale=math.nan)}, {},
                       "finite scale"),
    "alignment": (lambda: {"w": torch.ones(2)}, {"alignment": 100}, "alignment"),
    "seed_range": (lambda: {"w": MCNC(Segment(GeneratorSpec(k=3, d=4, hidden=(5,),
                                                            seed=1 << 33),
                                              torch.rand(1, 1, 3), torch.rand(1, 1)), (4,))},
                   {}, "uint32"),
    "fan_in_rank_1": (lambda: {"w": MCNC(_segment(), (4,), theta0=Theta0.fan_in_uniform(1, 2))},
                      {}, "fan_in_uniform"),
    "bad_external_uri": (lambda: {"w": MCNC(_segment(), (4,), theta0=Theta0.external(
        "../base.safetensors", "w", "0" * 64))}, {}, "R74"),
}


@pytest.mark.parametrize("case", list(WRITER_CASES))
def test_writer_rejects_bad_input(case: str, tmp_path: Path) -> None:
    build, kwargs, message = WRITER_CASES[case]
    path = tmp_path / "out.mcnc"
    with pytest.raises(mf.WriteError, match=message) as info:
        mf.save(path, build(), **kwargs)
    assert str(path) in str(info.value), "the message names the file"
    assert list(tmp_path.iterdir()) == [], "nothing is left behind"


# R52 holds at open even when another tensor uses a feature this reader does not know
# (SPEC.md §12 lets only R41 and R45's "unused" check be skipped).

@pytest.mark.parametrize("unknown", ["theta0_kind", "encoding"])
def test_r52_is_checked_beside_unknown_features(unknown: str, tmp_path: Path) -> None:
    header, payloads = _base(tmp_path)
    header["tensors"][PACKED_TENSORS[1]]["shape"] = [4]  # "q" covers 4 of the pack's last 5 bytes
    if unknown == "theta0_kind":
        header["tensors"][1]["theta0"] = {"kind": "future"}  # "b": R70, reported when read
    else:
        header["tensors"][DENSE_TENSOR]["encoding"] = "vq"  # "d": R46, reported when read
    path = tmp_path / "short-pack.mcnc"
    path.write_bytes(craft(header, payloads, preamble={"minor": 1}))
    with pytest.raises(mf.HeaderError, match="R52"):
        mf.open(path).close()


if __name__ == "__main__":
    started = time.monotonic()
    worker(sys.argv[1])
    print(f"worker done in {time.monotonic() - started:.1f} s", file=sys.stderr)
