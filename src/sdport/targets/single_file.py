"""``--to single-file``: one file in the original (LDM/SGM) layout — from a diffusers folder or an ONNX export by
the families' name tables — or the input's own tensors repackaged as they are (another format, another dtype).

The file is safetensors, a PyTorch zip ``.ckpt`` (a whole pipeline's tensors under ``state_dict``, as the
released checkpoints are) or a MindSpore checkpoint; ``mindone`` reuses these plans for MindOne names.
"""

from __future__ import annotations

from ..detect import prediction_origin
from ..errors import SdportError
from ..families import FAMILIES
from ..families.parts import part_links, part_shapes
from ..io.base import TensorSource
from ..model import Model
from ..plan import SAFETENSORS, OutputFile, OutputTensor, Plan, WriterSpec, derive
from ..request import FILE_FORMATS, ConvertRequest, MindOneOptions, SingleFileOptions
from .components import chosen_parts, modelspec, required_shapes

#: components of a diffusers pipeline folder that have no place in an original single file
NOT_IN_SINGLE_FILE = ("safety_checker", "image_encoder", "feature_extractor")


def file_format(request: ConvertRequest) -> str:
    """The user's name of the output's format: ``safetensors``, ``ckpt`` or ``mindspore``."""
    options = request.options
    return options.format if isinstance(options, SingleFileOptions) else "mindspore"


def writer(request: ConvertRequest, root: str) -> WriterSpec:
    """The output file's writer; a ckpt keeps its tensors under ``root`` (``state_dict`` for a whole pipeline)."""
    fmt = file_format(request)
    if fmt == "ckpt":
        return WriterSpec(FILE_FORMATS[fmt], {"root": root})
    if fmt == "mindspore":
        crc = isinstance(request.options, (SingleFileOptions, MindOneOptions)) and request.options.crc
        return WriterSpec("mindspore", {"crc": crc})
    return SAFETENSORS


def repackage(model: Model, request: ConvertRequest) -> Plan:
    """Same tensors, same names, in source order (any file, adapters too); entries that are not tensors left out."""
    if request.ema or request.components:
        raise SdportError(model.path, "--ema and --components need a conversion to or from diffusers",
                          "add --to diffusers")
    family = FAMILIES.get(model.found.family)
    return repackage_plan(model.source, request, whole=family is not None and family.whole)


def repackage_plan(source: TensorSource, request: ConvertRequest, *, whole: bool) -> Plan:
    """The repackaging plan of ``source`` (also the plan a ``--base`` is read through)."""
    fmt = file_format(request)
    tensors = [derive(name, None, source, (name,)) for name in source.tensors]
    metadata = {**source.metadata, "format": source.metadata.get("format", "pt")} if fmt == "safetensors" else {}
    root = source.root or ("state_dict" if whole else "")
    return Plan([OutputFile(".", writer(request, root), tensors, metadata)],
                dropped={k: f"not a tensor ({v})" for k, v in source.non_tensors.items()})


def from_diffusers(model: Model, request: ConvertRequest) -> Plan:
    """A diffusers folder (or component folder, or ONNX export read under diffusers names) → one original file."""
    family, source = model.family(), model.source
    tensors: list[OutputTensor] = []
    plan = Plan(files=[])
    parts = chosen_parts(family, request.components)
    if request.base is not None and request.components is None:  # the base gives the parts the folder lacks
        parts = [p for p in parts if part_shapes(source, family, p, True) is not None] or parts
    for part in parts:
        prefix, shapes = required_shapes(source, family, part, True, "folder")
        links, _ = part_links(part, shapes, False)
        tensors += [derive(part.ldm_prefix + link.out, None, source, tuple(prefix + i for i in link.inputs),
                           link.op, link.args) for link in links.links]
        plan.dropped.update({prefix + k: v for k, v in links.dropped.items()})
    chosen = {p.component for p in parts}
    for k in source.tensors:
        component = k.split(".", 1)[0]
        if component in NOT_IN_SINGLE_FILE:
            plan.dropped[k] = f"{component}: not part of an original single file"
        elif family.whole and family.part(component) and component not in chosen:
            plan.dropped[k] = f"{component} left out (--components)"
    metadata = {"format": "pt", **modelspec(source, prediction_origin(model.found))} \
        if file_format(request) == "safetensors" else {}
    plan.files.append(OutputFile(".", writer(request, "state_dict" if family.whole else ""), tensors,
                                 metadata))
    return plan



def from_export(model: Model, request: ConvertRequest) -> Plan:
    """An ONNX export sdport made, back to one original file (through its name maps, as a diffusers folder)."""
    from .diffusers import require_export

    require_export(model, request, rewrite=False)
    return from_diffusers(model, request)
