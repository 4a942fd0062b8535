"""Zip archives as PyTorch writes them: a strict reader of entry ranges and a STORED writer.

The reader never inflates or extracts anything: it checks that the end record, the central
directory and every local header agree, that entries are stored (not compressed or encrypted),
that no two entries overlap and that nothing is hidden before or after them, then reports where
each entry's bytes lie. The writer emits stored entries with data aligned to 64 bytes, in zip64
form when a size or offset needs it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FormatError

_LOCAL, _CENTRAL, _EOCD = 0x04034B50, 0x02014B50, 0x06054B50
_EOCD64, _LOCATOR = 0x06064B50, 0x07064B50
_MAX32, _MAX16 = 0xFFFFFFFF, 0xFFFF
ALIGN = 64


@dataclass(frozen=True)
class Entry:
    name: str
    offset: int  # where the entry's data starts in the file
    size: int
    crc: int


def _u(fmt: str, buf: bytes, at: int) -> tuple:
    return struct.unpack_from("<" + fmt, buf, at)


def read_entries(path: str, check_names: Callable[[list[str]], None] | None = None) -> dict[str, Entry]:
    """All entries of the zip at ``path``, by name, after the container checks.

    ``check_names`` sees every name of the central directory before any entry is checked, so that a
    caller can refuse what the archive is (a TorchScript program, say) before a detail of one entry.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise FormatError(path, "unexpected data before zip", "not a plain PyTorch archive")
        tail_len = min(size, 22 + 0xFFFF + 20)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        eocd_at, count, cd_size, cd_offset = _find_end(path, tail, size)
        if cd_offset + cd_size > eocd_at or cd_size > 64 << 20:
            raise FormatError(path, "inconsistent zip headers (central directory)", None)
        f.seek(cd_offset)
        cd = f.read(cd_size)
        records = _split_central(path, cd, count)
        if check_names is not None:
            check_names([name for name, *_ in records])
        return _check_locals(path, f, _check_central(path, records), cd_offset)


def _find_end(path: str, tail: bytes, size: int) -> tuple[int, int, int, int]:
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and at + 22 + _u("H", tail, at + 20)[0] != len(tail):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise FormatError(path, "no zip end record or data after it", "the file is truncated or not a zip")
    _, disk, cd_disk, n_disk, count, cd_size, cd_offset, _ = _u("IHHHHIIH", tail, at)
    eocd_at = size - len(tail) + at
    if disk or cd_disk or n_disk != count:
        raise FormatError(path, "multi-disk zip archives are not supported", None)
    if _MAX16 in (count,) or _MAX32 in (cd_size, cd_offset):
        loc = at - 20
        if loc < 0 or _u("I", tail, loc)[0] != _LOCATOR:
            raise FormatError(path, "inconsistent zip headers (zip64 locator)", None)
        z64_at = _u("Q", tail, loc + 8)[0]
        rel = z64_at - (size - len(tail))
        if rel < 0 or rel + 56 > loc or _u("I", tail, rel)[0] != _EOCD64:
            raise FormatError(path, "inconsistent zip headers (zip64 end record)", None)
        count, cd_size, cd_offset = _u("QQQ", tail, rel + 32)
        eocd_at = z64_at
    return eocd_at, count, cd_size, cd_offset


def _split_central(path: str, cd: bytes, count: int) -> list[tuple[str, bytes, bytes, tuple]]:
    """The central directory's records as (name, raw name, extra field, fixed fields); nothing checked yet."""
    out, at = [], 0
    for _ in range(count):
        if at + 46 > len(cd) or _u("I", cd, at)[0] != _CENTRAL:
            raise FormatError(path, "inconsistent zip headers (central directory)", None)
        fields = _u("HHHHHHIIIHHHHHII", cd, at + 4)
        nlen, xlen, clen = fields[9:12]
        raw = cd[at + 46:at + 46 + nlen]
        extra = cd[at + 46 + nlen:at + 46 + nlen + xlen]
        at += 46 + nlen + xlen + clen
        out.append((raw.decode("utf-8" if fields[2] & 0x800 else "cp437", "replace"), raw, extra, fields))
    if at != len(cd):
        raise FormatError(path, "inconsistent zip headers (central directory size)", None)
    return out


def _check_central(path: str, records: list[tuple[str, bytes, bytes, tuple]]) -> list[tuple]:
    """Per entry: stored, not encrypted, not a symlink, and named once."""
    out, seen = [], set()
    for name, raw, extra, (made, _, flags, method, _, _, crc, csize, usize, _, _, _, _, _, attr, local) in records:
        usize, csize, local = _zip64(path, extra, usize, csize, local)
        if flags & 0x1:
            raise FormatError(path, f"encrypted entry {name!r}", "sdport reads only plain archives")
        if method != 0 or csize != usize:
            raise FormatError(path, f"compressed entry not supported: {name!r}",
                              "PyTorch writes stored entries; re-save the checkpoint with torch.save")
        if made >> 8 == 3 and (attr >> 16) & 0o170000 == 0o120000:
            raise FormatError(path, f"symlink entry {name!r}", "the archive is crafted")
        if name in seen:
            raise FormatError(path, f"duplicate archive entry {name!r}", "the archive is crafted")
        seen.add(name)
        out.append((name, raw, flags, crc, usize, local))
    return out


def _zip64(path: str, extra: bytes, usize: int, csize: int, local: int) -> tuple[int, int, int]:
    at = 0
    while at + 4 <= len(extra):
        tag, n = _u("HH", extra, at)
        if tag == 0x0001:
            vals = [usize, csize, local]
            body, pos = extra[at + 4:at + 4 + n], 0
            for i, v in enumerate(vals):
                if v == _MAX32:
                    if pos + 8 > len(body):
                        raise FormatError(path, "inconsistent zip headers (zip64 field)", None)
                    vals[i] = _u("Q", body, pos)[0]
                    pos += 8
            return vals[0], vals[1], vals[2]
        at += 4 + n
    return usize, csize, local


def _check_locals(path: str, f, entries, cd_offset: int) -> dict[str, Entry]:
    result: dict[str, Entry] = {}
    ranges = []
    for name, raw, flags, crc, usize, local in entries:
        f.seek(local)
        head = f.read(30)
        if len(head) < 30 or _u("I", head, 0)[0] != _LOCAL:
            raise FormatError(path, f"inconsistent zip headers for {name!r}", None)
        _, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, nlen, xlen = _u("IHHHHHIIIHH", head, 0)
        if f.read(nlen) != raw or lmethod != 0 or (lflags ^ flags) & 0x1:
            raise FormatError(path, f"inconsistent zip headers for {name!r}", "the archive is crafted")
        if not flags & 0x8 and lcrc != crc:
            raise FormatError(path, f"inconsistent zip headers for {name!r} (CRC)", None)
        start = local + 30 + nlen + xlen
        ranges.append((local, start + usize, name))
        result[name] = Entry(name, start, usize, crc)
    ranges.sort()
    if not ranges or ranges[0][0] != 0:
        raise FormatError(path, "unexpected data before zip", "not a plain PyTorch archive")
    for (_, end, a), (nxt, _, b) in zip(ranges, ranges[1:], strict=False):
        if end > nxt:
            raise FormatError(path, f"overlapping archive entries {a!r} and {b!r}", "the archive is crafted")
    if ranges[-1][1] > cd_offset:
        raise FormatError(path, "overlapping archive entries (data runs into the directory)", None)
    return result


class ZipBuilder:
    """Writes stored zip entries through ``emit`` (a function appending bytes at position ``pos()``)."""

    def __init__(self, emit, pos):
        self.emit, self.pos = emit, pos
        self.central: list[bytes] = []

    def start_entry(self, name: str, size: int, crc: int) -> None:
        """Write a local header so that the entry's data begins on a 64-byte boundary."""
        raw = name.encode("utf-8")
        local = self.pos()
        big = size >= _MAX32 or local >= _MAX32
        z64 = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        base = local + 30 + len(raw) + len(z64)
        pad = -(base + 4) % ALIGN
        extra = z64 + struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # miniz's 'FB' padding field
        s32 = _MAX32 if big else size
        self.emit(struct.pack("<IHHHHHIIIHH", _LOCAL, 45 if big else 20, 0x800, 0, 0, 0x21,
                              crc, s32, s32, len(raw), len(extra)) + raw + extra)
        self._remember(raw, size, crc, local)

    def _remember(self, raw: bytes, size: int, crc: int, local: int) -> None:
        fields = [v for v in (size, size, local) if v >= _MAX32]
        big = bool(fields)
        extra = struct.pack("<HH", 1, 8 * len(fields)) + b"".join(struct.pack("<Q", v) for v in fields) if big else b""
        s32 = _MAX32 if size >= _MAX32 else size
        self.central.append(struct.pack(
            "<IHHHHHHIIIHHHHHII", _CENTRAL, 45 if big else 20, 45 if big else 20, 0x800, 0, 0, 0x21, crc,
            s32, s32, len(raw), len(extra), 0, 0, 0, 0, min(local, _MAX32)) + raw + extra)

    def set_crc(self, index: int, crc: int) -> None:
        """Patch the CRC of central record ``index`` (its local header was patched by the caller)."""
        rec = bytearray(self.central[index])
        struct.pack_into("<I", rec, 16, crc)
        self.central[index] = bytes(rec)

    def finish(self) -> None:
        cd_offset = self.pos()
        blob = b"".join(self.central)
        n = len(self.central)
        self.emit(blob)
        if n >= _MAX16 or cd_offset >= _MAX32 or len(blob) >= _MAX32:
            z64_at = self.pos()
            self.emit(struct.pack("<IQHHIIQQQQ", _EOCD64, 44, 45, 45, 0, 0, n, n, len(blob), cd_offset))
            self.emit(struct.pack("<IIQI", _LOCATOR, 0, z64_at, 1))
            self.emit(struct.pack("<IHHHHIIH", _EOCD, 0, 0, _MAX16, _MAX16, _MAX32, _MAX32, 0))
        else:
            self.emit(struct.pack("<IHHHHIIH", _EOCD, 0, 0, n, n, len(blob), cd_offset, 0))
