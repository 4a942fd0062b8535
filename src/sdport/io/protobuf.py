"""The protobuf wire format, as far as sdport's readers and writers need it, without protobuf's parser.

``varint`` encodes; ``Fields`` walks the fields of one message lying in a mapped file and gives each
length-delimited field as (offset, length) — never copying a tensor's bytes — so a reader records where
weights lie (MindSpore checkpoints, ONNX models) and parses only the small fields around them.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import FormatError


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Fields:
    """The fields of one protobuf message lying at [start, end) of a mapped file."""

    def __init__(self, path: str, buf, start: int, end: int):
        self.path, self.buf, self.pos, self.end = path, buf, start, end

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= self.end:
                raise FormatError(self.path, "a message ends inside a field", "the file is truncated or damaged")
            b = self.buf[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise FormatError(self.path, f"malformed varint at byte {self.pos}", "the file is damaged")

    def __iter__(self):
        """(field number, wire type, value): varints as ints, length-delimited fields as (offset, length)."""
        while self.pos < self.end:
            key = self.varint()
            number, wire = key >> 3, key & 7
            if wire == 0:
                yield number, wire, self.varint()
            elif wire == 2:
                n = self.varint()
                if self.pos + n > self.end:
                    raise FormatError(self.path, "a field runs past its message", "the file is truncated")
                yield number, wire, (self.pos, n)
                self.pos += n
            elif wire in (1, 5):
                self.pos += 8 if wire == 1 else 4
                if self.pos > self.end:
                    raise FormatError(self.path, "a field runs past its message", "the file is truncated")
                yield number, wire, None
            else:
                raise FormatError(self.path, f"unsupported protobuf wire type {wire} at byte {self.pos}",
                                  "the file is damaged")

    def text(self, span: tuple[int, int]) -> str:
        try:
            return bytes(self.buf[span[0]:span[0] + span[1]]).decode()
        except UnicodeDecodeError as exc:
            raise FormatError(self.path, "a name is not UTF-8", "the file is damaged") from exc

    def sub(self, span: tuple[int, int]) -> Fields:
        return Fields(self.path, self.buf, span[0], span[0] + span[1])


@contextmanager
def mapped(path: str) -> Iterator[mmap.mmap | bytes]:
    """The file mapped read-only (pages are read only where a field is looked at); an empty file is ``b""``."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf
