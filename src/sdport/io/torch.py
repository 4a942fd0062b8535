"""PyTorch checkpoints (``.ckpt .pt .pth .bin``) read and written without torch.

Reading: the zip format (torch ≥ 1.6, any archive folder name) and the legacy non-zip format,
both through sdport's own pickle interpreter (``io/pickle.py``); every tensor's extent is checked
against the bytes really in the file. Writing: the zip format, with a pickle assembled by hand
that ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from collections.abc import Sequence

from ..dtypes import BY_CODE
from ..errors import FormatError, UnsafeFileError
from . import pickle as rpickle
from .base import Slot, TensorInfo, TensorSource
from .writer import StreamWriter
from .ziparchive import ZipBuilder, read_entries

MAX_PICKLE = 64 << 20
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ENTRY = re.compile(r"^(data\.pkl|byteorder|version|\.format_version|\.storage_alignment|"
                    r"\.data/serialization_id|\.data/version|data/[0-9]{1,20})$")
# Containers whose content users mean when they load a checkpoint, in order of preference.
WEIGHT_ROOTS = ("state_dict", "model_state_dict", "params_ema", "params", "model", "module", "net")


# ------------------------------------------------------------------------------ zip format
def _refuse_torchscript(path: str, names: list[str]) -> None:
    """Run on the central directory's names before any entry check: TorchScript zips store code compressed."""
    if any(n.split("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in names):
        raise FormatError(path, "TorchScript archive not supported", "save the state_dict with torch.save instead")


def _zip_layout(path: str, entries: dict) -> tuple[str, dict[str, object]]:
    roots = {name.split("/", 1)[0] for name in entries}
    for name in entries:
        parts = name.split("/")
        if "\\" in name or name.startswith("/") or "\0" in name or ".." in parts or ":" in parts[0]:
            raise UnsafeFileError(path, f"unexpected archive entry {name!r}", "the archive is crafted")
    pickles = [n for n in entries if n.endswith("/data.pkl")]
    if len(pickles) > 1:
        raise FormatError(path, "multiple data.pkl in archive", "the archive is crafted")
    if len(roots) != 1 or not pickles:
        raise FormatError(path, "not a PyTorch checkpoint (no single archive folder with data.pkl)", None)
    root = roots.pop()
    inner = {}
    for name, entry in entries.items():
        rest = name[len(root) + 1:] if name.startswith(root + "/") else ""
        if not _ENTRY.fullmatch(rest):
            raise UnsafeFileError(path, f"unexpected archive entry {name!r}", "the archive is crafted")
        inner[rest] = entry
    return root, inner


def _read_entry(f, entry, path: str, limit: int) -> bytes:
    if entry.size > limit:
        raise FormatError(path, f"{entry.name!r} too large ({entry.size} bytes)", "the archive is crafted")
    f.seek(entry.offset)
    data = f.read(entry.size)
    if zlib.crc32(data) != entry.crc:
        raise FormatError(path, f"CRC mismatch in {entry.name.split('/', 1)[-1]}", "the file is damaged")
    return data


def open_torch_zip(path: str) -> TensorSource:
    _, inner = _zip_layout(path, read_entries(path, lambda names: _refuse_torchscript(path, names)))
    with open(path, "rb") as f:
        if "byteorder" in inner and _read_entry(f, inner["byteorder"], path, 64) != b"little":
            raise FormatError(path, "big-endian checkpoint not supported", None)
        data = _read_entry(f, inner["data.pkl"], path, MAX_PICKLE)
    where = path
    seen: dict[str, rpickle.StorageRef] = {}

    def persistent_load(pid: object) -> rpickle.StorageRef:
        ref = rpickle.storage_ref(pid, where, legacy=False)
        entry = inner.get(f"data/{ref.key}")
        if entry is None:
            raise FormatError(path, f"missing storage data/{ref.key}", "the archive is incomplete")
        if ref.numel * BY_CODE[ref.dtype].itemsize != entry.size:
            raise FormatError(path, f"storage size mismatch for data/{ref.key} ({ref.numel} elements of "
                              f"{ref.dtype}, {entry.size} bytes stored)", "the checkpoint is damaged or crafted")
        if seen.setdefault(ref.key, ref) != ref:
            raise FormatError(path, f"storage data/{ref.key} used with two dtypes", None)
        return ref

    obj, end = rpickle.load(data, where, persistent_load)
    if end != len(data):
        raise FormatError(path, "trailing data after pickle STOP in data.pkl", "the checkpoint is crafted")
    offsets = {key: inner[f"data/{key}"].offset for key in seen}
    return _source(path, "torch-zip", obj, lambda ref: (offsets[ref.key], path))


# ------------------------------------------------------------------------------ legacy format
def open_torch_legacy(path: str) -> TensorSource:
    """torch < 1.6's format: magic, protocol, sys_info and data pickles, a key list, raw storages."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(min(size, MAX_PICKLE))
    refs: dict[str, rpickle.StorageRef] = {}

    def persistent_load(pid: object) -> rpickle.StorageRef:
        ref = rpickle.storage_ref(pid, path, legacy=True)
        if refs.setdefault(ref.key, ref) != ref:
            raise FormatError(path, f"storage {ref.key} used with two dtypes", None)
        return ref

    pos = 0
    values = []
    for _ in range(3):
        value, pos = rpickle.load(head, path, lambda pid: _no_pid(path), pos)
        values.append(value)
    if values[0] != LEGACY_MAGIC or values[1] != 1001 or not isinstance(values[2], dict):
        raise FormatError(path, "not a PyTorch checkpoint (bad legacy header)", None)
    if values[2].get("little_endian") is not True:
        raise FormatError(path, "big-endian checkpoint not supported", None)
    obj, pos = rpickle.load(head, path, persistent_load, pos)
    keys, pos = rpickle.load(head, path, lambda pid: _no_pid(path), pos)
    if not isinstance(keys, list) or sorted(keys) != sorted(refs) or len(set(keys)) != len(keys):
        raise FormatError(path, "legacy storage list does not match the tensors", None)
    offsets = {}
    with open(path, "rb") as f:
        for key in keys:
            f.seek(pos)
            raw = f.read(8)
            ref = refs[key]
            nbytes = ref.numel * BY_CODE[ref.dtype].itemsize
            if len(raw) < 8 or struct.unpack("<q", raw)[0] != ref.numel or pos + 8 + nbytes > size:
                raise FormatError(path, f"storage size mismatch for storage {key}", "the file is damaged")
            offsets[key] = pos + 8
            pos += 8 + nbytes
    if pos != size:
        raise FormatError(path, "file has trailing bytes after the last storage", None)
    return _source(path, "torch-legacy", obj, lambda ref: (offsets[ref.key], path))


def _no_pid(path: str):
    raise FormatError(path, "invalid persistent id in a header pickle", None)


def open_plain_pickle(path: str) -> TensorSource:
    """A bare pickle (not a torch archive). Scanned like any other, then refused if it holds no tensors."""
    with open(path, "rb") as f:
        data = f.read(MAX_PICKLE + 1)
    if len(data) > MAX_PICKLE:
        raise FormatError(path, "data.pkl too large", None)
    rpickle.load(data, path, lambda pid: _no_pid(path))
    raise FormatError(path, "a plain pickle holds no tensor data", "not a PyTorch checkpoint")


# ------------------------------------------------------------------------------ flattening
def _source(path: str, fmt: str, obj: object, locate) -> TensorSource:
    root, weights, others = _weights_root(obj)
    tensors: dict[str, TensorInfo] = {}
    non_tensors: dict[str, str] = {f"{k}": _describe(v) for k, v in others.items()}
    for name, value in _flatten(weights, "", 0, path):
        if isinstance(value, rpickle.TensorRecord):
            tensors[name] = _info(name, value, locate)
        else:
            non_tensors[name] = _describe(value)
    return TensorSource(path=path, format=fmt, tensors=tensors, non_tensors=non_tensors, root=root)


def _weights_root(obj: object) -> tuple[str, object, dict]:
    path, others = [], {}
    while isinstance(obj, dict):
        key = next((k for k in WEIGHT_ROOTS if isinstance(obj.get(k), dict) and obj[k]), None)
        if key is None:
            break
        prefix = ".".join(path + [""])
        others.update({f"{prefix}{k}": v for k, v in obj.items() if k != key})
        path.append(key)
        obj = obj[key]
    return ".".join(path), obj, others


def _flatten(obj: object, prefix: str, depth: int, path: str):
    if depth > 64:
        raise FormatError(path, "checkpoint nesting too deep", None)
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (rpickle.TensorRecord, dict)) for v in obj):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        yield prefix.rstrip("."), obj
        return
    for key, value in items:
        yield from _flatten(value, f"{prefix}{key}.", depth + 1, path)


def _describe(value: object) -> str:
    if isinstance(value, rpickle.Opaque):
        return value.what
    if isinstance(value, rpickle.TensorRecord):
        return f"tensor {list(value.shape)} outside the weights"
    if isinstance(value, (dict, list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _info(name: str, rec: rpickle.TensorRecord, locate) -> TensorInfo:
    base, file = locate(rec.storage)
    item = BY_CODE[rec.storage.dtype].itemsize
    expect, acc = [], 1
    for d in reversed(rec.shape):
        expect.append(acc)
        acc *= d
    expect.reverse()
    contiguous = all(d == 1 or s == e for d, s, e in zip(rec.shape, rec.stride, expect, strict=True))
    numel = math.prod(rec.shape)
    if contiguous or numel == 0:
        return TensorInfo(name, rec.storage.dtype, rec.shape, file, base + rec.offset * item, numel * item)
    return TensorInfo(name, rec.storage.dtype, rec.shape, file, base + rec.offset * item, numel * item,
                      strides=rec.stride, storage_nbytes=(rec.storage.numel - rec.offset) * item)


# ------------------------------------------------------------------------------ writer
def _p_str(s: str) -> bytes:
    # BINUNICODE, not SHORT_BINUNICODE: torch's weights_only unpickler knows protocol 2 only.
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _p_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_tuple(items: Sequence[int]) -> bytes:
    return b"(" + b"".join(_p_int(i) for i in items) + b"t" if items else b")"


_ORDERED_DICT = b"ccollections\nOrderedDict\n)R"


def _tensor_pickle(s: Slot, key: int) -> bytes:
    """``_rebuild_tensor_v2`` over a typed storage, or v3 over an untyped one for dtypes without a class."""
    dt = BY_CODE[s.dtype]
    numel = math.prod(s.shape)
    strides = [math.prod(s.shape[i + 1:]) for i in range(len(s.shape))]
    storage = f"ctorch\n{dt.torch_storage}\n" if dt.torch_storage else "ctorch.storage\nUntypedStorage\n"
    count = numel if dt.torch_storage else numel * dt.itemsize
    args = (b"((" + _p_str("storage") + storage.encode() + _p_str(str(key)) + _p_str("cpu") + _p_int(count)
            + b"tQ" + _p_int(0) + _p_tuple(s.shape) + _p_tuple(strides) + b"\x89" + _ORDERED_DICT)
    if dt.torch_storage:
        return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"tR"
    return b"ctorch._utils\n_rebuild_tensor_v3\n" + args + f"ctorch\n{dt.torch_name}\ntR".encode()


def state_dict_pickle(slots: Sequence[Slot], root: str) -> bytes:
    """Protocol-2 pickle of ``{root: OrderedDict(name → tensor)}`` (or the bare dict when root is "")."""
    out = [b"\x80\x02"]
    if root:
        out.append(b"}" + _p_str(root))
    out.append(_ORDERED_DICT)
    for start in range(0, len(slots), 1000):
        out.append(b"(")
        for key, s in enumerate(slots[start:start + 1000], start):
            out.append(_p_str(s.name) + _tensor_pickle(s, key))
        out.append(b"u")
    if root:
        out.append(b"s")
    out.append(b".")
    return b"".join(out)


class TorchWriter(StreamWriter):
    """Write a torch zip checkpoint (``torch.load``-able) without torch, atomically.

    ``root`` wraps the tensors as ``{root: {...}}`` (``state_dict`` for full SD checkpoints).
    Every storage is one tensor, stored uncompressed and 64-byte aligned, as torch.save does.
    """

    want_crc = True

    def __init__(self, target: str, *, force: bool = False, root: str = "state_dict"):
        super().__init__(target, force=force)
        self.folder = re.sub(r"[^A-Za-z0-9_]", "_", os.path.splitext(os.path.basename(target))[0]) or "archive"
        self.root = root
        self.zip = ZipBuilder(self.emit, lambda: self.pos)
        self.header_at = 0

    def _small(self, name: str, data: bytes) -> None:
        self.zip.start_entry(f"{self.folder}/{name}", len(data), zlib.crc32(data))
        self.emit(data)

    def _start(self, slots: Sequence[Slot], metadata: dict[str, str]) -> None:
        self._small("data.pkl", state_dict_pickle(slots, self.root))
        self._small(".format_version", b"1")
        self._small(".storage_alignment", b"64")
        self._small("byteorder", b"little")

    def _begin_tensor(self, slot: Slot) -> None:
        self.header_at = self.pos
        self.zip.start_entry(f"{self.folder}/data/{self.index}", slot.nbytes, 0)

    def _end_tensor(self, slot: Slot) -> None:
        os.pwrite(self.out.fd, struct.pack("<I", self.crc), self.header_at + 14)
        self.zip.set_crc(len(self.zip.central) - 1, self.crc)

    def _finish(self) -> None:
        self._small("version", b"3\n")
        self._small(".data/serialization_id", os.urandom(10).hex().encode())
        self.zip.finish()
