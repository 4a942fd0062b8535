"""ONNX model files, written and read without loading their weights: initializers streamed as protobuf fields.

An ONNX file is one protobuf ``ModelProto``; its ``graph`` field holds the nodes and the weights
(``initializer`` ``TensorProto`` messages, each with its bytes in ``raw_data`` or, past 2 GB, in an
external data file named by ``location``/``offset``/``length``). The writer takes the model and its
graph serialized *without* initializers (from the exporter) and appends every initializer field by
field as protobuf itself would encode it, streaming ``raw_data`` (inline) or the external data file,
so no weight is ever held whole. The reader walks the same fields and records where each
initializer's bytes lie (``TensorInfo``), never parsing the graph's nodes unless asked, and checks
every external-data reference: a plain file name inside the model's folder, no symlink or hard link,
offsets and lengths inside the file and equal to the tensor's size.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from contextlib import contextmanager

from ..dtypes import BY_CODE
from ..errors import FormatError
from .atomic import AtomicFile, disk_error
from .base import Slot, TensorInfo, TensorSource
from .protobuf import Fields, mapped, varint
from .writer import StreamWriter

#: ONNX TensorProto.DataType ⇄ sdport dtype code
ONNX_TYPES = {1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL", 10: "F16", 11: "F64",
              12: "U32", 13: "U64", 16: "BF16"}
TYPE_CODES = {code: n for n, code in ONNX_TYPES.items()}
#: protobuf's hard limit on one message; a model whose weights come within EXTERNAL_MARGIN of it keeps them in an
#: external data file, under one of the names the pipelines' exporters use (diffusers' script, optimum)
PROTO_LIMIT = 2 << 30
EXTERNAL_MARGIN = 64 << 20
DATA_FILE_NAMES = ("weights.pb", "model.onnx_data")
#: tensors of this size or more start at a multiple of ALIGN in an external data file (as onnx's own saver
#: does), so onnxruntime can map them instead of copying
ALIGN_FROM, ALIGN = 1 << 20, 64 << 10
EXTERNAL_KEYS = {"location", "offset", "length", "checksum", "basepath"}


#: ModelProto fields that may follow ``ir_version`` (field 1, always first: protobuf writes fields in order)
_MODEL_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2}


def looks_like(path: str, head: bytes) -> bool:
    """Whether a file's first bytes start an ONNX ModelProto: ``ir_version`` (a small number), then a model field."""
    if len(head) < 3 or head[0] != 0x08 or not 1 <= head[1] < 0x80:
        return False
    return head[2] in _MODEL_TAGS


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, bytes."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _tensor_head(slot: Slot) -> bytes:
    """A TensorProto's fields before its bytes: dims (1), data_type (2), name (8)."""
    dims = b"".join(b"\x08" + varint(d) for d in slot.shape)
    return dims + b"\x10" + varint(TYPE_CODES[slot.dtype]) + _field(8, slot.name.encode())


def _external_fields(location: str, offset: int, length: int) -> bytes:
    """external_data (13) entries and data_location (14) = EXTERNAL."""
    entries = b"".join(_field(13, _field(1, k.encode()) + _field(2, v.encode()))
                       for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))))
    return entries + b"\x70\x01"


def needs_external(nbytes: int, model: bytes, graph: bytes) -> bool:
    """Whether weights of ``nbytes`` must go to an external file beside this model and graph."""
    return nbytes + len(model) + len(graph) > PROTO_LIMIT - EXTERNAL_MARGIN


def external_offsets(slots: Sequence[Slot]) -> list[int]:
    """Where each tensor starts in an external data file: in order, big ones aligned to ALIGN."""
    offsets, pos = [], 0
    for s in slots:
        if s.nbytes >= ALIGN_FROM:
            pos = -(-pos // ALIGN) * ALIGN
        offsets.append(pos)
        pos += s.nbytes
    return offsets


class OnnxWriter(StreamWriter):
    """Write ``model.onnx`` (model + graph without weights, from the exporter) with the tensors as initializers.

    With ``external`` (a plain file name), the tensors' bytes go to that file beside the model and
    the model's initializers point at them; else each tensor is a ``raw_data`` field inside the model.
    Either way the bytes are streamed and the files appear only on ``commit``.
    """

    def __init__(self, target: str, model: bytes, graph: bytes, *, external: str | None = None,
                 force: bool = False):
        self.model_path = target
        self.external = external
        if external is not None:
            if os.path.basename(external) != external or external in ("", ".", ".."):
                raise ValueError(f"external data name {external!r} is not a plain file name")
            target = os.path.join(os.path.dirname(target), external)
        super().__init__(target, force=force)
        self.model, self.graph = model, graph
        self.offsets: list[int] = []

    def _start(self, slots: Sequence[Slot], metadata: dict[str, str]) -> None:
        for s in slots:
            if s.dtype not in TYPE_CODES:
                raise FormatError(None, f"tensor '{s.name}' is {s.dtype}, which ONNX cannot hold", None)
        if self.external is not None:
            self.offsets = external_offsets(slots)
            return
        inits = [self._inline_head(s) for s in slots]
        size = len(self.graph) + sum(len(h) + s.nbytes for h, s in zip(inits, slots, strict=True))
        if len(self.model) + size + 16 > PROTO_LIMIT:
            raise FormatError(self.model_path, "weights too large to keep inside the model", "write external data")
        self.emit(self.model + varint(7 << 3 | 2) + varint(size) + self.graph)

    @staticmethod
    def _inline_head(slot: Slot) -> bytes:
        """initializer (5) { head, raw_data (9) } up to the first byte of the data."""
        body = _tensor_head(slot) + varint(9 << 3 | 2) + varint(slot.nbytes)
        return varint(5 << 3 | 2) + varint(len(body) + slot.nbytes) + body

    def _begin_tensor(self, slot: Slot) -> None:
        if self.external is None:
            self.emit(self._inline_head(slot))
        else:
            pad = self.offsets[self.index] - self.pos
            if pad:
                self.emit(bytes(pad))

    def _finish(self) -> None:
        if self.external is None:
            return
        inits = b"".join(_field(5, _tensor_head(s) + _external_fields(self.external, off, s.nbytes))
                         for s, off in zip(self.slots, self.offsets, strict=True))
        model = AtomicFile(self.model_path, force=self.force)
        try:
            data = memoryview(self.model + _field(7, self.graph + inits))
            while data:
                data = data[os.write(model.fd, data):]
            model.commit()
        except OSError as exc:
            model.abort()
            raise disk_error(self.model_path, exc) from exc
        except BaseException:
            model.abort()
            raise


# ---------------------------------------------------------------------------------------------- reading
@contextmanager
def _mapped(path: str):
    """The model's graph message in the mapped file (its weights' pages are never touched)."""
    with mapped(path) as buf:
        if not buf:
            raise FormatError(path, "empty file", "the file is not ONNX")
        top = Fields(path, buf, 0, len(buf))
        spans = [v for number, wire, v in top if number == 7 and wire == 2]
        if len(spans) != 1:
            raise FormatError(path, f"{len(spans)} graph fields", "the file is not a single ONNX model")
        yield top.sub(spans[0])


def read_nodes(path: str) -> list[tuple[str, str, list[str]]]:
    """(name, op_type, inputs) of each node of the model's graph, without reading its weights."""
    out = []
    with _mapped(path) as graph:
        for number, wire, span in graph:
            if number != 1 or wire != 2:
                continue
            name, op, inputs = "", "", []
            node = graph.sub(span)
            for n, w, v in node:
                if w == 2 and n in (1, 3, 4):
                    text = node.text(v)
                    if n == 1:
                        inputs.append(text)
                    elif n == 3:
                        name = text
                    else:
                        op = text
            out.append((name, op, inputs))
    return out


def open_onnx(path: str) -> TensorSource:
    """A ``model.onnx``'s initializers as tensors (inline or in external files beside it, all checked)."""
    folder = os.path.dirname(os.path.abspath(path))
    tensors: dict[str, TensorInfo] = {}
    sizes: dict[str, int] = {}
    with _mapped(path) as graph:
        for number, wire, span in graph:
            if number == 15:
                raise FormatError(path, "sparse initializers are not supported", None)
            if number != 5 or wire != 2:
                continue
            info = _initializer(graph.sub(span), path, folder, sizes)
            if info.name in tensors:
                raise FormatError(path, f"initializer '{info.name}' appears twice", "the file is damaged")
            tensors[info.name] = info
    return TensorSource(path, "onnx", tensors)


def _initializer(t: Fields, path: str, folder: str, sizes: dict[str, int]) -> TensorInfo:
    dims, code, name, raw, external, location, typed = [], None, None, None, {}, 0, False
    for number, wire, value in t:
        if number == 1:
            if wire == 0:
                dims.append(value)
            elif wire == 2:  # packed
                sub = t.sub(value)
                while sub.pos < sub.end:
                    dims.append(sub.varint())
        elif number == 2 and wire == 0:
            code = value
        elif number == 8 and wire == 2:
            name = t.text(value)
        elif number == 9 and wire == 2:
            raw = value
        elif number == 13 and wire == 2:
            entry = t.sub(value)
            kv = {n: entry.text(v) for n, w, v in entry if w == 2 and n in (1, 2)}
            key = kv.get(1, "")
            if key not in EXTERNAL_KEYS:
                raise FormatError(path, f"unknown external_data key {key!r}", "the file is damaged or hostile")
            external[key] = kv.get(2, "")
        elif number == 14 and wire == 0:
            location = value
        elif number in (4, 5, 6, 7, 10, 11):
            typed = True
    if typed:
        raise FormatError(path, f"initializer '{name}' keeps its values in a typed field, not raw bytes",
                          "re-save the model with onnx (raw_data)")
    if name is None or code not in ONNX_TYPES:
        raise FormatError(path, f"initializer '{name}' has unsupported data type {code}", None)
    dtype = ONNX_TYPES[code]
    if any(d < 0 or d > 1 << 40 for d in dims):
        raise FormatError(path, f"initializer '{name}' has invalid dims {dims}", "the file is damaged")
    nbytes = math.prod(dims) * BY_CODE[dtype].itemsize
    if location == 1:
        file, offset, length = _external(path, folder, name, external, sizes)
        if length != nbytes:
            raise FormatError(path, f"external data length mismatch for '{name}' ({length} bytes for {nbytes})",
                              "the model and its data file do not belong together")
        return TensorInfo(name, dtype, tuple(dims), file, offset, nbytes)
    if raw is None:
        if nbytes:
            raise FormatError(path, f"initializer '{name}' has no data", "the file is damaged")
        raw = (t.pos, 0)
    if raw[1] != nbytes:
        raise FormatError(path, f"initializer '{name}' holds {raw[1]} bytes for shape {dims}", "the file is damaged")
    return TensorInfo(name, dtype, tuple(dims), path, raw[0], nbytes)


def _external(path: str, folder: str, name: str, fields: dict[str, str], sizes: dict[str, int]
              ) -> tuple[str, int, int]:
    """The checked (file, offset, length) of an external initializer."""
    location = fields.get("location", "")
    plain = os.path.normpath(location) == location.removeprefix("./") and not {"\\", "\x00"} & set(location)
    if not location or not plain or os.path.isabs(location) or os.path.normpath(location).startswith(("..", os.sep)):
        raise FormatError(path, f"external data path {location!r} escapes model folder", "the file is hostile")
    file = os.path.join(folder, location)
    probe = folder
    for part in location.split("/"):
        probe = os.path.join(probe, part)
        if os.path.islink(probe):
            raise FormatError(path, f"external data {location!r} is a symlink",
                              "copy the real file in place (a Hugging Face cache links files: download to a folder)")
    if os.path.commonpath([os.path.realpath(file), os.path.realpath(folder)]) != os.path.realpath(folder):
        raise FormatError(path, f"external data path {location!r} escapes model folder", "the file is hostile")
    if file not in sizes:
        try:
            st = os.stat(file, follow_symlinks=False)
        except FileNotFoundError:
            raise FormatError(path, f"external data file {location!r} is missing", "keep the data beside the model"
                              ) from None
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(path, f"external data {location!r} is not a regular file", None)
        if st.st_nlink > 1:
            raise FormatError(path, f"external data {location!r} has multiple hard links", "copy the file")
        sizes[file] = st.st_size
    try:
        offset, length = int(fields.get("offset", "0")), int(fields.get("length", "-1"))
    except ValueError:
        raise FormatError(path, f"invalid external data offset/length for '{name}'", "the file is damaged") from None
    if length == -1:
        length = sizes[file] - offset
    if offset < 0 or length < 0 or offset + length > sizes[file]:
        raise FormatError(path, f"invalid external data offset/length for '{name}' (past the end of {location})",
                          "the data file is truncated or does not belong to the model")
    return file, offset, length


def split_model(path: str) -> tuple[bytes, bytes]:
    """The model's fields without its graph, and its graph's fields without initializers, as written.

    A graph whose constants (node attributes) point into external data is refused: re-writing the
    weights would move the bytes those pointers name (onnx saves large constants so, Optimum over 2 GB).
    """
    with _mapped(path) as graph:
        buf = graph.buf
        for number, wire, span in Fields(path, buf, graph.pos, graph.end):
            if number == 1 and wire == 2 and _external_attribute(graph.sub(span)):
                raise FormatError(path, "graph constants are stored in external data",
                                  "re-save the model with onnx.save(..., convert_attribute=False)")
        top = Fields(path, buf, 0, len(buf))
        model = b"".join(bytes(buf[a:b]) for a, b in _raw_fields(top) if not _is(buf, a, 7))
        body = b"".join(bytes(buf[a:b]) for a, b in _raw_fields(graph) if not _is(buf, a, 5))
    return model, body


def _external_attribute(node: Fields) -> bool:
    """Whether a node has a tensor attribute (t = 5, tensors = 10) whose data is external (data_location 14 = 1)."""
    for number, wire, span in node:
        if number != 5 or wire != 2:
            continue
        for n, w, value in node.sub(span):
            if n in (5, 10) and w == 2 and any(f == 14 and v == 1 for f, _, v in node.sub(value)):
                return True
    return False


def _raw_fields(fields: Fields):
    """[start, end) of each whole field (key included) of a message."""
    start = fields.pos
    for _, wire, value in fields:
        end = value[0] + value[1] if wire == 2 else fields.pos
        yield start, end
        start = end


def _is(buf, pos: int, number: int) -> bool:
    return buf[pos] == (number << 3 | 2)
