"""``sdport convert``: builds the plan for a conversion, validates it, and executes it.

This module owns the choice of output layout and format; family-specific key rules live in
``families/`` and are only consulted here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .detect import detect
from .dtypes import USER_NAMES
from .errors import SdportError
from .execute import execute
from .io import open_tensors
from .io.base import TensorSource
from .plan import OutputFile, OutputTensor, Plan, validate

CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FULL_CHECKPOINTS = ("sd1", "sd2", "sdxl-base", "sdxl-refiner")


@dataclass
class ConvertResult:
    """What a conversion wrote and what it left out."""

    output: str
    tensors: int
    bytes: int
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def _target_format(dst: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("safetensors", "ckpt"):
            raise SdportError(None, f"unknown --format {fmt!r}", "use safetensors or ckpt")
        return fmt
    if dst.endswith(CKPT_SUFFIXES):
        return "ckpt"
    return "safetensors"


def _target_layout(dst: str, to: str | None) -> str:
    if to is None:
        to = "single-file" if os.path.splitext(dst)[1] else "diffusers"
    if to not in ("single-file", "diffusers"):
        raise SdportError(None, f"unknown --to {to!r}", "use single-file or diffusers")
    return to


def _dtype_code(dtype: str) -> str | None:
    if dtype == "keep":
        return None
    if dtype not in USER_NAMES:
        raise SdportError(None, f"unknown --dtype {dtype!r}", "use keep, fp32, fp16 or bf16")
    return USER_NAMES[dtype]


def repackage_plan(source: TensorSource, fmt: str, dtype: str | None, root: str) -> Plan:
    """Same tensors, same names, in source order; float tensors cast to ``dtype`` when given."""
    tensors = []
    for name, info in source.tensors.items():
        out_dtype = dtype if dtype and info.dtype in ("F64", "F32", "F16", "BF16") else info.dtype
        tensors.append(OutputTensor(name, out_dtype, info.shape, (name,)))
    metadata = dict(source.metadata) if fmt == "safetensors" else {}
    if fmt == "safetensors":
        metadata.setdefault("format", "pt")
    return Plan([OutputFile(".", fmt, tensors, metadata, root)],
                dropped={k: f"not a tensor ({v})" for k, v in source.non_tensors.items()})


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None, dtype: str = "keep",
            format: str | None = None, allow_unknown: bool = False, force: bool = False,
            progress: bool = False) -> ConvertResult:
    """Convert a model file or folder to another layout, format or dtype.

    Args:
        src: a weights file (safetensors, ``.ckpt``/``.pt``/``.bin``) or a diffusers folder.
        dst: the output path; its suffix chooses ``to`` and ``format`` when those are not given.
        to: ``single-file`` or ``diffusers``.
        dtype: ``keep``, ``fp32``, ``fp16`` or ``bf16`` (float tensors only).
        format: ``safetensors`` or ``ckpt`` for single-file outputs.
        allow_unknown: copy tensors no rule knows instead of refusing.
        force: replace an existing output.

    Returns:
        A ConvertResult listing what was written and dropped.

    Raises:
        SdportError: bad input or a refused output; nothing is written at ``dst`` then.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    layout = _target_layout(dst, to)
    code = _dtype_code(dtype)
    fmt = _target_format(dst, format)
    with open_tensors(src) as source:
        if layout == "diffusers" or source.format == "diffusers":
            raise SdportError(src, "conversion between single-file and diffusers layouts is not available yet",
                              "this version converts single files between formats and dtypes")
        found = detect(source.tensors, source.metadata)
        root = source.root or ("state_dict" if found.family in FULL_CHECKPOINTS else "")
        plan = repackage_plan(source, fmt, code, root)
        validate(plan, source, allow_unknown=allow_unknown)
        execute(plan, source, dst, force=force, progress=progress)
        return ConvertResult(dst, sum(len(f.tensors) for f in plan.files), plan.nbytes, plan.dropped, plan.unknown)
