"""Opening any weights file or folder as a lazy TensorSource, by its content, not its name."""

from __future__ import annotations

import os

from ..errors import FormatError, SdportError, SourceNotFoundError
from .base import Slot, TensorInfo, TensorSource

__all__ = ["Slot", "TensorInfo", "TensorSource", "open_file", "open_tensors", "sniff_format"]

_WRAPPERS = {b"\x1f\x8b": "gzip", b"7z\xbc\xaf": "7z", b"\xfd7zXZ": "xz", b"BZh": "bzip2", b"Rar!": "rar"}


def sniff_format(path: str) -> str:
    """The format of a file from its first bytes: safetensors, torch-zip, torch-legacy, pickle."""
    from .torch import sniff

    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < (1 << 40) and head[8:9] in b"{ \t\r\n":
        return "safetensors"
    if head.startswith(b"version https://git-lfs"):
        raise FormatError(path, "this is a Git LFS pointer, not the model", "download the file with git lfs pull")
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        raise FormatError(path, "file is HTML, not a model", "the download needs a login or the URL is wrong")
    for magic, name in _WRAPPERS.items():
        if head.startswith(magic):
            raise FormatError(path, f"not a supported checkpoint format ({name}-compressed)",
                              "decompress it first")
    from .mindspore import looks_like

    if looks_like(head):
        return "mindspore"
    kind = sniff(path)
    if kind is None:
        if len(head) < 8:
            raise FormatError(path, "file too small to be a model", None)
        raise FormatError(path, "not a supported checkpoint format", "sdport reads safetensors, "
                          "PyTorch .ckpt/.pt/.bin, MindSpore .ckpt and diffusers folders")
    return kind


def open_file(path: str) -> TensorSource:
    """Open one weights file of any supported format."""
    from .mindspore import open_mindspore
    from .safetensors import open_safetensors
    from .torch import open_plain_pickle, open_torch_legacy, open_torch_zip

    if path.endswith(".onnx"):
        from .onnx import open_onnx

        return open_onnx(path)
    opener = {"safetensors": open_safetensors, "torch-zip": open_torch_zip, "torch-legacy": open_torch_legacy,
              "pickle": open_plain_pickle, "mindspore": open_mindspore}[sniff_format(path)]
    return opener(path)


def open_tensors(path: str | os.PathLike, *, variant: str | None = None) -> TensorSource:
    """Open a weights file or a diffusers folder as a lazy TensorSource.

    Raises:
        SourceNotFoundError: nothing at ``path``.
        FormatError / UnsafeFileError: the file is malformed, crafted, or not a format sdport reads.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from .diffusers import open_diffusers
        from .onnx_folder import open_onnx_folder

        if any(os.path.isfile(os.path.join(path, d, "model.onnx")) for d in os.listdir(path)):
            return open_onnx_folder(path)
        return open_diffusers(path, variant=variant)
    if not os.path.exists(path):
        raise SourceNotFoundError(path, "no such file or folder", None)
    try:
        return open_file(path)
    except SdportError:
        raise
    except OSError as exc:
        raise FormatError(path, f"cannot read file ({exc.strerror or exc})", None) from exc
