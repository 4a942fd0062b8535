"""The streaming writer every output format builds on.

A writer is told every tensor up front (``begin``), then receives each tensor's bytes in that
order (``write`` from an array, ``copy`` straight from another file), then ``commit``s: the file
appears at its target atomically, or not at all. Misuse (wrong order, wrong size, a second
``begin``) is an internal error, caught before a wrong byte is written.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import FormatError
from .atomic import AtomicFile, disk_error
from .base import Slot

_COPY_CHUNK = 64 << 20
#: once this many bytes are written, the kernel is asked to start writing them to disk (write-behind), so that
#: the final fsync has little left to do and the output does not crowd the page cache
WRITE_BEHIND = 64 << 20


class StreamWriter:
    """Base of the format writers: state, order checks, byte output, atomic commit.

    Subclasses implement ``_start(slots, metadata)``, ``_begin_tensor(slot)``, ``_end_tensor(slot)``
    and ``_finish()``; ``want_crc`` makes the writer keep a CRC32 of each tensor's bytes.
    """

    want_crc = False

    def __init__(self, target: str, *, force: bool = False):
        self.target = target
        self.force = force
        self.out: AtomicFile | None = None
        self.slots: Sequence[Slot] = ()
        self.index = 0
        self.pos = 0
        self.crc = 0
        self.left = 0
        self.flushed = 0

    # ----------------------------------------------------------------- public protocol
    def begin(self, slots: Sequence[Slot], metadata: dict[str, str] | None = None) -> None:
        if self.out is not None:
            raise RuntimeError("writer already begun")
        self.slots = list(slots)
        self.out = AtomicFile(self.target, force=self.force)
        self._start(self.slots, dict(metadata or {}))

    def write(self, name: str, array: np.ndarray) -> None:
        self.write_parts(name, (array,))

    def write_parts(self, name: str, parts: Iterable[np.ndarray]) -> None:
        """Write tensor ``name`` from consecutive pieces of its flat bytes, so a big cast never sits whole in memory."""
        slot = self._next(name)
        total = 0
        for part in parts:
            data = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            total += data.nbytes
            if total > slot.nbytes:
                break
            self.emit(memoryview(data), tensor=True)
        if total != slot.nbytes:
            raise RuntimeError(f"tensor '{name}': {total}+ bytes for a slot of {slot.nbytes}")
        self._close_tensor(slot)

    def copy(self, name: str, src_fd: int, offset: int, nbytes: int, src_path: str) -> None:
        """Copy ``nbytes`` at ``offset`` of ``src_fd`` into the output as tensor ``name``."""
        slot = self._next(name)
        if nbytes != slot.nbytes:
            raise RuntimeError(f"tensor '{name}': {nbytes} bytes for a slot of {slot.nbytes}")
        if self.want_crc:
            self._copy_through_memory(src_fd, offset, nbytes, src_path)
        else:
            self._copy_in_kernel(src_fd, offset, nbytes, src_path)
        self._close_tensor(slot)

    def commit(self) -> None:
        if self.index != len(self.slots):
            raise RuntimeError(f"commit after {self.index} of {len(self.slots)} tensors")
        self._finish()
        self.out.commit()

    def abort(self) -> None:
        if self.out is not None:
            self.out.abort()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.out is not None and not self.out.done:
            self.abort()

    # ----------------------------------------------------------------- helpers for subclasses
    def emit(self, data: bytes | memoryview, *, tensor: bool = False) -> None:
        """Append bytes to the output (counted into the current tensor's CRC when ``tensor``)."""
        if tensor and self.want_crc:
            self.crc = zlib.crc32(data, self.crc)
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.write(self.out.fd, view)
                view = view[n:]
                self.pos += n
        except OSError as exc:
            raise disk_error(self.target, exc) from exc
        self._write_behind()

    def _write_behind(self) -> None:
        """Start writeback of what was written since the last call, once it is WRITE_BEHIND bytes or more."""
        if self.pos - self.flushed >= WRITE_BEHIND and hasattr(os, "posix_fadvise"):
            # DONTNEED starts writeback of the dirty pages at once and drops them from the cache when clean
            os.posix_fadvise(self.out.fd, self.flushed, self.pos - self.flushed, os.POSIX_FADV_DONTNEED)
            self.flushed = self.pos

    def _next(self, name: str) -> Slot:
        if self.out is None:
            raise RuntimeError("write before begin")
        if self.index >= len(self.slots) or self.slots[self.index].name != name:
            raise RuntimeError(f"tensor '{name}' written out of order")
        slot = self.slots[self.index]
        self.crc = 0
        self._begin_tensor(slot)
        return slot

    def _close_tensor(self, slot: Slot) -> None:
        self._end_tensor(slot)
        self.index += 1

    def _copy_in_kernel(self, src_fd: int, offset: int, nbytes: int, src_path: str) -> None:
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, self.out.fd, min(nbytes - done, 1 << 30), offset + done)
                if n == 0:
                    raise FormatError(src_path, "file ends inside a tensor", "the file is truncated")
                done += n
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) and done == 0:
                self._copy_through_memory(src_fd, offset, nbytes, src_path)
                return
            if exc.errno == errno.EIO:
                raise FormatError(src_path, "read error (I/O error)", "the disk holding the input failed") from exc
            raise disk_error(self.target, exc) from exc
        self.pos += nbytes
        self._write_behind()

    def _copy_through_memory(self, src_fd: int, offset: int, nbytes: int, src_path: str) -> None:
        buf = bytearray(min(nbytes, _COPY_CHUNK))
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            want = min(nbytes - done, len(buf))
            try:
                n = os.preadv(src_fd, [view[:want]], offset + done)
            except OSError as exc:
                raise FormatError(src_path, f"read error ({exc.strerror})", None) from exc
            if n == 0:
                raise FormatError(src_path, "file ends inside a tensor", "the file is truncated")
            self.emit(view[:n], tensor=True)
            done += n

    # ----------------------------------------------------------------- format hooks
    def _start(self, slots: Sequence[Slot], metadata: dict[str, str]) -> None:
        raise NotImplementedError

    def _begin_tensor(self, slot: Slot) -> None:
        pass

    def _end_tensor(self, slot: Slot) -> None:
        pass

    def _finish(self) -> None:
        pass
