"""Downloads that survive what networks do: resumed with HTTP Range, retried with backoff, checked by size and SHA-256.

``download`` appends to a ``.part`` file that outlives a crash or Ctrl-C: the next call resumes from its
end with ``Range`` and ``If-Range`` (the validator the server gave, kept beside it), and starts over when
the server ignores the range, answers from another offset, or the file changed. 408, 429, 5xx and
dropped connections are retried (``Retry-After`` honoured, else 1, 2, 4, 8 s; a retry that brought
bytes resets the count); 401, 403 and 404 are errors at once, the first naming the token to set.
Redirects are followed, the ``Authorization`` header only to the host it was meant for. Bytes are
written as they come (no decompression) and hashed; a body shorter than announced, a size or SHA-256
other than the published one leave nothing behind. Plain ``http://`` is for loopback addresses only.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException, HTTPResponse

from ..errors import HashMismatchError, SourceError
from ..io.atomic import disk_error
from ..progress import Progress

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
TRIES = 5
CHUNK = 1 << 20
#: seconds without a byte before a connection is given up (``SDPORT_HTTP_TIMEOUT``)
TIMEOUT = 10.0
#: query parameters and headers that carry secrets, never shown
SECRET_PARAMS = re.compile(r"(token|key|signature|sig|x-amz-.*|x-goog-.*|auth.*|credential|expires|policy)$", re.I)


@dataclass
class Fetch:
    """One file to fetch.

    Attributes:
        url: where to get it (may carry a token in its query: never shown).
        shown: what users see it as (``civitai://6266``, a URL without secrets).
        headers: sent to ``url``'s host only (``Authorization``).
        sha256, size: what the source publishes, checked at the end when given.
        token_hint: the variable to set when the server refuses access.
    """

    url: str
    shown: str
    headers: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None
    size: int | None = None
    token_hint: str = ""


@dataclass
class Fetched:
    sha256: str
    size: int
    name: str
    etag: str


def redact(url: str) -> str:
    """``url`` without user info or secret query parameters (tokens, signatures), for messages and metadata."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v if not SECRET_PARAMS.match(k) else "…") for k, v in urllib.parse.parse_qsl(parts.query, True)]
    netloc = parts.hostname or "" if parts.username or parts.password else parts.netloc
    if parts.port and (parts.username or parts.password):
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), ""))


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def check_scheme(url: str, shown: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname)):
        return
    raise SourceError(shown, f"unsupported URL scheme {parts.scheme!r}" if parts.scheme != "http" else
                      "plain http is only allowed to this machine", "use https://")


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, sending ``Authorization`` only to the host it was given for, and only to https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        check_scheme(newurl, "a redirect")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            for name in list(new.headers):
                if name.lower() == "authorization":
                    del new.headers[name]
        return new


_OPENER = urllib.request.build_opener(_Redirects())


def _timeout() -> float:
    return float(os.environ.get("SDPORT_HTTP_TIMEOUT", TIMEOUT))


def _retry_after(headers: object, tries: int) -> float:
    value = getattr(headers, "get", lambda _: None)("Retry-After")
    if value:
        if value.strip().isdigit():
            return min(float(value), 60.0)
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, min(when.timestamp() - time.time(), 60.0))
        except (TypeError, ValueError):
            pass
    return float(min(2 ** tries, 8))


def _refused(fetch: Fetch, code: int) -> SourceError:
    if code in (401, 403):
        hint = f"set {fetch.token_hint} to a token that may read it" if fetch.token_hint else "it needs a login"
        return SourceError(fetch.shown, f"access refused (HTTP {code})", hint)
    if code == 404:
        return SourceError(fetch.shown, "not found (HTTP 404)", "check the name, version or URL")
    return SourceError(fetch.shown, f"the server answered HTTP {code}", None)


def json_get(fetch: Fetch) -> object:
    """A JSON document (an API answer), with the same retries and errors as a download."""
    for tries in range(TRIES):
        try:
            request = urllib.request.Request(fetch.url, headers={**fetch.headers, "Accept": "application/json"})
            with _OPENER.open(request, timeout=_timeout()) as r:
                return json.loads(r.read(64 << 20))
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRY_STATUS or tries == TRIES - 1:
                raise _refused(fetch, exc.code) from None
            time.sleep(_retry_after(exc.headers, tries))
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            if tries == TRIES - 1:
                raise SourceError(fetch.shown, f"cannot reach the server ({_reason(exc)})", None) from None
            time.sleep(_retry_after(None, tries))
        except ValueError:
            raise SourceError(fetch.shown, "the API answer is not JSON", "the endpoint is wrong or down") from None
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return type(reason).__name__ if not str(reason) else str(reason)[:120]


def download(fetch: Fetch, part: str, *, progress: bool = False) -> Fetched:
    """Fetch ``fetch`` into ``part`` (resuming what is there), verified; the caller moves it into place."""
    check_scheme(fetch.url, fetch.shown)
    state = _State(part, fetch)
    failures = 0
    with Progress(fetch.size, fetch.shown, enabled=progress) as bar:
        while True:
            try:
                if state.attempt(bar):
                    break
                failures = 0 if state.moved else failures
            except _Retry as retry:
                failures = 0 if state.moved else failures + 1
                if failures >= TRIES:
                    raise SourceError(fetch.shown, f"download failed {TRIES} times ({retry.reason})",
                                      "try again later; the bytes received so far are kept") from None
                time.sleep(retry.wait)
    return state.finish()


class _Retry(Exception):
    def __init__(self, reason: str, wait: float):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class _State:
    """The partial file and what is known of it; one ``attempt`` per request."""

    def __init__(self, part: str, fetch: Fetch):
        self.part, self.fetch, self.meta_path = part, fetch, part[:-len(".part")] + ".json"
        self.meta = self._load_meta()
        self.moved = False
        self.best = os.path.getsize(part) if os.path.exists(part) else 0
        self.name, self.tries = "", 0

    def _load_meta(self) -> dict[str, str]:
        try:
            with open(self.meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if isinstance(meta, dict) and meta.get("url") == redact(self.fetch.url) and os.path.exists(self.part):
                return meta
        except (OSError, ValueError):
            pass
        self._restart({})
        return {}

    def _restart(self, meta: dict[str, str]) -> None:
        with open(self.part, "wb"):
            pass
        self.meta = meta
        self._save_meta()

    def _save_meta(self) -> None:
        with open(self.meta_path, "w", encoding="utf-8") as f:
            json.dump({**self.meta, "url": redact(self.fetch.url)}, f)

    def attempt(self, bar: Progress) -> bool:
        """One request; True when the file is complete."""
        have = os.path.getsize(self.part)
        headers = {**self.fetch.headers, "Accept-Encoding": "identity"}
        if have and self.meta.get("validator"):
            headers.update({"Range": f"bytes={have}-", "If-Range": self.meta["validator"]})
        elif have:
            self._restart({})
            have = 0
        self.moved = False
        try:
            response = _OPENER.open(urllib.request.Request(self.fetch.url, headers=headers), timeout=_timeout())
        except urllib.error.HTTPError as exc:
            return self._status(exc.code, exc.headers, have)
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            self.tries += 1
            raise _Retry(_reason(exc), _retry_after(None, self.tries)) from None
        with response:
            return self._receive(response, have, bar)

    def _status(self, code: int, headers: object, have: int) -> bool:
        if code == 416 and have and have == self.fetch.size:
            return True
        if code == 416:
            self._restart({})
            raise _Retry("range not satisfiable", 0)
        if code in RETRY_STATUS:
            self.tries += 1
            raise _Retry(f"HTTP {code}", _retry_after(headers, self.tries))
        raise _refused(self.fetch, code)

    def _receive(self, response: HTTPResponse, have: int, bar: Progress) -> bool:
        start, total = _extent(response, have)
        if start != have:  # the server ignored the range, or the file changed: start over with what it sends
            self._restart({})
            have = 0
        self.name = _file_name(response) or self.name
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
        if validator.startswith("W/"):
            validator = ""  # a weak ETag cannot validate a range
        if validator != self.meta.get("validator"):
            self.meta = {"validator": validator, "etag": response.headers.get("ETag") or ""}
            self._save_meta()
        self._check_size(total)
        if have and not bar.done:
            bar.update(have)
        self._check_space(total, have)
        with open(self.part, "ab") as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, HTTPException) as exc:
                    out.flush()
                    self._progress()
                    raise _Retry(f"connection dropped ({_reason(exc)})", 1.0) from None
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as exc:
                    raise disk_error(self.part, exc) from None
                bar.update(len(block))
        got = self._progress()
        if total is not None and got < total:
            raise _Retry(f"the server sent {got:,} of {total:,} bytes", 1.0)
        return True

    def _progress(self) -> int:
        """The partial file's size; ``moved`` when it is larger than it ever was (a retry that only repeats what an
        earlier one got is a failure, so a server that always stops short cannot keep sdport busy)."""
        got = os.path.getsize(self.part)
        self.moved, self.best = got > self.best, max(self.best, got)
        return got

    def _check_space(self, total: int | None, have: int) -> None:
        free = shutil.disk_usage(os.path.dirname(self.part)).free
        if total is not None and total - have > free:
            raise SourceError(self.fetch.shown, f"{total - have:,} bytes to fetch, {free:,} free in the cache",
                              "free some space, or point SDPORT_CACHE elsewhere")

    def _check_size(self, total: int | None) -> None:
        expected = self.fetch.size
        if total is not None and expected is not None and total != expected:
            raise SourceError(self.fetch.shown, f"the server offers {total:,} bytes, the source says {expected:,}",
                              "the file changed or the download is not the one published")

    def finish(self) -> Fetched:
        size = os.path.getsize(self.part)
        digest = sha256_of(self.part)
        want = self.fetch.sha256
        if (want and digest != want.lower()) or (self.fetch.size is not None and size != self.fetch.size):
            for path in (self.part, self.meta_path):
                if os.path.exists(path):
                    os.remove(path)
            what = f"SHA-256 {digest[:16]}…, published {want.lower()[:16]}…" if want and digest != want.lower() \
                else f"{size:,} bytes, published {self.fetch.size:,}"
            raise HashMismatchError(self.fetch.shown, f"the download does not match its source ({what})",
                                    "nothing was kept; the file may have been tampered with or changed")
        name = self.name or _url_name(self.fetch.url)
        return Fetched(digest, size, name, self.meta.get("etag", ""))


def _extent(response: HTTPResponse, have: int) -> tuple[int, int | None]:
    """Where the body starts in the file, and the file's whole size when the server says it."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if not m:
            return 0, None
        return int(m[1]), int(m[3]) if m[3] != "*" else None
    return 0, int(length) if length and length.isdigit() else None


def sha256_of(path: str) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK * 16):
            h.update(block)
    return h.hexdigest()


def _file_name(response: HTTPResponse) -> str:
    """The name the server gives (``Content-Disposition``), reduced to a safe last component; "" if none."""
    header = response.headers.get("Content-Disposition", "")
    m = re.search(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", header) or re.search(r'filename\s*=\s*"([^"]*)"', header) \
        or re.search(r"filename\s*=\s*([^;]+)", header)
    return safe_name(urllib.parse.unquote(m[1].strip())) if m else ""


def _url_name(url: str) -> str:
    return safe_name(urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])) or "download"


def safe_name(name: str) -> str:
    """A file name from a server: its last component only, no control characters, no leading dots, 200 bytes."""
    name = re.split(r"[/\\]", name)[-1]
    name = re.sub(r"[\x00-\x1f\x7f:*?\"<>|]", "_", name).lstrip(". ").strip()
    return name.encode()[:200].decode("utf-8", "ignore")

