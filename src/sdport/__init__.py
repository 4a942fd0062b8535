"""sdport: inspect and convert Stable Diffusion weights between formats, streaming and offline.

The public API is small and lazy: importing sdport imports neither numpy nor torch.

    >>> import sdport
    >>> sdport.inspect("model.ckpt")["family"]
    >>> sdport.convert("model.ckpt", "model.safetensors", dtype="fp16")
    >>> sdport.export_onnx("model.safetensors", "model-onnx", dtype="fp16", vae_dtype="fp32")
    >>> sdport.merge_loras("model.safetensors", "merged", ["style.safetensors:0.8"])
    >>> sdport.lora.convert("style.safetensors", "style-peft.safetensors", to="peft")
"""

from __future__ import annotations

from typing import Any

from .errors import FormatError, OutputError, PlanError, SdportError, UnknownKeyError, UnsafeFileError

__all__ = ["FormatError", "OutputError", "PlanError", "SdportError", "UnknownKeyError", "UnsafeFileError",
           "convert", "export_onnx", "inspect", "lora", "merge_loras", "open_tensors"]


def __getattr__(name: str) -> Any:
    """``sdport.lora`` (adapter convert/combine/extract), imported when first used."""
    if name == "lora":
        import importlib

        return importlib.import_module(".lora", __name__)
    raise AttributeError(f"module 'sdport' has no attribute {name!r}")


def inspect(source: Any) -> dict[str, Any]:
    """Describe a model file or folder; see ``sdport.inspection.inspect``."""
    from .inspection import inspect as _inspect

    return _inspect(source)


def export_onnx(src: Any, dst: Any, **options: Any) -> Any:
    """``convert(src, dst, to="onnx", …)``: an ONNX pipeline folder (``onnx_layout``, ``dtype``, ``vae_dtype``, …)."""
    return convert(src, dst, to="onnx", **options)


def convert(src: Any, dst: Any, **options: Any) -> Any:
    """Convert a model; see ``sdport.conversion.convert`` for the options."""
    from .conversion import convert as _convert

    return _convert(src, dst, **options)


def merge_loras(base: Any, dst: Any, loras: list[str], **options: Any) -> Any:
    """Merge adapters (``FILE`` or ``FILE:RATIO`` each) into ``base``, written at ``dst`` in any layout.

    The same as ``convert(base, dst, loras=loras, **options)``.
    """
    return convert(base, dst, loras=loras, **options)


def open_tensors(path: Any, **options: Any) -> Any:
    """Open a weights file or folder as a lazy TensorSource; see ``sdport.io.open_tensors``."""
    from .io import open_tensors as _open

    return _open(path, **options)
