"""The KL-f8 autoencoder of SD1/SD2/SDXL in both layouts: structure read off the names, and its name table.

The decoder's levels run in opposite orders (LDM ``decoder.up.0`` is the last diffusers up block),
and the mid-block attention is 1×1 convs in LDM but linear layers in diffusers. Files saved by old
diffusers versions name that attention ``query/key/value/proj_attn``; they are read, never written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .names import NameMap, Rename

RESNET = (Rename("norm1", "norm1"), Rename("conv1", "conv1"), Rename("norm2", "norm2"), Rename("conv2", "conv2"),
          Rename("nin_shortcut", "conv_shortcut"))
ATTENTION = (Rename("norm", "group_norm"), Rename("q", "to_q", True), Rename("k", "to_k", True),
             Rename("v", "to_v", True), Rename("proj_out", "to_out.0", True))
#: the pre-0.14 diffusers attention names, accepted on input
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
INNER = {"resnet": RESNET, "attention": ATTENTION}


@dataclass(frozen=True)
class VAELayout:
    levels: int
    layers: int


def layout_from_ldm(names: Iterable[str]) -> VAELayout | None:
    names = set(names)
    levels = len({m[1] for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n))})
    layers = len({m[1] for n in names if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", n))})
    return VAELayout(levels, layers) if levels and layers else None


def layout_from_diffusers(names: Iterable[str]) -> VAELayout | None:
    names = set(names)
    levels = len({m[1] for n in names if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", n))})
    layers = len({m[1] for n in names if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", n))})
    return VAELayout(levels, layers) if levels and layers else None


def modern_name(name: str) -> str:
    """A diffusers VAE name with the pre-0.14 attention names replaced by today's."""
    m = re.match(r"(.*\.attentions\.0\.)(query|key|value|proj_attn)(\..*)$", name)
    return f"{m[1]}{OLD_ATTENTION[m[2]]}{m[3]}" if m else name


def name_map(layout: VAELayout) -> NameMap:
    rows = [(n, n, "") for n in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                 "quant_conv", "post_quant_conv")]
    rows += [("encoder.norm_out", "encoder.conv_norm_out", ""), ("decoder.norm_out", "decoder.conv_norm_out", "")]
    for side in ("encoder", "decoder"):
        rows += [(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", "resnet"),
                 (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", "attention"),
                 (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", "resnet")]
    for i in range(layout.levels):
        for j in range(layout.layers):
            rows.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", "resnet"))
        if i < layout.levels - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ""))
        level = layout.levels - 1 - i
        for j in range(layout.layers + 1):
            rows.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", "resnet"))
        if level > 0:
            rows.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", ""))
    return NameMap(rows, INNER)
