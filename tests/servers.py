"""HTTP servers the source tests start on 127.0.0.1: files served well and badly, Civitai's API, the Hub's endpoints.

``Server`` serves ``files`` (name → bytes) under paths that say how to misbehave::

    /plain/NAME       Range and If-Range honoured, a strong ETag
    /norange/NAME     Range ignored (always 200, the whole file)
    /drop/NAME        the first answer stops halfway and the connection closes
    /short/NAME       every answer ignores Range, announces the whole size and sends half
    /changed/NAME     every answer has a new ETag (so If-Range always fails)
    /slow/NAME        sends in small pieces with pauses (for concurrent fetches)
    /redirect/NAME    302 to /plain/NAME on ``localhost`` (another host than 127.0.0.1)
    /status/CODE/NAME answers CODE; 429 and 500 only once (429 with Retry-After: 1), then as /plain
    /api/v1/model-versions/ID, /api/download/models/ID   Civitai (``civitai``: ID → version JSON)
    /api/models/REPO/revision/REV, /REPO/resolve/REV/PATH   the Hub (``hub``: repo → (commit, {path: bytes}))

Every request is logged with its method, path, headers and what was sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: files at or above this size are served as LFS files (their ETag is their SHA-256, as the Hub does)
LFS_FROM = 1024


class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.civitai: dict[str, dict] = {}
        self.hub: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.log: list[dict] = []
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def first(self, key: str) -> bool:
        with self.lock:
            new = key not in self.seen
            self.seen.add(key)
            return new

    def gets(self, prefix: str = "") -> list[str]:
        return [r["path"] for r in self.log if r["method"] == "GET" and r["path"].startswith(prefix)]


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            with server.lock:
                server.log.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
            if path.startswith("/api/v1/model-versions/"):
                return self._json(server.civitai.get(path.rsplit("/", 1)[-1]))
            if path.startswith("/api/download/models/"):
                return self._civitai_download(path.rsplit("/", 1)[-1])
            if path.startswith("/api/models/"):
                return self._hub_info(path)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m and m[1] in server.hub:
                return self._hub_file(m[1], m[2], urllib.parse.unquote(m[3]), head)
            m = re.fullmatch(r"/(plain|norange|drop|short|changed|slow|redirect)/(.+)", path) or \
                re.fullmatch(r"/status/(\d+)/(.+)", path)
            if not m or m[2] not in server.files:
                return self._send(404, b"not found")
            mode, name = m[1], m[2]
            if mode.isdigit():
                code = int(mode)
                if code not in (429, 500) or server.first(path):
                    extra = {"Retry-After": "1"} if code == 429 else {}
                    return self._send(code, b"no", extra)
                mode = "plain"
            if mode == "redirect":
                return self._send(302, b"", {"Location": f"http://localhost:{server.port}/plain/{name}"})
            self._file(server.files[name], mode, name, head)

        def _file(self, data: bytes, mode: str, name: str, head: bool) -> None:
            etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"' if mode != "changed" else f'"{time.monotonic_ns()}"'
            start = 0
            wanted = self.headers.get("Range")
            if wanted and mode not in ("norange", "changed", "short") and self.headers.get("If-Range", etag) == etag:
                start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
            body = data[start:]
            headers = {"ETag": etag, "Accept-Ranges": "bytes",
                       "Content-Disposition": f'attachment; filename="{name}"'}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(206 if start else 200)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            cut = len(body) // 2 if mode == "short" or (mode == "drop" and server.first("drop:" + name)) else None
            sent = body[:cut] if cut is not None else body
            with server.lock:
                server.log[-1].update(start=start, sent=len(sent))
            if mode == "slow":
                for i in range(0, len(sent), max(1, len(sent) // 20)):
                    self.wfile.write(sent[i:i + max(1, len(sent) // 20)])
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(sent)
            if cut is not None:
                self.close_connection = True

        def _civitai_download(self, version: str) -> None:
            doc = server.civitai.get(version)
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            name = next((f["name"] for f in (doc or {}).get("files", []) if f.get("type") == query.get("type")),
                        None)
            if name is None:
                return self._send(404, b"no such file")
            self._send(302, b"", {"Location": f"http://localhost:{server.port}/plain/{name}"})

        def _hub_info(self, path: str) -> None:
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if not m or m[1] not in server.hub:
                return self._send(401, b"{}", {"X-Error-Code": "RepoNotFound"})
            commit, files = server.hub[m[1]]
            siblings = [{"rfilename": p, "size": len(d), **({"lfs": {"sha256": hashlib.sha256(d).hexdigest(),
                                                                      "size": len(d), "pointerSize": 134}}
                                                             if len(d) >= LFS_FROM else {})} for p, d in files.items()]
            self._json({"id": m[1], "sha": commit, "siblings": siblings, "private": False})

        def _hub_file(self, repo: str, rev: str, name: str, head: bool) -> None:
            commit, files = server.hub[repo]
            if name not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            data = files[name]
            sha = hashlib.sha256(data).hexdigest()
            etag = f'"{sha}"' if len(data) >= LFS_FROM else f'"{hashlib.sha1(data).hexdigest()}"'
            self._file_hub(data, etag, sha, commit, head)

        def _file_hub(self, data: bytes, etag: str, sha: str, commit: str, head: bool) -> None:
            start = 0
            wanted = self.headers.get("Range")
            if wanted:
                start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
            body = data[start:]
            self.send_response(206 if start else 200)
            headers = {"ETag": etag, "X-Repo-Commit": commit, "Content-Length": str(len(body)),
                       "Accept-Ranges": "bytes"}
            if len(data) >= LFS_FROM:
                headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, doc: object) -> None:
            if doc is None:
                return self._send(404, b'{"error": "not found"}')
            self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

        def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in {**(headers or {}), "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def civitai_version(version: str, files: dict[str, tuple[bytes, dict]], base: str, *, sha: dict[str, str] | None = None
                    ) -> dict:
    """A model-version document listing ``files`` (name → (bytes, type and metadata)); the first is primary."""
    out = []
    for k, (name, (data, meta)) in enumerate(files.items()):
        query = urllib.parse.urlencode({"type": meta["type"], "format": meta.get("format", "")})
        out.append({"id": 100 + k, "name": name, "sizeKB": len(data) / 1024, "type": meta["type"],
                    "metadata": {f: meta[f] for f in ("format", "size", "fp") if f in meta},
                    "hashes": {"SHA256": (sha or {}).get(name, hashlib.sha256(data).hexdigest()).upper(),
                               "AutoV2": hashlib.sha256(data).hexdigest()[:10]},
                    "downloadUrl": f"{base}/api/download/models/{version}?{query}", "primary": k == 0})
    return {"id": int(version), "modelId": 1, "name": "v1", "files": out}
