"""``sdport batch``: every entry of a manifest (onnx-web's ``extras.json`` or sdport's own) converted or fetched into
one folder, locally in worker processes or on a Ray cluster, idempotently. (The package is ``batching`` so that
``sdport.batch`` stays the function.)

The manifest is validated in full first (``manifest``). Entries done before — outputs present, the same
definition and sdport version, inputs unchanged — are skipped unless ``force``. The rest run
(``local`` or ``ray``), each one in its own staging folder (``runner``); a failed entry leaves nothing
and the others go on. ``DIR/sdport-batch.json`` records every entry's result after each one, so an
interrupted batch continues where it stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import SdportError
from .manifest import Entry, ManifestError, load
from .runner import STAGING, EntryResult, entry_key, fingerprint

RECORD = "sdport-batch.json"
EXECUTORS = ("local", "ray")

__all__ = ["BatchResult", "Entry", "EntryResult", "ManifestError", "batch", "load"]


@dataclass
class BatchResult:
    """Every entry's result, in manifest order; ``ok`` when none failed."""

    manifest: str
    out: str
    entries: list[EntryResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e.status != "failed" for e in self.entries)

    def to_json(self) -> dict:
        return {"format": "sdport-batch", "version": 1, "manifest": self.manifest, "out": self.out,
                "entries": [e.to_json() for e in self.entries]}


def batch(manifest: str | os.PathLike[str], out: str | os.PathLike[str], *, executor: str = "local", jobs: int = 1,
          only: list[str] | tuple[str, ...] = (), force: bool = False, dry_run: bool = False,
          address: str | None = None, on_result: Callable[[EntryResult], None] | None = None) -> BatchResult:
    """Run a manifest's entries into ``out``.

    Args:
        manifest: onnx-web's ``extras.json`` (JSON or YAML) or sdport's own manifest.
        out: the folder outputs go to (onnx-web's models folder); with Ray, a path every node sees.
        executor: ``local`` (worker processes) or ``ray`` (tasks on the cluster at ``address``, else a local one).
        jobs: local only: entries run at once (fewer when their expected memory does not fit).
        only: run just these entries (by name).
        force: redo entries done before.
        dry_run: say what would run, run nothing.
        on_result: called with each entry's result as it comes.

    Raises:
        ManifestError: the manifest does not validate (every problem listed); nothing runs.
    """
    manifest, out = os.fspath(manifest), os.path.abspath(os.fspath(out))
    if executor not in EXECUTORS:
        raise SdportError(None, f"unknown executor {executor!r}", "use local or ray")
    if jobs < 1:
        raise SdportError(None, f"--jobs {jobs}", "run at least one entry at a time")
    entries = _chosen(load(manifest), only, manifest)
    result = BatchResult(manifest, out)
    if dry_run:
        before = _record(out)
        result.entries = [EntryResult(e.name, e.where, "skipped" if not force and _done(e, before.get(e.name), out)
                                      else "planned", list(e.outputs)) for e in entries]
        return result
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise SdportError(out, f"cannot make the output folder ({exc.strerror})", None) from None
    with _locked(out):
        results = _run(entries, manifest, out, executor, jobs, address, force, on_result)
    result.entries = [results[e.name] for e in entries if e.name in results]
    return result


def _run(entries: list[Entry], manifest: str, out: str, executor: str, jobs: int, address: str | None, force: bool,
         on_result: Callable[[EntryResult], None] | None) -> dict[str, EntryResult]:
    """Skip what is done, run the rest, record each result as it comes; the staging folder goes in any case."""
    before = _record(out)
    results: dict[str, EntryResult] = {}
    todo = []
    for e in entries:
        if not force and _done(e, before.get(e.name), out):
            results[e.name] = EntryResult(e.name, e.where, "skipped", before[e.name]["outputs"])
            if on_result is not None:
                on_result(results[e.name])
        else:
            todo.append(e)

    def done(r: EntryResult) -> None:
        results[r.name] = r
        before[r.name] = r.to_json()
        _write_record(out, manifest, before)
        if on_result is not None:
            on_result(r)

    try:
        if executor == "ray" and todo:
            from .ray import run_ray

            run_ray(todo, out, address, done)
        elif todo:
            from .local import run_local

            run_local(todo, out, jobs, done)
    finally:
        shutil.rmtree(os.path.join(out, STAGING), ignore_errors=True)
    return results


def _chosen(entries: list[Entry], only: list[str] | tuple[str, ...], manifest: str) -> list[Entry]:
    if not only:
        return entries
    names = {e.name for e in entries} | {e.name.removeprefix("diffusion-") for e in entries}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SdportError(manifest, f"--only {unknown[0]}: no such entry", "name an entry of the manifest")
    return [e for e in entries if e.name in only or e.name.removeprefix("diffusion-") in only]


def _record(out: str) -> dict[str, dict]:
    """The entries' results of earlier runs (a damaged record is as none: every entry runs again)."""
    try:
        with open(os.path.join(out, RECORD)) as f:
            doc = json.load(f)
        return {e["name"]: e for e in doc["entries"] if isinstance(e, dict) and isinstance(e.get("name"), str)}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return {}


def _write_record(out: str, manifest: str, entries: dict[str, dict]) -> None:
    from ..io.atomic import write_atomic

    doc = {"format": "sdport-batch", "version": 1, "manifest": manifest, "out": out, "entries": list(entries.values())}
    write_atomic(os.path.join(out, RECORD), (json.dumps(doc, indent=1) + "\n").encode(), force=True)


def _done(entry: Entry, record: dict | None, out: str) -> bool:
    """Whether an earlier run made this entry's outputs from the same definition and unchanged inputs."""
    if not record or record.get("status") != "ok" or record.get("key") != entry_key(entry):
        return False
    if not record.get("outputs") or not all(os.path.exists(os.path.join(out, o)) for o in record["outputs"]):
        return False
    inputs = record.get("inputs") or {}
    return all(_same(s, inputs.get(s, "")) for s in entry.sources)


def _same(source: str, recorded: str) -> bool:
    return recorded.startswith("sha256:") and not os.path.exists(source) or fingerprint(source) == recorded


@contextmanager
def _locked(out: str) -> Iterator[None]:
    """One batch at a time in a folder (a second one is refused, not queued)."""
    try:
        fd = os.open(os.path.join(out, ".sdport-batch.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise SdportError(out, f"cannot write into the output folder ({exc.strerror})", None) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SdportError(out, "another sdport batch is running into this folder", "wait for it") from None
        yield
    finally:
        os.close(fd)
