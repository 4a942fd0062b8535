"""``sdport inspect``: what a model file is, as a stable JSON-able report and as a readable table."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .detect import Detection, prediction_type
from .families import FAMILIES
from .lora.describe import describe
from .model import open_model
from .sources import locate


def inspect(source: str | os.PathLike[str], *, variant: str | None = None) -> dict[str, Any]:
    """Describe a model or adapter — a file, a folder, or any source ``sdport.resolve`` takes — without loading its
    tensors (a remote source is fetched into the cache first).

    Returns:
        A dict with the keys documented in the README (``format``, ``family``, ``tensors``,
        ``parameters``, ``dtypes`` …); stable across versions, new keys may be added.

    Example::

        >>> sdport.inspect("model.safetensors")["family"]
        'sd1'
    """
    where = locate(source, variant=variant)
    with open_model(where.path, variant=variant) as model:
        src, found = model.raw, model.found
        infos = list(src.tensors.values())
        files = sorted({i.file for i in infos})
        prefixes = Counter(_prefix(name) for name in src.tensors)
        return {
            "path": os.fspath(source),
            **({"location": where.path, "sha256": where.sha256} if where.remote else {}),
            "format": src.format,
            "family": found.family,
            "layout": found.layout,
            "variant": found.variant,
            "adapter_format": found.adapter_format,
            "evidence": found.evidence,
            "tensors": len(infos),
            "parameters": sum(i.numel for i in infos),
            "tensor_bytes": sum(i.nbytes for i in infos),
            "file_bytes": sum(os.path.getsize(f) for f in files),
            "files": len(files),
            "dtypes": dict(sorted(Counter(i.dtype for i in infos).items())),
            "prefixes": dict(sorted(prefixes.items())),
            "root": src.root,
            "metadata": dict(src.metadata),
            "non_tensors": dict(src.non_tensors),
            **_prediction(found),
            **({"adapter": describe(src, found.adapter_format)} if found.family == "lora" else {}),
        }


def _prediction(found: Detection) -> dict[str, str]:
    """What a denoiser predicts and how that was decided; empty for models without a UNet."""
    family = FAMILIES.get(found.family)
    if family is None or family.part("unet") is None:
        return {}
    value, reason = prediction_type(found)
    return {"prediction_type": value, "prediction_reason": reason}


def _prefix(name: str) -> str:
    parts = name.split(".")
    depth = 2 if parts[0] in ("model", "cond_stage_model", "conditioner", "first_stage_model") else 1
    return ".".join(parts[:depth]) if len(parts) > depth else "(top level)"


def render(report: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    family = report["family"] + (f" ({report['variant']})" if report["variant"] else "")
    if report["adapter_format"]:
        family += f", {report['adapter_format']} adapter"
    rows = [
        ("file", report["path"]),
        ("format", report["format"] + (f", weights under '{report['root']}'" if report["root"] else "")),
        ("family", family + (f", {report['layout']} layout" if report["layout"] not in ("", "adapter") else "")),
        ("evidence", "; ".join(report["evidence"])),
        ("tensors", f"{report['tensors']:,}"),
        ("parameters", f"{report['parameters']:,}"),
        ("bytes", f"{report['tensor_bytes']:,} in tensors, {report['file_bytes']:,} on disk"),
        ("dtypes", ", ".join(f"{k} {v:,}" for k, v in report["dtypes"].items())),
    ]
    if "adapter" in report:
        rows.append(("adapter", _adapter_line(report["adapter"])))
        if report["adapter"].get("loads_in"):
            note = report["adapter"]["loads_in_note"]
            rows.append(("loads in", ", ".join(report["adapter"]["loads_in"]) + (f"; {note}" if note else "")))
    if "prediction_type" in report:
        rows.insert(4, ("predicts", f"{report['prediction_type']}: {report['prediction_reason']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for title, items in (("prefixes", report["prefixes"]), ("metadata", report["metadata"]),
                         ("non-tensor entries", report["non_tensors"])):
        if items:
            lines.append(f"{title}:")
            shown = list(items.items())
            lines += [f"  {k}: {_short(v)}" for k, v in shown[:40]]
            if len(shown) > 40:
                lines.append(f"  … and {len(shown) - 40} more (see --json)")
    return "\n".join(lines)


def _adapter_line(a: dict[str, Any]) -> str:
    if not a.get("mergeable"):
        return f"{', '.join(a['algorithms']) or 'unknown algorithm'}: {a['reason']}"
    kinds = ", ".join(f"{k} {n}" for k, n in a["kinds"].items())
    parts = []
    for comp, e in a["components"].items():
        ranks = "/".join(str(r) for r in e["ranks"])
        alphas = "/".join(f"{x:g}" for x in e["alphas"])
        parts.append(f"{comp} {e['modules']} (rank {ranks}, alpha {alphas})")
    return f"{a['format']}, {a['modules']} modules ({kinds}) for {a['base_family']}: {'; '.join(parts)}"


def _short(value: object) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= 100 else text[:97] + "..."
