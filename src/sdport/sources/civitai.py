"""Civitai model versions: ``civitai://MODEL_VERSION_ID[?type=…&format=…&size=…&fp=…]``, as onnx-web's ``extras.json``
writes them, to the one file they name and the SHA-256 Civitai publishes for it.

The model-version API (``/api/v1/model-versions/ID``) lists a version's files, each with its ``type``
(``Model``, ``Pruned Model``, ``VAE`` …), ``metadata`` (``format``: ``SafeTensor``/``PickleTensor``,
``size``: ``pruned``/``full``, ``fp``: ``fp16``/``fp32``), ``hashes.SHA256`` and ``downloadUrl``. The
query picks among them (every given field must match, case aside); without one, the primary file.
``CIVITAI_TOKEN`` goes as a bearer token to Civitai's host only; ``SDPORT_CIVITAI_ENDPOINT`` replaces
``https://civitai.com`` (a mirror, or a test server).
"""

from __future__ import annotations

import os
import urllib.parse

from ..errors import SourceError
from .http import Fetch, json_get

ENDPOINT = "https://civitai.com"
#: query field → where the file says it
FIELDS = {"type": ("type",), "format": ("metadata", "format"), "size": ("metadata", "size"), "fp": ("metadata", "fp")}


def parse(uri: str) -> tuple[str, dict[str, str]]:
    """``civitai://ID?…`` → (version id, query); anything else is refused with one line."""
    parts = urllib.parse.urlsplit(uri)
    version = parts.netloc + parts.path.rstrip("/")
    if not version.isdigit() or len(version) > 12:
        raise SourceError(uri, "invalid Civitai model version id", "write civitai://MODEL_VERSION_ID, e.g. "
                          "civitai://6266?type=Pruned%20Model&format=SafeTensor")
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - set(FIELDS)
    if unknown:
        raise SourceError(uri, f"unknown Civitai query field {sorted(unknown)[0]!r}", "use type, format, size or fp")
    return version, query


def shown(version: str, query: dict[str, str]) -> str:
    """The source as users see it and the cache knows it: the query in a fixed order."""
    return f"civitai://{version}" + (f"?{urllib.parse.urlencode(sorted(query.items()))}" if query else "")


def _endpoint() -> str:
    return os.environ.get("SDPORT_CIVITAI_ENDPOINT", ENDPOINT).rstrip("/")


def _headers(url: str) -> dict[str, str]:
    token = os.environ.get("CIVITAI_TOKEN")
    same = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(_endpoint()).netloc
    return {"Authorization": f"Bearer {token}"} if token and same else {}


def fetch_of(version: str, query: dict[str, str]) -> Fetch:
    """What to download for this version and query, with the hash to check it against."""
    name = shown(version, query)
    api = f"{_endpoint()}/api/v1/model-versions/{version}"
    doc = json_get(Fetch(api, name, _headers(api), token_hint="CIVITAI_TOKEN"))
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not files:
        raise SourceError(name, "the model version lists no files", "check the version id")
    chosen = _choose(name, [f for f in files if isinstance(f, dict)], query)
    sha = (chosen.get("hashes") or {}).get("SHA256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise SourceError(name, f"Civitai publishes no SHA-256 for {chosen.get('name')!r}",
                          "sdport fetches only what it can verify")
    url = chosen.get("downloadUrl") or f"{_endpoint()}/api/download/models/{version}"
    if not isinstance(url, str):
        raise SourceError(name, "the file has no download URL", None)
    return Fetch(url, name, _headers(url), sha256=sha, token_hint="CIVITAI_TOKEN")


def _field(file: dict, path: tuple[str, ...]) -> str:
    value: object = file
    for step in path:
        value = value.get(step) if isinstance(value, dict) else None
    return str(value) if value is not None else ""


def _choose(name: str, files: list[dict], query: dict[str, str]) -> dict:
    matching = [f for f in files if all(_field(f, FIELDS[k]).lower() == v.lower() for k, v in query.items())]
    if not query:
        matching = [f for f in files if f.get("primary")] or [f for f in files if f.get("type") == "Model"] or files
    if not matching:
        offered = "; ".join(", ".join(f"{k}={_field(f, p)}" for k, p in FIELDS.items() if _field(f, p))
                            for f in files)
        raise SourceError(name, "no file of this version matches the query", f"it offers: {offered}")
    return next((f for f in matching if f.get("primary")), matching[0])
