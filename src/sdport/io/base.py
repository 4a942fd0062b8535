"""The lazy ``TensorSource`` every reader returns, and the ``TensorInfo`` records it holds.

A source knows each tensor's dtype, shape and where its bytes lie; it reads a tensor only when
asked (``read``), into a fresh buffer with ``pread`` so that nothing stays mapped in memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from ..dtypes import BY_CODE
from ..errors import FormatError


@dataclass(frozen=True)
class Slot:
    """One tensor the writer will place: name, dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BY_CODE[self.dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are.

    ``offset``/``nbytes`` locate the bytes of a contiguous tensor in ``file``. A torch view that is
    not contiguous keeps ``strides`` (in elements) over a storage of ``storage_nbytes`` bytes at
    ``offset``; it is gathered with numpy when read. A tensor computed by sdport itself (an adapter's
    re-factorised factors) is held in ``array`` and has no file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    strides: tuple[int, ...] | None = None
    storage_nbytes: int = 0
    chunks: tuple[tuple[int, int], ...] | None = None  # (offset, nbytes) pieces in file order (MindSpore > 512 MiB)
    array: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        """One byte range in ``file`` (not a strided view, not in chunks, not in memory)."""
        return self.strides is None and self.chunks is None and self.array is None


@dataclass
class TensorSource:
    """The tensors of one model file or folder, by name, nothing loaded.

    Attributes:
        path: what the user named (a file or a directory).
        format: ``safetensors``, ``torch-zip``, ``torch-legacy`` or ``diffusers``.
        tensors: name → TensorInfo, in file order.
        metadata: string metadata (safetensors ``__metadata__``); empty when the format has none.
        non_tensors: name → short description of entries that are not tensors (``global_step`` …).
        root: the container key the weights were found under (``state_dict``), or ``""``.
    """

    path: str
    format: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    non_tensors: dict[str, str] = field(default_factory=dict)
    root: str = ""
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def keys(self) -> list[str]:
        return list(self.tensors)

    def fork(self) -> TensorSource:
        """The same tensors in a source of their own (own descriptors), for others to be joined into."""
        return TensorSource(self.path, self.format, dict(self.tensors), dict(self.metadata), dict(self.non_tensors),
                            self.root)

    def put(self, name: str, array: np.ndarray) -> str:
        """Hold a tensor computed in memory under ``name`` (its dtype must be one sdport names); returns the name."""
        from ..dtypes import code_of

        if name in self.tensors:
            raise ValueError(f"'{name}' is already a tensor of {self.path}")
        array = np.require(array, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
        self.tensors[name] = TensorInfo(name, code_of(array), tuple(array.shape), "", 0, array.nbytes, array=array)
        return name

    def files(self) -> list[str]:
        """The files the tensors are read from."""
        return sorted({i.file for i in self.tensors.values() if i.array is None})

    def join(self, prefix: str, other: TensorSource) -> dict[str, str]:
        """Make ``other``'s tensors readable here as ``prefix`` + their names — one plan reading several models (a
        ``--base``, adapters) — and return each one's name here. This source opens their files from now on."""
        names = {k: prefix + k for k in other.tensors}
        taken = [n for n in names.values() if n in self.tensors]
        if taken:
            raise ValueError(f"prefix {prefix!r} is taken: '{taken[0]}' is already a tensor of {self.path}")
        self.tensors.update({names[k]: replace(v, name=names[k]) for k, v in other.tensors.items()})
        return names

    def fd(self, file: str) -> int:
        """A read-only descriptor of one of the source's files, opened once."""
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fds[file]

    def read_bytes(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        """Raw bytes of a contiguous tensor (or of a view's whole storage) as a uint8 array.

        ``start``/``count`` select a byte range of it; by default all of it.
        """
        if count is None:
            count = (info.nbytes if info.strides is None else info.storage_nbytes) - start
        buf = np.empty(count, dtype=np.uint8)
        view = memoryview(buf)
        if info.chunks:  # a tensor stored in pieces: each piece's share of [start, start + count)
            at = 0
            for offset, nbytes in info.chunks:
                lo, hi = max(start, at), min(start + count, at + nbytes)
                if lo < hi:
                    self._pread(info, view[lo - start:hi - start], offset + lo - at)
                at += nbytes
            return buf
        self._pread(info, view, info.offset + start)
        return buf

    def _pread(self, info: TensorInfo, view: memoryview, offset: int) -> None:
        fd, done, count = self.fd(info.file), 0, len(view)
        while done < count:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise FormatError(info.file, f"read error ({exc.strerror or exc})",
                                  "the disk holding the input failed") from exc
            if n == 0:
                raise FormatError(info.file, f"file ends inside tensor '{info.name}'", "the file is truncated")
            done += n

    def read_flat(self, info: TensorInfo, start: int, count: int) -> np.ndarray:
        """``count`` bytes of a contiguous tensor from byte ``start``, as a flat array of its dtype."""
        return self.read_bytes(info, start, count).view(BY_CODE[info.dtype].numpy)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new numpy array with its shape and dtype (one held in memory: itself)."""
        info = self.tensors[name]
        if info.array is not None:
            return info.array
        dt = BY_CODE[info.dtype].numpy
        raw = self.read_bytes(info).view(dt)
        if info.strides is None:
            return raw.reshape(info.shape)
        strided = np.lib.stride_tricks.as_strided(
            raw, info.shape, tuple(s * dt.itemsize for s in info.strides), writeable=False)
        return np.ascontiguousarray(strided)
