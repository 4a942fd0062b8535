"""Traced ONNX graphs kept between exports: a weightless trace depends only on what it was traced from.

``traced`` returns ``trace.onnx.trace``'s result for a component, from the cache when the same
component config (less the keys that only record provenance), spec, opset, fp16 options and the same
versions of sdport and of the exporter stack (torch, onnx, onnxruntime, diffusers, transformers) were
traced before — so the second export of any model of a family and shape neither imports torch nor
traces. An entry is two files under ``graph_dir()`` (``SDPORT_GRAPH_CACHE``, else
``SDPORT_CACHE/graphs``; ``SDPORT_GRAPH_CACHE=off`` disables it): ``<key>.onnx``, the model with its graph
and no weights (it opens in Netron or onnx), and ``<key>.json``, the parameters the graph takes and the
SHA-256 of the ``.onnx``. The ``.json`` is written last; an entry that does not read back whole and
with that hash is traced again and replaced. The cache holds graphs only, a few MB each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version

from ..io.atomic import write_atomic
from ..io.onnx import _field, split_model
from ..request import OPSET
from . import onnx as traced_onnx

#: config keys that record where a config came from, not what the module is
PROVENANCE = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash", "_use_default_values")
STACK = ("sdport", "torch", "onnx", "onnxruntime", "diffusers", "transformers")


def graph_dir() -> str | None:
    """Where traced graphs are kept, or None when ``SDPORT_GRAPH_CACHE=off``."""
    chosen = os.environ.get("SDPORT_GRAPH_CACHE", "")
    if chosen.lower() in ("off", "0", "no"):
        return None
    if chosen:
        return os.path.abspath(chosen)
    from ..sources.cache import root

    return os.path.join(root(), "graphs")


def _installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def key(spec: traced_onnx.Spec, config: dict, *, opset: int, fp16: bool, fp16_io: bool) -> str:
    """The SHA-256 naming a trace: everything the graph is a function of."""
    what = {"spec": dataclasses.asdict(spec), "config": {k: v for k, v in config.items() if k not in PROVENANCE},
            "opset": opset, "fp16": fp16, "fp16_io": fp16_io, "fp32_ops": traced_onnx.FP32_OPS,
            "fp32_modules": traced_onnx.FP32_MODULES, "versions": {p: _installed(p) for p in STACK}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def traced(spec: traced_onnx.Spec, config: dict, *, opset: int = OPSET, fp16: bool = False,
           fp16_io: bool = False) -> traced_onnx.Traced:
    """The component traced (``trace.onnx.trace``), or its graph from the cache."""
    folder = graph_dir()
    if folder is None:
        return traced_onnx.trace(spec, config, opset=opset, fp16=fp16, fp16_io=fp16_io)
    name = os.path.join(folder, key(spec, config, opset=opset, fp16=fp16, fp16_io=fp16_io))
    hit = _load(name, spec)
    if hit is not None:
        return hit
    fresh = traced_onnx.trace(spec, config, opset=opset, fp16=fp16, fp16_io=fp16_io)
    _store(name, fresh)
    return fresh


def _load(name: str, spec: traced_onnx.Spec) -> traced_onnx.Traced | None:
    try:
        with open(name + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        model, graph = split_model(name + ".onnx")  # read once; the entry is exactly these two parts again
        if hashlib.sha256(model + _field(7, graph)).hexdigest() != meta["sha256"]:
            return None
        params = [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in meta["params"]]
    except Exception:  # noqa: BLE001 - an entry unreadable in any way is traced again
        return None
    return traced_onnx.Traced(spec, model, graph, params)


def _store(name: str, t: traced_onnx.Traced) -> None:
    """Write the entry; a cache that cannot be written (read-only, full) only costs the next export a trace."""
    whole = t.model + _field(7, t.graph)
    try:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        write_atomic(name + ".onnx", whole)
        meta = {"sha256": hashlib.sha256(whole).hexdigest(), "params": [[n, d, list(s)] for n, d, s in t.params]}
        write_atomic(name + ".json", json.dumps(meta).encode())
    except Exception:  # noqa: BLE001 - OSError, or sdport's OutputError for a full disk
        return
