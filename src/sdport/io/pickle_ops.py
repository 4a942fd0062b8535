"""The pickle stream read as opcodes and checked before a single object is built: the opcodes sdport knows, the
allowlist of globals a weights file may name, and the disassembler that rejects everything else.

``disassemble(data)`` walks the whole stream once, decoding every opcode's argument; an opcode
outside the set, a global outside ``_KINDS`` or a truncated stream stops it with one error. What it
returns is interpreted by ``pickle.load``, which never calls what a global names.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..dtypes import BY_STORAGE, BY_TORCH_NAME
from ..errors import FormatError, UnsafeFileError

MAX_OPS = 50_000_000

# module.name → what the sentinel stands for; everything else is rejected before interpretation.
_KINDS: dict[tuple[str, str], str] = {
    ("collections", "OrderedDict"): "dict",
    ("torch._utils", "_rebuild_tensor_v2"): "tensor",
    ("torch._utils", "_rebuild_tensor"): "tensor",
    ("torch._utils", "_rebuild_tensor_v3"): "tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "parameter",
    ("torch._tensor", "_rebuild_from_type_v2"): "from_type",
    ("torch", "Tensor"): "type",
    ("torch._tensor", "Tensor"): "type",
    ("torch.nn.parameter", "Parameter"): "type",
    ("torch", "Size"): "size",
    ("torch.storage", "UntypedStorage"): "storage",
    ("_codecs", "encode"): "encode",
    ("builtins", "set"): "set",
    ("__builtin__", "set"): "set",
    # Seen in real checkpoints beside the weights; kept as opaque, never constructed.
    ("numpy.core.multiarray", "scalar"): "opaque",
    ("numpy._core.multiarray", "scalar"): "opaque",
    ("numpy.core.multiarray", "_reconstruct"): "opaque",
    ("numpy._core.multiarray", "_reconstruct"): "opaque",
    ("numpy", "dtype"): "opaque",
    ("numpy", "ndarray"): "opaque",
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): "opaque",
    ("torch.nn.modules.container", "ParameterDict"): "opaque",
    ("argparse", "Namespace"): "opaque",
}
_KINDS.update({("torch", s): "storage" for s in BY_STORAGE})
_KINDS.update({("torch", n): "dtype" for n in BY_TORCH_NAME})


@dataclass(frozen=True)
class Global:
    """The inert stand-in for an allowed global."""

    module: str
    name: str

    @property
    def kind(self) -> str:
        return _KINDS[(self.module, self.name)]

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


FIXED = {b"K": 1, b"M": 2, b"J": 4, b"G": 8, b"q": 1, b"r": 4, b"h": 1, b"j": 4, b"\x80": 1, b"\x95": 8}
SIZED = {b"X": 4, b"\x8c": 1, b"\x8d": 8, b"T": 4, b"U": 1, b"B": 4, b"C": 1, b"\x8e": 8, b"\x8a": 1, b"\x8b": 4}
_BARE = set(b"(.012N\x88\x89)t\x85\x86\x87]ael}dsu\x8f\x90\x91\x93Rb\x81Q\x94")
_NAMES = {b"i": "INST", b"o": "OBJ", b"P": "PERSID", b"\x82": "EXT1", b"\x83": "EXT2", b"\x84": "EXT4",
          b"\x92": "NEWOBJ_EX", b"\x96": "BYTEARRAY8", b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER",
          b"I": "INT", b"L": "LONG", b"F": "FLOAT", b"S": "STRING", b"V": "UNICODE", b"g": "GET", b"p": "PUT"}
_STRING_OPS = (b"X", b"\x8c", b"\x8d", b"T", b"U")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _check_global(where: str, module: str, name: str) -> Global:
    if (module, name) not in _KINDS:
        raise UnsafeFileError(where, f"forbidden global {module}.{name} in pickle",
                              "sdport only reads plain weights and never runs code from a file")
    return Global(module, name)


def disassemble(data: bytes, where: str, start: int = 0) -> tuple[list[tuple[bytes, object]], int]:
    """Decode one pickle from ``start``: the list of (opcode, argument) and the offset after STOP.

    Every global is checked against the allowlist as it is met, so a payload is rejected even
    when the stream after it is broken.
    """
    ops: list[tuple[bytes, object]] = []
    pos, end = start, len(data)
    while True:
        if pos >= end:
            raise FormatError(where, "truncated pickle (no STOP)", "the file is damaged")
        if len(ops) > MAX_OPS:
            raise FormatError(where, "pickle too long", None)
        op = data[pos:pos + 1]
        pos += 1
        if op in FIXED:
            n = FIXED[op]
            if pos + n > end:
                raise FormatError(where, "truncated pickle", "the file is damaged")
            raw = data[pos:pos + n]
            pos += n
            arg: object = _fixed_arg(op, raw)
            if op == b"\x95" and arg > end - pos:
                raise FormatError(where, "malformed pickle frame", "the file is damaged or crafted")
        elif op in SIZED:
            n = SIZED[op]
            if pos + n > end:
                raise FormatError(where, "truncated pickle", "the file is damaged")
            length = int.from_bytes(data[pos:pos + n], "little", signed=False)
            pos += n
            if length > end - pos:
                raise FormatError(where, "truncated pickle (a length runs past the end)", "the file is damaged")
            arg = _sized_arg(op, data[pos:pos + length], where)
            pos += length
        elif op == b"c":
            module, pos = _line(data, pos, where)
            name, pos = _line(data, pos, where)
            arg = _check_global(where, module, name)
        elif op and op[0] in _BARE:
            arg = None
            if op == b"\x93":
                arg = _stack_global(ops, where)
        elif op in _NAMES:
            raise UnsafeFileError(where, f"unsupported opcode {_NAMES[op]} in pickle",
                                  "not a plain weights file")
        else:
            raise FormatError(where, f"unknown pickle opcode 0x{op.hex()}", "the file is damaged or not a pickle")
        ops.append((op, arg))
        if op == b".":
            return ops, pos


def _fixed_arg(op: bytes, raw: bytes) -> object:
    if op == b"J":
        return struct.unpack("<i", raw)[0]
    if op == b"G":
        return struct.unpack(">d", raw)[0]
    return int.from_bytes(raw, "little", signed=False)


def _sized_arg(op: bytes, raw: bytes, where: str) -> object:
    if op in (b"\x8a", b"\x8b"):
        return int.from_bytes(raw, "little", signed=True)
    if op in (b"X", b"\x8c", b"\x8d"):
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise FormatError(where, "invalid UTF-8 string in pickle", None) from None
    if op in (b"T", b"U"):
        return raw.decode("latin-1")
    return bytes(raw)


def _line(data: bytes, pos: int, where: str) -> tuple[str, int]:
    nl = data.find(b"\n", pos, pos + 512)
    if nl < 0:
        raise FormatError(where, "truncated pickle (unterminated global name)", "the file is damaged")
    text = data[pos:nl].decode("latin-1")
    if not _IDENT.match(text):
        raise FormatError(where, f"malformed global name {text!r} in pickle", None)
    return text, nl + 1


def _stack_global(ops: list[tuple[bytes, object]], where: str) -> Global:
    """STACK_GLOBAL is allowed only right after two string constants (memo writes between them)."""
    strings = []
    for op, arg in reversed(ops):
        if op in (b"\x94", b"q", b"r"):
            continue
        if op not in _STRING_OPS or len(strings) == 2:
            break
        strings.append(arg)
    if len(strings) < 2:
        raise UnsafeFileError(where, "unsupported opcode STACK_GLOBAL with computed operands in pickle",
                              "not a plain weights file")
    for text in strings:  # held to GLOBAL's rule, so no name can carry a newline into a message
        if not _IDENT.fullmatch(text):
            raise FormatError(where, f"malformed global name {text!r} in pickle", None)
    return _check_global(where, strings[1], strings[0])


# ------------------------------------------------------------------------------ interpretation
