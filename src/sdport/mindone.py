"""The MindOne layout: MindSpore checkpoints seen with original names, and original-layout plans written as MindOne.

Reading: ``view`` presents a MindOne checkpoint under the original single-file names (the rules
in ``families.mindone``), SD1's fused text-encoder ``in_proj`` as its q, k, v row blocks — byte
ranges of the file, nothing copied — so every conversion, inspection and LoRA merge works on it
unchanged. Writing: ``to_mindone`` takes any plan that writes an original single file (repackaged,
from diffusers, LoRAs merged) and renames its outputs, fuses SD1's q, k, v into one ``in_proj``
(rows [q; k; v]), leaves out what MindOne files never hold, casts floats to fp32 unless a dtype was
asked for (MindOne's converters write fp32), and writes a MindSpore ``.ckpt``.
"""

from __future__ import annotations

from dataclasses import replace

from .dtypes import BY_CODE
from .errors import FormatError
from .families import mindone as names
from .io.base import TensorInfo, TensorSource
from .plan import OutputFile, OutputTensor, Plan

#: CLIP-L's token embedding under the name a stored mindspore_key_base.yaml gives it by mistake
TYPO = "conditioner.embedders.1.model.token_embedding..embedding_table"


def family_of(source: TensorSource) -> str | None:
    """The family whose MindOne rules name this checkpoint, or None when it is not MindOne-named."""
    style = names.is_mindone(list(source.tensors))
    if style is None:
        return None
    if style == "ldm":  # SD2's UNet projects attention with linears, SD1's with 1×1 convs; else the text width
        proj = source.tensors.get(names.UNET + "input_blocks.1.1.proj_in.weight")
        if proj is not None:
            return "sd2" if len(proj.shape) == 2 else "sd1"
        text = source.tensors.get(names.TEXT + "embedding_table")
        return "sd2" if text is not None and text.shape[-1] == 1024 else "sd1"
    return "sdxl-refiner" if any(k.startswith("conditioner.embedders.0.model.") for k in source.tensors) \
        else "sdxl-base"


def view(source: TensorSource) -> TensorSource | None:
    """The checkpoint under original names, or None when it is not MindOne-named."""
    family = family_of(source)
    if family is None:
        return None
    tensors: dict[str, TensorInfo] = {}
    dropped = {}
    for name, info in source.tensors.items():
        if name.endswith(".position_ids"):  # saved from a MindOne network: not a weight
            dropped[name] = "position ids (not a weight)"
            continue
        if name == TYPO and info.shape[:1] == (49408,):
            name = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table"
        fused = _fused(name) if family == "sd1" else None
        if fused is not None:
            for k, q in enumerate(names.QKV):
                _put(tensors, source, f"{names.HF_TEXT}encoder.layers.{fused[0]}.self_attn.{q}_proj.{fused[1]}",
                     _rows(source, info, k))
            continue
        _put(tensors, source, names.from_mindone(name, family), info)
    return TensorSource(path=source.path, format=source.format, tensors=tensors,
                        metadata={**source.metadata, "sdport.mindone_family": family},
                        non_tensors={**source.non_tensors, **dropped})


def _fused(name: str) -> tuple[str, str] | None:
    prefix = names.TEXT + "transformer_layer.resblocks."
    if not name.startswith(prefix) or ".attn.attn.in_proj." not in name:
        return None
    layer, _, param = name[len(prefix):].partition(".attn.attn.in_proj.")
    return (layer, param) if layer.isdigit() and param in ("weight", "bias") else None


def _rows(source: TensorSource, info: TensorInfo, k: int) -> TensorInfo:
    """Row block k of 3 of a fused tensor, as its own byte range."""
    if not info.contiguous or not info.shape or info.shape[0] % 3:
        raise FormatError(source.path, f"'{info.name}' {list(info.shape)} is not three row blocks",
                          "the text encoder's in_proj is damaged")
    size = info.nbytes // 3
    return replace(info, shape=(info.shape[0] // 3, *info.shape[1:]), offset=info.offset + k * size, nbytes=size)


def _put(tensors: dict[str, TensorInfo], source: TensorSource, name: str, info: TensorInfo) -> None:
    if name in tensors:
        raise FormatError(source.path, f"two tensors map to '{name}'", "the checkpoint mixes naming schemes")
    tensors[name] = replace(info, name=name)


def to_mindone(plan: Plan, family: str, dtype: str | None) -> Plan:
    """The plan of an original single file, written as a MindOne checkpoint instead."""
    (out,) = plan.files
    tensors: list[OutputTensor] = []
    fused: dict[tuple[str, str], dict[str, OutputTensor]] = {}
    for t in out.tensors:
        m = names.SD1_FUSED.fullmatch(t.name) if family == "sd1" else None
        if m is not None:
            fused.setdefault((m[1], m[3]), {})[m[2]] = t
            if len(fused[(m[1], m[3])]) == 3:
                tensors.append(_fuse(fused.pop((m[1], m[3])), m[1], m[3]))
            continue
        new = names.to_mindone(t.name, family)
        if new is None:
            plan.dropped.update({i: "not held by MindOne checkpoints" for i in t.inputs})
            continue
        tensors.append(replace(t, name=new))
    if fused:
        raise FormatError(None, f"text-encoder layer {next(iter(fused))[0]} lacks some of q, k, v", None)
    if dtype is None:  # MindOne's converters write fp32
        tensors = [replace(t, dtype="F32") if BY_CODE[t.dtype].is_float else t for t in tensors]
    return Plan([OutputFile(".", "mindspore", tensors)], plan.dropped, plan.unknown)


def _fuse(parts: dict[str, OutputTensor], layer: str, param: str) -> OutputTensor:
    q, k, v = (parts[x] for x in names.QKV)
    for t in (q, k, v):
        if t.op != "identity" or len(t.inputs) != 1:
            raise FormatError(None, f"'{t.name}' is computed ({t.op}); sdport fuses only stored q, k, v", None)
    shape = (q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:])
    return OutputTensor(names.fused_name(layer, param), q.dtype, shape, q.inputs + k.inputs + v.inputs, "concat",
                        (0,), q.patches + k.patches + v.patches)
