"""The local executor: entries in worker processes, at most ``jobs`` at once and no more than memory allows.

Each entry runs in a fresh process (its peak RSS is its own; torch's memory goes back when it ends).
An entry is started only while the expected peaks of those running, plus its own, fit in the memory
available — one always runs. Ctrl-C stops the workers; the caller removes their staging folders.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .manifest import Entry
from .runner import EntryResult, run_entry

#: expected peak of an entry that exports to ONNX (tracing holds one component's modules) beyond its largest
#: input's size, and of any other entry (sdport streams: a few hundred MB whatever the size)
EXPORT_BASE, STREAM_PEAK = 1 << 30, 512 << 20
#: a remote model's size is known only once fetched: taken as an SDXL file's
REMOTE_SIZE = 7 << 30


def expected_peak(entry: Entry) -> int:
    """The memory an entry is expected to peak at, from what it does and the size of its local source."""
    if entry.action != "export" and not any(r.target == "onnx" for r in entry.requests):
        return STREAM_PEAK
    size = REMOTE_SIZE if not os.path.exists(entry.source) else 0
    try:
        if os.path.isfile(entry.source):
            size = os.path.getsize(entry.source)
        elif os.path.isdir(entry.source):
            size = sum(os.lstat(os.path.join(r, f)).st_size for r, _, fs in os.walk(entry.source) for f in fs)
    except OSError:
        pass
    return EXPORT_BASE + size // 2


def available_memory() -> int:
    """MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_local(entries: list[Entry], out: str, jobs: int, done: Callable[[EntryResult], None]) -> None:
    """Run every entry; ``done`` is called with each result as it comes. A worker that dies (killed, out of
    memory) fails its entry, and the batch goes on in a new pool."""
    pending = deque(entries)
    while pending:
        _run_pool(pending, out, jobs, done)


def _run_pool(pending: deque[Entry], out: str, jobs: int, done: Callable[[EntryResult], None]) -> None:
    budget = int(available_memory() * 0.8)
    running: dict[Future, tuple[Entry, int]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context, max_tasks_per_child=1) as pool:
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    need = expected_peak(pending[0])
                    if running and sum(n for _, n in running.values()) + need > budget:
                        break
                    running[pool.submit(run_entry, pending[0], out)] = (pending[0], need)
                    pending.popleft()
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    entry, _ = running.pop(future)
                    done(_result(entry, future))
        except BrokenProcessPool:  # every entry still running in the broken pool has lost its worker
            for future, (entry, _) in running.items():
                done(_result(entry, future))
        except BaseException:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _result(entry: Entry, future: Future) -> EntryResult:
    try:
        return future.result()
    except Exception as exc:  # the worker died (killed, out of memory)
        return EntryResult(entry.name, entry.where, "failed",
                           error=f"sdport: {entry.where}: its worker process died ({type(exc).__name__})")
