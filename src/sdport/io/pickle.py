"""A pickle interpreter that never executes: PyTorch checkpoint pickles → inert records.

``load(data)`` first disassembles the whole stream, rejecting any opcode outside a small set and
any global outside the allowlist before a single object is built; it then interprets the opcodes
with sentinels standing for the allowed globals, so a "call" only ever builds a record
(``TensorRecord``, ``StorageRef``, ``Opaque``). No resolved Python object is ever called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..dtypes import BY_CODE, BY_STORAGE, BY_TORCH_NAME
from ..errors import FormatError, UnsafeFileError
from .pickle_ops import FIXED, SIZED, Global, disassemble

MAX_MEMO = 1_000_000
MAX_MARKS = 1_000


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: str  # safetensors code
    numel: int
    view: tuple | None = None  # legacy format: (view_key, offset, size)


@dataclass(frozen=True)
class TensorRecord:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class Opaque:
    """A value sdport does not build (numpy scalars, Lightning callbacks …); described, then dropped."""

    what: str


_MARK = object()


class _Machine:
    """Runs disassembled opcodes over inert values."""

    def __init__(self, where: str, persistent_load):
        self.where = where
        self.persistent_load = persistent_load
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    def fail(self, problem: str) -> FormatError:
        return FormatError(self.where, problem, "the checkpoint is damaged or crafted")

    def pop(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise self.fail("malformed pickle (stack underflow)")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise self.fail("malformed pickle (no MARK)")
        at = self.marks.pop()
        items = self.stack[at + 1:]
        del self.stack[at:]
        return items

    def put(self, index: int) -> None:
        if len(self.memo) >= MAX_MEMO and index not in self.memo:
            raise self.fail("pickle memo limit exceeded")
        if not self.stack:
            raise self.fail("malformed pickle (memo write on empty stack)")
        self.memo[index] = self.stack[-1]

    def run(self, ops: list[tuple[bytes, object]]):
        for op, arg in ops:
            if op == b".":
                if len(self.stack) != 1 or self.marks:
                    raise self.fail("malformed pickle (stack not empty at STOP)")
                return self.stack[0]
            self.step(op, arg)
        raise self.fail("truncated pickle (no STOP)")

    def step(self, op: bytes, arg) -> None:  # noqa: C901 - one branch per opcode, flat on purpose
        s = self.stack
        if op in FIXED and op not in (b"q", b"r", b"h", b"j", b"\x80", b"\x95") or op in SIZED:
            s.append(arg)
        elif op in (b"\x80", b"\x95"):
            pass
        elif op == b"(":
            if len(self.marks) >= MAX_MARKS:
                raise self.fail("pickle nesting limit exceeded")
            self.marks.append(len(s))
            s.append(_MARK)
        elif op == b"N":
            s.append(None)
        elif op in (b"\x88", b"\x89"):
            s.append(op == b"\x88")
        elif op == b"0":
            self.pop()
        elif op == b"1":
            self.pop_mark()
        elif op == b"2":
            s.append(s[-1] if s and s[-1] is not _MARK else self.pop())
        elif op == b")":
            s.append(())
        elif op == b"t":
            s.append(tuple(self.pop_mark()))
        elif op in (b"\x85", b"\x86", b"\x87"):
            n = op[0] - 0x84
            items = [self.pop() for _ in range(n)][::-1]
            s.append(tuple(items))
        elif op == b"]":
            s.append([])
        elif op == b"l":
            s.append(self.pop_mark())
        elif op in (b"a", b"e"):
            items = [self.pop()] if op == b"a" else self.pop_mark()
            target = self.pop()
            if not isinstance(target, list):
                raise self.fail("invalid APPEND target in pickle")
            target.extend(items)
            s.append(target)
        elif op == b"}":
            s.append({})
        elif op in (b"s", b"u", b"d"):
            self._setitems(op)
        elif op == b"\x8f":
            s.append(set())
        elif op in (b"\x90", b"\x91"):
            self._additems(op)
        elif op in (b"c", b"\x93"):
            if op == b"\x93":
                name, module = self.pop(), self.pop()
                if (module, name) != (arg.module, arg.name):
                    raise self.fail("malformed pickle (STACK_GLOBAL operands)")
            s.append(arg)
        elif op == b"R":
            args = self.pop()
            s.append(self._call(self.pop(), args))
        elif op == b"\x81":
            args = self.pop()
            s.append(self._new(self.pop(), args))
        elif op == b"b":
            self._build(self.pop())
        elif op == b"Q":
            s.append(self.persistent_load(self.pop()))
        elif op in (b"q", b"r"):
            self.put(arg)
        elif op == b"\x94":
            self.put(len(self.memo))
        elif op in (b"h", b"j"):
            if arg not in self.memo:
                raise self.fail("malformed pickle (memo read before write)")
            s.append(self.memo[arg])
        else:  # pragma: no cover - disassemble() let through an opcode this table misses
            raise self.fail(f"unsupported opcode 0x{op.hex()}")

    def _setitems(self, op: bytes) -> None:
        if op == b"d":
            items = self.pop_mark()
            target: object = {}
            self.stack.append(target)
        else:
            items = [self.pop(), self.pop()][::-1] if op == b"s" else self.pop_mark()
            target = self.pop()
            self.stack.append(target)
        if not isinstance(target, dict) or len(items) % 2:
            raise self.fail("invalid SETITEM target in pickle")
        for k, v in zip(items[::2], items[1::2], strict=True):
            try:
                target[k] = v
            except TypeError:
                raise self.fail("unhashable dict key in pickle") from None

    def _additems(self, op: bytes) -> None:
        items = self.pop_mark()
        target = set() if op == b"\x91" else self.pop()
        if not isinstance(target, set):
            raise self.fail("invalid ADDITEMS target in pickle")
        try:
            target.update(items)
        except TypeError:
            raise self.fail("unhashable set item in pickle") from None
        self.stack.append(frozenset(target) if op == b"\x91" else target)

    def _call(self, func, args):
        if not isinstance(func, Global) or not isinstance(args, tuple):
            raise self.fail("invalid REDUCE in pickle (only allowed constructors may be called)")
        kind = func.kind
        if kind == "dict" and args in ((), ([],)):
            return {}
        if kind == "tensor":
            return self._tensor(args)
        if kind == "tensor_v3":
            return self._tensor(self._retype(args))
        if kind == "parameter" and args and isinstance(args[0], TensorRecord):
            return args[0]
        if kind == "from_type" and len(args) == 4 and isinstance(args[0], Global) and isinstance(args[2], tuple):
            if args[0].kind in ("tensor", "parameter") and isinstance(args[1], Global) and args[1].kind == "type":
                return self._call(args[0], args[2])
        if kind == "size" and len(args) == 1 and isinstance(args[0], tuple):
            return args[0]
        if kind == "encode" and len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1":
            return args[0].encode("latin-1")
        if kind == "set" and len(args) == 1 and isinstance(args[0], list):
            return Opaque("set")
        if kind == "opaque":
            return Opaque(str(func))
        raise self.fail(f"invalid call of {func} in pickle")

    def _new(self, cls, args):
        if isinstance(cls, Global) and cls.kind == "opaque" and isinstance(args, tuple):
            return Opaque(str(cls))
        if isinstance(cls, Global) and cls.kind == "dict" and args == ():
            return {}
        raise self.fail("invalid NEWOBJ in pickle (only allowed classes may be built)")

    def _build(self, state) -> None:
        target = self.stack[-1] if self.stack else None
        # OrderedDict state (torch's _metadata) and opaque objects' state are dropped; tensors
        # never take state in a weights file.
        if not isinstance(target, (dict, Opaque)):
            raise self.fail("invalid BUILD target in pickle")
        del state

    def _retype(self, args: tuple) -> tuple:
        """``_rebuild_tensor_v3(untyped_storage, offset, size, stride, grad, hooks, dtype)`` → v2's arguments."""
        if len(args) < 7 or not isinstance(args[6], Global) or args[6].kind != "dtype":
            raise self.fail("invalid tensor record (v3 without a dtype)")
        storage, code = args[0], BY_TORCH_NAME[args[6].name].code
        item = BY_CODE[code].itemsize
        if not isinstance(storage, StorageRef) or storage.dtype != "U8" or storage.numel % item:
            raise self.fail("invalid tensor record (v3 storage)")
        return (StorageRef(storage.key, code, storage.numel // item),) + args[1:6]

    def _tensor(self, args: tuple) -> TensorRecord:
        if len(args) < 4:
            raise self.fail("invalid tensor record (too few arguments)")
        storage, offset, shape, stride = args[:4]
        ok = (isinstance(storage, StorageRef) and _is_int(offset) and isinstance(shape, tuple)
              and isinstance(stride, tuple) and len(shape) == len(stride)
              and all(_is_int(d) for d in shape + stride))
        if not ok:
            raise self.fail("invalid tensor record")
        if offset < 0 or any(d < 0 for d in shape + stride):
            raise self.fail("invalid tensor shape (negative size, stride or offset)")
        if all(shape):
            last = offset + sum((d - 1) * st for d, st in zip(shape, stride, strict=True))
            if last >= storage.numel:
                raise self.fail(f"tensor extent exceeds storage (element {last} of {storage.numel})")
        return TensorRecord(storage, offset, shape, stride)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def storage_ref(pid: object, where: str, *, legacy: bool) -> StorageRef:
    """Validate a persistent id ``('storage', StorageType, key, location, numel[, view])``."""
    n = 6 if legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == n and pid[0] == "storage"):
        raise UnsafeFileError(where, "invalid persistent id in pickle", "not a plain weights file")
    _, stype, key, location, numel = pid[:5]
    if not (isinstance(stype, Global) and stype.kind == "storage"):
        raise UnsafeFileError(where, "invalid persistent id in pickle (storage type)", None)
    if not isinstance(key, str) or not re.fullmatch(r"[0-9]{1,20}", key):
        raise FormatError(where, f"invalid storage key {key!r}", "the checkpoint is damaged or crafted")
    if not isinstance(location, str) or not _is_int(numel) or numel < 0:
        raise FormatError(where, "invalid persistent id in pickle", None)
    code = "U8" if stype.name == "UntypedStorage" else BY_STORAGE[stype.name].code
    view = pid[5] if legacy else None
    if view is not None:
        raise FormatError(where, "storage views of the legacy format are not supported", None)
    return StorageRef(key, code, numel)


def load(data: bytes, where: str, persistent_load, start: int = 0) -> tuple[object, int]:
    """Disassemble, check and interpret one pickle; return the inert result and the end offset."""
    ops, end = disassemble(data, where, start)
    return _Machine(where, persistent_load).run(ops), end
