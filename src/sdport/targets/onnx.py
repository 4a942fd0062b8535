"""``--to onnx``: an ONNX export — which graphs, which weights in them at which dtype, and the folder's other files —
or an existing export re-written with adapters blended in.

An export starts from the plan of the same model as a diffusers folder (any input converts to that), so
LoRA patches and renames apply unchanged; ``finish`` traces each ONNX component (``trace.onnx``, torch)
and makes its initializers that plan's tensors under the same names, re-typed. The folder follows one
of two layouts that load as they are: ``diffusers`` (``OnnxStableDiffusionPipeline``, onnx-web) and
``optimum`` (``ORTStableDiffusion*``). Re-writing an export needs no torch: each graph keeps its bytes,
its initializers are streamed anew from the plan.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..dtypes import BY_CODE
from ..errors import SdportError
from ..families import Family
from ..families.configs import json_bytes
from ..families.parts.clip import hub_name
from ..io.diffusers import small_files
from ..io.onnx import DATA_FILE_NAMES, needs_external, open_onnx, split_model
from ..io.onnx_folder import NAME_MAP, folder_graphs, full_name, owner
from ..model import Model
from ..plan import OutputFile, OutputTensor, Plan, WriterSpec, derive, validate
from ..progress import Stages
from ..request import ConvertRequest, OnnxOptions
from ..trace.onnx import Spec
from . import diffusers

if TYPE_CHECKING:
    from ..steps import Run

#: the external data file name each layout's exporter uses (diffusers' script, Optimum)
DATA_FILE = {"diffusers": DATA_FILE_NAMES[0], "optimum": DATA_FILE_NAMES[1]}


def from_original(model: Model, request: ConvertRequest) -> Plan:
    """An original file's plan as a diffusers folder, every part: ``--components`` picks ONNX components later."""
    family = model.family()
    _check_family(family, request)
    return diffusers.from_original(model, request, components=tuple(p.component for p in family.parts))


def from_diffusers(model: Model, request: ConvertRequest) -> Plan:
    """A diffusers folder's own plan; ``finish`` exports it."""
    _check_family(model.family(), request)
    return diffusers.folder_plan(model, request.prediction_type)


def _check_family(family: Family, request: ConvertRequest) -> None:
    if not family.whole and family.name != "controlnet":
        raise SdportError(None, f"ONNX export takes a whole pipeline or a ControlNet, not a lone {family.name}",
                          "export a Stable Diffusion 1.x, 2.x or XL model")
    if isinstance(request.options, OnnxOptions) and request.options.controlnet and not family.whole:
        raise SdportError(None, "--controlnet adds the ControlNet UNet to a pipeline's export", "drop --controlnet")


def rewrite(model: Model, request: ConvertRequest) -> Plan:
    """The same ONNX folder, each graph unchanged, its initializers (patched by the LoRA step) streamed anew."""
    diffusers.require_export(model, request, rewrite=True)
    if isinstance(request.options, OnnxOptions) and request.options != OnnxOptions():
        raise SdportError(model.path, "--layout, --vae-dtype, --opset and --controlnet shape an ONNX export",
                          "an existing export is re-written as it is (LoRAs blended in)")
    source = model.source
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
        plan.files.append(OutputFile(f"{comp}/model.onnx", graph_writer(head, graph, external), tensors))
    return plan


def graph_writer(model: bytes, graph: bytes, external: str | None) -> WriterSpec:
    """The writer of one graph: the model and its graph serialized without weights, and its external data file."""
    return WriterSpec("onnx", {"model": model, "graph": graph, "external": external})


def finish(plan: Plan, run: Run) -> Plan:
    """The export of the diffusers plan (checked against its sources first: tracing takes a while); a re-written
    export is final as it is."""
    if run.model.kind == "onnx":
        return plan
    validate(plan, run.source, allow_unknown=run.request.allow_unknown)
    options = run.request.options if isinstance(run.request.options, OnnxOptions) else OnnxOptions()
    with Stages("tracing", enabled=run.progress) as stages:
        return onnx_plan(plan, run.family(), options, dtype=run.request.dtype or "F32",
                         components=run.request.components, progress=stages.step if run.progress else None)


def component_tensors(plan: Plan) -> dict[str, dict[str, OutputTensor]]:
    out: dict[str, dict[str, OutputTensor]] = {}
    for f in plan.files:
        component = f.path.split("/")[0] if "/" in f.path else ""
        out.setdefault(component, {}).update({t.name: t for t in f.tensors})
    return out


def component_configs(plan: Plan, components: list[str]) -> dict[str, dict]:
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


def onnx_plan(plan: Plan, family: Family, options: OnnxOptions, *, dtype: str = "F32",
              components: tuple[str, ...] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> Plan:
    """The ONNX export of a diffusers-layout ``plan`` (validated against its source by the caller); ``progress`` is
    told each component (name, its number from 1, how many) as its tracing begins."""
    from ..trace.cache import traced as trace
    from ..trace.onnx import specs

    layout, vae_dtype, controlnet = options.layout, options.vae_dtype, options.controlnet
    tensors = component_tensors(plan)
    weights = [c for c in ("text_encoder", "text_encoder_2", "unet", "vae", "") if c in tensors]
    configs = component_configs(plan, weights)
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
    if dtype not in ("F32", "F16"):
        raise SdportError(None, f"ONNX export in {dtype}", "use --dtype fp32 or fp16")
    out = Plan(files=[], dropped=dict(plan.dropped), added=dict(plan.added))
    used: set[str] = set()
    for number, spec in enumerate(chosen, 1):
        if progress:
            progress(spec.name, number, len(chosen))
        want = (vae_dtype or dtype) if spec.weights == "vae" else dtype
        traced = trace(spec, configs[spec.weights], opset=options.opset, fp16=want == "F16", fp16_io=dtype == "F16")
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
        out.files.append(OutputFile(f"{spec.name}/model.onnx", graph_writer(traced.model, traced.graph, external),
                                    typed))
        out.extra[f"{spec.name}/{NAME_MAP}"] = _name_map(spec, params, {t.name: t.dtype for t in typed})
    for component, named in tensors.items():
        for name, t in named.items():
            if f"{component}/{name}" not in used:
                out.dropped.update({i: f"{component} weight the ONNX graphs do not use" for i in t.reads})
    if "" in configs:  # a lone ControlNet: its graph and config, no pipeline around it
        out.extra["controlnet/config.json"] = json_bytes(configs[""])
    else:
        out.extra.update(layout_files(plan, family, layout, [s.name for s in chosen], configs))
    return out


def layout_files(plan: Plan, family: Family, layout: str, components: list[str], configs: dict[str, dict]
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
        doc = {"_class_name": family.ort_class, "_diffusers_version": "0.39.0",
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


def _name_map(spec: Spec, params: dict[str, str], dtypes: dict[str, str]) -> bytes:
    """The name map (``sdport-names.json``): initializer ↔ the diffusers parameter it holds, never transposed."""
    tensors = {n: {"param": p, "component": spec.weights or spec.name, "transpose": False, "dtype": dtypes[n]}
               for n, p in params.items()}
    doc = {"format": "sdport-onnx-names", "version": 1, "component": spec.name, "tensors": tensors}
    return (json.dumps(doc, indent=1) + "\n").encode()
