"""A batch manifest read, checked in full and turned into entries: onnx-web's ``extras.json`` as onnx-web users write
it, or sdport's own manifest (``{"sdport": 1, "models": [...]}``), JSON or YAML.

Every schema error names its entry (``diffusion[3] "diffusion-foo": …``) and nothing runs when there is
one. Each entry becomes an ``Entry``: what to do (``export``, ``convert``, ``fetch``, ``keep``), its sources
and the requests of its outputs, with paths relative to the batch's output folder — picklable, so a
worker process or a Ray task can carry it out (``runner``).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import MissingExtraError, SdportError
from ..request import OPSETS, ConvertRequest, InversionSpec, LoraSpec, OnnxOptions
from . import schema

ONNX_WEB_SECTIONS = ("sources", "networks", "diffusion", "upscaling", "correction")
#: onnx-web's server lists models whose folder starts with one of these; others get ``diffusion-`` in front
DIFFUSION_PREFIXES = ("diffusion-", "diffusion/", "stable-diffusion-", "upscaling-")
#: onnx-web's words for its protocols → sdport's
_SCHEMES = {"huggingface://": "hf://", "file://": ""}
_HASH = re.compile(r"[0-9a-fA-F]{8,64}")
#: onnx-web's ``version`` and ``pipeline`` → the family ``detect`` must find
VERSION_FAMILIES = {"v1": ("sd1",), "v2": ("sd2",), "v2.1": ("sd2",)}
SDXL_PIPELINES = ("txt2img-sdxl", "img2img-sdxl")


class ManifestError(SdportError):
    """A manifest that does not validate: every problem, one line each."""

    def __init__(self, path: str, problems: list[str]):
        super().__init__(path, problems[0] if len(problems) == 1 else f"{len(problems)} problems")
        self.problems = problems

    @property
    def lines(self) -> list[str]:
        return [f"sdport: error: {self.path}: {p}" for p in self.problems]


@dataclass(frozen=True)
class Entry:
    """One entry of a manifest, ready to run anywhere.

    Attributes:
        section / index / name: where it stands in the manifest (``where`` names it in messages).
        action: ``export`` (an onnx-web diffusion model → ONNX), ``convert`` (sdport's outputs), ``fetch``
            (a file kept as it is, checked as ``check`` says: ``adapter``, ``embedding`` or nothing), ``keep``
            (fetched and kept, not a Stable Diffusion model).
        source: the model or file (any source form).
        outputs: the paths it writes, relative to the batch's folder (a fetch's suffix is settled when fetched).
        requests: the conversions, outputs relative to the batch's folder.
        hash: the SHA-256 (or its first hex digits) the source must have.
        hints: onnx-web's ``version`` and ``pipeline``, checked against what ``detect`` finds.
    """

    section: str
    index: int
    name: str
    action: str
    source: str
    outputs: tuple[str, ...]
    requests: tuple[ConvertRequest, ...] = ()
    hash: str = ""
    check: str = ""
    hints: tuple[tuple[str, str], ...] = field(default=())

    @property
    def where(self) -> str:
        return f'{self.section}[{self.index}] "{self.name}"'

    @property
    def sources(self) -> tuple[str, ...]:
        """Every input it reads: the model, its adapters, embeddings and VAE."""
        extra = [s for r in self.requests for s in ([x.source for x in r.loras] + [x.source for x in r.inversions]
                                                     + ([r.vae] if r.vae else []))]
        return tuple(dict.fromkeys([self.source, *extra]))


def load(path: str | os.PathLike[str]) -> list[Entry]:
    """The entries of a manifest file (onnx-web's extras.json or sdport's own), validated in full first."""
    path = os.fspath(path)
    doc = _read(path)
    base = os.path.dirname(os.path.abspath(path))
    own = isinstance(doc, dict) and "sdport" in doc
    _validate(path, doc, schema.SDPORT if own else schema.EXTRAS)
    problems: list[str] = []
    entries = _sdport_entries(doc, base, problems) if own else _extras_entries(doc, base, problems)
    _check_outputs(entries, problems)
    if problems:
        raise ManifestError(path, problems)
    return entries


#: what the batch itself keeps in its folder: no entry may write there
RESERVED = (".sdport-batch", "sdport-batch.json", ".sdport-batch.lock")


def _check_outputs(entries: list[Entry], problems: list[str]) -> None:
    """Names unique; outputs inside the folder, clear of the batch's own files, none inside another."""
    names: dict[str, Entry] = {}
    for e in entries:
        other = names.setdefault(e.name, e)
        if other is not e:
            problems.append(f"{e.where}: the name is {other.where}'s too (the record tells entries by name)")
    seen: dict[str, Entry] = {}
    for e in entries:
        for out in e.outputs:
            norm = posixpath.normpath(out.replace("\\", "/"))
            if norm in (".", "") or norm.startswith("../") or norm.split("/")[0] in RESERVED:
                problems.append(f"{e.where}: output {out!r} is not a place inside the output folder")
            other = seen.setdefault(norm, e)
            if other is not e:
                problems.append(f"{e.where}: writes {out}, as {other.where} does")
    paths = sorted(seen)
    for a, b in zip(paths, paths[1:], strict=False):
        if b.startswith(a + "/"):
            problems.append(f"{seen[b].where}: output {b} is inside {seen[a].where}'s {a}")


def _read(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            text = f.read(64 << 20)
    except OSError as exc:
        raise SdportError(path, f"cannot read the manifest ({exc.strerror})", None) from exc
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise MissingExtraError("YAML manifests", "batch", ["pyyaml"]) from None
        try:
            doc = yaml.load(text, Loader=_loader(yaml))  # noqa: S506 - a safe loader without aliases
            return json.loads(json.dumps(doc))  # keys as JSON has them (a YAML key may be a number)
        except (yaml.YAMLError, RecursionError, TypeError, ValueError) as exc:
            raise SdportError(path, f"not valid YAML ({str(exc).splitlines()[0]})", None) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise SdportError(path, f"not valid JSON ({exc})", "onnx-web's extras.json, or sdport's manifest") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _loader(yaml: Any) -> type:
    """PyYAML's safe loader refusing aliases (a few hundred bytes of nested aliases expand to billions of nodes)."""
    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("aliases (*name) are not allowed in a manifest")
            return super().compose_node(parent, index)
    return NoAliases


def _validate(path: str, doc: Any, against: dict) -> None:
    try:
        import jsonschema
    except ImportError:
        raise MissingExtraError("sdport batch", "batch", ["jsonschema"]) from None
    validator = jsonschema.Draft202012Validator(against)
    try:
        errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    except RecursionError:
        raise SdportError(path, "nested too deeply", None) from None
    if errors:
        raise ManifestError(path, [_schema_problem(doc, e) for e in errors])


def _schema_problem(doc: Any, error: Any) -> str:
    """``section[i] "name".field: what is wrong`` for an error inside an entry, else the error at its path."""
    error = _leaf(error)
    where = list(error.absolute_path)
    if len(where) >= 2 and isinstance(where[1], int):
        item = doc[where[0]][where[1]]
        name = item.get("name") if isinstance(item, dict) else (item[0] if item and isinstance(item, list) else None)
        label = f"{where[0]}[{where[1]}]" + (f' "{name}"' if isinstance(name, str) else "")
        rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where[2:])
        return f"{label}{rest}: {error.message[:200]}"
    return f"{'.'.join(map(str, where)) or 'manifest'}: {error.message[:200]}"


def _leaf(error: Any) -> Any:
    """Of a ``oneOf``/``allOf`` failure, the error of the branch that fits best: the fewest errors, then the deepest,
    then not a mere wrong type (an object entry is not told that it is not a legacy array)."""
    while error.context:
        branches: dict[Any, list] = {}
        for e in error.context:
            branches.setdefault(e.relative_schema_path[0], []).append(e)
        best = min(branches.values(), key=lambda es: (len(es), -max(len(e.absolute_path) for e in es),
                                                      all(e.validator == "type" for e in es)))
        error = max(best, key=lambda e: len(e.absolute_path))
    return error


def local_source(text: str, base: str) -> str:
    """onnx-web's protocols in sdport's words; a relative path is relative to the manifest's folder."""
    for scheme, ours in _SCHEMES.items():
        if text.startswith(scheme):
            text = ours + text[len(scheme):]
    text = os.path.expanduser(text)
    if "://" in text or os.path.isabs(text):
        return text
    near = os.path.join(base, text)
    return near if os.path.exists(near) or text.startswith((".", "~")) else text


def _legacy_problem(section: str, exc: Exception) -> str:
    order = "name, source" if section == "sources" else \
        f"name, source, {'single_vae' if section == 'diffusion' else 'scale'}, half, opset"
    what = f"no {exc.args[0]}" if isinstance(exc, KeyError) else str(exc)[:120]
    return f"{what} (a positional entry is [{order}], name and source strings)"


def _legacy(section: str, item: list) -> dict:
    """onnx-web's positional entries: (name, source, single_vae|scale, half, opset) — sources: (name, source, …)."""
    keys = ("name", "source") if section == "sources" else \
        ("name", "source", "single_vae" if section == "diffusion" else "scale", "half", "opset")
    return dict(zip(keys, item, strict=False))


def _extras_entries(doc: dict, base: str, problems: list[str]) -> list[Entry]:
    entries = []
    for section in ONNX_WEB_SECTIONS:
        for index, item in enumerate(doc.get(section, [])):
            item = _legacy(section, item) if isinstance(item, list) else item
            label = f'{section}[{index}] "{item.get("name")}"'
            try:
                entries.append(_EXTRAS[section](index, item, base))
            except SdportError as exc:
                problems.append(f"{label}: {exc.problem}")
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # a positional entry
                problems.append(f"{label}: {_legacy_problem(section, exc)}")
    return entries


def _checked_name(name: object, *, folder: bool = False) -> str:
    if not isinstance(name, str) or not name.strip():
        raise SdportError(None, "has no name")
    parts = name.split("/")
    if name.startswith(("/", "\\")) or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts) \
            or len(parts) > (2 if folder else 1):
        raise SdportError(None, f"name {name!r} is not a plain file name")
    return name


def _hash(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not _HASH.fullmatch(value):
        raise SdportError(None, f"hash {value!r} is not a SHA-256 (or its first 8+ hex digits)")
    return value.lower()


def _diffusion(index: int, item: dict, base: str) -> Entry:
    name = _checked_name(item["name"], folder=True)
    if not name.startswith(DIFFUSION_PREFIXES):
        name = "diffusion-" + name  # what onnx-web's converter does, so that its server lists the model
    if item.get("pipeline") not in (None, "txt2img", "img2img", "inpaint", "txt2img-legacy", *SDXL_PIPELINES):
        raise SdportError(None, f"pipeline {item['pipeline']!r} has no converter (onnx-web has none either)")
    opset = item.get("opset")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int | float) or opset != int(opset)
                              or int(opset) not in OPSETS):
        raise SdportError(None, f"opset {opset!r}: use {OPSETS.start} to {OPSETS.stop - 1}")
    if not isinstance(item["source"], str):
        raise SdportError(None, "source is not a string")
    loras = tuple(LoraSpec(local_source(x["source"], base), float(x.get("weight", 1.0)))
                  for x in item.get("loras", []))
    inversions = tuple(InversionSpec(local_source(x["source"], base), x.get("token") or x["name"],
                                     float(x.get("weight", 1.0))) for x in item.get("inversions", []))
    half = bool(item.get("half"))
    options = OnnxOptions(vae_dtype="F32" if half else None, **({"opset": int(opset)} if opset is not None else {}))
    request = ConvertRequest(local_source(item["source"], base), name, "onnx", "F16" if half else "F32",
                             loras=loras, options=options, inversions=inversions,
                             vae=local_source(item["vae"], base) if item.get("vae") else None)
    hints = tuple((k, str(item[k])) for k in ("version", "pipeline") if k in item)
    return Entry("diffusion", index, name, "export", request.source, (name,), (request,), _hash(item.get("hash")),
                 hints=hints)


def _network(index: int, item: dict, base: str) -> Entry:
    kind = item.get("type", "inversion")
    name = _checked_name(item["name"])
    return Entry("networks", index, name, "fetch", local_source(item["source"], base),
                 (f"{kind}/{name}{_suffix(item)}",), check="adapter" if kind == "lora" else "embedding")


def _file(section: str, action: str):
    def entry(index: int, item: dict, base: str) -> Entry:
        name = _checked_name(item["name"])
        dest = item.get("dest") or ".cache"
        if not isinstance(dest, str) or os.path.isabs(dest) or ".." in re.split(r"[/\\]", dest):
            raise SdportError(None, f"dest {dest!r} is outside the output folder")
        return Entry(section, index, name, action, local_source(str(item["source"]), base),
                     (f"{dest.strip('/')}/{name}{_suffix(item)}",))
    return entry


def _suffix(item: dict) -> str:
    """The file's suffix: its ``format``, else the source's own when it names one (else settled by its content)."""
    fmt = item.get("format")
    if isinstance(fmt, str) and re.fullmatch(r"[A-Za-z0-9]{1,12}", fmt):
        return "." + fmt
    ext = os.path.splitext(str(item.get("source", "")).split("?")[0])[1]
    return ext if re.fullmatch(r"\.[A-Za-z0-9]{1,12}", ext) else ""


_EXTRAS = {"diffusion": _diffusion, "networks": _network, "sources": _file("sources", "fetch"),
           "upscaling": _file("upscaling", "keep"), "correction": _file("correction", "keep")}


def _sdport_entries(doc: dict, base: str, problems: list[str]) -> list[Entry]:
    entries = []
    for index, item in enumerate(doc["models"]):
        try:
            entries.append(_sdport_entry(index, item, base))
        except SdportError as exc:
            problems.append(f'models[{index}] "{item["name"]}": {exc.problem}')
    return entries


def _sdport_entry(index: int, item: dict, base: str) -> Entry:
    name = _checked_name(item["name"])
    source = local_source(item["source"], base)
    specs = [LoraSpec.parse(x) if isinstance(x, str) else LoraSpec(x["source"], float(x.get("ratio", 1.0)))
             for x in item.get("loras", [])]
    loras = [LoraSpec(local_source(s.source, base), s.ratio) for s in specs]
    inversions = [InversionSpec(local_source(x["source"], base), x.get("token"), float(x.get("weight", 1.0)))
                  for x in item.get("inversions", [])]
    requests = []
    for out in item["outputs"]:
        path = out["path"]
        if os.path.isabs(path) or ".." in re.split(r"[/\\]", path) or not path.strip("/"):
            raise SdportError(None, f"output {path!r} is outside the output folder")
        opts = {k: out[k] for k in ("to", "dtype", "format", "ema", "prediction_type", "allow_unknown", "vae_dtype",
                                    "opset", "controlnet", "crc") if k in out}
        requests.append(ConvertRequest.build(source, path.rstrip("/"), onnx_layout=out.get("layout"),
                                             components=out.get("components"), loras=loras,
                                             inversions=inversions, variant=item.get("variant"),
                                             vae=local_source(item["vae"], base) if item.get("vae") else None,
                                             **opts))
    return Entry("models", index, name, "convert", source, tuple(r.output for r in requests), tuple(requests),
                 _hash(item.get("hash")))
