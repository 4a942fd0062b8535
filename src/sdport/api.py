"""The verbs of sdport's Python API — what the CLI, and any other front end, calls.

``convert`` is the whole path of a conversion: request → open → detect → route → steps → validate →
execute. ``inspect`` describes a model; ``merge_loras`` and ``export_onnx`` are ``convert`` with adapters,
or to ONNX.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from .execute import execute
from .lora.merge import READ_INTO_MERGE, AdapterReport
from .model import open_model
from .plan import Plan, validate
from .request import ConvertRequest, InversionSpec, LoraSpec
from .sources import Resolved, locate
from .steps import Run, apply
from .targets import route

PathLike = str | os.PathLike[str]


@dataclass
class ConvertResult:
    """What a conversion wrote and what it left out.

    Attributes:
        output: the path written.
        tensors / bytes: how many tensors, and their bytes.
        dropped: input entries left out, each with its reason.
        read: adapter alphas and flags, read into the merge rather than written (name → why).
        unknown: input tensors no rule knew, let through by ``allow_unknown``.
        family: the model's family (the base's, with ``base``).
        prediction_type: what the output's scheduler says the UNet predicts ("" when it has none).
        adapters: what each merged adapter did.
        added: files the input lacked that the output's loaders need, filled in (path → from where).
    """

    output: str
    tensors: int
    bytes: int
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    family: str = ""
    prediction_type: str = ""
    adapters: list[AdapterReport] = field(default_factory=list)
    added: dict[str, str] = field(default_factory=dict)
    read: dict[str, str] = field(default_factory=dict)


def convert(src: PathLike, dst: PathLike, *, to: str | None = None, dtype: str = "keep", format: str | None = None,
            ema: bool = False, components: str | list[str] | None = None, prediction_type: str | None = None,
            loras: list[str | LoraSpec] | tuple[str | LoraSpec, ...] = (), allow_unmatched: bool = False,
            lora_alpha: float | None = None, base: PathLike | None = None, allow_unknown: bool = False,
            onnx_layout: str | None = None, vae_dtype: str | None = None, opset: int | None = None,
            controlnet: bool = False, crc: bool = False, variant: str | None = None, vae: PathLike | None = None,
            inversions: list[InversionSpec] | tuple[InversionSpec, ...] = (), force: bool = False,
            progress: bool = False) -> ConvertResult:
    """Convert a model file or folder to another layout, format or dtype, merging adapters on the way.

    Args:
        src: a weights file (safetensors, ``.ckpt``/``.pt``/``.bin``, MindSpore ``.ckpt``), a diffusers folder or
            an ONNX export's folder — or any source ``sdport.resolve`` takes (Hub repo, ``civitai://``, URL);
            ``loras`` and ``base`` too.
        dst: the output path; its suffix chooses ``to`` and ``format`` when those are not given.
        to: ``single-file``, ``diffusers``, ``mindspore`` (MindOne names) or ``onnx``.
        dtype: ``keep``, ``fp32``, ``fp16`` or ``bf16`` (float tensors only).
        format: single files only: ``safetensors``, ``ckpt`` or ``mindspore``.
        ema: take the UNet's EMA copy (original files that carry one).
        components: only these parts (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``; ONNX:
            ``vae_encoder``, ``vae_decoder``), list or comma-separated.
        prediction_type: ``epsilon`` or ``v_prediction``, where the file cannot tell (folders only).
        loras: adapters to merge, each ``FILE`` or ``FILE:RATIO`` (kohya, LyCORIS, diffusers/PEFT, old diffusers).
        allow_unmatched: merge what matches when some adapter modules match no base weight.
        lora_alpha: the alpha of adapter modules whose file stores none (MindOne LoRAs); else alpha = rank.
        base: a whole model (single file or MindOne) the input's components replace their counterparts in.
        allow_unknown: tensors no rule knows are copied (single file) or left out (folders) instead of refused.
        onnx_layout: ONNX only: ``diffusers`` (OnnxStableDiffusionPipeline, onnx-web) or ``optimum`` (ORT pipelines).
        vae_dtype: ONNX only: the VAE's dtype when it differs from ``dtype`` (``fp32``: fp16 VAEs overflow).
        opset: ONNX only: the opset of the graphs (14–20, default 17).
        controlnet: ONNX only: add ``cnet``, the UNet taking a ControlNet's residuals (onnx-web's layout).
        crc: MindSpore outputs only: append the ``crc_num`` trailer ``load_checkpoint(crc_check=True)`` checks.
        variant: read a diffusers folder's (or Hub repo's) weights of this variant (``fp16``).
        vae: folders only: a VAE (file, folder or any source form) in place of the model's own.
        inversions: folders only: textual-inversion embeddings to blend in (``InversionSpec``: source, token,
            weight): new tokens in the tokenizer, their vectors in the text encoder.
        force: replace an existing output.
        progress: show a progress bar on a terminal.

    Returns:
        A ConvertResult listing what was written and left out.

    Raises:
        SdportError: bad input or a refused output; nothing is written at ``dst`` then.

    Example::

        >>> sdport.convert("model.ckpt", "model.safetensors", dtype="fp16").tensors
        1143
    """
    request = ConvertRequest.build(src, dst, to=to, dtype=dtype, format=format, ema=ema, components=components,
                                   prediction_type=prediction_type, loras=loras, allow_unmatched=allow_unmatched,
                                   lora_alpha=lora_alpha, base=base, allow_unknown=allow_unknown, force=force,
                                   onnx_layout=onnx_layout, vae_dtype=vae_dtype, opset=opset, controlnet=controlnet,
                                   crc=crc, variant=variant, vae=vae, inversions=inversions)
    return run(request, progress=progress)


def run(request: ConvertRequest, *, progress: bool = False) -> ConvertResult:
    """Carry out a request: open → detect → route → steps → validate → execute."""
    with planned(request, progress=progress) as (plan, job):
        execute(plan, job.source, request.output, force=request.force, progress=progress)
        family = job.base.found.family if job.base else job.model.found.family
        read = {k: why for k, why in plan.dropped.items() if why == READ_INTO_MERGE}
        dropped = {k: why for k, why in plan.dropped.items() if k not in read}
        return ConvertResult(request.output, sum(len(f.tensors) for f in plan.files), plan.nbytes, dropped,
                             plan.unknown, family, plan.prediction_type, job.adapters, plan.added, read)


@contextmanager
def planned(request: ConvertRequest, *, progress: bool = False) -> Iterator[tuple[Plan, Run]]:
    """The validated plan of a request and the run it reads from (open until the block ends); nothing is written.

    ``run`` executes it; ``verify`` computes its tensors in memory instead.
    """
    with ExitStack() as stack:
        source = locate(request.source, variant=request.variant, progress=progress)
        model = stack.enter_context(open_model(source.path, variant=request.variant))
        target, planner = route(model, request)
        job = Run(request, model, target, stack, progress)
        plan = apply(planner(model, request), job)
        if target.finish is not None:
            plan = target.finish(plan, job)
        validate(plan, job.source, allow_unknown=request.allow_unknown)
        _provenance(plan, source)
        yield plan, job


def _provenance(plan: Plan, source: Resolved) -> None:
    """Where a downloaded input came from, in every safetensors file written (no tokens: the source as shown)."""
    if not source.remote:
        return
    for out in plan.files:
        if out.writer.format == "safetensors":
            out.metadata.update({"sdport.source": source.shown,
                                 **({"sdport.source_sha256": source.sha256} if source.sha256 else {})})


def merge_loras(base: PathLike, dst: PathLike, loras: list[str | LoraSpec] | tuple[str | LoraSpec, ...], *,
                to: str | None = None, dtype: str = "keep", format: str | None = None, ema: bool = False,
                components: str | list[str] | None = None, allow_unmatched: bool = False,
                lora_alpha: float | None = None, crc: bool = False, force: bool = False, progress: bool = False
                ) -> ConvertResult:
    """Merge adapters (each ``FILE`` or ``FILE:RATIO``, or a ``LoraSpec``) into ``base``, written at ``dst`` in any
    layout: ``convert(base, dst, loras=loras, …)`` with the same options (an ONNX export: ``export_onnx``)."""
    return convert(base, dst, loras=loras, to=to, dtype=dtype, format=format, ema=ema, components=components,
                   allow_unmatched=allow_unmatched, lora_alpha=lora_alpha, crc=crc, force=force, progress=progress)


def export_onnx(src: PathLike, dst: PathLike, *, dtype: str = "fp32", layout: str = "diffusers",
                vae_dtype: str | None = None, opset: int | None = None, controlnet: bool = False,
                components: str | list[str] | None = None,
                loras: list[str | LoraSpec] | tuple[str | LoraSpec, ...] = (), force: bool = False,
                progress: bool = False) -> ConvertResult:
    """``convert(src, dst, to="onnx", …)``: an ONNX pipeline folder in ``layout`` (``diffusers``: onnx-web and
    OnnxStableDiffusionPipeline; ``optimum``: Optimum's ORT pipelines), fp32 or fp16."""
    return convert(src, dst, to="onnx", dtype=dtype, onnx_layout=layout, vae_dtype=vae_dtype, opset=opset,
                   controlnet=controlnet, components=components, loras=loras, force=force, progress=progress)


def inspect(source: PathLike, *, variant: str | None = None) -> dict[str, Any]:
    """Describe a model or adapter (any source form) without loading its tensors (``sdport inspect --json``)."""
    from .inspection import inspect as _inspect

    return _inspect(source, variant=variant)
