"""Plans between the original single-file layout and diffusers folders, for every family in ``families``.

For each part of the family, the part's tensors are found under their prefix, its name table
turns them into ``Link``s, and each link becomes an ``OutputTensor``. Everything else in the
input is either a known extra (scheduler buffers, EMA bookkeeping, markers), dropped with its
reason, or left unused so that plan validation names it as unknown.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import SdportError
from .families import FAMILIES, PIPELINES, Family, Part, clip, unet, vae
from .families.configs import pipeline_files
from .families.links import Links, map_names
from .io.base import TensorSource
from .plan import OutputFile, OutputTensor, Plan, derive

SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
EXTRAS = {
    **{n: "scheduler buffer: diffusers computes the noise schedule from scheduler_config.json" for n in SCHEDULE},
    "model_ema.decay": "EMA bookkeeping, not a weight", "model_ema.num_updates": "EMA bookkeeping, not a weight",
    "v_pred": "v-prediction marker: recorded as the scheduler's prediction_type",
    "ztsnr": "zero-terminal-SNR marker: the scheduler config rescales betas to zero terminal SNR",
}
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "controlnet": "diffusion_pytorch_model",
           "text_encoder": "model", "text_encoder_2": "model"}
PROBES = {"unet": ("input_blocks.0.0.weight", "conv_in.weight"),
          "controlnet": ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"),
          "vae": ("encoder.conv_in.weight", "encoder.conv_in.weight")}
CLIP_L_LAYERS = 12
LDM_PREFIXES = {"vae": ("first_stage_model.", "vae.", ""), "controlnet": ("control_model.", "")}


@dataclass
class LayoutRequest:
    """What the user asked for, beyond source and target."""

    dtype: str | None = None  # safetensors code to cast floats to, or None to keep
    ema: bool = False
    components: tuple[str, ...] | None = None
    prediction_type: str | None = None
    fmt: str = "safetensors"


def part_links(part: Part, shapes: dict[str, tuple[int, ...]], to_diffusers: bool) -> tuple[Links, object]:
    """The links of one component (names relative to it) and the structure read off its names."""
    names = list(shapes)
    if part.kind in ("unet", "controlnet"):
        layout = (unet.layout_from_ldm if to_diffusers else unet.layout_from_diffusers)(names)
        return (map_names(unet.name_map(layout), shapes, to_diffusers) if layout else Links(unknown=names)), layout
    if part.kind == "vae":
        layout = (vae.layout_from_ldm if to_diffusers else vae.layout_from_diffusers)(names)
        normalize = str if to_diffusers else vae.modern_name
        return (map_names(vae.name_map(layout), shapes, to_diffusers, normalize) if layout else
                Links(unknown=names)), layout
    if part.kind == "clip-l":
        return (clip.clip_l_to_diffusers if to_diffusers else clip.clip_l_to_ldm)(names), None
    if to_diffusers:
        return clip.openclip_to_diffusers(names, layers=part.text_layers, projection=part.projection), None
    return clip.openclip_to_ldm(names), None


def part_prefix(source: TensorSource, family: Family, part: Part, diffusers_layout: bool) -> str | None:
    """Where ``part``'s tensors start in ``source`` (``model.diffusion_model.``, ``unet.``, "" …), or None if absent.

    Original files: the part's prefix (a VAE or ControlNet alone may have another or none). diffusers:
    the component's folder name, or none for a component folder of its own.
    """
    if diffusers_layout:
        alone = ("",) if family.name not in PIPELINES else ()
        candidates, probe = (part.component + ".", *alone), PROBES.get(part.kind, (None, None))[1]
    else:
        candidates, probe = LDM_PREFIXES.get(part.kind, (part.ldm_prefix,)), PROBES.get(part.kind, (None,))[0]
    for p in candidates:
        if probe is None and any(k.startswith(p) for k in source.tensors) or probe and p + probe in source.tensors:
            return p
    return None


def part_shapes(source: TensorSource, family: Family, part: Part, diffusers_layout: bool
                ) -> tuple[str, dict[str, tuple[int, ...]]] | None:
    """``part``'s prefix in ``source`` and its tensors' shapes by name below it; None when the part is absent."""
    prefix = part_prefix(source, family, part, diffusers_layout)
    if prefix is None:
        return None
    return prefix, {k[len(prefix):]: i.shape for k, i in source.tensors.items() if k.startswith(prefix)}


def _required_shapes(source: TensorSource, family: Family, part: Part, diffusers_layout: bool, where: str
                     ) -> tuple[str, dict[str, tuple[int, ...]]]:
    found = part_shapes(source, family, part, diffusers_layout)
    if found is None:
        raise SdportError(source.path, f"no {part.component} weights in this {where}",
                          f"pass --components without {part.component}")
    return found


def _parts(family: Family, request: LayoutRequest) -> list[Part]:
    if request.components is None:
        return list(family.parts)
    unknown = set(request.components) - {p.component for p in family.parts}
    if unknown:
        raise SdportError(None, f"--components: {', '.join(sorted(unknown))} not in a {family.name} model",
                          "choose from " + ", ".join(p.component for p in family.parts))
    return [p for p in family.parts if p.component in request.components]


def ema_name(ldm_unet_name: str) -> str:
    """Where an original file keeps the EMA copy of a UNet weight: ``model_ema.`` + the name without dots."""
    return "model_ema." + ldm_unet_name.removeprefix("model.").replace(".", "")


def to_diffusers(source: TensorSource, family_name: str, request: LayoutRequest, *, variant: str = "") -> Plan:
    """Plan an original single file → a diffusers folder (weights, configs, scheduler, tokenizers)."""
    family = FAMILIES[family_name]
    plan = Plan(files=[], dropped=dict(_extras(source)))
    shapes_by_component, layouts = {}, {}
    has_ema = sum(k.startswith("model_ema.") for k in source.tensors) > 100
    for part in _parts(family, request):
        prefix, shapes = _required_shapes(source, family, part, False, f"{family.name} file")
        links, layout = part_links(part, shapes, True)
        _check_text_encoder(source, family, part, prefix, links)
        remap = {n: prefix + n for n in shapes}
        if part.kind == "unet" and request.ema:
            if not has_ema:
                raise SdportError(source.path, "--ema: the file has no EMA weights", "convert without --ema")
            remap = {n: ema_name(prefix + n) for n in shapes}
            plan.dropped.update({prefix + n: "non-EMA UNet weight (--ema converts the EMA copy)" for n in shapes})
        outputs = [derive(link.out, request.dtype, source, tuple(remap[i] for i in link.inputs), link.op, link.args)
                   for link in links.links]
        folder = f"{part.component}/" if family.name in PIPELINES else ""
        metadata = {"format": "pt", **(_modelspec(source) if part.kind == "unet" else {})}
        plan.files.append(OutputFile(f"{folder}{WEIGHTS[part.component]}.safetensors", "safetensors", outputs,
                                     metadata))
        plan.dropped.update({prefix + k: v for k, v in links.dropped.items()})
        shapes_by_component[part.component] = {t.name: t.shape for t in outputs}
        layouts[part.component] = layout
    if has_ema:
        used = {i for f in plan.files for t in f.tensors for i in t.inputs}
        why = ("EMA copy of the UNet, left out with it (--components)" if request.ema else
               "EMA copy of the UNet (pass --ema to convert it instead)")
        plan.dropped.update({k: why for k in source.tensors
                             if k.startswith("model_ema.") and k not in plan.dropped and k not in used})
    if family.name in PIPELINES:
        _drop_other_parts(source, family, request, plan)
    plan.extra = pipeline_files(family_name, shapes_by_component, layouts,
                                prediction_type=request.prediction_type or "epsilon", variant=variant,
                                zero_snr="ztsnr" in source.tensors)
    return plan


def to_single_file(source: TensorSource, family_name: str, request: LayoutRequest) -> Plan:
    """Plan a diffusers folder (or component folder) → one original-layout file."""
    family = FAMILIES[family_name]
    tensors: list[OutputTensor] = []
    plan = Plan(files=[])
    for part in _parts(family, request):
        prefix, shapes = _required_shapes(source, family, part, True, "folder")
        links, _ = part_links(part, shapes, False)
        tensors += [derive(part.ldm_prefix + link.out, request.dtype, source, tuple(prefix + i for i in link.inputs),
                           link.op, link.args) for link in links.links]
        plan.dropped.update({prefix + k: v for k, v in links.dropped.items()})
    chosen = {p.component for p in _parts(family, request)}
    for k in source.tensors:
        component = k.split(".", 1)[0]
        if component in ("safety_checker", "image_encoder", "feature_extractor"):
            plan.dropped[k] = f"{component}: not part of an original single file"
        elif family_name in PIPELINES and family.part(component) and component not in chosen:
            plan.dropped[k] = f"{component} left out (--components)"
    root = "state_dict" if request.fmt == "ckpt" and family_name in PIPELINES else ""
    metadata = {"format": "pt", **_modelspec(source)} if request.fmt == "safetensors" else {}
    plan.files.append(OutputFile(".", request.fmt, tensors, metadata, root))
    return plan


def _check_text_encoder(source: TensorSource, family: Family, part: Part, prefix: str, links: Links) -> None:
    """Refuse text encoders the pipeline would silently misread: SDXL without bigG's projection or CLIP-L's last layer.

    SDXL reads CLIP-L's second-to-last hidden state, so a CLIP-L stored without its last layer would
    make diffusers read the wrong layer; the pooled embedding needs bigG's ``text_projection``.
    """
    outputs = {link.out for link in links.links}
    if part.projection and "text_projection.weight" not in outputs:
        raise SdportError(source.path, f"{prefix}text_projection is missing", "SDXL's pooled text embedding needs "
                          "it; convert with --components without " + part.component)
    layers = {int(o.split(".")[3]) for o in outputs if o.startswith("text_model.encoder.layers.")}
    if part.kind == "clip-l" and family.name == "sdxl-base" and layers and len(layers) < CLIP_L_LAYERS:
        raise SdportError(source.path, f"{prefix}: CLIP-L has {len(layers)} of its {CLIP_L_LAYERS} layers",
                          "SDXL reads the second-to-last layer, so the folder would compute other embeddings; "
                          "not supported")


def folder_plan(source: TensorSource, dtype: str | None) -> Plan:
    """A diffusers folder rewritten as itself (to merge adapters into it): same files, same names, configs copied."""
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
        files.setdefault(out, OutputFile(out, "safetensors", [], {"format": "pt", **_modelspec(source)}))
        files[out].tensors.append(derive(inner, dtype, source, (name,)))
    plan = Plan(files=list(files.values()), dropped={k: f"not a tensor ({v})" for k, v in source.non_tensors.items()})
    plan.extra = small_files(source.path, {os.path.realpath(i.file) for i in source.tensors.values()})
    return plan


def small_files(path: str, weights: set[str] = frozenset()) -> dict[str, bytes]:
    """A model folder's configs and tokenizers (``.json``/``.txt`` under 16 MiB), by relative path.

    Symlinks are followed (a Hugging Face cache snapshot links every file to its blob); a ``.bin``
    shard index is left out (it would name files that are renamed), as are the files in ``weights``.
    """
    out = {}
    for folder, _, names in os.walk(path):
        for n in sorted(names):
            full = os.path.join(folder, n)
            small = n.endswith((".json", ".txt")) and not n.endswith(".bin.index.json")
            if small and os.path.getsize(full) < 16 << 20 and os.path.realpath(full) not in weights:
                with open(full, "rb") as f:
                    out[os.path.relpath(full, path)] = f.read()
    return out


def _modelspec(source: TensorSource) -> dict[str, str]:
    """The ``modelspec.*`` metadata (architecture, prediction type …), carried across layouts."""
    return {k: v for k, v in source.metadata.items() if k.startswith("modelspec.")}


def _extras(source: TensorSource) -> dict[str, str]:
    return {k: why for k, why in EXTRAS.items() if k in source.tensors}


def _drop_other_parts(source: TensorSource, family: Family, request: LayoutRequest, plan: Plan) -> None:
    """With --components, the parts left out are dropped by choice, not unknown."""
    chosen = {p.component for p in _parts(family, request)}
    for part in family.parts:
        if part.component not in chosen:
            plan.dropped.update({k: f"{part.component} left out (--components)" for k in source.tensors
                                 if k.startswith(part.ldm_prefix)})
