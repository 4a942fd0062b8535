"""Every weight format sdport reads or writes, in one registry: how it is recognised, opened and written.

``FORMATS`` lists each format once. ``sniff`` recognises it from a file's first bytes (or, for a
folder format, from the folder's entries) — never from a name; ``open`` returns a lazy
``TensorSource``; ``writer`` is the ``StreamWriter`` a plan's ``WriterSpec`` names, for the formats
sdport writes. A format's module is imported only when it is used.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, SdportError, SourceNotFoundError
from .base import Slot, TensorInfo, TensorSource

__all__ = ["FORMATS", "Format", "Slot", "TensorInfo", "TensorSource", "open_file", "open_tensors", "open_writer",
           "sniff_format"]

#: bytes read from the start of a file to recognise it (a tar header's magic sits at byte 257)
HEAD = 512
_WRAPPERS = {b"\x1f\x8b": "gzip", b"7z\xbc\xaf": "7z", b"\xfd7zXZ": "xz", b"BZh": "bzip2", b"Rar!": "rar"}


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    """``module.attr`` called on first use, so that recognising a file imports only what reading it needs."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module, __name__), attr)(*args, **kwargs)
    return call


def _is_safetensors(path: str, head: bytes) -> bool:
    return len(head) >= 9 and int.from_bytes(head[:8], "little") < (1 << 40) and head[8:9] in b"{ \t\r\n"


def _is_onnx_export(path: str, head: bytes) -> bool:
    return any(os.path.isfile(os.path.join(path, d, "model.onnx")) for d in os.listdir(path))


@dataclass(frozen=True)
class Format:
    """One format: its name (``TensorSource.format`` of what it opens), how to recognise, open and write it."""

    name: str
    folder: bool
    sniff: Callable[[str, bytes], bool]
    open: Callable[..., TensorSource]
    writer: Callable[..., Any] | None = None


#: in sniffing order: the first whose ``sniff`` says yes reads the file (diffusers: any other folder)
FORMATS: tuple[Format, ...] = (
    Format("safetensors", False, _is_safetensors, _lazy(".safetensors", "open_safetensors"),
           _lazy(".safetensors", "SafetensorsWriter")),
    Format("mindspore", False, _lazy(".mindspore", "looks_like"), _lazy(".mindspore", "open_mindspore"),
           _lazy(".mindspore", "MindSporeWriter")),
    Format("onnx", False, _lazy(".onnx", "looks_like"), _lazy(".onnx", "open_onnx"), _lazy(".onnx", "OnnxWriter")),
    Format("torch-zip", False, lambda path, head: head[:4] == b"PK\x03\x04", _lazy(".torch", "open_torch_zip"),
           _lazy(".torch", "TorchWriter")),
    Format("torch-legacy", False, lambda path, head: head[:4] == b"\x80\x02\x8a\x0a",
           _lazy(".torch", "open_torch_legacy")),
    Format("pickle", False, lambda path, head: _not_tar(path, head) and head[:1] == b"\x80",
           _lazy(".torch", "open_plain_pickle")),
    Format("onnx", True, _is_onnx_export, _lazy(".onnx_folder", "open_onnx_folder")),
    Format("diffusers", True, lambda path, head: True, _lazy(".diffusers", "open_diffusers")),
)
WRITERS: dict[str, Format] = {f.name: f for f in FORMATS if f.writer is not None}


def _refuse(path: str, head: bytes) -> None:
    """Files that are not models but are often mistaken for one: say what they are."""
    if head.startswith(b"version https://git-lfs"):
        raise FormatError(path, "this is a Git LFS pointer, not the model", "download the file with git lfs pull")
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        raise FormatError(path, "file is HTML, not a model", "the download needs a login or the URL is wrong")
    for magic, name in _WRAPPERS.items():
        if head.startswith(magic):
            raise FormatError(path, f"not a supported checkpoint format ({name}-compressed)", "decompress it first")


def _not_tar(path: str, head: bytes) -> bool:
    """True unless the file is a tar archive (torch's pre-1.6 tar checkpoints), which is refused by name."""
    if head[257:262] == b"ustar":
        raise FormatError(path, "legacy tar checkpoint not supported", "re-save it with a current torch.save")
    return True


def sniff_format(path: str) -> Format:
    """The format of a weights file, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(HEAD)
    if _is_safetensors(path, head):
        return FORMATS[0]
    _refuse(path, head)
    for fmt in FORMATS:
        if not fmt.folder and fmt.sniff(path, head):
            return fmt
    if len(head) < 8:
        raise FormatError(path, "file too small to be a model", None)
    raise FormatError(path, "not a supported checkpoint format", "sdport reads safetensors, PyTorch "
                      ".ckpt/.pt/.bin, MindSpore .ckpt, ONNX and diffusers folders")


def open_file(path: str) -> TensorSource:
    """Open one weights file of any supported format."""
    return sniff_format(path).open(path)


def open_tensors(path: str | os.PathLike[str], *, variant: str | None = None) -> TensorSource:
    """Open a weights file or a model folder (diffusers, ONNX export) as a lazy TensorSource.

    Raises:
        SourceNotFoundError: nothing at ``path``.
        FormatError / UnsafeFileError: the file is malformed, crafted, or not a format sdport reads.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        fmt = next(f for f in FORMATS if f.folder and f.sniff(path, b""))
        return fmt.open(path, variant=variant) if fmt.name == "diffusers" else fmt.open(path)
    if not os.path.exists(path):
        raise SourceNotFoundError(path, "no such file or folder", None)
    try:
        return open_file(path)
    except SdportError:
        raise
    except OSError as exc:
        raise FormatError(path, f"cannot read file ({exc.strerror or exc})", None) from exc


def open_writer(format: str, target: str, *, force: bool, **options: Any) -> Any:
    """The ``StreamWriter`` of ``format`` for ``target`` (options: ``root`` for torch-zip, ``crc`` for mindspore …)."""
    return WRITERS[format].writer(target, force=force, **options)
