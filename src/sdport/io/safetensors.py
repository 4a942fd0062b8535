"""safetensors: a strict header reader (→ TensorSource) and a streaming writer.

The reader applies every check of the reference implementation and the ones it misses (duplicate
JSON keys at any level, NaN tokens, non-string metadata); the writer emits the header first and
then the tensor bytes in header order, from arrays or straight from another file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence

from ..dtypes import BY_CODE
from ..errors import FormatError
from .base import Slot, TensorInfo, TensorSource
from .writer import StreamWriter

MAX_HEADER = 100_000_000
_WHITESPACE = b" \t\n\r"
_FIELDS = {"dtype", "shape", "data_offsets"}


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _no_constants(token: str) -> object:
    raise ValueError(f"'{token}' is not valid JSON")


Entry = tuple[str, tuple[int, ...], int, int]  # dtype, shape, begin, end


def parse_header(path: str, head: bytes, data_size: int) -> tuple[dict[str, Entry], dict[str, str]]:
    """Validate a header's bytes; return name → (dtype, shape, begin, end) in offset order, and metadata."""
    stripped = head.strip(_WHITESPACE)
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "header is not UTF-8", "not a safetensors file, or a damaged one") from None
    if not text.startswith("{"):
        raise FormatError(path, "header must be a JSON object", "not a safetensors file")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ValueError as exc:
        if "duplicate key" in str(exc):
            raise FormatError(path, str(exc), "the header names a tensor twice; the file is unsafe to read") from None
        raise FormatError(path, "header is not valid JSON", "the file is damaged or not safetensors") from None
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(path, "__metadata__ values must be strings", "the header breaks the safetensors format")
    entries = {name: _entry(path, name, spec) for name, spec in doc.items()}
    ordered = dict(sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])))
    _check_layout(path, ordered, data_size)
    return ordered, metadata


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: str, name: str, spec: object) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(spec, dict) or set(spec) != _FIELDS:
        raise FormatError(path, f"tensor {name!r}: missing field or unexpected field in header entry",
                          "expected exactly dtype, shape, data_offsets")
    dt, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dt, str) or dt not in BY_CODE:
        raise FormatError(path, f"unsupported dtype {dt!r} for tensor {name!r}",
                          f"sdport reads {', '.join(BY_CODE)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(path, f"invalid tensor shape {shape!r} for tensor {name!r}", None)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or offsets[0] < 0 or offsets[1] < offsets[0]):
        raise FormatError(path, f"invalid data_offsets {offsets!r} for tensor {name!r}", None)
    return dt, tuple(shape), offsets[0], offsets[1]


def _check_layout(path: str, ordered: dict[str, tuple[str, tuple[int, ...], int, int]], data_size: int) -> None:
    expect = 0
    for name, (dt, shape, begin, end) in ordered.items():
        nbytes = math.prod(shape) * BY_CODE[dt].itemsize
        if nbytes > data_size:
            raise FormatError(path, f"tensor size overflow for {name!r} (shape {list(shape)})",
                              "the header claims more bytes than the file has")
        if begin != expect:
            raise FormatError(path, f"overlapping or non-contiguous offsets at tensor {name!r}",
                              "the file is damaged or crafted")
        if end - begin != nbytes:
            raise FormatError(path, f"byte length does not match shape and dtype for tensor {name!r} "
                              f"({end - begin} bytes for {dt} {list(shape)})", None)
        expect = end
    if expect < data_size:
        raise FormatError(path, f"file has trailing bytes ({data_size - expect} after the last tensor)",
                          "the file is damaged or a polyglot")
    if expect > data_size:
        raise FormatError(path, f"file is truncated ({expect - data_size} bytes missing)",
                          "download the file again")


def open_safetensors(path: str) -> TensorSource:
    """Read and validate a safetensors header; return the lazy source of its tensors."""
    size = os.path.getsize(path)
    if size < 8:
        raise FormatError(path, "file too small to be safetensors", None)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise FormatError(path, f"header too large ({n} bytes; the limit is {MAX_HEADER})", None)
        if 8 + n > size:
            raise FormatError(path, "header length exceeds file", "the file is truncated or not safetensors")
        head = f.read(n)
    ordered, metadata = parse_header(path, head, size - 8 - n)
    base = 8 + n
    tensors = {name: TensorInfo(name, dt, shape, path, base + begin, end - begin)
               for name, (dt, shape, begin, end) in ordered.items()}
    return TensorSource(path=path, format="safetensors", tensors=tensors, metadata=dict(metadata))


def header_bytes(slots: Iterable[Slot], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for ``slots`` in order, padded with spaces to 8 bytes."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for s in slots:
        if s.name == "__metadata__":
            raise FormatError(None, "a tensor cannot be named __metadata__", None)
        if s.name in doc:
            raise FormatError(None, f"tensor {s.name!r} written twice", None)
        doc[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    head = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-(len(head) + 8) % 8)
    return struct.pack("<Q", len(head)) + head



class SafetensorsWriter(StreamWriter):
    """Write a safetensors file: header from the slots, then tensor bytes in slot order, atomically.

    Example::

        with SafetensorsWriter("out.safetensors") as w:
            w.begin([Slot("w", "F16", (2, 2))], {"format": "pt"})
            w.write("w", np.zeros((2, 2), np.float16))
            w.commit()
    """

    def _start(self, slots: Sequence[Slot], metadata: dict[str, str]) -> None:
        self.emit(header_bytes(slots, metadata))
