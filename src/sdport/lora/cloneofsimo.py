"""cloneofsimo/lora adapters: which module each numbered up/down pair of theirs patches.

Two containers: "safeloras" (``.safetensors``: tensors ``unet:N:up``/``unet:N:down``, ``text_encoder:N:…``; the
metadata names each group's target classes as a JSON list and ``GROUP:N:rank``, which its loader ignores and so
does sdport; textual-inversion vectors ride along as tensors named after their token, flagged ``<embed>`` in the
metadata) and the ``.pt`` lists ``torch.save`` wrote (``[up0, down0, up1, down1, …]``; the UNet's in
``NAME.pt``, the text encoder's in ``NAME.text_encoder.pt``, no record of the targets).

Modules are not named, only numbered: pair N patches the N-th ``nn.Linear`` (``nn.Conv2d`` too with
``ResnetBlock2D`` among the targets) found below a module of a target class, visiting the model in
``named_modules()`` order — the order in which the diffusers of the day registered them. That order is
reproduced here from the block structure of SD1/SD2's UNet (``down_blocks``, then ``up_blocks``, then
``mid_block``; in a block its ``attentions`` before its ``resnets``; ``to_q, to_k, to_v, to_out.0``; a resnet's
``conv1, time_emb_proj, conv2, conv_shortcut``; a transformer block's ``attn1, attn2, ff`` — or ``attn1, ff,
attn2`` in the diffusers 0.9–0.12 most of these files were trained with, told apart by the factors' shapes) and
of CLIP's text encoder (``k_proj, v_proj, q_proj, out_proj``). The scale is 1: cloneofsimo's ``collapse_lora``
adds ``ratio · up @ down``.
"""

from __future__ import annotations

import json
import re

from ..errors import FormatError
from ..inversion import EMBED_FLAG
from ..io.base import TensorSource

UNET_CLASSES = ("CrossAttention", "Attention", "GEGLU", "ResnetBlock2D")
TEXT_CLASSES = ("CLIPAttention",)
_ATTENTION = {"CrossAttention", "Attention"}
#: what a .pt list was made with, most likely first: the defaults of the versions that wrote .pt files
PT_TARGETS = (_ATTENTION | {"GEGLU"}, _ATTENTION, _ATTENTION | {"GEGLU", "ResnetBlock2D"},
              _ATTENTION | {"ResnetBlock2D"})
#: a transformer block's children in registration order: diffusers ≥ 0.13, then 0.9–0.12
BLOCK_ORDERS = (("attn1", "attn2", "ff"), ("attn1", "ff", "attn2"))
ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
RESNET_LEAVES = ("conv1", "time_emb_proj", "conv2", "conv_shortcut")
CONV_LEAVES = {"conv1", "conv2", "conv_shortcut"}
#: modules whose output width is known from their input width: GEGLU's projection doubles a 4× inner width
WIDTH = {"proj": 8, "to_q": 1, "to_out.0": 1, "k_proj": 1, "v_proj": 1, "q_proj": 1, "out_proj": 1}
TEXT_PT_SUFFIX = ".text_encoder.pt"
MAX_METADATA = 4096
_KEY = re.compile(r"(unet|text_encoder):(0|[1-9]\d{0,5}):(up|down)")
_DIGITS = re.compile(r"0|[1-9]\d{0,6}")

Pair = tuple[str, str]


def unet_paths(targets: set[str], block_order: tuple[str, ...] = BLOCK_ORDERS[0]) -> list[str]:
    """The diffusers paths cloneofsimo's injection may visit in an SD1/SD2 UNet, in its order; a resnet's
    ``conv_shortcut`` is there only where the resnet changes width (``_assign`` tells from the factors)."""
    leaves = {"attn1": [f"attn1.{leaf}" for leaf in ATTENTION_LEAVES] if targets & _ATTENTION else [],
              "attn2": [f"attn2.{leaf}" for leaf in ATTENTION_LEAVES] if targets & _ATTENTION else [],
              "ff": ["ff.net.0.proj"] if "GEGLU" in targets else []}
    out: list[str] = []
    blocks = [(f"down_blocks.{level}", 2 if level < 3 else 0, 2) for level in range(4)]
    blocks += [(f"up_blocks.{level}", 3 if level else 0, 3) for level in range(4)] + [("mid_block", 1, 2)]
    for block, attentions, resnets in blocks:
        for i in range(attentions):
            out.extend(f"{block}.attentions.{i}.transformer_blocks.0.{leaf}" for child in block_order
                       for leaf in leaves[child])
        if "ResnetBlock2D" in targets:
            out.extend(f"{block}.resnets.{i}.{leaf}" for i in range(resnets) for leaf in RESNET_LEAVES)
    return out


def text_paths(layers: int) -> list[str]:
    """The CLIP text-encoder paths cloneofsimo's injection visits, in its order."""
    return [f"text_model.encoder.layers.{i}.self_attn.{leaf}" for i in range(layers)
            for leaf in ("k_proj", "v_proj", "q_proj", "out_proj")]


def placed(source: TensorSource) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Every pair as (component, diffusers path, up tensor, down tensor), and the embedding tensors."""
    names = list(source.tensors)
    if all(_DIGITS.fullmatch(n) for n in names):
        return _pt_list(source, names), []
    found, embeds = _safeloras(source, names)
    out = []
    for group, pairs in found.items():
        targets = _targets(source, group)
        candidates = [text_paths(len(pairs) // 4)] if group == "text_encoder" else \
            [unet_paths(targets, order) for order in BLOCK_ORDERS]
        assigned = next((a for paths in candidates if (a := _assign(source, paths, pairs)) is not None), None)
        if assigned is None:
            raise FormatError(source.path, f"its {len(pairs)} {group} modules do not fit cloneofsimo's injection "
                              f"into an SD1/SD2 {group} with targets {', '.join(sorted(targets))}",
                              "sdport places cloneofsimo LoRAs of SD1/SD2 made with its target sets")
        out.extend((group, path, up, down) for path, (up, down) in assigned)
    return out, embeds


def _safeloras(source: TensorSource, names: list[str]) -> tuple[dict[str, list[Pair]], list[str]]:
    """Per group, its (up, down) names by index; and the embedding tensors."""
    found: dict[str, dict[int, dict[str, str]]] = {}
    embeds = []
    for name in names:
        m = _KEY.fullmatch(name)
        if m is None:
            if source.metadata.get(name) != EMBED_FLAG:
                raise FormatError(source.path, f"tensor '{name}' is neither a cloneofsimo LoRA factor nor an "
                                  "embedding", "the file mixes formats")
            embeds.append(name)
            continue
        found.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = name
    out = {}
    for group, by_index in found.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise FormatError(source.path, f"{group} modules are not numbered 0…{len(by_index) - 1}",
                              "the file is damaged")
        missing = next((i for i, p in sorted(by_index.items()) if set(p) != {"up", "down"}), None)
        if missing is not None:
            raise FormatError(source.path, f"{group} module {missing} lacks a factor", "the file is damaged")
        out[group] = [(by_index[i]["up"], by_index[i]["down"]) for i in range(len(by_index))]
    return out, embeds


def _targets(source: TensorSource, group: str) -> set[str]:
    raw = source.metadata.get(group) or ""
    known = UNET_CLASSES if group == "unet" else TEXT_CLASSES
    try:
        targets = json.loads(raw) if 0 < len(raw) <= MAX_METADATA else None
    except (ValueError, RecursionError):
        targets = None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise FormatError(source.path, f"metadata '{group}' does not list the target classes as JSON",
                          "cloneofsimo's safeloras record them; the file is damaged")
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise FormatError(source.path, f"{group} LoRA targets {', '.join(map(repr, unknown))[:200]}, whose "
                          "modules sdport cannot place", f"targets read: {', '.join(known)}")
    return set(targets)


def _pt_list(source: TensorSource, names: list[str]) -> list[tuple[str, str, str, str]]:
    if len(names) % 2 or sorted(map(int, names)) != list(range(len(names))):
        raise FormatError(source.path, f"a list of {len(names)} tensors, not cloneofsimo's (up, down) pairs",
                          "a cloneofsimo .pt LoRA lists up and down factors in turn")
    pairs = [(str(i), str(i + 1)) for i in range(0, len(names), 2)]
    if source.path.endswith(TEXT_PT_SUFFIX):
        candidates = [("text_encoder", text_paths(len(pairs) // 4))]
    else:
        candidates = [("unet", unet_paths(t, order)) for t in PT_TARGETS for order in BLOCK_ORDERS]
    for group, paths in candidates:
        assigned = _assign(source, paths, pairs)
        if assigned is not None:
            return [(group, path, up, down) for path, (up, down) in assigned]
    what = "its text encoder's" if source.path.endswith(TEXT_PT_SUFFIX) else "any SD1/SD2 UNet target set's"
    raise FormatError(source.path, f"a cloneofsimo .pt list of {len(pairs)} modules, which do not fit {what} "
                      "modules", f"a text encoder's list is named NAME{TEXT_PT_SUFFIX}")


def _assign(source: TensorSource, paths: list[str], pairs: list[Pair]) -> list[tuple[str, Pair]] | None:
    """(path, pair) in order, or None when the pairs do not fit the paths: a conv factor where a linear goes, an
    output width the module cannot have, too few or too many. A resnet's ``conv_shortcut`` is taken when the next
    pair is a 1×1 conv. Factors that are no LoRA pair at all are refused."""
    out: list[tuple[str, Pair]] = []
    for path in paths:
        if len(out) == len(pairs):
            if path.endswith("conv_shortcut"):
                continue
            return None
        up, down = (tuple(source.tensors[n].shape) for n in pairs[len(out)])
        _check_pair(source, pairs[len(out)], up, down)
        leaf = "to_out.0" if path.endswith(".to_out.0") else path.rsplit(".", 1)[-1]
        conv = len(down) == 4
        if leaf == "conv_shortcut" and not (conv and down[2:] == (1, 1)):
            continue  # the resnet keeps its width: it has no shortcut
        if conv != (leaf in CONV_LEAVES) or (leaf in WIDTH and up[0] != WIDTH[leaf] * down[1]):
            return None
        out.append((path, pairs[len(out)]))
    return out if len(out) == len(pairs) else None


def _check_pair(source: TensorSource, names: Pair, up: tuple[int, ...], down: tuple[int, ...]) -> None:
    if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0] or up[2:] not in ((), (1, 1)) \
            or 0 in up + down:
        raise FormatError(source.path, f"'{names[0]}' {list(up)} and '{names[1]}' {list(down)} are not a LoRA's up "
                          "and down factors", "the file is damaged")
