"""Name machinery for the components families are made of — UNet (and ControlNet), VAE, CLIP text encoders —
and where a component's tensors are in a model: ``part_shapes`` finds them, ``part_links`` translates their names.

``names`` holds the two-way table types, ``links`` what a table yields, and ``unet``, ``vae``,
``clip`` and ``mindone`` each component's (or naming scheme's) rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import clip, unet, vae
from .links import Links, map_names

if TYPE_CHECKING:  # families.base imports this package's tables
    from ...io.base import TensorSource
    from ..base import Family, Part

#: a tensor each component surely has, by which its prefix is found: (original layout, diffusers)
PROBES = {"unet": ("input_blocks.0.0.weight", "conv_in.weight"),
          "controlnet": ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"),
          "vae": ("encoder.conv_in.weight", "encoder.conv_in.weight")}
#: original files of a component alone may keep it under another prefix, or none (sd-vae-ft-mse's .ckpt)
LDM_PREFIXES = {"vae": ("first_stage_model.", "vae.", ""), "controlnet": ("control_model.", "")}

Shapes = dict[str, tuple[int, ...]]


def part_links(part: Part, shapes: Shapes, to_diffusers: bool) -> tuple[Links, object]:
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
        alone = ("",) if not family.whole else ()
        candidates, probe = (part.component + ".", *alone), PROBES.get(part.kind, (None, None))[1]
    else:
        candidates, probe = LDM_PREFIXES.get(part.kind, (part.ldm_prefix,)), PROBES.get(part.kind, (None,))[0]
    for p in candidates:
        if probe is None and any(k.startswith(p) for k in source.tensors) or probe and p + probe in source.tensors:
            return p
    return None


def part_shapes(source: TensorSource, family: Family, part: Part, diffusers_layout: bool
                ) -> tuple[str, Shapes] | None:
    """``part``'s prefix in ``source`` and its tensors' shapes by name below it; None when the part is absent."""
    prefix = part_prefix(source, family, part, diffusers_layout)
    if prefix is None:
        return None
    return prefix, {k[len(prefix):]: i.shape for k, i in source.tensors.items() if k.startswith(prefix)}
