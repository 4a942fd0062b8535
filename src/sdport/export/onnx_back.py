"""Plans that start from an ONNX pipeline folder: back to a diffusers folder, or re-written with LoRAs merged.

The folder is read as a ``TensorSource`` under diffusers names (``io.onnx.open_onnx_folder``), so a
single-file conversion needs nothing from here. Neither plan needs torch: a re-written graph is the
original's bytes with its initializers streamed anew from the plan (LoRA updates added in fp32).
"""

from __future__ import annotations

import json
import os

from ..errors import SdportError
from ..families import FAMILIES
from ..families.configs import model_index
from ..io.base import TensorSource
from ..io.onnx import DATA_FILE_NAMES, needs_external, open_onnx, split_model
from ..io.onnx_folder import folder_graphs
from ..layouts import WEIGHTS, small_files
from ..plan import OutputFile, Plan, derive


def onnx_to_diffusers(source: TensorSource, family: str, dtype: str | None) -> Plan:
    """The diffusers folder of an sdport ONNX export: the weights by the name maps, configs from the export."""
    files: dict[str, OutputFile] = {}
    for name in source.tensors:
        component, param = name.split(".", 1)
        if component not in WEIGHTS and not component.startswith("text_encoder"):
            raise SdportError(source.path, f"initializer '{param}' of {component}/ has no diffusers name",
                              "only sdport's exports (with sdport-names.json) convert back")
        path = f"{component}/{WEIGHTS.get(component, 'model')}.safetensors"
        files.setdefault(path, OutputFile(path, "safetensors", [], {"format": "pt"}))
        files[path].tensors.append(derive(param, dtype, source, (name,)))
    extra = {k: v for k, v in small_files(source.path).items() if k.startswith(("scheduler/", "tokenizer"))}
    for comp in folder_graphs(source.path):
        target = "vae" if comp.startswith("vae_") else comp
        config = small_files(source.path).get(f"{comp}/config.json")
        if config is None:
            raise SdportError(os.path.join(source.path, comp), "no config.json", "only sdport's exports convert back")
        extra[f"{target}/config.json"] = config
    scheduler = json.loads(extra.get("scheduler/scheduler_config.json", b"{}")).get("_class_name", "PNDMScheduler")
    components = {p.split("/")[0] for p in files}
    extra["model_index.json"] = (json.dumps(model_index(FAMILIES[family], components, "", scheduler), indent=2,
                                            sort_keys=True) + "\n").encode()
    return Plan(files=list(files.values()), extra=extra)


def onnx_rewrite(source: TensorSource) -> Plan:
    """The same ONNX folder, each graph unchanged, its initializers (perhaps patched later) streamed anew."""
    plan = Plan(files=[], extra=small_files(source.path))
    for comp, g in folder_graphs(source.path).items():
        head, graph = split_model(g.model)
        # a weight read as a transposed view is written back as it was stored
        tensors = [derive(initializer, None, source, (g.names.get(initializer, f"{comp}.{initializer}"),),
                          "transpose" if initializer in g.transposed else "identity")
                   for initializer in _initializers(g.model)]
        external = None
        if needs_external(sum(t.slot().nbytes for t in tensors), head, graph):
            data = {os.path.basename(source.tensors[t.inputs[0]].file) for t in tensors} - {"model.onnx"}
            external = next((n for n in DATA_FILE_NAMES if n in data), DATA_FILE_NAMES[-1])
        plan.files.append(OutputFile(f"{comp}/model.onnx", "onnx", tensors, onnx=(head, graph, external)))
    return plan


def _initializers(model: str) -> list[str]:
    return list(open_onnx(model).tensors)
