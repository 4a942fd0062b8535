"""The SD UNet (and ControlNet) in both layouts: its block structure, read off the names, and its name table.

The original layout numbers blocks flatly (``input_blocks.N.M``), diffusers nests them
(``down_blocks.i.resnets.j``); which flat number is which nested block follows from three facts —
the number of levels, resnets per level, and which levels have attention — so the table is built
from a ``UNetLayout`` read off whichever side's names are at hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .names import NameMap, Rename

RESNET = (Rename("in_layers.0", "norm1"), Rename("in_layers.2", "conv1"), Rename("emb_layers.1", "time_emb_proj"),
          Rename("out_layers.0", "norm2"), Rename("out_layers.3", "conv2"),
          Rename("skip_connection", "conv_shortcut"))
ATTENTION = tuple(Rename(n, n) for n in ("norm", "proj_in", "proj_out", "transformer_blocks"))
INNER = {"resnet": RESNET, "attention": ATTENTION}

#: names outside the blocks; ``label_emb`` is SDXL's text-time embedding (diffusers ``add_embedding``)
STEM = (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
        ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))

#: ControlNet's extra parts: the hint encoder (convs at 0, 2, …, 14 ⇄ conv_in, blocks.0-5, conv_out) and zero convs
HINT = [("input_hint_block.0", "controlnet_cond_embedding.conv_in"),
        *((f"input_hint_block.{2 * k + 2}", f"controlnet_cond_embedding.blocks.{k}") for k in range(6)),
        ("input_hint_block.14", "controlnet_cond_embedding.conv_out"),
        ("middle_block_out.0", "controlnet_mid_block")]


#: the head layout of a UNet alone that projects attention with 1×1 convs: SD1's, 8 heads everywhere
CONV_HEADS = ("count", 8)


@dataclass(frozen=True)
class UNetLayout:
    """How many levels, resnets per level, and which down/up levels carry attention."""

    levels: int
    layers: int
    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]
    controlnet: bool = False


def layout_from_ldm(names: Iterable[str]) -> UNetLayout | None:
    """The layout of an original-layout UNet or ControlNet from its names (without the model prefix)."""
    names = set(names)
    blocks = {int(m[1]) for n in names if (m := re.match(r"input_blocks\.(\d+)\.", n))}
    downs = sorted(int(m[1]) for n in names if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", n)))
    if not blocks or not downs:
        return None
    layers, levels = downs[0] - 1, len(downs) + 1
    if layers < 1 or max(blocks) != levels * layers + levels - 1:
        return None
    firsts = [1 + i * (layers + 1) for i in range(levels)]
    down_attn = tuple(f"input_blocks.{n}.1.proj_in.weight" in names for n in firsts)
    controlnet = any(n.startswith("input_hint_block.") for n in names)
    up_attn = () if controlnet else tuple(
        f"output_blocks.{i * (layers + 1)}.1.proj_in.weight" in names for i in range(levels))
    return UNetLayout(levels, layers, down_attn, up_attn, controlnet)


def layout_from_diffusers(names: Iterable[str]) -> UNetLayout | None:
    """The layout of a diffusers UNet2DConditionModel or ControlNetModel from its names."""
    names = set(names)
    levels = len({m[1] for n in names if (m := re.match(r"down_blocks\.(\d+)\.", n))})
    layers = len({m[1] for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))})
    if not levels or not layers:
        return None
    down_attn = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in names for i in range(levels))
    controlnet = any(n.startswith("controlnet_cond_embedding.") for n in names)
    up_attn = () if controlnet else tuple(
        f"up_blocks.{i}.attentions.0.proj_in.weight" in names for i in range(levels))
    return UNetLayout(levels, layers, down_attn, up_attn, controlnet)


def name_map(layout: UNetLayout) -> NameMap:
    """The two-way name table of a UNet (or ControlNet) with this layout."""
    rows = [(a, b, "") for a, b in STEM]
    n = 1
    for i in range(layout.levels):
        for j in range(layout.layers):
            rows.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
            if layout.down_attn[i]:
                rows.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", "attention"))
            if layout.controlnet:
                rows.append((f"zero_convs.{n}.0", f"controlnet_down_blocks.{n}", ""))
            n += 1
        if i < layout.levels - 1:
            rows.append((f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv", ""))
            if layout.controlnet:
                rows.append((f"zero_convs.{n}.0", f"controlnet_down_blocks.{n}", ""))
            n += 1
    rows += [("middle_block.0", "mid_block.resnets.0", "resnet"), ("middle_block.1", "mid_block.attentions.0",
                                                                     "attention"),
             ("middle_block.2", "mid_block.resnets.1", "resnet")]
    if layout.controlnet:
        rows += [("zero_convs.0.0", "controlnet_down_blocks.0", ""), *((a, b, "") for a, b in HINT)]
        return NameMap(rows, INNER)
    n = 0
    for i in range(layout.levels):
        level = layout.levels - 1 - i
        attn = layout.up_attn[i]
        for j in range(layout.layers + 1):
            rows.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if attn:
                rows.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
            if j == layout.layers and level > 0:
                rows.append((f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", ""))
            n += 1
    return NameMap(rows, INNER)
