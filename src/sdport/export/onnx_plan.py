"""The plan of an ONNX export: which graphs, which weights in them at which dtype, and the folder's other files.

Input is the plan of the same model as a diffusers folder (any source converts to that), so LoRA
patches, casts and renames apply unchanged; each ONNX component's initializers are that plan's
tensors under the same names, re-typed. The folder follows one of two layouts that load as they are:
``diffusers`` (``OnnxStableDiffusionPipeline``, onnx-web) and ``optimum`` (``ORTStableDiffusion*``).
"""

from __future__ import annotations

import json
from dataclasses import replace

from ..dtypes import BY_CODE
from ..errors import SdportError
from ..families.clip import hub_name
from ..families.configs import json_bytes
from ..io.onnx import DATA_FILE_NAMES, needs_external
from ..io.onnx_folder import NAME_MAP, owner
from ..plan import OutputFile, OutputTensor, Plan
from .onnx import OPSET, OPSETS, name_map, specs, trace

LAYOUTS = ("diffusers", "optimum")
#: the external data file name each layout's exporter uses (diffusers' script, Optimum)
DATA_FILE = {"diffusers": DATA_FILE_NAMES[0], "optimum": DATA_FILE_NAMES[1]}
ORT_CLASS = {"sd1": "ORTStableDiffusionPipeline", "sd2": "ORTStableDiffusionPipeline",
             "sdxl-base": "ORTStableDiffusionXLPipeline", "sdxl-refiner": "ORTStableDiffusionXLImg2ImgPipeline"}


def _component_tensors(plan: Plan) -> dict[str, dict[str, OutputTensor]]:
    out: dict[str, dict[str, OutputTensor]] = {}
    for f in plan.files:
        component = f.path.split("/")[0] if "/" in f.path else ""
        out.setdefault(component, {}).update({t.name: t for t in f.tensors})
    return out


def _configs(plan: Plan, components: list[str]) -> dict[str, dict]:
    configs = {}
    for c in components:
        raw = plan.extra.get(f"{c}/config.json" if c else "config.json")
        if raw is None:
            raise SdportError(None, f"the model has no {c}/config.json", "convert it to a diffusers folder first")
        try:
            configs[c] = json.loads(raw)
        except ValueError as exc:
            raise SdportError(f"{c}/config.json", "invalid JSON", None) from exc
    return configs


def onnx_plan(plan: Plan, family: str, *, layout: str = "diffusers", dtype: str = "F32", vae_dtype: str | None = None,
              opset: int = OPSET, components: tuple[str, ...] | None = None, controlnet: bool = False,
              progress=None) -> Plan:
    """The ONNX export of a diffusers-layout ``plan`` (validated against its source by the caller)."""
    if layout not in LAYOUTS:
        raise SdportError(None, f"unknown --layout {layout!r}", "use diffusers or optimum")
    tensors = _component_tensors(plan)
    weights = [c for c in ("text_encoder", "text_encoder_2", "unet", "vae", "") if c in tensors]
    configs = _configs(plan, weights)
    if "" in configs and configs[""].get("_class_name") != "ControlNetModel":
        raise SdportError(None, f"ONNX export of a lone {configs[''].get('_class_name', 'model')}",
                          "export a whole pipeline or a ControlNet")
    if controlnet and "unet" not in weights:
        raise SdportError(None, "--controlnet needs the pipeline's UNet", "export a whole pipeline")
    chosen = specs(weights, configs, controlnet=controlnet)
    if components:
        unknown = set(components) - {s.name for s in chosen}
        if unknown:
            raise SdportError(None, f"--components: {', '.join(sorted(unknown))} not in this model",
                              "choose from " + ", ".join(s.name for s in chosen))
        chosen = [s for s in chosen if s.name in components or s.name == "cnet" and "unet" in components]
    for want in (dtype, vae_dtype or dtype):
        if want not in ("F32", "F16"):
            raise SdportError(None, f"ONNX export in {want}", "use --dtype and --vae-dtype fp32 or fp16")
    if opset not in OPSETS:
        raise SdportError(None, f"opset {opset}", f"use {OPSETS.start} to {OPSETS.stop - 1}")
    out = Plan(files=[], dropped=dict(plan.dropped))
    used: set[str] = set()
    for spec in chosen:
        if progress:
            progress(spec.name)
        want = (vae_dtype or dtype) if spec.weights == "vae" else dtype
        traced = trace(spec, configs[spec.weights], opset=opset, fp16=want == "F16", fp16_io=dtype == "F16")
        # a text encoder's names with or without transformers' ``text_model.`` (the module's and the file's may differ)
        norm = hub_name if spec.weights.startswith("text_encoder") else (lambda n: n)
        have = {norm(k): t for k, t in tensors[spec.weights].items()}
        typed, params = [], {}
        for name, param_dtype, shape in traced.params:
            t = have.get(norm(name))
            if t is None or tuple(t.shape) != tuple(shape):
                got = "missing" if t is None else f"of shape {list(t.shape)}"
                raise SdportError(None, f"{spec.name}: weight '{name}' {got}, the graph needs {list(shape)}",
                                  "the model does not match its config")
            typed.append(replace(t, name=name, dtype=param_dtype if BY_CODE[t.dtype].is_float else t.dtype))
            params[name] = t.name
            used.add(f"{spec.weights}/{t.name}")
        big = needs_external(sum(t.slot().nbytes for t in typed), traced.model, traced.graph)
        external = DATA_FILE[layout] if big else None
        out.files.append(OutputFile(f"{spec.name}/model.onnx", "onnx", typed,
                                    onnx=(traced.model, traced.graph, external)))
        out.extra[f"{spec.name}/{NAME_MAP}"] = name_map(spec, params, {t.name: t.dtype for t in typed})
    for component, named in tensors.items():
        for name, t in named.items():
            if f"{component}/{name}" not in used:
                out.dropped.update({i: f"{component} weight the ONNX graphs do not use" for i in t.reads})
    if "" in configs:  # a lone ControlNet: its graph and config, no pipeline around it
        out.extra["controlnet/config.json"] = json_bytes(configs[""])
    else:
        out.extra.update(layout_files(plan, family, layout, [s.name for s in chosen], configs))
    return out


def layout_files(plan: Plan, family: str, layout: str, components: list[str], configs: dict[str, dict]
                 ) -> dict[str, bytes]:
    """model_index.json, the scheduler, tokenizers and (optimum) component configs of the export folder."""
    files = {k: v for k, v in plan.extra.items() if k.startswith(("scheduler/", "tokenizer"))}
    for folder in {k.split("/")[0] for k in files if k.startswith("tokenizer")}:
        files.update(_slow_tokenizer(files, folder))
    index = json.loads(plan.extra.get("model_index.json", b"{}") or b"{}")
    scheduler = index.get("scheduler") or ["diffusers", "PNDMScheduler"]
    tokenizers = {k: v for k, v in index.items() if k.startswith("tokenizer") and v and v[0]}
    if layout == "diffusers":
        doc = {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": "0.42.1",
               "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
               "scheduler": scheduler, **tokenizers,
               **{c: ["diffusers", "OnnxRuntimeModel"] for c in components}}
    else:
        doc = {"_class_name": ORT_CLASS.get(family, "ORTStableDiffusionPipeline"), "_diffusers_version": "0.39.0",
               "scheduler": scheduler, **tokenizers, **{c: ["diffusers", "OnnxRuntimeModel"] for c in components}}
    for c in components:  # optimum reads them; sdport reads them to convert the export back
        config = configs[owner(c)]
        if c.startswith("vae") and layout == "optimum":  # the graph's precision is fixed: Optimum must not upcast
            config = {**config, "force_upcast": False}
        files[f"{c}/config.json"] = json_bytes(config)
    files["model_index.json"] = json_bytes(doc)
    return files


def _slow_tokenizer(files: dict[str, bytes], folder: str) -> dict[str, bytes]:
    """vocab.json and merges.txt from a ``tokenizer.json`` that comes alone (transformers 5 saves only it), so
    the export's tokenizer loads in the older transformers that onnx-web and Optimum run on."""
    fast = files.get(f"{folder}/tokenizer.json")
    if fast is None or f"{folder}/vocab.json" in files:
        return {}
    try:
        model = json.loads(fast)["model"]
        vocab, merges = model["vocab"], model["merges"]
        lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    except (ValueError, KeyError, TypeError) as exc:
        raise SdportError(f"{folder}/tokenizer.json", "not a BPE tokenizer", "give the model a CLIP tokenizer") from exc
    merges_txt = "#version: 0.2\n" + "\n".join(lines) + "\n"
    return {f"{folder}/vocab.json": json_bytes(vocab), f"{folder}/merges.txt": merges_txt.encode()}
