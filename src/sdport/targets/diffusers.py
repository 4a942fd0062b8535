"""``--to diffusers``: a diffusers folder — from an original single file by the families' name tables, from an ONNX
export sdport made (by its name maps), or a diffusers folder re-written as itself with adapters merged.

A folder from an original file gets every non-weight file a pipeline needs, derived from the shapes
and the family's facts (configs, scheduler, the bundled CLIP tokenizers, ``model_index.json``). Entries
of the original file that are not weights (scheduler buffers, EMA bookkeeping, markers) are left out
with their reason.
"""

from __future__ import annotations

import json
import os
import re

from ..detect import prediction_origin, prediction_type
from ..errors import SdportError
from ..families import Family, Part
from ..families.configs import json_bytes, model_index, pipeline_files, scheduler_config, tokenizer_for
from ..families.parts import part_links
from ..families.parts.links import Links
from ..io.diffusers import SCHEDULER_SOURCE, small_files
from ..io.onnx_folder import folder_graphs, owner, require_name_maps
from ..model import Model
from ..plan import SAFETENSORS, OutputFile, Plan, derive
from ..request import ConvertRequest
from .components import chosen_parts, modelspec, required_shapes

SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
EXTRAS = {
    **{n: "scheduler buffer: diffusers computes the noise schedule from scheduler_config.json" for n in SCHEDULE},
    "model_ema.decay": "EMA bookkeeping, not a weight", "model_ema.num_updates": "EMA bookkeeping, not a weight",
    "v_pred": "v-prediction marker: recorded as the scheduler's prediction_type",
    "ztsnr": "zero-terminal-SNR marker: the scheduler config rescales betas to zero terminal SNR",
}
EMA_COPY = "EMA copy of the UNet (pass --ema to convert it instead)"
#: the weights file of each component, as diffusers and transformers name it
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "controlnet": "diffusion_pytorch_model",
           "text_encoder": "model", "text_encoder_2": "model"}


def from_original(model: Model, request: ConvertRequest, *, components: tuple[str, ...] | None = None) -> Plan:
    """An original single file → a diffusers folder (weights, configs, scheduler, tokenizers).

    ``components``: the parts to write, when they are not the request's (an ONNX export takes every part).
    """
    family, source = model.family(), model.source
    wanted = request.components if components is None else components
    plan = Plan(files=[], dropped={k: why for k, why in EXTRAS.items() if k in source.tensors})
    shapes_by_component, layouts = {}, {}
    origin = prediction_origin(model.found, request.prediction_type)
    parts = chosen_parts(family, wanted)
    for part in parts:
        prefix, shapes = required_shapes(source, family, part, False, f"{family.name} file")
        links, layout = part_links(part, shapes, True)
        _check_text_encoder(source.path, part, prefix, links)
        outputs = [derive(link.out, None, source, tuple(prefix + i for i in link.inputs), link.op, link.args)
                   for link in links.links]
        folder = f"{part.component}/" if family.whole else ""
        metadata = {"format": "pt", **(modelspec(source, origin) if part.kind == "unet" else {})}
        plan.files.append(OutputFile(f"{folder}{WEIGHTS[part.component]}.safetensors", SAFETENSORS, outputs,
                                     metadata))
        plan.dropped.update({prefix + k: v for k, v in links.dropped.items()})
        shapes_by_component[part.component] = {t.name: t.shape for t in outputs}
        layouts[part.component] = layout
    plan.dropped.update({k: EMA_COPY for k in source.tensors if k.startswith("model_ema.") and k not in plan.dropped})
    if family.whole:
        _drop_other_parts(model, family, parts, plan)
    plan.prediction_type = request.prediction_type or prediction_type(model.found)[0]
    plan.extra = pipeline_files(family.name, shapes_by_component, layouts, prediction_type=plan.prediction_type,
                                origin=origin,
                                variant=model.found.variant, zero_snr="ztsnr" in source.tensors)
    return plan


def _check_text_encoder(path: str, part: Part, prefix: str, links: Links) -> None:
    """Refuse text encoders the pipeline would silently misread: SDXL without bigG's projection or CLIP-L's last layer.

    SDXL reads CLIP-L's second-to-last hidden state, so a CLIP-L stored without its last layer would
    make diffusers read the wrong layer; the pooled embedding needs bigG's ``text_projection``.
    """
    outputs = {link.out for link in links.links}
    if part.projection and "text_projection.weight" not in outputs:
        raise SdportError(path, f"{prefix}text_projection is missing", "SDXL's pooled text embedding needs "
                          "it; convert with --components without " + part.component)
    layers = {int(o.split(".")[3]) for o in outputs if o.startswith("text_model.encoder.layers.")}
    if part.all_layers and layers and len(layers) < part.all_layers:
        raise SdportError(path, f"{prefix}: CLIP-L has {len(layers)} of its {part.all_layers} layers",
                          "SDXL reads the second-to-last layer, so the folder would compute other embeddings; "
                          "not supported")


def _drop_other_parts(model: Model, family: Family, parts: list[Part], plan: Plan) -> None:
    """With --components, the parts left out are dropped by choice, not unknown."""
    for part in family.parts:
        if part not in parts:
            plan.dropped.update({k: f"{part.component} left out (--components)" for k in model.source.tensors
                                 if k.startswith(part.ldm_prefix)})


def rewrite(model: Model, request: ConvertRequest) -> Plan:
    """A diffusers folder rewritten as itself, adapters merged or in another dtype: same files, same names, configs
    copied."""
    if not (request.loras or request.inversions or request.vae or request.dtype or request.in_memory):
        raise SdportError(model.path, "already a diffusers folder", "convert it to a single file or another "
                          "dtype, merge adapters into it, or add a VAE or an inversion")
    return folder_plan(model, request.prediction_type)


def folder_plan(model: Model, asked: str | None = None) -> Plan:
    """The folder's plan: every weights file again (``.bin`` as the safetensors loaders look for), configs copied;
    ``asked`` (``--prediction-type``) goes into its scheduler config."""
    source = model.source
    origin = prediction_origin(model.found, asked)
    files: dict[str, OutputFile] = {}
    sharded_bin = [i.file for i in source.tensors.values() if re.search(r"-\d+-of-\d+\.bin$", i.file)]
    if sharded_bin:
        raise SdportError(sharded_bin[0], "sharded .bin weights cannot be rewritten in place",
                          "convert the folder to a single file first, then back to a folder")
    for name, info in source.tensors.items():
        relative = os.path.relpath(info.file, source.path)
        component = os.path.dirname(relative)
        out = relative
        if relative.endswith(".bin"):  # the names loaders look for: pytorch_model.bin → model.safetensors
            folder, base = os.path.split(relative[:-len(".bin")])
            base = "model" + base[len("pytorch_model"):] if base.startswith("pytorch_model") else base
            out = os.path.join(folder, base + ".safetensors")
        inner = name[len(component) + 1:] if component else name
        files.setdefault(out, OutputFile(out, SAFETENSORS, [], {"format": "pt", **modelspec(source, origin)}))
        files[out].tensors.append(derive(inner, None, source, (name,)))
    plan = Plan(files=list(files.values()), dropped={k: f"not a tensor ({v})" for k, v in source.non_tensors.items()})
    plan.extra = small_files(source.path, {os.path.realpath(i.file) for i in source.tensors.values()})
    scheduler = plan.extra.get("scheduler/scheduler_config.json")
    if asked and scheduler is not None:
        doc = json.loads(scheduler)
        if not isinstance(doc, dict):
            raise SdportError(os.path.join(source.path, "scheduler"), "scheduler_config.json is not a JSON object",
                              None)
        plan.extra["scheduler/scheduler_config.json"] = json_bytes({**doc, SCHEDULER_SOURCE: "user",
                                                                    "prediction_type": asked})
    _fill_pipeline(model, plan, asked)
    return plan


def _fill_pipeline(model: Model, plan: Plan, asked: str | None = None) -> None:
    """A pipeline folder kept without its scheduler or tokenizers (people often keep only the weights) gets the
    family's training schedule and sdport's bundled CLIP tokenizers, so that the pipeline loading the output
    finds them; ``plan.added`` says what was filled in."""
    family = model.family()
    if not family.whole:
        return
    components = {f.path.split("/")[0] for f in plan.files}
    index = json.loads(plan.extra.get("model_index.json", b"{}") or b"{}")
    if "scheduler/scheduler_config.json" not in plan.extra:
        kind = asked or prediction_type(model.found)[0]
        config = scheduler_config(family, kind, origin=prediction_origin(model.found, asked))
        plan.extra["scheduler/scheduler_config.json"] = json_bytes(config)
        index["scheduler"] = ["diffusers", config["_class_name"]]
        plan.added["scheduler/"] = f"the folder has none: {family.name}'s schedule ({config['_class_name']}, {kind})"
    for part in family.parts:
        tokenizer = part.component.replace("text_encoder", "tokenizer")
        if part.component.startswith("text_encoder") and part.component in components and \
                not any(k.startswith(tokenizer + "/") for k in plan.extra):
            plan.extra.update({f"{tokenizer}/{k}": v for k, v in tokenizer_for(part.kind).items()})
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
            plan.added[f"{tokenizer}/"] = "the folder has none: sdport's bundled CLIP tokenizer"
    if plan.added:
        base = model_index(family, components, model.found.variant, index["scheduler"][1])
        plan.extra["model_index.json"] = json_bytes({**base, **index})


def from_export(model: Model, request: ConvertRequest) -> Plan:
    """The diffusers folder of an sdport ONNX export: the weights by the name maps, configs from the export.

    A pipeline's weights go to their component folders; a lone ControlNet's to the folder itself.
    """
    require_export(model, request, rewrite=False)
    family, source = model.family(), model.source
    files: dict[str, OutputFile] = {}
    for name in source.tensors:
        component, param = ("", name) if not family.whole else name.split(".", 1)
        path = f"{component}/{WEIGHTS.get(component, 'model')}.safetensors" if component else \
            "diffusion_pytorch_model.safetensors"
        files.setdefault(path, OutputFile(path, SAFETENSORS, [], {"format": "pt"}))
        files[path].tensors.append(derive(param, None, source, (name,)))
    found = small_files(source.path)
    extra = {k: v for k, v in found.items() if k.startswith(("scheduler/", "tokenizer"))}
    for comp in folder_graphs(source.path):
        config = found.get(f"{comp}/config.json")
        if config is None:
            raise SdportError(os.path.join(source.path, comp), "no config.json", "only sdport's exports convert back")
        if owner(comp) == "vae":  # an Optimum-layout export turns upcasting off; diffusers' fp16 SDXL VAE needs it
            config = json_bytes({**json.loads(config), "force_upcast": family.vae_upcast})
        extra["config.json" if not family.whole else f"{owner(comp)}/config.json"] = config
    if family.whole:
        scheduler = json.loads(extra.get("scheduler/scheduler_config.json", b"{}")).get("_class_name",
                                                                                        "PNDMScheduler")
        index = model_index(family, {p.split("/")[0] for p in files}, "", scheduler)
        extra["model_index.json"] = json_bytes(index)
    return Plan(files=list(files.values()), extra=extra)


def require_export(model: Model, request: ConvertRequest, *, rewrite: bool) -> None:
    """An ONNX source is an export's folder; it converts back only when sdport made it, and as it is."""
    if not os.path.isdir(model.path):
        raise SdportError(model.path, "a lone ONNX graph", "give the export's folder (model_index.json, unet/ …)")
    if not rewrite:
        require_name_maps(model.path)
    if request.components or request.ema or (request.dtype and rewrite) or request.prediction_type:
        raise SdportError(model.path, "an ONNX export converts as it is (LoRAs merged): no --components, --ema, "
                          "--dtype or --prediction-type", "export the original model again for other components, "
                          "dtypes or prediction types")
