"""LoRA adapters: reading the formats people download (``formats``), finding where each module lands in a
base model (``resolve``), merging them into any conversion as per-tensor patches (``merge``), and
writing adapters anew — ``convert`` between formats, ``combine`` several into one (``rewrite``),
``extract`` one from a fine-tune (``extract``). Every adapter written goes through the same plan
validation and streaming writer as a model conversion.

    >>> from sdport import lora
    >>> lora.convert("style.safetensors", "style-peft.safetensors", to="peft")
    >>> lora.combine(["a.safetensors:0.7", "b.safetensors:0.5"], "ab.safetensors")
    >>> lora.extract("tuned.safetensors", "base.safetensors", "diff.safetensors", rank=32)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .extract import Extracted
    from .rewrite import Written

__all__ = ["FORMATS", "Extracted", "Written", "combine", "convert", "extract"]

#: the adapter formats sdport writes: kohya (ComfyUI, A1111, Forge, kohya), peft (diffusers), diffusers-old
FORMATS = ("kohya", "peft", "diffusers-old")

PathLike = str | os.PathLike[str]


def __getattr__(name: str) -> Any:
    """The result types, imported when first used (``import sdport.lora`` stays light)."""
    if name == "Written":
        from .rewrite import Written

        return Written
    if name == "Extracted":
        from .extract import Extracted

        return Extracted
    raise AttributeError(f"module 'sdport.lora' has no attribute {name!r}")


def convert(src: PathLike, dst: PathLike, *, to: str, rank: int | None = None, dtype: str = "keep",
            force: bool = False) -> Written:
    """Rewrite adapter ``src`` in format ``to`` (``kohya``, ``peft``, ``diffusers-old``).

    Renames are lossless: factors are copied byte for byte and alpha moves between kohya's ``.alpha``
    tensors and PEFT's metadata. ``rank`` re-factorises LoHa, LoKr, Tucker and full modules as LoRA of
    that rank by SVD (lossy; the relative error is reported); ``dtype`` (``fp16``, ``bf16``, ``fp32`` or
    ``keep``) is the dtype of the re-factorised modules.

    Raises:
        SdportError: an unreadable adapter, or modules the output format cannot hold.
    """
    from ..request import parse_dtype
    from .rewrite import convert_adapter

    return convert_adapter(os.fspath(src), os.fspath(dst), to=to, rank=rank, dtype=parse_dtype(dtype),
                           force=force)


def combine(specs: list[str], dst: PathLike, *, to: str = "kohya", dtype: str = "fp32", force: bool = False
            ) -> Written:
    """One LoRA equal to the sum of ``specs`` (each ``FILE`` or ``FILE:RATIO``) at their ratios, exactly (ranks
    concatenated), written in format ``to`` with factors in ``dtype``."""
    from ..request import parse_dtype
    from .rewrite import combine as _combine

    return _combine(list(specs), os.fspath(dst), to=to, dtype=parse_dtype(dtype) or "F32", force=force)


def extract(tuned: PathLike, base: PathLike, dst: PathLike, *, rank: int = 32, energy: float | None = None,
            min_rank: int = 1, max_rank: int | None = None, min_diff: float = 0.0, to: str = "kohya",
            dtype: str = "fp16", force: bool = False) -> Extracted:
    """A LoRA turning ``base`` into ``tuned``: per-module SVD of their difference at ``rank`` — or, with ``energy``,
    the smallest rank in ``min_rank..max_rank`` keeping that share of Σσ² — leaving out modules whose
    difference never exceeds ``min_diff``."""
    from ..request import parse_dtype
    from .extract import extract as _extract

    return _extract(os.fspath(tuned), os.fspath(base), os.fspath(dst), rank=rank, energy=energy, min_rank=min_rank,
                    max_rank=max_rank, min_diff=min_diff, to=to, dtype=parse_dtype(dtype) or "F16", force=force)
