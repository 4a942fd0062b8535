"""Streams a validated plan from its source files into writers: the only code that moves tensor bytes.

One output tensor (plus its inputs) is in memory at a time — a large tensor that is only cast, in
pieces of ``CAST_CHUNK`` bytes — and a tensor whose bytes pass through unchanged is copied file to
file by the kernel without entering Python memory.
"""

from __future__ import annotations

import os

from .dtypes import cast
from .io.atomic import check_target
from .io.base import TensorSource
from .io.safetensors import SafetensorsWriter
from .io.torch import TorchWriter
from .io.writer import StreamWriter
from .plan import OutputFile, Plan, compute, is_elementwise, is_passthrough
from .progress import Progress

#: a cast of a tensor larger than this is done piece by piece, so memory stays bounded whatever the tensor's size
CAST_CHUNK = 16 << 20


def writer_for(out: OutputFile, target: str, *, force: bool) -> StreamWriter:
    if out.format == "safetensors":
        return SafetensorsWriter(target, force=force)
    if out.format == "ckpt":
        return TorchWriter(target, force=force, root=out.root)
    raise ValueError(f"unknown output format {out.format}")


def execute(plan: Plan, source: TensorSource, target: str, *, force: bool = False, progress: bool = True) -> None:
    """Write the plan's single output file at ``target``, atomically.

    The caller has validated the plan. Nothing exists at ``target`` unless every tensor was written
    and the file was flushed to disk.
    """
    (out,) = plan.files
    inputs = sorted({info.file for info in source.tensors.values()})
    check_target(target, force=force, inputs=inputs + [source.path], need_bytes=plan.nbytes)
    with Progress(plan.nbytes, os.path.basename(target), enabled=progress) as bar, \
            writer_for(out, target, force=force) as writer:
        writer.begin([t.slot() for t in out.tensors], out.metadata)
        for t in out.tensors:
            info = source.tensors[t.inputs[0]]
            if is_passthrough(t, source):
                writer.copy(t.name, source.fd(info.file), info.offset, info.nbytes, info.file)
            elif is_elementwise(t, source) and info.nbytes > CAST_CHUNK:
                writer.write_parts(t.name, (cast(c, t.dtype) for c in source.read_chunks(info, CAST_CHUNK)))
            else:
                writer.write(t.name, compute(t, [source.read(i) for i in t.inputs]))
            bar.update(t.slot().nbytes)
        writer.commit()
