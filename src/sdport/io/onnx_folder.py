"""ONNX pipeline folders (``<component>/model.onnx`` …) read as one model under diffusers names.

sdport writes ``sdport-names.json`` beside every graph it exports: initializer ↔ (component,
parameter). Graphs exported by others (diffusers' script, onnx-web, Optimum: torch's exporter with
constant folding) keep most weights under their parameter names, but store every linear layer's
weight transposed under a made-up name (``onnx::MatMul_1234``); the node that multiplies by it is
named after its module (``/down_blocks.0/…/to_q/MatMul``), so the weight is found again, and read as a
transposed view. Either way the folder reads as a ``TensorSource`` whose names a diffusers folder would have.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import FormatError
from .base import TensorInfo, TensorSource
from .onnx import open_onnx, read_nodes

#: sdport writes this beside every graph it exports: initializer ↔ diffusers parameter
NAME_MAP = "sdport-names.json"
_MATMUL = re.compile(r"/(.+)/MatMul(_\d+)?")


@dataclass
class Graph:
    """One graph of the folder: its file, initializer → diffusers name, and the initializers stored transposed."""

    model: str
    names: dict[str, str] = field(default_factory=dict)
    transposed: set[str] = field(default_factory=set)
    mapped: bool = False  # the names come from sdport's name map (every weight named)


def owner(comp: str) -> str:
    """The diffusers component whose weights an ONNX component holds."""
    return "vae" if comp.startswith("vae_") else "unet" if comp == "cnet" else comp


def full_name(comp: str, graph: Graph, initializer: str) -> str:
    """An initializer's name in the folder's source: its diffusers name, else kept under its folder."""
    return graph.names.get(initializer, f"{comp}.{initializer}")


def folder_graphs(path: str) -> dict[str, Graph]:
    """Each ``<component>/model.onnx`` of the folder, with its names: from sdport's name map, else the graph's own.

    A lone ControlNet's weights are its own; a pipeline's go under their component (``vae_encoder``
    and ``vae_decoder`` both hold parts of ``vae``). ``cnet`` (onnx-web's ControlNet UNet) comes last:
    it repeats the UNet's weights.
    """
    out = {}
    for comp in sorted(os.listdir(path), key=lambda c: (c == "cnet", c)):
        model = os.path.join(path, comp, "model.onnx")
        if not os.path.isfile(model):
            continue
        mapped = os.path.join(path, comp, NAME_MAP)
        out[comp] = _mapped(mapped, model) if os.path.isfile(mapped) else _found(model, comp)
    return out


def _mapped(mapped: str, model: str) -> Graph:
    graph = Graph(model, mapped=True)
    try:
        with open(mapped, "rb") as f:
            for k, v in json.load(f)["tensors"].items():
                component = v["component"]
                graph.names[k] = v["param"] if component == "controlnet" else f"{component}.{v['param']}"
                if v.get("transpose"):
                    graph.transposed.add(k)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(mapped, "invalid name map", "re-export the model with sdport") from exc
    return graph


def _found(model: str, comp: str) -> Graph:
    """Names of a foreign export: initializers named like parameters under their component, MatMul weights
    after their node's module; made-up names (``onnx::…``) stay under the folder's name."""
    graph = Graph(model)
    users: dict[str, list[str]] = {}
    for name, op, inputs in read_nodes(model):
        if op == "MatMul" and len(inputs) == 2 and (m := _MATMUL.fullmatch(name)):
            users.setdefault(inputs[1], []).append(m[1].replace("/", ".") + ".weight")
    for initializer in open_onnx(model).tensors:
        params = set(users.get(initializer, ()))
        if len(params) == 1:  # one module multiplies by it (not a weight shared by deduplication)
            graph.names[initializer] = f"{owner(comp)}.{params.pop()}"
            graph.transposed.add(initializer)
        elif "::" not in initializer:
            graph.names[initializer] = f"{owner(comp)}.{initializer}"
    return graph


def require_name_maps(path: str) -> None:
    """Refuse a folder whose graphs sdport did not export: only a name map names every weight."""
    foreign = [comp for comp, g in folder_graphs(path).items() if not g.mapped]
    if foreign:
        raise FormatError(os.path.join(path, foreign[0]), f"no {NAME_MAP}: not exported by sdport",
                          "only sdport's exports convert back; LoRAs can still be blended into it")


def open_onnx_folder(path: str) -> TensorSource:
    """An ONNX pipeline folder's weights under their diffusers names (see ``folder_graphs``)."""
    source = TensorSource(path=path, format="onnx", tensors={})
    for comp, graph in folder_graphs(path).items():
        for name, info in open_onnx(graph.model).tensors.items():
            full = full_name(comp, graph, name)
            if full in source.tensors:
                seen = source.tensors[full]
                if comp == "cnet" and (seen.dtype, seen.numel) == (info.dtype, info.numel):
                    continue  # the UNet's weight again
                raise FormatError(graph.model, f"'{full}' is in two graphs", "the name maps are wrong")
            if name in graph.transposed:
                if len(info.shape) != 2:
                    raise FormatError(graph.model, f"'{name}' is not a matrix but is marked transposed", None)
                rows, cols = info.shape
                info = TensorInfo(full, info.dtype, (cols, rows), info.file, info.offset, info.nbytes,
                                  strides=(1, cols), storage_nbytes=info.nbytes)
            source.tensors[full] = TensorInfo(**{**info.__dict__, "name": full})
    if not source.tensors:
        raise FormatError(path, "no ONNX graphs with weights in this folder", "expected <component>/model.onnx")
    return source
