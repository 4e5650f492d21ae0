"""Rules that relate header entries to each other and to the file size (SPEC.md §4-§7, §12).

``validate_header`` runs once, when a file is opened and before any blob is touched, and again
in the writer before anything is written: a header that passes cannot make the reader read
outside the file or allocate more than the file and the limits of §9 justify.
"""

from __future__ import annotations

import math

from . import constants as C
from .errors import FormatError, HeaderError
from .header import (
    BlobEntry,
    BlobTheta0,
    DenseTensor,
    FanInUniformTheta0,
    Header,
    InlineWeights,
    LoRATensor,
    MemberEntry,
    PackedTensor,
    TensorEntry,
    Theta0Entry,
)

__all__ = ["align_up", "blob_layout", "data_start", "validate_header"]


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def data_start(header_length: int, alignment: int) -> int:
    return align_up(C.PREAMBLE_SIZE + header_length, alignment)


def blob_layout(start: int, lengths: list[int], alignment: int) -> list[int]:
    """Offsets of §4's placement: each blob at the next aligned offset after the previous."""
    offsets = []
    position = start
    for length in lengths:
        position = align_up(position, alignment)
        offsets.append(position)
        position += length
    return offsets


def validate_header(header: Header, header_length: int, file_size: int, source: str) -> None:
    """Check R20-R23 and R40-R75 (all but the blob bytes and external files)."""
    _check_blob_placement(header, header_length, file_size, source)
    for i, blob in enumerate(header.blobs):
        _check_blob_size(blob, f"blobs[{i}]", source)
    _Checker(header, source).run()


def _check_blob_placement(header: Header, header_length: int, file_size: int, source: str) -> None:
    start = data_start(header_length, header.alignment)
    expected = blob_layout(start, [b.length for b in header.blobs], header.alignment)
    for i, (blob, offset) in enumerate(zip(header.blobs, expected, strict=True)):
        if blob.offset != offset:
            raise FormatError(
                f"expected {offset} (blobs tile the data region in order at "
                f"{header.alignment}-byte alignment), got {blob.offset}",
                rule="R20", path=source, field=f"blobs[{i}].offset")
    end = header.blobs[-1].offset + header.blobs[-1].length if header.blobs else start
    if end != file_size:
        what = "is truncated" if end > file_size else "has trailing bytes"
        raise FormatError(
            f"the file is {file_size} bytes but its header accounts for {end}: the file {what}."
            " Re-download or re-write it", rule="R21", path=source)


def _check_blob_size(blob: BlobEntry, path: str, source: str) -> None:
    decoded = blob.decoded_length
    if blob.codec == C.Codec.RAW and blob.length != decoded:
        raise HeaderError(
            f"a raw {blob.dtype} blob of shape {list(blob.shape)} is {decoded} bytes, got "
            f"{blob.length}", rule="R23", path=source, field=f"{path}.length")
    if blob.codec == C.Codec.ZSTD:
        allowance = max(C.MAX_ZSTD_RATIO * blob.length, C.ZSTD_MIN_DECODED_ALLOWANCE)
        if decoded > allowance:
            raise HeaderError(
                f"a zstd blob of {blob.length} bytes may decode to at most {allowance} bytes, but "
                f"its shape needs {decoded}", rule="R23", path=source, field=path)


class _Checker:
    """Cross-reference checks; collects blob uses and segment members as it goes."""

    def __init__(self, header: Header, source: str) -> None:
        self.header = header
        self.source = source
        self.blob_users: dict[int, str] = {}
        self.members: dict[int, list[tuple[int, int, str]]] = {}
        self.packs: dict[int, int] = {}  # pack blob -> bytes its packed tensors take

    def error(self, path: str, message: str, rule: str | None = None) -> HeaderError:
        return HeaderError(message, rule=rule, path=self.source, field=path)

    def use_blob(self, index: int, path: str) -> BlobEntry:
        if index >= len(self.header.blobs):
            raise self.error(path, f"blob index {index} is out of range: the file has "
                             f"{len(self.header.blobs)} blobs", rule="R45")
        if index in self.blob_users:
            raise self.error(path, f"blob {index} is already used by {self.blob_users[index]}; "
                             "every blob but a pack is used exactly once", rule="R45")
        self.blob_users[index] = path
        return self.header.blobs[index]

    def use_pack(self, tensor: PackedTensor, path: str) -> None:
        """R52: a pack blob is u8 of rank 1; it is shared by packed tensors only, since any
        other use of it goes through ``use_blob`` and finds it taken (R45)."""
        if tensor.blob not in self.packs:
            blob = self.use_blob(tensor.blob, f"{path}.blob")
            if blob.dtype != C.PACK_DTYPE or len(blob.shape) != 1:
                raise self.error(f"{path}.blob", f"a pack blob is {C.PACK_DTYPE} of rank 1, got "
                                 f"{blob.dtype} {list(blob.shape)}", rule="R52")
            self.packs[tensor.blob] = 0
        self.packs[tensor.blob] += tensor.nbytes
        size = self.header.blobs[tensor.blob].numel
        if self.packs[tensor.blob] > size:  # checked as we go: also when check_packs cannot run
            raise self.error(f"{path}.blob", f"packed tensor {tensor.name!r} ends at byte "
                             f"{self.packs[tensor.blob]} of a {size}-byte pack blob", rule="R52")

    def check_packs(self) -> None:
        for index, used in self.packs.items():
            size = self.header.blobs[index].numel
            if used != size:
                raise self.error(f"blobs[{index}]", f"its packed tensors take {used} bytes of "
                                 f"its {size}; packed tensors tile their blob exactly", rule="R52")

    def run(self) -> None:
        for i, gen in enumerate(self.header.generators):
            if isinstance(gen.weights, InlineWeights):
                self.check_inline_generator(i)
        for i in range(len(self.header.segments)):
            self.check_segment(i)
        names: set[str] = set()
        all_known = True
        for i, tensor in enumerate(self.header.tensors):
            path = f"tensors[{i}]"
            if tensor.name in names:
                raise self.error(f"{path}.name", f"duplicate tensor name {tensor.name!r}",
                                 rule="R42")
            names.add(tensor.name)
            all_known &= self.check_tensor(tensor, path)
        # Completeness (every segment value and every blob used) is checkable only when every
        # reference is visible: an entry of an unknown encoding or theta0 kind may use blobs
        # and segment values, and so may a key of a newer minor version (§13).
        sees_all = all_known and self.header.minor <= C.FORMAT_MINOR
        self.check_members(complete=sees_all)
        self.check_packs()  # packs are used by packed tensors only, which this reader knows
        if sees_all and len(self.blob_users) != len(self.header.blobs):
            unused = sorted(set(range(len(self.header.blobs))) - set(self.blob_users))
            raise self.error("blobs", f"blob(s) {unused[:8]} are not used by any entry; every "
                             "blob is used exactly once", rule="R45")

    def check_inline_generator(self, index: int) -> None:
        gen = self.header.generators[index]
        path = f"generators[{index}].weights.blobs"
        shapes = gen.parameter_shapes()
        assert isinstance(gen.weights, InlineWeights)
        blobs = gen.weights.blobs
        if len(blobs) != len(shapes):
            raise self.error(path, f"expected {len(shapes)} blobs for widths {list(gen.widths)}"
                             f" (bias={gen.bias}), got {len(blobs)}", rule="R33")
        for j, (blob_index, shape) in enumerate(zip(blobs, shapes, strict=True)):
            blob = self.use_blob(blob_index, f"{path}[{j}]")
            if blob.dtype != "f32" or blob.shape != shape:
                raise self.error(f"{path}[{j}]", f"expected an f32 blob of shape {list(shape)}, "
                                 f"got {blob.dtype} {list(blob.shape)}", rule="R33")

    def check_segment(self, index: int) -> None:
        seg = self.header.segments[index]
        path = f"segments[{index}]"
        if seg.generator >= len(self.header.generators):
            raise self.error(f"{path}.generator", f"generator {seg.generator} does not exist; "
                             f"the file has {len(self.header.generators)}", rule="R45")
        gen = self.header.generators[seg.generator]
        for key, index_, shape in (
            ("alpha", seg.alpha, (seg.chunks, seg.m, gen.k)),
            ("beta", seg.beta, (seg.chunks, seg.m)),
        ):
            blob = self.use_blob(index_, f"{path}.{key}")
            if blob.shape != shape or blob.dtype not in C.ALPHA_BETA_DTYPES:
                raise self.error(
                    f"{path}.{key}",
                    f"expected a {'/'.join(C.ALPHA_BETA_DTYPES)} blob of shape {list(shape)}, "
                    f"got {blob.dtype} {list(blob.shape)}",
                    rule="R40",
                )

    def check_tensor(self, tensor: TensorEntry, path: str) -> bool:
        """Checks one tensor; returns False when it uses features this reader does not know."""
        if not tensor.known:
            return False
        if isinstance(tensor, DenseTensor):
            blob = self.use_blob(tensor.blob, f"{path}.blob")
            if blob.dtype != tensor.dtype or blob.shape != tensor.shape:
                raise self.error(f"{path}.blob", f"expected a {tensor.dtype} blob of shape "
                                 f"{list(tensor.shape)}, got {blob.dtype} {list(blob.shape)}",
                                 rule="R51")
            return True
        if isinstance(tensor, PackedTensor):
            self.use_pack(tensor, path)
            return True
        if not isinstance(tensor, LoRATensor):  # mcnc: the tensor is its one member
            (member,) = tensor.members()
            return self.check_member(member, path, tensor.name)
        if len(tensor.shape) != 2:
            raise self.error(f"{path}.shape", f"a lora tensor has rank 2, got {len(tensor.shape)}",
                             rule="R60")
        out_dim, in_dim = tensor.shape
        r = tensor.A.shape[0] if tensor.A.shape else 0
        if r < 1 or tensor.A.shape != (r, in_dim) or tensor.B.shape != (out_dim, r):
            raise self.error(path, f"lora factors must be A [r, {in_dim}] and B [{out_dim}, r] "
                             f"with r >= 1, got A {list(tensor.A.shape)} and B "
                             f"{list(tensor.B.shape)}", rule="R60")
        known = self.check_theta0(tensor.theta0, tensor.shape, f"{path}.theta0")
        known &= self.check_member(tensor.A, f"{path}.A", f"{tensor.name}:A")
        return known & self.check_member(tensor.B, f"{path}.B", f"{tensor.name}:B")

    def check_member(self, member: MemberEntry, path: str, label: str) -> bool:
        if member.segment >= len(self.header.segments):
            raise self.error(f"{path}.segment", f"segment {member.segment} does not exist; the "
                             f"file has {len(self.header.segments)}", rule="R45")
        seg = self.header.segments[member.segment]
        capacity = seg.chunks * self.header.generators[seg.generator].d
        if member.offset + member.numel > capacity:
            raise self.error(f"{path}.offset", f"member {label!r} ends at element "
                             f"{member.offset + member.numel}, past its segment's {seg.chunks} "
                             f"chunks of {capacity // max(seg.chunks, 1)} values", rule="R41")
        self.members.setdefault(member.segment, []).append((member.offset, member.numel, label))
        return self.check_theta0(member.theta0, member.shape, f"{path}.theta0")

    def check_theta0(self, theta0: Theta0Entry, shape: tuple[int, ...], path: str) -> bool:
        if not theta0.known:
            return False
        if isinstance(theta0, BlobTheta0):
            blob = self.use_blob(theta0.blob, f"{path}.blob")
            if blob.dtype not in C.FLOAT_DTYPES or blob.shape != shape:
                raise self.error(f"{path}.blob", f"expected a float blob of shape {list(shape)}, "
                                 f"got {blob.dtype} {list(blob.shape)}", rule="R73")
        if isinstance(theta0, FanInUniformTheta0) and (len(shape) < 2 or
                                                       math.prod(shape[1:]) < 1):
            raise self.error(f"{path}.scheme", f"fan_in_uniform needs a tensor of rank >= 2 with"
                             f" fan_in >= 1, got shape {list(shape)}", rule="R72")
        return True

    def check_members(self, complete: bool) -> None:
        """R41. Without every member in view (``complete`` False: an unknown encoding or
        theta0 kind, or a newer minor, §13) only overlaps between the known members count:
        a gap or a segment without members may be filled by what this reader cannot see."""
        for index, seg in enumerate(self.header.segments):
            members = sorted(self.members.get(index, []))
            if not members and complete:
                raise self.error(f"segments[{index}]", "no tensor uses this segment", rule="R41")
            position = 0
            for offset, numel, label in members:
                if offset < position or (offset > position and complete):
                    kind = "overlaps" if offset < position else "leaves a gap before"
                    raise self.error(f"segments[{index}]", f"member {label!r} at offset {offset} "
                                     f"{kind} element {position}; members must tile the segment",
                                     rule="R41")
                position = offset + numel
            d = self.header.generators[seg.generator].d
            if complete and seg.chunks != -(-position // d):
                raise self.error(f"segments[{index}].chunks", f"members hold {position} values, "
                                 f"which need ceil({position} / {d}) = {-(-position // d)} chunks,"
                                 f" got {seg.chunks}", rule="R41")
