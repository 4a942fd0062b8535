"""MindSpore ``.ckpt`` files, read and written without MindSpore: a stream of protobuf ``Checkpoint`` messages.

MindSpore (``mindspore.save_checkpoint``) writes one serialized ``Checkpoint`` message per
parameter chunk — ``value { tag: name, tensor { dims…, tensor_type: "Float32", tensor_content } }``
— and concatenates them; a parameter over 512 MiB is cut into 512 MiB chunks, each repeating the
name, dims and type. An optional trailer ``b"crc_num"`` + 10 bytes (the CRC32 of everything before
it, big-endian) may follow. The reader walks the length-delimited fields and records where each
tensor's bytes lie, never parsing or copying the content (a chunked parameter becomes a tensor with
several byte ranges); the writer emits the exact bytes protobuf's serializer would, field by field,
streaming the content, so its files are byte-identical to MindSpore's for the same tensors.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence

from ..dtypes import BY_CODE
from ..errors import FormatError
from .base import Slot, TensorInfo, TensorSource
from .writer import StreamWriter

#: MindSpore tensor_type ⇄ sdport dtype code
MS_TYPES = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Float64": "F64", "Int8": "I8", "UInt8": "U8",
            "Int16": "I16", "UInt16": "U16", "Int32": "I32", "UInt32": "U32", "Int64": "I64", "UInt64": "U64",
            "Bool": "BOOL"}
TYPE_NAMES = {code: name for name, code in MS_TYPES.items()}
SLICE = 512 << 20  # MindSpore's SLICE_SIZE: bytes of tensor content per chunk message
CRC_MAGIC = b"crc_num"
TRAILER = len(CRC_MAGIC) + 10


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def looks_like(head: bytes) -> bool:
    """Whether a file's first bytes start a Checkpoint message: field 1 (value), then its field 1 (tag)."""
    if len(head) < 4 or head[0] != 0x0A:
        return False
    k = 1
    while k < len(head) and head[k] & 0x80:
        k += 1
    return k + 1 < len(head) and k <= 10 and head[k + 1] == 0x0A


class _Reader:
    """Varints and length-delimited fields of a file, through a small read buffer."""

    def __init__(self, path: str, f, end: int):
        self.path, self.f, self.end = path, f, end

    @property
    def pos(self) -> int:
        return self.f.tell()

    def byte(self, limit: int) -> int:
        if self.pos >= limit:
            raise FormatError(self.path, f"protobuf field runs past its message at byte {self.pos}", "the file is "
                              "truncated or not a MindSpore checkpoint")
        b = self.f.read(1)
        if not b:
            raise FormatError(self.path, "file ends inside a protobuf field", "the file is truncated")
        return b[0]

    def varint(self, limit: int) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte(limit)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise FormatError(self.path, f"malformed varint at byte {self.pos}", "the file is damaged")

    def length(self, limit: int) -> int:
        n = self.varint(limit)
        if self.pos + n > limit:
            raise FormatError(self.path, f"a field of {n} bytes at byte {self.pos} runs past its message "
                              f"(ends at {limit})", "the file is truncated or damaged")
        return n

    def skip(self, wire: int, limit: int) -> None:
        if wire == 0:
            self.varint(limit)
        elif wire == 2:
            self.f.seek(self.length(limit), os.SEEK_CUR)
        elif wire in (1, 5):
            self.f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        else:
            raise FormatError(self.path, f"unknown protobuf wire type {wire} at byte {self.pos}", "the file is damaged")


def _crc_end(path: str, f, size: int) -> int:
    """Where the checkpoint messages end: before a ``crc_num`` trailer (verified) or at the end of the file."""
    if size < TRAILER:
        return size
    f.seek(size - TRAILER)
    tail = f.read(TRAILER)
    if not tail.startswith(CRC_MAGIC):
        return size
    want = int.from_bytes(tail[len(CRC_MAGIC):], "big")
    f.seek(0)
    crc, left = 0, size - TRAILER
    while left:
        block = f.read(min(left, 16 << 20))
        crc, left = zlib.crc32(block, crc), left - len(block)
    if crc != want:
        raise FormatError(path, f"CRC trailer says {want:#010x}, the content has {crc:#010x}", "the file is damaged")
    return size - TRAILER


def _tensor(r: _Reader, limit: int) -> tuple[list[int], str, int, int]:
    """dims, tensor_type, content offset and length of one TensorProto ending at ``limit``."""
    dims: list[int] = []
    kind, offset, nbytes = None, -1, -1
    while r.pos < limit:
        key = r.varint(limit)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            dims.append(r.varint(limit))
        elif field == 1 and wire == 2:  # packed dims
            n = r.length(limit)
            end = r.pos + n
            while r.pos < end:
                dims.append(r.varint(end))
        elif field == 2 and wire == 2:
            kind = r.f.read(r.length(limit)).decode("utf-8", "replace")
        elif field == 3 and wire == 2:
            nbytes = r.length(limit)
            offset = r.pos
            r.f.seek(nbytes, os.SEEK_CUR)
        else:
            r.skip(wire, limit)
    if kind is None or offset < 0:
        raise FormatError(r.path, f"a tensor at byte {limit} lacks its type or content", "the file is damaged")
    return dims, kind, offset, nbytes


def open_mindspore(path: str) -> TensorSource:
    """Open a MindSpore checkpoint lazily: names, dtypes, shapes and where each tensor's bytes lie."""
    chunks: dict[str, list[tuple[int, int]]] = {}
    heads: dict[str, tuple[tuple[int, ...], str]] = {}
    last = None
    with open(path, "rb", buffering=1 << 16) as f:
        size = os.fstat(f.fileno()).st_size
        end = _crc_end(path, f, size)
        f.seek(0)
        r = _Reader(path, f, end)
        while r.pos < end:
            if r.varint(end) != 0x0A:
                raise FormatError(path, f"byte {r.pos}: not a Checkpoint value field", "not a MindSpore checkpoint")
            n = r.length(end)
            value_end = r.pos + n
            tag, tensor = None, None
            while r.pos < value_end:
                key = r.varint(value_end)
                field, wire = key >> 3, key & 7
                if field == 1 and wire == 2:
                    raw = r.f.read(r.length(value_end))
                    try:
                        tag = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise FormatError(path, f"a parameter name at byte {r.pos} is not UTF-8", None) from None
                elif field == 2 and wire == 2:
                    n = r.length(value_end)
                    tensor = _tensor(r, r.pos + n)
                elif field == 3:
                    raise FormatError(path, f"parameter '{tag}' is a MapParameter", "sdport reads dense tensors only")
                else:
                    r.skip(wire, value_end)
            if tag is None or tensor is None:
                raise FormatError(path, f"a value ending at byte {value_end} lacks its name or tensor", None)
            dims, kind, offset, nbytes = tensor
            if kind not in MS_TYPES:
                raise FormatError(path, f"parameter '{tag}' has tensor type '{kind}'",
                                  f"sdport reads {', '.join(MS_TYPES)}")
            if tag in heads and (heads[tag] != (tuple(dims), kind) or last != tag):  # chunks come in a row
                raise FormatError(path, f"parameter '{tag}' appears twice", "the file is damaged")
            heads[tag], last = (tuple(dims), kind), tag
            chunks.setdefault(tag, []).append((offset, nbytes))
    tensors = {}
    for tag, (dims, kind) in heads.items():
        code = MS_TYPES[kind]
        total = sum(n for _, n in chunks[tag])
        if total != math.prod(dims) * BY_CODE[code].itemsize:
            raise FormatError(path, f"parameter '{tag}' {list(dims)} {kind} holds {total} bytes",
                              "its dims disagree with its content: the file is damaged")
        parts = chunks[tag]
        tensors[tag] = TensorInfo(tag, code, dims, path, parts[0][0], total,
                                  chunks=tuple(parts) if len(parts) > 1 else None)
    return TensorSource(path=path, format="mindspore", tensors=tensors)


class MindSporeWriter(StreamWriter):
    """Write a MindSpore checkpoint byte-identical to ``mindspore.save_checkpoint``'s, atomically.

    ``crc`` appends MindSpore's optional ``crc_num`` trailer; every byte then passes through memory
    (no kernel copies) so that it enters the CRC.
    """

    def __init__(self, target: str, *, force: bool = False, crc: bool = False):
        super().__init__(target, force=force)
        self.want_trailer = crc
        self.file_crc = 0
        self.done = 0  # content bytes of the current tensor written so far

    def _start(self, slots: Sequence[Slot], metadata: dict[str, str]) -> None:
        for s in slots:
            if s.dtype not in TYPE_NAMES:
                raise FormatError(None, f"tensor '{s.name}' is {s.dtype}, which MindSpore checkpoints cannot hold",
                                  None)

    def _out(self, data: bytes | memoryview, tensor: bool = False) -> None:
        if self.want_trailer:
            self.file_crc = zlib.crc32(data, self.file_crc)
        super().emit(data, tensor=tensor)

    def _chunk_header(self, slot: Slot, start: int) -> bytes:
        """The bytes before a chunk's content, as protobuf serializes them (fields in number order)."""
        nbytes = min(SLICE, slot.nbytes - start)
        tag = slot.name.encode("utf-8")
        kind = TYPE_NAMES[slot.dtype].encode()
        proto = b"".join(b"\x08" + varint(d) for d in slot.shape) + b"\x12" + varint(len(kind)) + kind \
            + b"\x1a" + varint(nbytes)
        value = b"\x0a" + varint(len(tag)) + tag + b"\x12" + varint(len(proto) + nbytes) + proto
        return b"\x0a" + varint(len(value) + nbytes) + value

    def _begin_tensor(self, slot: Slot) -> None:
        self.done = 0
        self._out(self._chunk_header(slot, 0))

    def emit(self, data: bytes | memoryview, *, tensor: bool = False) -> None:
        if not tensor:
            self._out(data)
            return
        view = memoryview(data).cast("B")
        slot = self.slots[self.index]
        while view:
            if self.done and self.done % SLICE == 0:
                self._out(self._chunk_header(slot, self.done))
            room = SLICE - self.done % SLICE
            self._out(view[:room], tensor=True)
            self.done += min(room, len(view))
            view = view[room:]

    def copy(self, name: str, src_fd: int, offset: int, nbytes: int, src_path: str) -> None:
        slot = self._next(name)
        if nbytes != slot.nbytes:
            raise RuntimeError(f"tensor '{name}': {nbytes} bytes for a slot of {slot.nbytes}")
        if self.want_trailer:
            self._copy_through_memory(src_fd, offset, nbytes, src_path)  # through emit: chunked and CRC'd
        else:
            while self.done < nbytes:
                if self.done:
                    self._out(self._chunk_header(slot, self.done))
                n = min(SLICE, nbytes - self.done)
                self._copy_in_kernel(src_fd, offset + self.done, n, src_path)
                self.done += n
        self._close_tensor(slot)

    def _finish(self) -> None:
        if self.want_trailer:
            super().emit(CRC_MAGIC + self.file_crc.to_bytes(10, "big"))
