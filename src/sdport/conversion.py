"""``sdport convert``: builds the plan for a conversion, validates it, and executes it.

This module owns the choice of output layout and format; family-specific key rules live in
``families/`` and are only consulted here.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace

from . import mindone
from .detect import Detection, detect, prediction_type
from .dtypes import USER_NAMES
from .errors import SdportError
from .execute import execute
from .export.onnx_back import onnx_rewrite, onnx_to_diffusers
from .families import FAMILIES, PIPELINES, UNET
from .io import open_tensors
from .io.base import TensorSource
from .io.onnx_folder import require_name_maps
from .layouts import LayoutRequest, ema_name, folder_plan, to_diffusers, to_single_file
from .lora import AdapterReport, merge_adapters
from .partial import into_base
from .plan import OutputFile, Plan, derive, validate

CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class ConvertResult:
    """What a conversion wrote and what it left out."""

    output: str
    tensors: int
    bytes: int
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    family: str = ""
    prediction_type: str = ""
    adapters: list[AdapterReport] = field(default_factory=list)


def _target_format(dst: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("safetensors", "ckpt", "mindspore"):
            raise SdportError(None, f"unknown --format {fmt!r}", "use safetensors, ckpt or mindspore")
        return fmt
    if dst.endswith(CKPT_SUFFIXES):
        return "ckpt"
    return "safetensors"


def _target_layout(dst: str, to: str | None) -> str:
    if to is None:
        to = "single-file" if os.path.splitext(dst)[1] else "diffusers"
    if to not in ("single-file", "diffusers", "mindspore", "onnx"):
        raise SdportError(None, f"unknown --to {to!r}", "use single-file, diffusers, mindspore or onnx")
    return to


def _dtype_code(dtype: str) -> str | None:
    if dtype == "keep":
        return None
    if dtype not in USER_NAMES:
        raise SdportError(None, f"unknown --dtype {dtype!r}", "use keep, fp32, fp16 or bf16")
    return USER_NAMES[dtype]


def repackage_plan(source: TensorSource, fmt: str, dtype: str | None, root: str) -> Plan:
    """Same tensors, same names, in source order; float tensors cast to ``dtype`` when given."""
    tensors = [derive(name, dtype, source, (name,)) for name in source.tensors]
    metadata = dict(source.metadata) if fmt == "safetensors" else {}
    if fmt == "safetensors":
        metadata.setdefault("format", "pt")
    return Plan([OutputFile(".", fmt, tensors, metadata, root)],
                dropped={k: f"not a tensor ({v})" for k, v in source.non_tensors.items()})


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None, dtype: str = "keep",
            format: str | None = None, ema: bool = False, components: str | list[str] | None = None,
            prediction_type: str | None = None, loras: list[str] | tuple[str, ...] = (),
            allow_unmatched: bool = False, allow_unknown: bool = False, force: bool = False,
            progress: bool = False, lora_alpha: float | None = None,
            base: str | os.PathLike | None = None, onnx_layout: str = "diffusers", vae_dtype: str | None = None,
            opset: int | None = None, controlnet: bool = False) -> ConvertResult:
    """Convert a model file or folder to another layout, format or dtype.

    Args:
        src: a weights file (safetensors, ``.ckpt``/``.pt``/``.bin``, MindSpore ``.ckpt``), a diffusers folder or
            an ONNX export's folder.
        dst: the output path; its suffix chooses ``to`` and ``format`` when those are not given.
        to: ``single-file``, ``diffusers``, ``mindspore`` or ``onnx``.
        dtype: ``keep``, ``fp32``, ``fp16`` or ``bf16`` (float tensors only).
        format: ``safetensors`` or ``ckpt`` for single-file outputs.
        ema: take the UNet's EMA copy (original files that carry one).
        components: only these parts (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``), list or comma-separated.
        prediction_type: ``epsilon`` or ``v_prediction``, where the file cannot tell.
        loras: adapters to merge, each ``FILE`` or ``FILE:RATIO`` (kohya, diffusers/PEFT, old diffusers).
        allow_unmatched: merge what matches when some adapter modules match no base weight.
        lora_alpha: the alpha of adapter modules whose file stores none (MindOne LoRAs); else alpha = rank.
        base: a whole model (single file or MindOne) the input's components replace their counterparts in.
        allow_unknown: tensors no rule knows are copied (single file) or left out (diffusers) instead of refused.
        onnx_layout: ONNX only: ``diffusers`` (OnnxStableDiffusionPipeline, onnx-web) or ``optimum`` (ORT pipelines).
        vae_dtype: ONNX only: the VAE's dtype when it differs from ``dtype`` (``fp32``: fp16 VAEs overflow).
        opset: ONNX only: the opset of the graphs.
        controlnet: ONNX only: add ``cnet``, the UNet taking a ControlNet's residuals (onnx-web's layout).
        force: replace an existing output.

    Returns:
        A ConvertResult listing what was written and dropped.

    Raises:
        SdportError: bad input or a refused output; nothing is written at ``dst`` then.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    layout = _target_layout(dst, to)
    fmt = "safetensors" if layout in ("mindspore", "onnx") else _target_format(dst, format)
    request = LayoutRequest(dtype=_dtype_code(dtype), ema=ema, components=_components(components),
                            prediction_type=_prediction_type(prediction_type), fmt=fmt)
    with ExitStack() as stack:
        source = _open(stack, src)
        found = detect(source.tensors, source.metadata)
        from_onnx = source.format == "onnx"
        from_diffusers = source.format in ("diffusers", "onnx") or found.layout == "diffusers"
        family = found.family
        if from_onnx and to is None and layout == "diffusers":
            layout = "onnx"  # an ONNX folder into a folder: the same export, LoRAs blended in
        onnx_request = None
        if layout == "onnx" and not from_onnx:  # the model as a diffusers folder; ONNX components and dtype after
            onnx_request = replace(request, dtype=request.dtype or "F32")
            request.dtype, request.components = None, None
        if (layout != "onnx" or from_onnx) and (onnx_layout != "diffusers" or vae_dtype or opset or controlnet):
            raise SdportError(src, "--layout, --vae-dtype, --opset and --controlnet shape an ONNX export",
                              "add --to onnx (an existing export is re-written as it is)")
        if from_onnx:
            _check_onnx_source(src, layout, components or ema or (dtype != "keep" and layout == "onnx"))
        if layout == "onnx" and from_onnx:
            plan = onnx_rewrite(source)
        elif from_onnx and layout == "diffusers":
            plan = onnx_to_diffusers(source, _family(source, found), request.dtype)
        elif layout == "mindspore":  # the original single file's plan, renamed at the end
            family = _family(source, found)  # a --base's family replaces it below
            plan = to_single_file(source, family, request) if from_diffusers else \
                repackage_plan(source, fmt, request.dtype, "")
        elif layout in ("diffusers", "onnx") and not from_diffusers:
            plan = to_diffusers(source, _family(source, found), _prediction(request, found), variant=found.variant)
        elif layout == "single-file" and from_diffusers:
            plan = to_single_file(source, _family(source, found), request)
        elif layout == "onnx":
            plan = folder_plan(source, None)
        elif layout == "diffusers":
            if not loras:
                raise SdportError(src, "already a diffusers folder", "convert it to a single file, or copy it")
            plan = folder_plan(source, request.dtype)
        else:
            if ema or components:
                raise SdportError(src, "--ema and --components need a conversion to or from diffusers",
                                  "add --to diffusers")
            root = source.root or ("state_dict" if found.family in PIPELINES else "")
            plan = repackage_plan(source, request.fmt, request.dtype, root)
        _place_unknown(plan, source, allow_unknown)
        if base is not None:  # the input's tensors in place of the base's own
            if layout not in ("single-file", "mindspore") or loras or ema:
                raise SdportError(src, "--base takes the input into a single file or MindOne checkpoint, "
                                  "without --lora or --ema", "merge LoRAs in a second step")
            base_source = _open(stack, os.fspath(base))
            base_found = detect(base_source.tensors, base_source.metadata)
            family = _family(base_source, base_found)
            base_plan = repackage_plan(base_source, fmt, request.dtype, "state_dict" if fmt == "ckpt" else "")
            plan, source = into_base(plan, source, base_source, base_plan)
            stack.callback(source.close)
        merged, reports = source, []
        if loras:
            ema_copies = {k: ema_name(k) for k in source.tensors if k.startswith(UNET.ldm_prefix)} if ema else {}
            merged, reports = merge_adapters(plan, source, _family(source, found), from_diffusers, list(loras),
                                             allow_unmatched=allow_unmatched, read_as=ema_copies,
                                             default_alpha=lora_alpha)
        if layout == "mindspore":
            plan = mindone.to_mindone(plan, family, request.dtype)
        try:
            if onnx_request is not None:
                validate(plan, merged, allow_unknown=allow_unknown)
                plan = _onnx(plan, _family(source, found), onnx_request, onnx_layout, vae_dtype, opset, controlnet,
                             progress)
            validate(plan, merged, allow_unknown=allow_unknown)
            execute(plan, merged, dst, force=force, progress=progress)
        finally:
            if merged is not source:
                merged.close()
        return ConvertResult(dst, sum(len(f.tensors) for f in plan.files), plan.nbytes, plan.dropped, plan.unknown,
                             family, request.prediction_type or "", reports)


def _check_onnx_source(src: str, layout: str, options: bool) -> None:
    """An ONNX source is an export's folder; it converts back only when sdport made it, and as it is."""
    if not os.path.isdir(src):
        raise SdportError(src, "a lone ONNX graph", "give the export's folder (model_index.json, unet/ …)")
    if layout != "onnx":
        require_name_maps(src)
    if options:
        raise SdportError(src, "an ONNX export converts as it is (LoRAs merged): no --components, --ema or --dtype",
                          "export the original model again for other components or dtypes")


def _onnx(plan: Plan, family: str, request: LayoutRequest, layout: str, vae_dtype: str | None, opset: int | None,
          controlnet: bool, progress: bool) -> Plan:
    from .export.onnx import OPSET
    from .export.onnx_plan import onnx_plan

    if family not in PIPELINES and family != "controlnet":
        raise SdportError(None, f"ONNX export takes a whole pipeline or a ControlNet, not a lone {family}",
                          "export a Stable Diffusion 1.x, 2.x or XL model")
    if controlnet and family not in PIPELINES:
        raise SdportError(None, "--controlnet adds the ControlNet UNet to a pipeline's export", "drop --controlnet")
    say = (lambda name: print(f"tracing {name}", file=sys.stderr)) if progress else None
    return onnx_plan(plan, family, layout=layout, dtype=request.dtype, vae_dtype=_dtype_code(vae_dtype or "keep"),
                     opset=opset or OPSET, components=request.components, controlnet=controlnet, progress=say)


def _open(stack: ExitStack, path: str) -> TensorSource:
    """Open a model; a MindOne checkpoint is seen under the original names."""
    raw = stack.enter_context(open_tensors(path))
    return stack.enter_context(mindone.view(raw) or nullcontext(raw))


def _family(source: TensorSource, found: Detection) -> str:
    if found.family not in FAMILIES:
        raise SdportError(source.path, f"cannot convert a model of family '{found.family}' between layouts",
                          "sdport converts sd1, sd2, sdxl-base, sdxl-refiner, vae, unet and controlnet models")
    return found.family


def _components(components: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if not components:
        return None
    items = components.split(",") if isinstance(components, str) else list(components)
    return tuple(c.strip() for c in items if c.strip())


def _prediction_type(value: str | None) -> str | None:
    names = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
             "v-prediction": "v_prediction"}
    if value is None:
        return None
    if value not in names:
        raise SdportError(None, f"unknown --prediction-type {value!r}", "use epsilon or v_prediction")
    return names[value]


def _prediction(request: LayoutRequest, found: Detection) -> LayoutRequest:
    """The request with the prediction type decided: the user's, else the file's, else the family's default."""
    if request.prediction_type is None:
        request.prediction_type = prediction_type(found)[0]
    return request


def _place_unknown(plan: Plan, source: TensorSource, allow_unknown: bool) -> None:
    """With --allow-unknown, tensors no rule knows are copied unchanged into a single file, or left out of a folder."""
    if not allow_unknown:
        return
    used = {i for f in plan.files for t in f.tensors for i in t.inputs}
    left = [k for k in source.tensors if k not in used and k not in plan.dropped]
    plan.unknown += left
    if len(plan.files) == 1 and plan.files[0].path == "." and not plan.extra:
        plan.files[0].tensors += [derive(k, None, source, (k,)) for k in left]
    else:
        plan.dropped.update({k: "no rule knows it: left out (--allow-unknown)" for k in left})
