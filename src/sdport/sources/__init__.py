"""Model sources: whatever names a model or adapter — a local path, a Hugging Face repo, ``civitai://``, a URL —
resolved to a local path, fetched once into a cache, verified, and usable offline afterwards.

Forms (``locate``): a path that exists; ``owner/repo[@revision]``, ``hf://owner/repo[@revision][/path]`` and
``https://huggingface.co/owner/repo/(blob|resolve)/REV/path`` (``hub``: the Hub's own cache);
``civitai://MODEL_VERSION_ID[?type=…&format=…&size=…&fp=…]`` (``civitai``); any other ``https://`` URL (and
``http://`` to this machine). Downloads go to sdport's content-addressed cache (``cache``) through
``http``'s resumable, verified downloader. ``--offline`` / ``SDPORT_OFFLINE=1`` resolve from the caches
only. Tokens (``HF_TOKEN``, ``CIVITAI_TOKEN``) are read from the environment and never shown.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from . import civitai, hub
from .cache import Cache, Entry
from .http import Fetch, check_scheme, download, redact

KINDS = ("model", "adapter")
_REPO = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w.-]+))?(?:/(?P<path>.+))?")
_HUB_HOSTS = ("huggingface.co", "hf.co")
#: a name with one of these endings is a file the user meant, never a repo id
_FILE_ENDINGS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".json", ".yaml", ".npy")


@dataclass(frozen=True)
class Resolved:
    """Where a source is on this machine, what it is called for users (no secrets), and its SHA-256 when a
    download made it known."""

    path: str
    shown: str
    sha256: str = ""
    remote: bool = False


def offline_mode(offline: bool | None = None) -> bool:
    """``offline`` if given, else ``SDPORT_OFFLINE``."""
    if offline is not None:
        return offline
    return os.environ.get("SDPORT_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(source: str | os.PathLike[str], *, kind: str = "model", revision: str | None = None,
            variant: str | None = None, offline: bool | None = None) -> Path:
    """The local path of ``source``, fetched and verified first if it is remote.

    Args:
        source: a local path, ``owner/repo[@rev]``, ``hf://owner/repo[@rev][/path]``, a Hub URL,
            ``civitai://VERSION[?type=…&format=…]`` or an ``https://`` URL.
        kind: ``model`` or ``adapter``: a Hub repo holding both gives the adapter's file for ``adapter``.
        revision: a Hub branch, tag or commit (instead of ``@rev``).
        variant: the diffusers weight variant to fetch (``fp16``); by default the plain weights.
        offline: resolve from the caches only (default: ``SDPORT_OFFLINE``).

    Raises:
        SourceError: not found, refused, unreachable, or not cached when offline.
        HashMismatchError: the bytes are not the ones the source publishes (nothing is kept).
    """
    return Path(locate(source, kind=kind, revision=revision, variant=variant, offline=offline).path)


def locate(source: str | os.PathLike[str], *, kind: str = "model", revision: str | None = None,
           variant: str | None = None, offline: bool | None = None, progress: bool = False) -> Resolved:
    """``resolve``, keeping what the source is called and its SHA-256 (for an output's provenance)."""
    text = os.fspath(source)
    if kind not in KINDS:
        raise SourceError(text, f"unknown source kind {kind!r}", "use model or adapter")
    if os.path.exists(text) or not text:
        return Resolved(text, text)
    off = offline_mode(offline)
    scheme = urllib.parse.urlsplit(text).scheme if "://" in text else ""
    if scheme == "civitai":
        version, query = civitai.parse(text)
        return _download(civitai.shown(version, query), lambda: civitai.fetch_of(version, query), off, progress)
    repo = _hub_source(text, scheme)
    if repo is not None:
        name, rev, path = repo
        shown = f"hf://{name}" + (f"@{revision or rev}" if revision or rev else "") + (f"/{path}" if path else "")
        hub_off = off or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        return Resolved(hub.fetch_repo(name, revision or rev, path, variant, offline=hub_off, shown=shown, kind=kind),
                        shown, remote=True)
    if scheme:
        check_scheme(text, redact(text))
        return _download(redact(text), lambda: Fetch(text, redact(text)), off, progress)
    return Resolved(text, text)  # a path that does not exist: the reader says so


def _hub_source(text: str, scheme: str) -> tuple[str, str | None, str] | None:
    """(repo, revision, path in the repo) when ``text`` names a Hugging Face repo, else None."""
    if scheme == "hf":
        m = _REPO.fullmatch(text[len("hf://"):])
        if not m:
            raise SourceError(text, "not a Hugging Face repo", "write hf://owner/repo[@revision][/path]")
        return m["repo"], m["rev"], m["path"] or ""
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(text)
        hosts = _HUB_HOSTS + ((urllib.parse.urlsplit(os.environ["HF_ENDPOINT"]).netloc,)
                              if os.environ.get("HF_ENDPOINT") else ())
        m = re.fullmatch(r"/([^/]+/[^/]+)(?:/(?:blob|resolve)/([^/]+)/(.+))?/?", parts.path)
        return (m[1], m[2], urllib.parse.unquote(m[3] or "")) if parts.netloc in hosts and m else None
    if scheme or text.startswith(("/", ".", "~")) or text.lower().endswith(_FILE_ENDINGS):
        return None
    m = _REPO.fullmatch(text)
    return (m["repo"], m["rev"], m["path"] or "") if m and not m["path"] else None


def _download(shown: str, fetch: Callable[[], Fetch], offline: bool, progress: bool) -> Resolved:
    """A file from the cache, or fetched into it once (other processes wait for the one that fetches)."""
    cache = Cache()
    entry = cache.lookup(shown)
    if entry is None and offline:
        raise SourceError(shown, "not in sdport's cache, and sdport is offline", "run once without --offline")
    if entry is None:
        with cache.lock(shown):
            entry = cache.lookup(shown)  # fetched by another process while this one waited
            if entry is None:
                part = cache.partial(shown)
                got = download(fetch(), part, progress=progress)
                entry = Entry(shown, got.sha256, got.size, got.name, got.etag)
                cache.store(part, entry)
    return Resolved(cache.file(entry), shown, entry.sha256, remote=True)
