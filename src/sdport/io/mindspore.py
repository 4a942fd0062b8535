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
from .protobuf import Fields, mapped, varint
from .writer import StreamWriter

#: MindSpore tensor_type ⇄ sdport dtype code
MS_TYPES = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Float64": "F64", "Int8": "I8", "UInt8": "U8",
            "Int16": "I16", "UInt16": "U16", "Int32": "I32", "UInt32": "U32", "Int64": "I64", "UInt64": "U64",
            "Bool": "BOOL"}
TYPE_NAMES = {code: name for name, code in MS_TYPES.items()}
SLICE = 512 << 20  # MindSpore's SLICE_SIZE: bytes of tensor content per chunk message
CRC_MAGIC = b"crc_num"
TRAILER = len(CRC_MAGIC) + 10


def looks_like(path: str, head: bytes) -> bool:
    """Whether a file's first bytes start a Checkpoint message: field 1 (value), then its field 1 (tag)."""
    if len(head) < 4 or head[0] != 0x0A:
        return False
    k = 1
    while k < len(head) and head[k] & 0x80:
        k += 1
    return k + 1 < len(head) and k <= 10 and head[k + 1] == 0x0A


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


def _tensor(t: Fields) -> tuple[list[int], str, int, int]:
    """dims, tensor_type, content offset and length of one TensorProto."""
    dims: list[int] = []
    kind, content = None, None
    for field, wire, value in t:
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed dims
            packed = t.sub(value)
            while packed.pos < packed.end:
                dims.append(packed.varint())
        elif field == 2 and wire == 2:
            kind = bytes(t.buf[value[0]:value[0] + value[1]]).decode("utf-8", "replace")
        elif field == 3 and wire == 2:
            content = value
    if kind is None or content is None:
        raise FormatError(t.path, f"a tensor ending at byte {t.end} lacks its type or content", "the file is damaged")
    return dims, kind, content[0], content[1]


def open_mindspore(path: str) -> TensorSource:
    """Open a MindSpore checkpoint lazily: names, dtypes, shapes and where each tensor's bytes lie."""
    chunks: dict[str, list[tuple[int, int]]] = {}
    heads: dict[str, tuple[tuple[int, ...], str]] = {}
    last = None
    with open(path, "rb", buffering=1 << 16) as f:
        end = _crc_end(path, f, os.fstat(f.fileno()).st_size)
    with mapped(path) as buf:
        for field, wire, span in Fields(path, buf, 0, end):
            if (field, wire) != (1, 2):
                raise FormatError(path, f"byte {span[0] if wire == 2 else 0}: not a Checkpoint value field",
                                  "not a MindSpore checkpoint")
            value = Fields(path, buf, span[0], span[0] + span[1])
            tag, tensor = None, None
            for n, w, v in value:
                if n == 1 and w == 2:
                    try:
                        tag = bytes(buf[v[0]:v[0] + v[1]]).decode("utf-8")
                    except UnicodeDecodeError:
                        raise FormatError(path, f"a parameter name at byte {v[0]} is not UTF-8", None) from None
                elif n == 2 and w == 2:
                    tensor = _tensor(value.sub(v))
                elif n == 3:
                    raise FormatError(path, f"parameter '{tag}' is a MapParameter", "sdport reads dense tensors only")
            if tag is None or tensor is None:
                raise FormatError(path, f"a value ending at byte {value.end} lacks its name or tensor", None)
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
