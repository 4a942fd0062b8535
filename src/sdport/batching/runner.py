"""One manifest entry carried out wherever it runs — a local worker process or a Ray task — and what it left.

An entry writes into a staging folder of its own under the batch's output folder
(``.sdport-batch/NAME.HOST.PID``), and only a finished entry's outputs are moved into place: a failure,
Ctrl-C or a killed worker leaves nothing half-written where the outputs go, and whoever notices removes
the staging folder. Sources are resolved (downloaded into the node's cache) here, on the worker.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, replace

from ..errors import HashMismatchError, SdportError
from .manifest import SDXL_PIPELINES, VERSION_FAMILIES, Entry

STAGING = ".sdport-batch"
KEPT = "kept, not converted (not a Stable Diffusion model)"


@dataclass
class EntryResult:
    """What became of one entry.

    Attributes:
        status: ``ok``, ``failed``, ``skipped`` (done before, inputs unchanged) or ``planned`` (``dry_run``).
        outputs: the paths written, relative to the batch's folder.
        started / seconds / peak_rss: when it started (seconds since the epoch), its wall time, and the peak
            resident memory (bytes) of the process that ran it.
        error: the one-line error of a failed entry.
        notes: what the user should know (a hint that disagrees with the model, a file kept unconverted).
        inputs: each source → its fingerprint (SHA-256 when known, else size and modification time).
        key: the entry's definition and sdport's version, hashed (a changed entry is redone).
    """

    name: str
    where: str
    status: str
    outputs: list[str] = field(default_factory=list)
    started: float = 0.0
    seconds: float = 0.0
    peak_rss: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    key: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def entry_key(entry: Entry) -> str:
    """The entry's definition and sdport's version, hashed: what a rerun compares before skipping an entry."""
    from importlib.metadata import version

    return hashlib.sha256(f"{version('sdport')}\n{entry!r}".encode()).hexdigest()


def fingerprint(source: str) -> str:
    """How a source is recognised unchanged: a local file by size and modification time, a folder by its files',
    a remote source by its name (a Civitai version or a Hub revision does not change under the same name)."""
    if not os.path.exists(source):
        return "remote:" + source
    if os.path.isfile(source):
        st = os.stat(source)
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for f in sorted(files):
            st = os.lstat(os.path.join(root, f))  # a dangling link is a name like any other
            h.update(f"{os.path.relpath(os.path.join(root, f), source)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "folder:" + h.hexdigest()


def run_entry(entry: Entry, out: str) -> EntryResult:
    """Carry out one entry into ``out`` (a folder every worker sees); never raises for a bad entry."""
    start = time.monotonic()
    result = EntryResult(entry.name, entry.where, "failed", key=entry_key(entry), started=time.time())
    staging = os.path.join(out, STAGING, f"{entry.name.replace('/', '_')}.{socket.gethostname()}.{os.getpid()}")
    try:
        result.inputs = {s: fingerprint(s) for s in entry.sources}
        os.makedirs(staging)
        result.outputs = ACTIONS[entry.action](entry, staging, result)
        _clear_of_sources(entry, out, result.outputs)
        publish(staging, out, result.outputs)
        result.status = "ok"
    except SdportError as exc:
        result.error = exc.message()
    except Exception as exc:  # an entry's internal error must not stop the batch
        result.error = f"sdport: internal error: {type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        result.seconds = time.monotonic() - start
        result.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _clear_of_sources(entry: Entry, out: str, outputs: list[str]) -> None:
    """Refuse outputs that would replace (or hold, or sit inside) one of the entry's own local inputs."""
    sources = [os.path.realpath(s) for s in entry.sources if os.path.exists(s)]
    for rel in outputs:
        dst = os.path.realpath(os.path.join(out, rel))
        for src in sources:
            if dst == src or src.startswith(dst + os.sep) or dst.startswith(src + os.sep):
                raise SdportError(os.path.join(out, rel), f"would replace the entry's input {src}",
                                  "write the output elsewhere")


def publish(staging: str, out: str, outputs: list[str]) -> None:
    """Move each finished output into place, replacing what an earlier run left there."""
    for rel in outputs:
        src, dst = os.path.join(staging, rel), os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst) or out, exist_ok=True)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        elif os.path.lexists(dst):
            os.unlink(dst)
        os.replace(src, dst)


def _checked(entry: Entry, result: EntryResult, *, kind: str = "model") -> str:
    """The entry's source on this machine, its SHA-256 checked against the manifest's ``hash``."""
    from ..sources import locate
    from ..sources.http import sha256_of

    got = locate(entry.source, kind=kind)
    if got.sha256:
        result.inputs[entry.source] = "sha256:" + got.sha256
    if entry.hash and not os.path.isfile(got.path):
        result.notes.append("hash not checked: the source is a folder (each of its files was checked as fetched)")
    elif entry.hash:
        sha = got.sha256 or sha256_of(got.path)
        if not sha.startswith(entry.hash) and not (len(entry.hash) == 8 and _old_hash(got.path) == entry.hash):
            raise HashMismatchError(got.shown, f"SHA-256 {sha[:16]}… is not the manifest's hash {entry.hash[:16]}…",
                                    "the file is not the one the manifest names")
    return got.path


def _old_hash(path: str) -> str:
    """A1111's first model hash (8 hex digits: SHA-256 of the 64 KiB at 1 MiB), which old manifests still carry."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _export(entry: Entry, staging: str, result: EntryResult) -> list[str]:
    """An onnx-web diffusion entry: its ONNX export (SDXL in Optimum's layout, which onnx-web's server loads)."""
    from ..api import run
    from ..model import open_model

    path = _checked(entry, result)
    (request,) = entry.requests
    with open_model(path, variant=request.variant) as model:
        family, variant = model.found.family, model.found.variant
    result.notes += _hint_notes(dict(entry.hints), family, variant)
    options = replace(request.options, layout="optimum" if family.startswith("sdxl") else "diffusers")
    run(replace(request, output=os.path.join(staging, request.output), options=options))
    if entry.hash:  # onnx-web's converter records it there; its server shows it as the image's model hash
        with open(os.path.join(staging, request.output, "hash.txt"), "w") as f:
            f.write(entry.hash + "\n")
    return [request.output]


def _hint_notes(hints: dict[str, str], family: str, variant: str) -> list[str]:
    """What onnx-web's ``version`` and ``pipeline`` say that the file is not (it is converted as what it is)."""
    notes = []
    want = VERSION_FAMILIES.get(hints.get("version", ""))
    if want and family not in want:
        notes.append(f"version {hints['version']} says {want[0]}, the file is {family}: converted as {family}")
    xl = hints.get("pipeline") in SDXL_PIPELINES
    if "pipeline" in hints and xl != family.startswith("sdxl"):
        notes.append(f"pipeline {hints['pipeline']} does not fit a {family} model: converted as {family}")
    if hints.get("pipeline") == "inpaint" and variant != "inpaint":
        notes.append(f"pipeline inpaint, and the file is a plain {family} model (its UNet takes 4 channels, not 9)")
    return notes


def _convert(entry: Entry, staging: str, result: EntryResult) -> list[str]:
    """An entry of sdport's manifest: each output."""
    from ..api import run

    _checked(entry, result)
    for request in entry.requests:
        target = os.path.join(staging, request.output)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        run(replace(request, output=target))
    return [r.output for r in entry.requests]


def _fetch(entry: Entry, staging: str, result: EntryResult) -> list[str]:
    """A file kept as it is: a LoRA checked to be an adapter, an embedding to be one; the suffix from its content."""
    path = _checked(entry, result, kind="adapter" if entry.check else "model")
    if not os.path.isfile(path):
        raise SdportError(path, "is a folder, and the entry keeps a file", "name the file in the source")
    if entry.check == "adapter":
        from ..model import open_model

        with open_model(path) as model:
            if not model.found.adapter_format:
                raise SdportError(path, f"is not a LoRA adapter sdport can read (found {model.found.family})", None)
    elif entry.check == "embedding":
        from ..inversion import vectors

        vectors(path)
    (rel,) = entry.outputs
    if not os.path.splitext(rel)[1]:
        rel += _sniffed_suffix(path)
    os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
    shutil.copyfile(path, os.path.join(staging, rel))
    if entry.action == "keep":
        result.notes.append(KEPT)
    return [rel]


def _sniffed_suffix(path: str) -> str:
    from ..io import sniff_format

    try:
        name = sniff_format(path).name
    except SdportError:
        return ".bin"
    return {"safetensors": ".safetensors", "onnx": ".onnx"}.get(name, ".pt")


ACTIONS = {"export": _export, "convert": _convert, "fetch": _fetch, "keep": _fetch}
