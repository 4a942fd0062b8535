"""Hostile inputs, end to end: every crafted file is refused by the CLI, and nothing in it ever runs.

Pins the contract of reliability-anchors.md §A–C and "Spec: sdport's torch-free restricted unpickler" on a
corpus generated here (no downloads, no committed blobs). Each case is one file, fed to ``sdport inspect`` and
``sdport convert`` as separate processes; for both runs:

* exit status 2, nothing on stdout, and stderr is exactly one line ``sdport: error: <input path>: …`` that
  names the problem (a per-case keyword), with no traceback and no control character a crafted name could
  use to forge lines or terminal escapes;
* every pickle payload tries to create a canary file (shell ``touch``, ``open``, a module planted in the
  working folder, a recursive ``torch.load``/``numpy.load`` of a second malicious pickle …): it never appears;
* nothing at the output path and no ``.sdport-`` temp file; the input's bytes and mtime are unchanged.

Groups: ``p-*`` pickles (in a torch zip unless the id says legacy/plain), ``z-*`` zip and container tricks,
``s-*`` safetensors headers. For every ``p-*``/``z-*`` file an oracle test asks ``torch.load(weights_only=True)``,
which must refuse it too; where it does not, the case carries the finding (strict xfail raising TorchAccepted).
A positive control proves the corpus is built from files both sdport and torch read.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import shlex
import struct
import subprocess
import tarfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import Run, leftovers, run_cli, sha256

# ------------------------------------------------------------------------------------------- pickle bytes
PROTO2, STOP, MARK, TUPLE, REDUCE, BINPERSID = b"\x80\x02", b".", b"(", b"t", b"R", b"Q"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, APPENDS, SETITEM, SETITEMS = b"}", b"]", b")", b"e", b"s", b"u"
NONE, NEWTRUE, NEWFALSE, POP, BUILD = b"N", b"\x88", b"\x89", b"0", b"b"

WEIGHTS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)  # the one 2×2 float tensor "w" of every base file
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _s(text: str) -> bytes:
    """BINUNICODE, the string opcode torch writes."""
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _short(text: str) -> bytes:
    """SHORT_BINUNICODE, the protocol-4 string opcode."""
    raw = text.encode("utf-8")
    return b"\x8c" + bytes([len(raw)]) + raw


def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tuple(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def _list(*items: bytes) -> bytes:
    return EMPTY_LIST + MARK + b"".join(items) + APPENDS


def _call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)``: what a ``__reduce__`` payload is made of."""
    return func + _tuple(*args) + REDUCE


def _tensor(key: str = "0", *, numel: int = 4, offset: int = 0, shape: Sequence[int] = (2, 2),
            stride: Sequence[int] = (2, 1), legacy: bool = False, extra: Sequence[bytes] = ()) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`` as torch.save writes it."""
    pid = _tuple(_s("storage"), _g("torch", "FloatStorage"), _s(key), _s("cpu"), _int(numel),
                 *([NONE] if legacy else []))
    return _call(_g("torch._utils", "_rebuild_tensor_v2"), pid + BINPERSID, _int(offset),
                 _tuple(*map(_int, shape)), _tuple(*map(_int, stride)), NEWFALSE,
                 _call(_g("collections", "OrderedDict")), *extra)


def _state_dict(entries: Mapping[str, bytes] | None = None, *, head: bytes = b"", memo: bytes = b"",
                legacy: bool = False) -> bytes:
    """``{"state_dict": OrderedDict(entries)}`` at protocol 2.

    ``head`` runs first (its maker pops its result); ``memo`` follows the outer dict (memo writes of it).
    """
    entries = {"w": _tensor(legacy=legacy)} if entries is None else entries
    body = b"".join(_s(k) + v for k, v in entries.items())
    return (PROTO2 + head + EMPTY_DICT + memo + _s("state_dict") + _call(_g("collections", "OrderedDict"))
            + MARK + body + SETITEMS + SETITEM + STOP)


def _with(payload: bytes) -> bytes:
    """The valid state dict with one more entry, first, whose value is the payload's result."""
    return _state_dict({"evil": payload, "w": _tensor()})


class _Reduce:
    """An object whose pickle calls ``func(*args)`` when loaded; ``pickle.dumps`` only records the call."""

    def __init__(self, func: Callable, *args: object):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _touch(canary: str) -> str:
    return f"touch {shlex.quote(canary)}"


def _evil_pickle(canary: str) -> bytes:
    """A plain pickle that runs ``touch CANARY`` when loaded by anything but a restricted unpickler."""
    return pickle.dumps(_Reduce(os.system, _touch(canary)), protocol=2)


# ------------------------------------------------------------------------------------------- zip bytes
@dataclass(frozen=True)
class Member:
    """One zip entry; the optional fields forge what a crafted archive lies about."""

    name: str
    data: bytes
    deflate: bool = False
    flags: int = 0
    local_name: str | None = None  # a different name in the local header than in the central directory
    crc: int | None = None  # a wrong CRC, in both headers
    made_by: int = 20
    attr: int = 0  # external attributes (unix mode << 16 when made_by says unix)

    def stored(self) -> bytes:
        if not self.deflate:
            return self.data
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(self.data) + c.flush()

    def checksum(self) -> int:
        return zlib.crc32(self.data) if self.crc is None else self.crc

    def local(self) -> bytes:
        raw = (self.name if self.local_name is None else self.local_name).encode("utf-8")
        body = self.stored()
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, self.flags, 8 if self.deflate else 0, 0, 0x21,
                           self.checksum(), len(body), len(self.data), len(raw), 0) + raw + body

    def central(self, offset: int) -> bytes:
        raw = self.name.encode("utf-8")
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, self.made_by, 20, self.flags,
                           8 if self.deflate else 0, 0, 0x21, self.checksum(), len(self.stored()), len(self.data),
                           len(raw), 0, 0, 0, 0, self.attr, offset) + raw


def _zip(members: Sequence[Member], hidden: Sequence[tuple[Member, int]] = ()) -> bytes:
    """Local records in order, then the central directory (plus ``hidden`` records at given offsets), then EOCD."""
    out, records = b"", []
    for m in members:
        records.append(m.central(len(out)))
        out += m.local()
    records += [m.central(at) for m, at in hidden]
    cd = b"".join(records)
    return out + cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(cd), len(out), 0)


def _members(pkl: bytes, storages: Mapping[str, bytes] | None = None, root: str = "archive") -> list[Member]:
    """The entries of a torch.save archive, in torch's order."""
    storages = {"0": WEIGHTS} if storages is None else storages
    return ([Member(f"{root}/data.pkl", pkl), Member(f"{root}/byteorder", b"little")]
            + [Member(f"{root}/data/{k}", v) for k, v in storages.items()] + [Member(f"{root}/version", b"3\n")])


def _legacy(data_pickle: bytes, *, sys_info: bytes | None = None, keys: bytes | None = None) -> bytes:
    """torch < 1.6's non-zip format: magic, protocol, sys_info, data and key-list pickles, then raw storages."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + (pickle.dumps(info, protocol=2) if sys_info is None else sys_info) + data_pickle
            + (pickle.dumps(["0"], protocol=2) if keys is None else keys) + struct.pack("<q", 4) + WEIGHTS)


def _sysinfo_with(payload: bytes) -> bytes:
    return (PROTO2 + EMPTY_DICT + MARK + _s("protocol_version") + _int(1001) + _s("little_endian") + NEWTRUE
            + _s("type_sizes") + payload + SETITEMS + STOP)


# ------------------------------------------------------------------------------------------- cases
Build = Callable[[Path, str], bytes]  # (folder for side files, canary path) -> the input file's bytes


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    keyword: str  # a distinctive word the one-line error must contain
    name: str = "model.ckpt"
    torch_accepts: str = ""  # finding: torch.load(weights_only=True) loads this file although sdport refuses it
    sparse: bool = False  # written by _write_big_pickle_zip instead of build()


def _in_zip(pickle_of: Callable[[Path, str], bytes]) -> Build:
    return lambda folder, canary: _zip(_members(pickle_of(folder, canary)))


def _plant(folder: Path, canary: str) -> None:
    """Side files a payload reaches for: a second malicious pickle, a script, a module in the working folder."""
    (folder / "evil.pkl").write_bytes(_evil_pickle(canary))
    (folder / "evil.py").write_text(f"open({canary!r}, 'w').close()\n")
    (folder / "mymodule.py").write_text(f"open({canary!r}, 'w').close()\n\nclass Thing:\n    pass\n")


def _payload_case(cid: str, keyword: str, payload: Callable[[Path, str], bytes], **kw: str) -> Case:
    """A valid torch zip whose state dict holds one more entry: the payload."""
    return Case(cid, _in_zip(lambda f, c: _with(payload(f, c))), keyword, **kw)


def _getattr(obj: bytes, attr: str) -> bytes:
    return _call(_g("builtins", "getattr"), obj, _s(attr))


def _import_chain(folder: Path, canary: str) -> bytes:
    """``getattr(__import__('os'), 'system')('touch …')`` with ``__import__`` met first (memo, then BINGET)."""
    return (_call(_g("builtins", "__import__"), _s("os")) + b"q\x00" + POP
            + _call(_getattr(b"h\x00", "system"), _s(_touch(canary))))


def _getattr_chain(folder: Path, canary: str) -> bytes:
    """From an allowed global to ``os.system`` by attributes: ``_rebuild_tensor_v2.__globals__['torch'].os``."""
    g = _getattr(_g("torch._utils", "_rebuild_tensor_v2"), "__globals__")
    torch_mod = _call(_getattr(g, "get"), _s("torch"))
    return _call(_getattr(_getattr(torch_mod, "os"), "system"), _s(_touch(canary)))


_GLOBALS = [
    ("p-posix-system", "posix.system", lambda f, c: _call(_g("posix", "system"), _s(_touch(c)))),
    ("p-os-system", "os.system", lambda f, c: _call(_g("os", "system"), _s(_touch(c)))),
    ("p-nt-system", "nt.system", lambda f, c: _call(_g("nt", "system"), _s(_touch(c)))),
    ("p-builtins-exec", "builtins.exec", lambda f, c: _call(_g("builtins", "exec"), _s(f"open({c!r},'w').close()"))),
    ("p-builtins-eval", "builtins.eval",
     lambda f, c: _call(_g("builtins", "eval"), _s(f"__import__('os').system({_touch(c)!r})"))),
    ("p-builtins-open", "builtins.open", lambda f, c: _call(_g("builtins", "open"), _s(c), _s("w"))),
    ("p-subprocess-popen", "subprocess.Popen",
     lambda f, c: _call(_g("subprocess", "Popen"), _list(_s("touch"), _s(c)))),
    ("p-subprocess-check-output", "subprocess.check_output",
     lambda f, c: _call(_g("subprocess", "check_output"), _list(_s("touch"), _s(c)))),
    ("p-import-then-getattr", "builtins.__import__", _import_chain),
    ("p-getattr-chain-from-allowed-global", "builtins.getattr", _getattr_chain),
    ("p-posixsubprocess-fork-exec", "_posixsubprocess.fork_exec",
     lambda f, c: _call(_g("_posixsubprocess", "fork_exec"), _list(_s("/usr/bin/touch"), _s(c)))),
    ("p-pip-main", "pip.main", lambda f, c: _call(_g("pip", "main"), _list(_s("--log"), _s(c), _s("--version")))),
    ("p-pkgutil-resolve-name", "pkgutil.resolve_name",
     lambda f, c: _call(_call(_g("pkgutil", "resolve_name"), _s("os:system")), _s(_touch(c)))),
    ("p-functools-partial", "functools.partial",
     lambda f, c: _call(_call(_g("functools", "partial"), _g("posix", "system"), _s(_touch(c))))),
    ("p-copyreg-reconstructor", "copyreg._reconstructor",
     lambda f, c: _call(_g("copyreg", "_reconstructor"), _g("subprocess", "Popen"), _g("subprocess", "Popen"),
                        _list(_s("touch"), _s(c)))),
    # torch.load(path, None, pickle) means weights_only=False: the recursion would run evil.pkl
    ("p-torch-load-recursion", "torch.load",
     lambda f, c: _call(_g("torch", "load"), _s(str(f / "evil.pkl")), NONE, _g("torch.serialization", "pickle"))),
    ("p-torch-storage-load-from-bytes", "torch.storage._load_from_bytes",
     lambda f, c: _call(_g("torch.storage", "_load_from_bytes"),
                        _call(_g("_codecs", "encode"), _s(_evil_pickle(c).decode("latin-1")), _s("latin1")))),
    ("p-torch-jit-load", "torch.jit.load", lambda f, c: _call(_g("torch.jit", "load"), _s(str(f / "evil.pkl")))),
    ("p-numpy-load-allow-pickle", "numpy.load",
     lambda f, c: _call(_g("numpy", "load"), _s(str(f / "evil.pkl")), NONE, NEWTRUE)),
    ("p-runpy-run-path", "runpy.run_path", lambda f, c: _call(_g("runpy", "run_path"), _s(str(f / "evil.py")))),
    # mymodule.py sits in the working folder, which `python -m` puts first on sys.path
    ("p-unknown-global-from-working-folder", "mymodule.Thing", lambda f, c: _call(_g("mymodule", "Thing"))),
]


def _payload_in_tensor_arguments(folder: Path, canary: str) -> bytes:
    """A 7th argument to ``_rebuild_tensor_v2`` that would run while the tensor is rebuilt."""
    extra = _call(_g("subprocess", "call"), _list(_s("touch"), _s(canary)))
    return _state_dict({"w": _tensor(extra=[extra])})


P_GLOBAL_CASES = [_payload_case(cid, kw, fn) for cid, kw, fn in _GLOBALS] + [
    Case("p-payload-in-tensor-arguments", _in_zip(_payload_in_tensor_arguments), "subprocess.call"),
]


def _protocol(n: int, func: Callable, args: Callable[[str], tuple]) -> Build:
    """A real ``pickle.dumps`` at protocol ``n`` (STACK_GLOBAL, MEMOIZE, FRAME) of a state dict with a payload."""
    return _in_zip(lambda f, c: pickle.dumps({"state_dict": {"evil": _Reduce(func, *args(c))}}, protocol=n))


def _stack_global_from_memo(folder: Path, canary: str) -> bytes:
    # 'posix' and 'system' are memoized, popped, and fetched back with BINGET: operands a pre-scan cannot see
    return (b"\x80\x04" + _short("posix") + b"\x94" + POP + _short("system") + b"\x94" + POP + b"h\x00h\x01\x93"
            + _tuple(_s(_touch(canary))) + REDUCE + STOP)


def _stack_global_forged_line(folder: Path, canary: str) -> bytes:
    # a STACK_GLOBAL name is any string: one carrying a newline would forge a second, reassuring line
    return (b"\x80\x04" + _short("posix") + _short("system\nsdport: ok, file is safe") + b"\x93"
            + _tuple(_s(_touch(canary))) + REDUCE + STOP)


P_STACK_GLOBAL_CASES = [
    Case("p4-stack-global-os-system", _protocol(4, os.system, lambda c: (_touch(c),)), "posix.system"),
    Case("p5-framed-subprocess-popen", _protocol(5, subprocess.Popen, lambda c: (["touch", c],)),
         "subprocess.Popen"),
    Case("p4-stack-global-operands-from-memo", _in_zip(_stack_global_from_memo), "STACK_GLOBAL"),
    Case("p4-stack-global-name-forging-a-line", _in_zip(_stack_global_forged_line), "malformed global name"),
    Case("p5-frame-longer-than-the-pickle",
         _in_zip(lambda f, c: b"\x80\x05\x95" + struct.pack("<Q", 1 << 40) + _state_dict()[2:]), "frame"),
]


def _after(trick: bytes) -> Build:
    """Protocol-2 stream: ``trick`` first, then a payload that would run if the trick were let through."""
    return _in_zip(lambda f, c: PROTO2 + trick + _call(_g("posix", "system"), _s(_touch(c))) + STOP)


P_OPCODE_CASES = [
    Case("p-inst-opcode", _in_zip(lambda f, c: PROTO2 + MARK + _s(_touch(c)) + b"iposix\nsystem\n" + STOP), "INST"),
    Case("p-obj-opcode-building-popen",
         _in_zip(lambda f, c: PROTO2 + MARK + _g("subprocess", "Popen") + _list(_s("touch"), _s(c)) + b"o" + STOP),
         "subprocess.Popen"),
    Case("p-obj-opcode-on-allowed-class", _after(MARK + _g("collections", "OrderedDict") + b"o" + POP), "OBJ"),
    Case("p-newobj-ex-opcode", _after(_g("collections", "OrderedDict") + EMPTY_TUPLE + EMPTY_DICT + b"\x92" + POP),
         "NEWOBJ_EX"),
    Case("p-ext1-extension-registry", _after(b"\x82\x01" + POP), "EXT1"),
    Case("p-text-persid-opcode", _after(b"P0\n" + POP), "PERSID"),
]


def _pid_tensor(pid: bytes) -> bytes:
    """A 4-element tensor whose storage is loaded through the persistent id ``pid``."""
    return _state_dict({"w": _call(_g("torch._utils", "_rebuild_tensor_v2"), pid + BINPERSID, _int(0),
                                   _tuple(_int(4)), _tuple(_int(1)), NEWFALSE,
                                   _call(_g("collections", "OrderedDict")))})


P_PERSID_CASES = [
    Case("p-persid-with-payload-in-the-pid",  # a bare storage as the value: the pid is built before anything else
         _in_zip(lambda f, c: _state_dict({"w": _tuple(_s("storage"), _call(_g("posix", "system"), _s(_touch(c))),
                                                       _s("0"), _s("cpu"), _int(4)) + BINPERSID})), "posix.system"),
    Case("p-persid-not-a-storage",
         _in_zip(lambda f, c: _pid_tensor(_tuple(_s("module"), _s("posix"), _s("system")))), "persistent id"),
    Case("p-persid-is-a-string", _in_zip(lambda f, c: _pid_tensor(_s(_touch(c)))), "persistent id"),
    Case("p-persid-storage-key-traversal",
         _in_zip(lambda f, c: _state_dict({"w": _tensor("../../etc/passwd")})), "invalid storage key"),
]

_SYSTEM = lambda f, c: _call(_g("posix", "system"), _s(_touch(c)))  # noqa: E731 - a payload like the ones above

P_PLACEMENT_CASES = [
    Case("p-payload-before-the-state-dict",
         _in_zip(lambda f, c: _state_dict(head=_SYSTEM(f, c) + POP)), "posix.system"),
    Case("p-nullifai-payload-then-broken-stream",
         _in_zip(lambda f, c: PROTO2 + _SYSTEM(f, c) + b"\x00\xffbroken" + _s("state_dict")[:3]), "posix.system"),
    Case("p-payload-after-stop", _in_zip(lambda f, c: _state_dict() + PROTO2 + _SYSTEM(f, c) + STOP),
         "trailing data after pickle STOP", torch_accepts="torch unpickles data.pkl up to its first STOP only"),
]


def _memo_bomb(folder: Path, canary: str) -> bytes:
    """The outer dict written to a million and one memo slots (LONG_BINPUT, an opcode torch's unpickler has)."""
    return _state_dict(memo=b"".join(b"r" + struct.pack("<I", i) for i in range(1_000_001)))


P_DOS_CASES = [
    Case("p-memo-bomb-a-million-entries", _in_zip(_memo_bomb), "memo limit",
         torch_accepts="torch's unpickler has no cap on memo entries"),
    Case("p-binunicode-claims-4gib", _in_zip(lambda f, c: PROTO2 + b"X\xff\xff\xff\xff" + b"A" * 64 + STOP),
         "truncated"),
    Case("p-binunicode8-claims-2-to-the-63", _in_zip(lambda f, c: b"\x80\x04\x8d" + struct.pack("<Q", 1 << 63)
                                                     + b"A" * 64 + STOP), "truncated"),
    Case("p-deep-mark-nesting", _in_zip(lambda f, c: PROTO2 + MARK * 100_000 + STOP), "nesting limit"),
    Case("p-data-pkl-over-64-mib", lambda f, c: b"", "too large", sparse=True),
]

P_FILE_CASES = [
    Case("p-legacy-payload-in-sys-info", lambda f, c: _legacy(_state_dict(legacy=True),
                                                              sys_info=_sysinfo_with(_SYSTEM(f, c))),
         "posix.system", name="model.pt"),
    Case("p-legacy-payload-in-state-dict",
         lambda f, c: _legacy(_state_dict({"w": _tensor(legacy=True), "evil": _SYSTEM(f, c)}, legacy=True)),
         "posix.system", name="model.pt"),
    Case("p-legacy-payload-in-storage-key-list",
         lambda f, c: _legacy(_state_dict(legacy=True), keys=PROTO2 + _list(_s("0"), _SYSTEM(f, c)) + STOP),
         "posix.system", name="model.pt"),
    Case("p-plain-pickle-named-bin", lambda f, c: _evil_pickle(c), "posix.system", name="pytorch_model.bin"),
    Case("p-plain-pickle-protocol-0", lambda f, c: pickle.dumps(_Reduce(os.system, _touch(c)), protocol=0),
         "not a supported checkpoint format", name="pytorch_model.bin"),
]


def _torchscript(folder: Path, canary: str) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, and still loaded by users
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    return buf.getvalue()


P_STRUCTURE_CASES = [
    Case("p-torchscript-archive-from-jit-save", _torchscript, "TorchScript", name="model.pt"),
    Case("p-torchscript-constants-pkl-with-payload",
         lambda f, c: _zip(_members(_state_dict()) + [Member("archive/constants.pkl", _evil_pickle(c))]),
         "TorchScript"),
    Case("p-torchscript-code-folder",
         lambda f, c: _zip(_members(_state_dict()) + [Member("archive/code/__torch__.py",
                                                             f"open({c!r}, 'w')\n".encode())]), "TorchScript",
         torch_accepts="torch tells TorchScript by constants.pkl only; it loads the weights beside a code/ folder"),
    Case("p-setitem-on-a-list", _in_zip(lambda f, c: PROTO2 + EMPTY_LIST + _s("k") + _s("v") + SETITEM + STOP),
         "invalid SETITEM target"),
    Case("p-append-on-a-dict", _in_zip(lambda f, c: PROTO2 + EMPTY_DICT + _s("v") + b"a" + STOP),
         "invalid APPEND target"),
    Case("p-build-on-a-list", _in_zip(lambda f, c: PROTO2 + EMPTY_LIST + EMPTY_DICT + BUILD + STOP),
         "invalid BUILD target"),
    Case("p-reduce-on-a-non-global", _in_zip(lambda f, c: PROTO2 + EMPTY_DICT + EMPTY_TUPLE + REDUCE + STOP),
         "invalid REDUCE"),
]

P_CASES = (P_GLOBAL_CASES + P_STACK_GLOBAL_CASES + P_OPCODE_CASES + P_PERSID_CASES + P_PLACEMENT_CASES
           + P_DOS_CASES + P_FILE_CASES + P_STRUCTURE_CASES)


def _with_member(*extra: Member) -> Build:
    return lambda f, c: _zip(_members(_state_dict()) + list(extra))


def _replace_member(name: str, **changes: object) -> Build:
    def build(folder: Path, canary: str) -> bytes:
        members = [replace(m, **changes) if m.name == name else m for m in _members(_state_dict())]
        return _zip(members)
    return build


def _overlap(folder: Path, canary: str) -> bytes:
    """Quoted overlap: ``data/0``'s bytes are a whole local record of ``data/1``, listed on its own as well."""
    inner = Member("archive/data/1", WEIGHTS)
    outer = Member("archive/data/0", inner.local())
    members = [outer] + _members(_state_dict({"w": _tensor("1")}), storages={})
    return _zip(members, hidden=[(inner, 30 + len(outer.name))])


def _duplicate(folder: Path, canary: str) -> bytes:
    base = _members(_state_dict())
    return _zip(base + [Member("archive/data.pkl", _with(_SYSTEM(folder, canary)))])


def _tar(folder: Path, canary: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("storages", pickle.dumps(0, protocol=2)), ("tensors", pickle.dumps(0, protocol=2)),
                           ("pickle", _evil_pickle(canary))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _payload_zip(folder: Path, canary: str) -> bytes:
    return _zip(_members(_with(_SYSTEM(folder, canary))))


_IGNORED = "torch never looks at an entry it does not need"
Z_CASES = [
    Case("z-entry-parent-traversal", _with_member(Member("archive/../../x", b"x")), "../", torch_accepts=_IGNORED),
    Case("z-entry-absolute-path", _with_member(Member("/x/evil", b"x")), "'/x/evil'"),
    Case("z-entry-backslash", _with_member(Member("archive\\..\\evil", b"x")), "unexpected archive entry"),
    Case("z-entry-drive-letter", _with_member(Member("C:/evil", b"x")), "unexpected archive entry"),
    Case("z-entry-with-nul", _with_member(Member("archive/data/0\0.py", b"x")), "unexpected archive entry",
         torch_accepts=_IGNORED),
    Case("z-entry-name-forging-a-line", _with_member(Member("archive/x\nsdport: ok, file is safe", b"x")),
         "unexpected archive entry", torch_accepts=_IGNORED),
    Case("z-entry-with-trailing-newline", _with_member(Member("archive/data/0\n", WEIGHTS)),
         "unexpected archive entry", torch_accepts=_IGNORED),
    Case("z-stray-entry-in-archive", _with_member(Member("archive/evil.py", b"import os\n")),
         "unexpected archive entry", torch_accepts=_IGNORED),
    Case("z-second-top-folder-with-payload-pickle",
         lambda f, c: _zip(_members(_state_dict()) + _members(_with(_SYSTEM(f, c)), root="other")),
         "multiple data.pkl"),
    Case("z-second-top-folder", _with_member(Member("other/version", b"3\n")), "no single archive folder"),
    Case("z-deflated-storage-entry", _replace_member("archive/data/0", deflate=True), "compressed entry",
         torch_accepts="torch (miniz) inflates a deflated entry, although torch.save never writes one"),
    Case("z-deflated-entry-with-escape-in-name",
         _with_member(Member("archive/\x1b[2Jevil", b"x" * 64, deflate=True)), "compressed entry",
         torch_accepts=_IGNORED),
    Case("z-encrypted-flag-on-data-pkl", _replace_member("archive/data.pkl", flags=1), "encrypted entry"),
    Case("z-overlapping-entries", _overlap, "overlapping archive entries",
         torch_accepts="torch reads each entry through the central directory and never compares ranges"),
    Case("z-local-name-differs-from-central", _replace_member("archive/data.pkl", local_name="archive/data.pkX"),
         "inconsistent zip headers", torch_accepts="torch never compares a local header's name with the central one"),
    Case("z-crc-mismatch-on-data-pkl", _replace_member("archive/data.pkl", crc=0x12345678), "CRC mismatch",
         torch_accepts="torch 2.13 does not check the CRC of data.pkl"),
    Case("z-duplicate-data-pkl-second-with-payload", _duplicate, "duplicate archive entry",
         torch_accepts="torch takes the first of two data.pkl (Python's zipfile takes the last)"),
    Case("z-symlink-entry", _replace_member("archive/data/0", made_by=(3 << 8) | 20, attr=0o120777 << 16),
         "symlink entry", torch_accepts="torch ignores external attributes"),
    Case("z-storage-shorter-than-claimed", _in_zip(lambda f, c: _state_dict({"w": _tensor(numel=1000)})),
         "storage size mismatch"),
    Case("z-view-past-storage-end",
         _in_zip(lambda f, c: _state_dict({"w": _tensor(offset=1, shape=(4,), stride=(1,))})),
         "tensor extent exceeds storage"),
    Case("z-negative-stride", _in_zip(lambda f, c: _state_dict({"w": _tensor(shape=(4,), stride=(-1,))})),
         "invalid tensor shape"),
    Case("z-storage-entry-missing", _in_zip(lambda f, c: _state_dict({"w": _tensor("7")})), "missing storage data/7"),
    Case("z-junk-prepended-polyglot", lambda f, c: b"MZ" + b"\0" * 62 + _payload_zip(f, c),
         "not a supported checkpoint format"),
    Case("z-junk-after-end-record", lambda f, c: _zip(_members(_state_dict())) + _evil_pickle(c), "end record",
         torch_accepts="torch finds the end record by scanning back and ignores what follows it"),
    Case("z-legacy-tar-checkpoint", _tar, "tar"),
    Case("z-gzip-wrapped-checkpoint", lambda f, c: gzip.compress(_payload_zip(f, c)), "gzip"),
    Case("z-7z-wrapped-checkpoint", lambda f, c: b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\0" * 24 + _payload_zip(f, c),
         "7z"),
]


def _st(header: bytes | dict, data: bytes = b"", *, length: int | None = None) -> Build:
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(head) if length is None else length
    return lambda f, c: struct.pack("<Q", n) + head + data


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


_W = {"w": _t("F32", [2], 0, 8)}
S_CASES = [
    Case("s-header-length-beyond-file", _st(_W, b"\0" * 8, length=4096), "header length exceeds file"),
    Case("s-header-length-over-100mb", _st(b"{}", length=200_000_000), "header too large"),
    Case("s-header-not-utf8", _st(b'{"w\xff\xfe": 1}'), "not UTF-8"),
    Case("s-header-not-json", _st(b'{"w": {"dtype": "F32",'), "not valid JSON"),
    Case("s-header-json-array", _st(b" [1, 2]"), "must be a JSON object"),
    Case("s-duplicate-key", _st(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
         "duplicate key 'w'"),
    Case("s-unknown-dtype", _st({"w": _t("Q7", [2], 0, 8)}, b"\0" * 8), "unsupported dtype"),
    Case("s-overlapping-offsets", _st({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, b"\0" * 12),
         "overlapping"),
    Case("s-hole-between-tensors", _st({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, b"\0" * 12),
         "non-contiguous"),
    Case("s-data-shorter-than-last-offset", _st({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 4, 8)}, b"\0" * 7),
         "file is truncated"),
    Case("s-data-longer-polyglot-zip", lambda f, c: _st(_W, b"\0" * 8)(f, c) + _payload_zip(f, c),
         "trailing bytes"),
    Case("s-byte-length-not-shape-times-itemsize",
         _st({"w": _t("F32", [2, 2], 0, 8), "b": _t("F32", [2], 8, 16)}, b"\0" * 16), "byte length"),
    Case("s-negative-shape", _st({"w": _t("F32", [-2], 0, 8)}, b"\0" * 8), "invalid tensor shape"),
    Case("s-overflowing-shape", _st({"w": _t("F32", [2, 2**63], 0, 8)}, b"\0" * 8), "overflow"),
    Case("s-metadata-value-not-a-string", _st({"__metadata__": {"format": 1}, **_W}, b"\0" * 8), "__metadata__"),
    Case("s-tensor-name-forging-a-line", _st({"w\nsdport: ok, file is safe": _t("Q7", [2], 0, 8)}, b"\0" * 8),
         "unsupported dtype"),
]
S_CASES = [replace(c, name="model.safetensors") for c in S_CASES]


# ------------------------------------------------------------------------------------------- running
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def _write(case: Case, folder: Path, canary: str) -> Path:
    folder.mkdir(parents=True)
    _plant(folder, canary)
    path = folder / case.name
    if case.sparse:
        _write_big_pickle_zip(path)
    else:
        path.write_bytes(case.build(folder, canary))
    return path


def _write_big_pickle_zip(path: Path) -> None:
    """A torch zip whose data.pkl is 65 MiB of zeros, written sparse (nothing that size is ever in memory)."""
    size = 65 << 20
    crc = 0
    zero = bytes(1 << 20)
    for _ in range(size >> 20):
        crc = zlib.crc32(zero, crc)
    name = b"archive/data.pkl"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, size, size, len(name), 0) + name
    rest = _members(_state_dict())[1:]
    with open(path, "wb") as f:
        f.write(local)
        f.seek(size, os.SEEK_CUR)
        records = [struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, size, size, len(name),
                               0, 0, 0, 0, 0, 0) + name]
        for m in rest:
            records.append(m.central(f.tell()))
            f.write(m.local())
        cd_at = f.tell()
        cd = b"".join(records)
        f.write(cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(cd), cd_at, 0))


def _assert_refused(r: Run, what: str, path: Path, keyword: str, seconds: float) -> None:
    assert r.code == 2, f"{what}: exit {r.code}\n{r.err}"
    assert r.out == "", f"{what}: stdout {r.out!r}"
    assert r.err.endswith("\n") and r.err.count("\n") == 1, f"{what}: not one line: {r.err!r}"
    assert r.err.startswith(f"sdport: error: {path}: "), f"{what}: {r.err!r}"
    assert keyword in r.err, f"{what}: {keyword!r} not in {r.err!r}"
    assert "Traceback" not in r.err and "internal error" not in r.err, f"{what}: {r.err!r}"
    assert not _CONTROL.search(r.err[:-1]), f"{what}: control character in {r.err!r}"
    assert seconds < 10, f"{what}: took {seconds:.1f} s"


# One BLAS thread: numpy's import otherwise starts a pool per process, a quarter of a refusal's cost.
_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}


def _timed_cli(*args: str | os.PathLike, cwd: Path) -> tuple[Run, float]:
    start = time.monotonic()
    try:
        r = run_cli(*args, timeout=60, cwd=cwd, env=_ENV)
    except subprocess.TimeoutExpired:
        r = Run(-9, "", "timed out after 60 s (a hang)\n")
    return r, time.monotonic() - start


def _timed_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[Run, float]:
    from sdport.cli import main

    capsys.readouterr()
    start = time.monotonic()
    code = main(list(args))
    seconds = time.monotonic() - start
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err), seconds


@dataclass(frozen=True)
class Converted:
    """One case's input on disk, and what ``sdport convert`` made of it."""

    path: Path
    out: Path
    canary: Path
    sha: str
    mtime: int
    run: Run
    seconds: float


@pytest.fixture(scope="module")
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Converted]:
    """Every selected case, built in a folder of its own and run through ``sdport convert`` as a process.

    An interpreter start costs more than any refusal, so the processes run side by side, one per core.
    Each one's working folder is the input's, where ``mymodule.py`` waits to be imported.
    """
    cases = {item.callspec.params["case"] for item in request.session.items
             if item.module is request.module and "converted" in getattr(item, "fixturenames", ())}
    prepared = {}
    for case in cases:
        root = tmp_path_factory.mktemp(case.id)
        canary, out_dir = root / "CANARY", root / "out"
        path = _write(case, root / "in", str(canary))
        out_dir.mkdir()
        out = out_dir / ("out.ckpt" if case.name.endswith(".safetensors") else "out.safetensors")
        prepared[case.id] = (path, out, canary, sha256(path), path.stat().st_mtime_ns)
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        runs = {cid: pool.submit(_timed_cli, "convert", path, out, cwd=path.parent)
                for cid, (path, out, *_) in prepared.items()}
        return {cid: Converted(*prepared[cid], *runs[cid].result()) for cid in prepared}


def _check_refused(case: Case, done: Converted, capsys: pytest.CaptureFixture) -> None:
    """``convert`` ran as its own process (fixture); ``inspect`` runs here through ``sdport.cli.main``."""
    ri, ti = _timed_main(capsys, "inspect", str(done.path))
    _assert_refused(ri, "inspect", done.path, case.keyword, ti)
    _assert_refused(done.run, "convert", done.path, case.keyword, done.seconds)
    assert not done.canary.exists(), "a payload ran"
    out_dir = done.out.parent
    assert not done.out.exists() and leftovers(out_dir) == [] and os.listdir(out_dir) == []
    assert sha256(done.path) == done.sha and done.path.stat().st_mtime_ns == done.mtime


def _params(cases: Sequence[Case]) -> list:
    assert len({c.id for c in cases}) == len(cases)
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.mark.parametrize("case", _params(P_CASES))
def test_hostile_pickle_is_refused_before_anything_runs(case: Case, converted, capsys) -> None:
    _check_refused(case, converted[case.id], capsys)


@pytest.mark.parametrize("case", _params(Z_CASES))
def test_hostile_zip_container_is_refused_without_extracting_anything(case: Case, converted, capsys) -> None:
    _check_refused(case, converted[case.id], capsys)


@pytest.mark.parametrize("case", _params(S_CASES))
def test_malformed_safetensors_header_is_refused_with_one_line(case: Case, converted, capsys) -> None:
    _check_refused(case, converted[case.id], capsys)


# ------------------------------------------------------------------------------------------- oracle
class TorchAccepted(AssertionError):
    """torch.load(weights_only=True) loaded a file sdport refuses."""


def _oracle_params() -> list:
    out = []
    for c in P_CASES + Z_CASES:
        marks = [pytest.mark.xfail(strict=True, raises=TorchAccepted, reason=c.torch_accepts)] if c.torch_accepts \
            else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _oracle_params())
@pytest.mark.filterwarnings("ignore:Detected pickle protocol", "ignore:'torch.load' received a zip file")
def test_torch_weights_only_refuses_every_pickle_and_zip_case_too(case: Case, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    canary = tmp_path / "CANARY"
    path = _write(case, tmp_path / "in", str(canary))
    try:
        torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal will do; what matters is that torch did not load it
        accepted = False
    else:
        accepted = True
    assert not canary.exists(), "torch ran a payload"
    if accepted:
        raise TorchAccepted(f"torch.load(weights_only=True) accepted {case.id}")


# ------------------------------------------------------------------------------------------- controls
CONTROLS = {
    "zip": ("model.ckpt", lambda: _zip(_members(_state_dict())), "torch-zip"),
    "legacy": ("model.pt", lambda: _legacy(_state_dict(legacy=True)), "torch-legacy"),
}


@pytest.mark.parametrize("kind", list(CONTROLS))
def test_the_files_the_corpus_is_built_from_are_read_by_sdport_and_torch(kind: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    name, build, fmt = CONTROLS[kind]
    path = tmp_path / name
    path.write_bytes(build())
    r = run_cli("inspect", path, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["format"] == fmt and report["tensors"] == 1 and report["root"] == "state_dict"
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", path, out, "-q").code == 0
    want = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], want)
    import safetensors.torch

    assert torch.equal(safetensors.torch.load_file(str(out))["w"], want)


def test_memo_index_near_4g_is_a_dict_key_not_an_allocation(tmp_path: Path) -> None:
    """``LONG_BINPUT 0xFFFFFFFF`` makes a C unpickler size its memo table by index; here it is one entry."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.ckpt"
    path.write_bytes(_zip(_members(_state_dict(memo=b"r\xff\xff\xff\xff"))))
    r, seconds = _timed_cli("inspect", path, cwd=tmp_path)
    assert r.code == 0 and seconds < 10, r.err
    assert torch.load(path, weights_only=True)["state_dict"]["w"].shape == (2, 2)


# Payloads that run under plain ``pickle.loads`` on this machine (the others need Windows, torch, or an old pip).
LIVE = ["p-posix-system", "p-os-system", "p-builtins-exec", "p-builtins-eval", "p-builtins-open", "p-subprocess-popen",
        "p-subprocess-check-output", "p-import-then-getattr", "p-pkgutil-resolve-name", "p-functools-partial",
        "p-copyreg-reconstructor", "p-numpy-load-allow-pickle", "p-runpy-run-path",
        "p-unknown-global-from-working-folder", "p4-stack-global-os-system", "p5-framed-subprocess-popen",
        "p-inst-opcode", "p-obj-opcode-building-popen", "p-persid-with-payload-in-the-pid",
        "p-payload-before-the-state-dict", "p-nullifai-payload-then-broken-stream"]


def test_the_payloads_are_live_so_an_absent_canary_means_something(tmp_path: Path) -> None:
    """Plain ``pickle.loads`` of each data.pkl, in a process of its own, does create the canary."""
    import sys

    by_id = {c.id: c for c in P_CASES}
    canaries = []
    for cid in LIVE:
        canary = tmp_path / cid / "CANARY"
        path = _write(by_id[cid], tmp_path / cid / "in", str(canary))
        with zipfile.ZipFile(path) as z:
            data = z.read("archive/data.pkl")
        # torch blocked: the payload runs before the tensor's global, which would only import torch, slowly
        subprocess.run([sys.executable, "-c", "import pickle, sys; sys.modules['torch'] = None; "
                        "pickle.loads(sys.stdin.buffer.read())"], input=data, cwd=path.parent, capture_output=True,
                       timeout=60)
        canaries.append(canary)
    deadline = time.monotonic() + 10  # Popen payloads touch the canary in a child that may still be running
    while not all(c.exists() for c in canaries) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c.parent.name for c in canaries if not c.exists()] == []
