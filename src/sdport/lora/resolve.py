"""Where each adapter module lands in a base model: built from the base's own names, never by string surgery.

For every weight of every component of the base, the family's name tables give both its diffusers
name and its original (LDM/SGM) name, so one index answers every naming an adapter may use:
diffusers/PEFT paths, kohya names derived from diffusers modules (SD1/SD2) or from SGM modules
(SDXL), and text-encoder paths in transformers' names. A target is the base tensor to update and,
for OpenCLIP's fused ``in_proj``, which third of its rows. Biases are indexed too, under the
module's key plus ``#bias`` (LyCORIS ``diff_b`` and ``b_norm`` update them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..families import Family, Part
from ..families.parts import part_links, part_shapes
from ..families.parts.clip import hub_name
from ..io.base import TensorSource

PARAMS = (".weight", ".bias")


@dataclass(frozen=True)
class Target:
    """The base tensor a module updates, its shape, and the row block (k of n) when it is part of a fused tensor."""

    tensor: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None


def _kohya_names(part: Part, diffusers_module: str, ldm_module: str | None) -> list[str]:
    """Other names of a module: kohya's (from diffusers or SGM paths) and, for the UNet, the SGM path itself
    with or without the checkpoint's ``model.diffusion_model.`` (MindOne's LoRA names)."""
    flat = diffusers_module.replace(".", "_")
    if part.kind == "unet":
        names = [f"unet:{flat}"]
        if ldm_module:
            names += ["unet:" + ldm_module.replace(".", "_"), f"unet:{ldm_module}",
                      f"unet:model.diffusion_model.{ldm_module}"]
        return names
    # trainers on transformers >= 5.6, whose CLIPTextModel has no text_model level, name modules without it
    return [f"{part.component}:{flat}", f"{part.component}:{flat.removeprefix('text_model_')}"]


def build_index(source: TensorSource, family: Family, diffusers_layout: bool, *, aliases: bool = True
                ) -> dict[str, Target]:
    """Every way an adapter can name a base weight → where that weight is.

    Keys are ``component:path`` — ``path`` a dotted diffusers module path or, with ``aliases``, also an
    underscored kohya name.
    """
    index: dict[str, Target] = {}
    for part in family.parts:
        if part.kind not in ("unet", "clip-l", "openclip"):
            continue
        found = part_shapes(source, family, part, diffusers_layout)
        if found is None:
            continue
        prefix, shapes = found
        links, _ = part_links(part, shapes, not diffusers_layout)
        for link in links.links:
            if not link.out.endswith(PARAMS) and not link.inputs[0].endswith(PARAMS):
                continue
            if diffusers_layout:  # link: diffusers inputs → original name
                if len(link.inputs) != 1:  # q, k, v fused into in_proj in the original layout: each is its own tensor
                    for name in link.inputs:
                        _add(index, part, hub_name(name) if part.kind != "unet" else name, None, prefix + name,
                             shapes[name], None, aliases)
                    continue
                diffusers_name, ldm_name, rows = link.inputs[0], link.out, None
                tensor, shape = prefix + diffusers_name, shapes[diffusers_name]
            else:  # link: original input → diffusers name
                diffusers_name, ldm_name = link.out, link.inputs[0]
                if link.op == "transpose":
                    continue  # text_projection, stored transposed: not a LoRA target here
                rows = (link.args[1], link.args[2]) if link.op == "split" else None
                tensor, shape = prefix + ldm_name, shapes[ldm_name]
            if part.kind != "unet":
                diffusers_name = hub_name(diffusers_name)
            _add(index, part, diffusers_name, ldm_name, tensor, shape, rows, aliases)
    return index


def _add(index: dict[str, Target], part: Part, diffusers_name: str, ldm_name: str | None, tensor: str,
         shape: tuple[int, ...], rows: tuple[int, int] | None, aliases: bool) -> None:
    param = next((p for p in PARAMS if diffusers_name.endswith(p)), None)
    if param is None:
        return
    module = diffusers_name[: -len(param)]
    ldm_module = ldm_name[: -len(param)] if ldm_name and ldm_name.endswith(param) else None
    target = Target(tensor, shape, rows)
    key = "#bias" if param == ".bias" else ""
    index[f"{part.component}:{module}{key}"] = target
    for name in _kohya_names(part, module, ldm_module) if aliases else ():
        index.setdefault(name + key, target)

