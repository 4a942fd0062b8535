"""sdport: inspect and convert Stable Diffusion weights between formats, streaming and offline.

The public API is small and lazy: importing sdport imports neither numpy nor torch; each name below is
loaded from its module (``api``, ``request``, ``io``, ``lora``) on first use, with its real signature.

    >>> import sdport
    >>> sdport.inspect("model.ckpt")["family"]
    >>> sdport.convert("model.ckpt", "model.safetensors", dtype="fp16")
    >>> sdport.export_onnx("model.safetensors", "model-onnx", dtype="fp16", vae_dtype="fp32")
    >>> sdport.merge_loras("model.safetensors", "merged", ["style.safetensors:0.8"])
    >>> sdport.lora.convert("style.safetensors", "style-peft.safetensors", to="peft")
    >>> sdport.resolve("civitai://6266?type=Pruned%20Model&format=SafeTensor")   # fetched once, verified
    >>> sdport.verify("model.safetensors", "model-onnx", report="parity").passed  # torch vs onnxruntime
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    FormatError,
    HashMismatchError,
    MissingExtraError,
    OutputError,
    PlanError,
    SdportError,
    SourceError,
    SourceNotFoundError,
    UnknownKeyError,
    UnsafeFileError,
)

if TYPE_CHECKING:
    from . import lora
    from .api import ConvertResult, convert, export_onnx, inspect, merge_loras, run
    from .batching import BatchResult, batch
    from .io import open_tensors
    from .parity import VerifyResult, verify
    from .request import ConvertRequest, InversionSpec, LoraSpec, MindOneOptions, OnnxOptions, SingleFileOptions
    from .sources import resolve

__all__ = ["BatchResult", "ConvertRequest", "ConvertResult", "FormatError", "HashMismatchError", "InversionSpec",
           "LoraSpec", "MindOneOptions",
           "MissingExtraError", "OnnxOptions", "OutputError", "PlanError", "SdportError", "SingleFileOptions",
           "SourceError", "SourceNotFoundError", "UnknownKeyError", "UnsafeFileError", "VerifyResult", "convert",
           "batch", "export_onnx", "inspect", "lora", "merge_loras", "open_tensors", "resolve", "run", "verify"]

_WHERE = {"convert": ".api", "export_onnx": ".api", "inspect": ".api", "merge_loras": ".api", "run": ".api",
          "ConvertResult": ".api", "ConvertRequest": ".request", "LoraSpec": ".request", "OnnxOptions": ".request",
          "MindOneOptions": ".request", "SingleFileOptions": ".request", "open_tensors": ".io", "resolve": ".sources",
          "verify": ".parity", "VerifyResult": ".parity", "InversionSpec": ".request", "batch": ".batching",
          "BatchResult": ".batching"}


def __getattr__(name: str) -> Any:
    """Each public name, imported from its module when first used."""
    if name == "lora":
        return importlib.import_module(".lora", __name__)
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'sdport' has no attribute {name!r}")
