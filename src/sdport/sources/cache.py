"""sdport's download cache: files stored by their SHA-256, a small index of which source gave which file, partial
downloads that survive a crash, and locks so that two processes fetching one source download it once.

Layout under ``SDPORT_CACHE`` (default ``$XDG_CACHE_HOME/sdport``, else ``~/.cache/sdport``)::

    files/<sha256>/<name>      a finished download, read-only, under the name the server gave it
    partial/<key>.part         the bytes received so far, and partial/<key>.json what they are (url, validator)
    locks/<key>.lock           held (flock) while a source is fetched
    index.json                 source → sha256, size, name, etag, when it was fetched and last used

``key`` is the SHA-256 of the source as shown to users (no tokens in it). Hugging Face repos stay in
the Hub's own cache; sdport's index only remembers which Hub blobs it has verified.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from ..errors import SourceError


@dataclass
class Entry:
    """What the index knows of one source."""

    source: str
    sha256: str
    size: int
    name: str
    etag: str = ""
    fetched: float = 0.0
    used: float = 0.0


def root() -> str:
    """The cache folder: ``SDPORT_CACHE``, else ``$XDG_CACHE_HOME/sdport``, else ``~/.cache/sdport``."""
    if os.environ.get("SDPORT_CACHE"):
        return os.path.abspath(os.environ["SDPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sdport")


def key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


class Cache:
    """The cache at ``path`` (default ``root()``)."""

    def __init__(self, path: str | None = None):
        self.path = path or root()

    def _dir(self, name: str) -> str:
        folder = os.path.join(self.path, name)
        os.makedirs(folder, exist_ok=True)
        return folder

    def file(self, entry: Entry) -> str:
        return os.path.join(self.path, "files", entry.sha256, entry.name)

    def partial(self, source: str) -> str:
        """Where the partial download of ``source`` lives (``.part``; its description beside it, ``.json``)."""
        return os.path.join(self._dir("partial"), key(source) + ".part")

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the lock ``name`` (one per source, and ``index``) against other processes."""
        fd = os.open(os.path.join(self._dir("locks"), key(name) + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------- index
    def entries(self) -> dict[str, Entry]:
        path = os.path.join(self.path, "index.json")
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            return {k: Entry(**v) for k, v in doc["entries"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(path, "the cache index is damaged", "remove it; the files stay and are fetched "
                              "again by source") from exc

    def _save(self, entries: dict[str, Entry]) -> None:
        doc = {"version": 1, "entries": {k: asdict(v) for k, v in sorted(entries.items())}}
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".index-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, "index.json"))

    def lookup(self, source: str) -> Entry | None:
        """The entry of ``source`` if its file is still there (and its use recorded), else None."""
        with self.lock("index"):
            entries = self.entries()
            entry = entries.get(source)
            if entry is None or not os.path.isfile(self.file(entry)):
                return None
            entry.used = time.time()
            self._save(entries)
            return entry

    def record(self, entry: Entry) -> None:
        with self.lock("index"):
            entries = self.entries()
            entries[entry.source] = entry
            self._save(entries)

    def store(self, part: str, entry: Entry) -> str:
        """Move a verified download into ``files/`` and record it; returns its path."""
        target = self.file(entry)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.chmod(part, 0o444)
        os.replace(part, target)
        with contextlib.suppress(FileNotFoundError):
            os.remove(part[:-len(".part")] + ".json")
        entry.fetched = entry.used = time.time()
        self.record(entry)
        return target

    def verified(self, path: str) -> str | None:
        """The SHA-256 this file (a Hub blob) was verified to have, if it has not changed since."""
        stat = os.stat(path)
        mark = self._verified().get(os.path.realpath(path))
        return mark[2] if mark and mark[:2] == [stat.st_size, stat.st_mtime_ns] else None

    def mark_verified(self, path: str, sha256: str) -> None:
        stat = os.stat(path)
        with self.lock("index"):
            marks = self._verified()
            marks[os.path.realpath(path)] = [stat.st_size, stat.st_mtime_ns, sha256]
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".verified-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(marks, f)
            os.replace(tmp, os.path.join(self.path, "verified.json"))

    def _verified(self) -> dict[str, list]:
        try:
            with open(os.path.join(self.path, "verified.json"), encoding="utf-8") as f:
                marks = json.load(f)
            return marks if isinstance(marks, dict) else {}
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------------------------------- upkeep
    def prune(self, older_than_days: float | None = None) -> tuple[int, int]:
        """Remove partial downloads, files no entry names, and (``older_than_days``) entries not used since;
        returns (entries removed, bytes freed)."""
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        with self.lock("index"):
            entries = self.entries()
            gone = [k for k, e in entries.items() if cutoff is not None and e.used < cutoff]
            for k in gone:
                del entries[k]
            self._save(entries)
            kept = {e.sha256 for e in entries.values()}
            freed = sum(_remove(os.path.join(self._dir("files"), n)) for n in os.listdir(self._dir("files"))
                        if n not in kept)
            for name in os.listdir(self._dir("partial")):
                if not self._busy(name.split(".")[0]):
                    freed += _remove(os.path.join(self._dir("partial"), name))
        return len(gone), freed

    def _busy(self, source_key: str) -> bool:
        """Whether another process is downloading the source whose key this is (its lock is held)."""
        fd = os.open(os.path.join(self._dir("locks"), source_key + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def _remove(path: str) -> int:
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) \
        if os.path.isdir(path) else os.path.getsize(path)
    if os.path.isdir(path):
        for d, _, fs in os.walk(path):
            os.chmod(d, 0o755)
            for f in fs:
                os.chmod(os.path.join(d, f), 0o644)
        shutil.rmtree(path)
    else:
        os.remove(path)
    return size
