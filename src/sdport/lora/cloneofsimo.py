"""cloneofsimo/lora adapters: which module each numbered up/down pair of theirs patches.

Two containers: "safeloras" (``.safetensors``: tensors ``unet:N:up``/``unet:N:down``, ``text_encoder:N:…``; the
metadata names each group's target classes as a JSON list and ``GROUP:N:rank``; textual-inversion vectors
ride along as tensors named after their token, flagged ``<embed>`` in the metadata) and the ``.pt`` lists
``torch.save`` wrote (``[up0, down0, up1, down1, …]``; the UNet's in ``NAME.pt``, the text encoder's in
``NAME.text_encoder.pt``, no record of the targets).

Modules are not named, only numbered: pair N patches the N-th ``nn.Linear`` (``nn.Conv2d`` too with
``ResnetBlock2D`` among the targets) found below a module of a target class, visiting the model in
``named_modules()`` order. That order is reproduced here from the block structure of SD1/SD2's UNet as
diffusers registers it (``down_blocks``, then ``up_blocks``, then ``mid_block``; in a block its
``attentions`` before its ``resnets``; ``to_q, to_k, to_v, to_out.0``; a resnet's ``conv1, time_emb_proj,
conv2, conv_shortcut``) and of CLIP's text encoder (``k_proj, v_proj, q_proj, out_proj``). The scale is 1:
cloneofsimo's ``collapse_lora`` adds ``ratio · up @ down``.
"""

from __future__ import annotations

import json
import re

from ..errors import FormatError
from ..inversion import EMBED_FLAG
from ..io.base import TensorSource

UNET_CLASSES = ("CrossAttention", "Attention", "GEGLU", "ResnetBlock2D")
TEXT_CLASSES = ("CLIPAttention",)
#: what a .pt list was made with, most likely first: the defaults of the versions that wrote .pt files
_ATTENTION = {"CrossAttention", "Attention"}
PT_TARGETS = (_ATTENTION | {"GEGLU"}, _ATTENTION, _ATTENTION | {"GEGLU", "ResnetBlock2D"},
              _ATTENTION | {"ResnetBlock2D"})
ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
RESNET_LEAVES = ("conv1", "time_emb_proj", "conv2", "conv_shortcut")
CONV_LEAVES = {"conv1", "conv2", "conv_shortcut"}
TEXT_PT_SUFFIX = ".text_encoder.pt"
_KEY = re.compile(r"(unet|text_encoder):(\d+):(up|down)")
_DIGITS = re.compile(r"\d+")


def unet_paths(targets: set[str]) -> list[str]:
    """The diffusers paths cloneofsimo's injection may visit in an SD1/SD2 UNet, in its order; a resnet's
    ``conv_shortcut`` is there only where the resnet changes width (``_assign`` tells from the factors)."""
    attention = bool(targets & _ATTENTION)
    out: list[str] = []
    blocks = [(f"down_blocks.{level}", 2 if level < 3 else 0, 2) for level in range(4)]
    blocks += [(f"up_blocks.{level}", 3 if level else 0, 3) for level in range(4)] + [("mid_block", 1, 2)]
    for block, attentions, resnets in blocks:
        for i in range(attentions):
            inner = f"{block}.attentions.{i}.transformer_blocks.0"
            if attention:
                out.extend(f"{inner}.{a}.{leaf}" for a in ("attn1", "attn2") for leaf in ATTENTION_LEAVES)
            if "GEGLU" in targets:
                out.append(f"{inner}.ff.net.0.proj")
        if "ResnetBlock2D" in targets:
            out.extend(f"{block}.resnets.{i}.{leaf}" for i in range(resnets) for leaf in RESNET_LEAVES)
    return out


def text_paths(layers: int) -> list[str]:
    """The CLIP text-encoder paths cloneofsimo's injection visits, in its order."""
    return [f"text_model.encoder.layers.{i}.self_attn.{leaf}" for i in range(layers)
            for leaf in ("k_proj", "v_proj", "q_proj", "out_proj")]


def groups(source: TensorSource) -> tuple[dict[str, list[tuple[str, str]]], dict[str, set[str]], list[str]]:
    """Per component, its (up, down) tensor names by index; the target classes each group was made with; the
    names of the textual-inversion vectors riding along."""
    names = list(source.tensors)
    if all(_DIGITS.fullmatch(n) for n in names):
        return _pt_list(source, names)
    pairs: dict[str, dict[int, dict[str, str]]] = {}
    embeds = []
    for name in names:
        m = _KEY.fullmatch(name)
        if m is None:
            if source.metadata.get(name) != EMBED_FLAG:
                raise FormatError(source.path, f"tensor '{name}' is neither a cloneofsimo LoRA factor nor an "
                                  "embedding", "the file mixes formats")
            embeds.append(name)
            continue
        pairs.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = name
    targets = {group: _targets(source, group) for group in pairs}
    return {group: _ordered(source, group, found) for group, found in pairs.items()}, targets, embeds


def _targets(source: TensorSource, group: str) -> set[str]:
    raw = source.metadata.get(group)
    known = UNET_CLASSES if group == "unet" else TEXT_CLASSES
    try:
        targets = json.loads(raw) if raw else None
    except ValueError:
        targets = None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise FormatError(source.path, f"metadata '{group}' does not list the target classes as JSON",
                          "cloneofsimo's safeloras record them; the file is damaged")
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise FormatError(source.path, f"{group} LoRA targets {', '.join(map(repr, unknown))}, whose modules "
                          "sdport cannot place", f"targets read: {', '.join(known)}")
    return set(targets)


def _ordered(source: TensorSource, group: str, found: dict[int, dict[str, str]]) -> list[tuple[str, str]]:
    if sorted(found) != list(range(len(found))):
        raise FormatError(source.path, f"{group} modules are not numbered 0…{len(found) - 1}", "the file is damaged")
    out = []
    for i in range(len(found)):
        pair = found[i]
        if set(pair) != {"up", "down"}:
            raise FormatError(source.path, f"{group} module {i} lacks its {'up' if 'down' in pair else 'down'} "
                              "factor", "the file is damaged")
        rank, stated = source.tensors[pair["down"]].shape[:1], source.metadata.get(f"{group}:{i}:rank")
        if stated is not None and [str(r) for r in rank] != [stated.strip()]:
            raise FormatError(source.path, f"{group} module {i} has rank {rank[0] if rank else '?'}, its metadata "
                              f"says {stated[:20]!r}", "the file is damaged")
        out.append((pair["up"], pair["down"]))
    return out


def _pt_list(source: TensorSource, names: list[str]) -> tuple[dict, dict, list[str]]:
    if len(names) % 2 or sorted(map(int, names)) != list(range(len(names))):
        raise FormatError(source.path, f"a list of {len(names)} tensors, not cloneofsimo's (up, down) pairs",
                          "a cloneofsimo .pt LoRA lists up and down factors in turn")
    pairs = [(str(i), str(i + 1)) for i in range(0, len(names), 2)]
    if not source.path.endswith(TEXT_PT_SUFFIX):
        for targets in PT_TARGETS:
            if _assign(source, unet_paths(targets), pairs) is not None:
                return {"unet": pairs}, {"unet": targets}, []
        if len(pairs) % 4:
            raise FormatError(source.path, f"a cloneofsimo .pt list of {len(pairs)} modules, which no SD1/SD2 "
                              "UNet target set makes", "its text encoder's list is named NAME.text_encoder.pt")
    return {"text_encoder": pairs}, {"text_encoder": set(TEXT_CLASSES)}, []


def _assign(source: TensorSource, paths: list[str], pairs: list[tuple[str, str]]) -> list | None:
    """(path, pair) in order, or None when the pairs do not fit the paths: a conv factor where a linear goes,
    too few or too many. A resnet's ``conv_shortcut`` is taken when the next pair is a 1×1 conv."""
    out: list[tuple[str, tuple[str, str]]] = []
    for path in paths:
        leaf = path.rsplit(".", 1)[1]
        down = source.tensors[pairs[len(out)][1]].shape if len(out) < len(pairs) else None
        conv = down is not None and len(down) == 4
        if leaf == "conv_shortcut" and not (conv and tuple(down[2:]) == (1, 1)):
            continue  # the resnet keeps its width: it has no shortcut
        if down is None or conv != (leaf in CONV_LEAVES):
            return None
        out.append((path, pairs[len(out)]))
    return out if len(out) == len(pairs) else None


def placed(source: TensorSource) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Every pair as (component, diffusers path, up tensor, down tensor), and the embedding tensors."""
    found, targets, embeds = groups(source)
    out = []
    for group, pairs in found.items():
        if group == "text_encoder" and len(pairs) % 4:
            raise FormatError(source.path, f"{len(pairs)} text-encoder modules, not 4 per CLIP layer",
                              "the file is damaged")
        paths = text_paths(len(pairs) // 4) if group == "text_encoder" else unet_paths(targets[group])
        assigned = _assign(source, paths, pairs)
        if assigned is None:
            raise FormatError(source.path, f"its {len(pairs)} {group} modules do not fit cloneofsimo's injection "
                              f"into an SD1/SD2 {group} with targets {', '.join(sorted(targets[group]))}",
                              "sdport places cloneofsimo LoRAs of SD1/SD2 made with its target sets")
        out.extend((group, path, up, down) for path, (up, down) in assigned)
    return out, embeds
