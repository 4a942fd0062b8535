"""Plans that start from an ONNX pipeline folder: back to a diffusers folder, or re-written with LoRAs merged.

The folder is read as a ``TensorSource`` under diffusers names (``io.onnx_folder.open_onnx_folder``), so a
single-file conversion needs nothing from here. Neither plan needs torch: a re-written graph is the
original's bytes with its initializers streamed anew from the plan (LoRA updates added in fp32).
"""

from __future__ import annotations

import json
import os

from ..errors import SdportError
from ..families import FAMILIES
from ..families.configs import json_bytes, model_index
from ..io.base import TensorSource
from ..io.onnx import DATA_FILE_NAMES, needs_external, open_onnx, split_model
from ..io.onnx_folder import folder_graphs, full_name, owner
from ..layouts import WEIGHTS, small_files
from ..plan import OutputFile, Plan, derive


def onnx_to_diffusers(source: TensorSource, family: str, dtype: str | None) -> Plan:
    """The diffusers folder of an sdport ONNX export: the weights by the name maps, configs from the export.

    A pipeline's weights go to their component folders; a lone ControlNet's to the folder itself.
    """
    files: dict[str, OutputFile] = {}
    lone = family == "controlnet"
    for name in source.tensors:
        component, param = ("", name) if lone else name.split(".", 1)
        path = f"{component}/{WEIGHTS.get(component, 'model')}.safetensors" if component else \
            "diffusion_pytorch_model.safetensors"
        files.setdefault(path, OutputFile(path, "safetensors", [], {"format": "pt"}))
        files[path].tensors.append(derive(param, dtype, source, (name,)))
    found = small_files(source.path)
    extra = {k: v for k, v in found.items() if k.startswith(("scheduler/", "tokenizer"))}
    for comp in folder_graphs(source.path):
        config = found.get(f"{comp}/config.json")
        if config is None:
            raise SdportError(os.path.join(source.path, comp), "no config.json", "only sdport's exports convert back")
        if owner(comp) == "vae":  # an Optimum-layout export turns upcasting off; diffusers' fp16 SDXL VAE needs it
            config = json_bytes({**json.loads(config), "force_upcast": family.startswith("sdxl")})
        extra["config.json" if lone else f"{owner(comp)}/config.json"] = config
    if not lone:
        scheduler = json.loads(extra.get("scheduler/scheduler_config.json", b"{}")).get("_class_name",
                                                                                        "PNDMScheduler")
        index = model_index(FAMILIES[family], {p.split("/")[0] for p in files}, "", scheduler)
        extra["model_index.json"] = json_bytes(index)
    return Plan(files=list(files.values()), extra=extra)


def onnx_rewrite(source: TensorSource) -> Plan:
    """The same ONNX folder, each graph unchanged, its initializers (perhaps patched later) streamed anew."""
    plan = Plan(files=[], extra=small_files(source.path))
    for comp, g in folder_graphs(source.path).items():
        head, graph = split_model(g.model)
        # a weight read as a transposed view is written back as it was stored
        tensors = [derive(initializer, None, source, (full_name(comp, g, initializer),),
                          "transpose" if initializer in g.transposed else "identity")
                   for initializer in open_onnx(g.model).tensors]
        external = None
        if needs_external(sum(t.slot().nbytes for t in tensors), head, graph):
            data = {os.path.basename(source.tensors[t.inputs[0]].file) for t in tensors} - {"model.onnx"}
            external = next((n for n in DATA_FILE_NAMES if n in data), DATA_FILE_NAMES[-1])
        plan.files.append(OutputFile(f"{comp}/model.onnx", "onnx", tensors, onnx=(head, graph, external)))
    return plan

