"""Text encoders in both layouts: CLIP-L (already in transformers' names) and OpenCLIP-H / bigG (fused q/k/v).

Each ``*_links`` function turns the names of one side (below the component's prefix) into
``Link``s — output name ← op(inputs) — plus the names it leaves out, with the reason. OpenCLIP
stores q, k, v as one ``in_proj`` matrix (split into thirds ⇄ concatenated) and bigG's
``text_projection`` transposed (no ``.weight``).
"""

from __future__ import annotations

import re

from .links import Link, Links
from .names import Pattern, translate

#: leading parts of CLIP-L names under ``text_model.`` (transformers' CLIPTextModel)
CLIP_L_PARTS = ("embeddings.token_embedding.", "embeddings.position_embedding.", "encoder.layers.",
                "final_layer_norm.")

OPENCLIP = (
    Pattern("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    Pattern("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    Pattern("ln_final.{p}", "text_model.final_layer_norm.{p}"),
    Pattern("transformer.resblocks.{i}.ln_1.{p}", "text_model.encoder.layers.{i}.layer_norm1.{p}"),
    Pattern("transformer.resblocks.{i}.ln_2.{p}", "text_model.encoder.layers.{i}.layer_norm2.{p}"),
    Pattern("transformer.resblocks.{i}.attn.out_proj.{p}", "text_model.encoder.layers.{i}.self_attn.out_proj.{p}"),
    Pattern("transformer.resblocks.{i}.mlp.c_fc.{p}", "text_model.encoder.layers.{i}.mlp.fc1.{p}"),
    Pattern("transformer.resblocks.{i}.mlp.c_proj.{p}", "text_model.encoder.layers.{i}.mlp.fc2.{p}"),
)
FUSED = "transformer.resblocks.{i}.attn.in_proj_{p}"
SPLIT = "text_model.encoder.layers.{i}.self_attn.{x}_proj.{p}"
POSITION_IDS = "position_ids: a constant buffer transformers rebuilds itself"


def clip_l_to_diffusers(names: list[str]) -> Links:
    """CLIP-L from an original file: the same names, with the ``text_model.`` level older files lack."""
    out = Links()
    for name in names:
        inner = name.removeprefix("text_model.")
        if inner.endswith("position_ids"):
            out.dropped[name] = POSITION_IDS
        elif inner.startswith(CLIP_L_PARTS):
            out.add(Link("text_model." + inner, (name,)))
        else:
            out.unknown.append(name)
    return out


def clip_l_to_ldm(names: list[str]) -> Links:
    """CLIP-L from diffusers (Hub names, or transformers ≥ 5.6's flat ones) to the original ``text_model.`` names."""
    return clip_l_to_diffusers(names)


def openclip_to_diffusers(names: list[str], *, layers: int | None = None, projection: bool = True) -> Links:
    """OpenCLIP names → CLIPTextModel(WithProjection) names.

    Args:
        layers: keep this many transformer layers (SD2 keeps 23 of 24: it reads the penultimate one).
        projection: map ``text_projection`` (bigG, CLIPTextModelWithProjection); else drop it.
    """
    out = Links()
    for name in names:
        fused = Pattern(FUSED, "").match(name, 0)
        layer = re.match(r"transformer\.resblocks\.(\d+)\.", name)
        if layer and layers is not None and int(layer[1]) >= layers:
            out.dropped[name] = f"layer {layer[1]}: this text encoder uses only its first {layers} layers"
        elif fused:
            for k, x in enumerate("qkv"):
                out.add(Link(SPLIT.format(x=x, **fused), (name,), "split", (0, k, 3)))
        elif name == "text_projection":
            if projection:
                out.add(Link("text_projection.weight", (name,), "transpose"))
            else:
                out.dropped[name] = "text_projection: unused by this family's pipeline (CLIPTextModel has none)"
        elif name in ("logit_scale", "attn_mask"):
            out.dropped[name] = f"{name}: used only to train CLIP, not by the text encoder"
        elif (hit := translate(OPENCLIP, name, 0)) is not None:
            out.add(Link(hit[1], (name,)))
        else:
            out.unknown.append(name)
    return out


def hub_name(name: str) -> str:
    """A CLIP text-encoder name in the Hub's ``text_model.`` form (transformers >= 5.6 saves it without)."""
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def openclip_to_ldm(names: list[str]) -> Links:
    """CLIPTextModel(WithProjection) names → OpenCLIP names (q/k/v fused again, projection transposed back)."""
    out = Links()
    present = set(names)
    for name in names:
        name_hub = hub_name(name)
        split = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name_hub)
        if name.endswith("position_ids"):
            out.dropped[name] = POSITION_IDS
        elif split:
            if split[2] == "q":
                parts = tuple(name.replace("q_proj", f"{x}_proj") for x in "qkv")
                missing = [p for p in parts if p not in present]
                if missing:
                    out.unknown += missing
                else:
                    out.add(Link(FUSED.format(i=split[1], p=split[3]), parts, "concat", (0,)))
        elif name_hub == "text_projection.weight":
            out.add(Link("text_projection", (name,), "transpose"))
        elif (hit := translate(OPENCLIP, name_hub, 1)) is not None:
            out.add(Link(hit[1], (name,)))
        else:
            out.unknown.append(name)
    return out
