"""Streams a validated plan from its source files into writers: the only code that moves tensor bytes.

One output tensor (plus its inputs) is in memory at a time — a large tensor that is only cast, in
pieces of ``CAST_CHUNK`` bytes — and a tensor whose bytes pass through unchanged is copied file to
file by the kernel without entering Python memory.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np

from .dtypes import BY_CODE, cast
from .io import open_writer
from .io.atomic import AtomicDir, check_target
from .io.base import TensorInfo, TensorSource
from .plan import OutputFile, OutputTensor, Plan, compute, is_elementwise, is_passthrough
from .progress import Progress

#: a cast of a tensor larger than this is done piece by piece, so memory stays bounded whatever the tensor's size
CAST_CHUNK = 16 << 20
#: threads computing pieces ahead of the writer, and how many pieces they may hold ready (each at most one tensor,
#: or CAST_CHUNK of a big cast: this bounds memory); while the writer copies unchanged tensors, they work ahead
WORKERS = 2
AHEAD = 8


def execute(plan: Plan, source: TensorSource, target: str, *, force: bool = False, progress: bool = True,
            protect: Sequence[str] = ()) -> None:
    """Write the plan at ``target`` atomically: one file, or a folder when the plan has several files or extras.

    The caller has validated the plan. Nothing exists at ``target`` unless every tensor was written
    and every file flushed to disk. Tensors that must be computed (cast, split, …) are computed a
    few pieces ahead in worker threads while earlier pieces are being written. ``target`` may replace
    none of the source's files, nor anything in ``protect`` (inputs read before the plan was made).
    """
    inputs = source.files()
    check_target(target, force=force, inputs=[*inputs, source.path, *protect], need_bytes=plan.nbytes)
    for file in inputs:
        source.fd(file)  # open every input here, so the worker threads never touch the descriptor table
    name = os.path.basename(target)
    with Progress(plan.nbytes, name, enabled=progress) as bar:
        if len(plan.files) == 1 and plan.files[0].path == "." and not plan.extra:
            _write_file(plan.files[0], source, target, force, bar, name)
            return
        with AtomicDir(target, force=force) as folder:
            for out in plan.files:
                _write_file(out, source, folder.path(out.path), False, bar, f"{name}/{out.path}")
            for relative, data in plan.extra.items():
                folder.write_bytes(relative, data)
            folder.commit()


def _write_file(out: OutputFile, source: TensorSource, path: str, force: bool, bar: Progress, shown: str) -> None:
    """One output file; the bar's label says which, and whether its weights or (ONNX) its graph are being written."""
    computed = [t for t in out.tensors if not is_passthrough(t, source)]
    pieces = _ahead(_pieces(computed, source))
    graph = out.writer.format == "onnx"  # the graph goes out before the weights, or with the model file after them
    try:
        with open_writer(out.writer.format, path, force=force, **out.writer.options) as writer:
            bar.stage(f"graph {shown}" if graph else f"weights {shown}")
            writer.begin([t.slot() for t in out.tensors], out.metadata)
            bar.stage(f"weights {shown}")
            for t in out.tensors:
                if is_passthrough(t, source):
                    info = source.tensors[t.inputs[0]]
                    writer.copy(t.name, source.fd(info.file), info.offset, info.nbytes, info.file)
                else:
                    writer.write_parts(t.name, _parts_of(t.name, pieces))
                bar.update(t.slot().nbytes)
            if graph:
                bar.stage(f"graph {shown}")
            writer.commit()
    finally:
        pieces.close()


def _pieces(tensors: list[OutputTensor], source: TensorSource) -> Iterator[tuple[str, Callable[[], np.ndarray], bool]]:
    """(name, compute-one-piece, last) for each computed tensor in order: one piece, or many for a big cast."""
    for t in tensors:
        info = source.tensors[t.inputs[0]]
        if is_elementwise(t, source) and info.nbytes > CAST_CHUNK:
            step = CAST_CHUNK - CAST_CHUNK % BY_CODE[info.dtype].itemsize
            for start in range(0, info.nbytes, step):
                count = min(step, info.nbytes - start)
                piece = partial(_cast_range, source, info, start, count, t.dtype)
                yield t.name, piece, start + count == info.nbytes
        else:
            yield t.name, partial(_compute_whole, source, t), True


def _cast_range(source: TensorSource, info: TensorInfo, start: int, count: int, dtype: str) -> np.ndarray:
    return cast(source.read_flat(info, start, count), dtype)


def _compute_whole(source: TensorSource, t: OutputTensor) -> np.ndarray:
    return compute(t, source.read)


def _parts_of(name: str, pieces: Iterator[tuple[str, np.ndarray, bool]]) -> Iterator[np.ndarray]:
    """The pieces of tensor ``name`` from the shared stream, up to its last one."""
    for got, array, last in pieces:
        if got != name:
            raise RuntimeError(f"computed '{got}' while writing '{name}'")
        yield array
        if last:
            return


def _ahead(jobs: Iterator[tuple[str, Callable[[], np.ndarray], bool]]) -> Generator[tuple[str, np.ndarray, bool]]:
    """Each job's result in order, up to ``AHEAD`` jobs computed ahead by ``WORKERS`` threads while the caller writes.

    numpy's casts and ``preadv`` release the GIL, so reading and casting overlap with writing.
    Closing the generator cancels the jobs not started and waits for those running.
    """
    pending: deque[tuple[str, Future, bool]] = deque()
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="sdport-compute")
    try:
        for name, job, last in jobs:
            pending.append((name, pool.submit(job), last))
            if len(pending) > AHEAD:
                name, future, last = pending.popleft()
                yield name, future.result(), last
        while pending:
            name, future, last = pending.popleft()
            yield name, future.result(), last
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
