"""Adapter module names without a base model: kohya's underscored names ⇄ dotted diffusers paths.

kohya names are module paths with every dot made an underscore, so reading one back means knowing
which underscores belong to a word (``to_q``, ``transformer_blocks``, ``time_emb_proj``). Names are
split against the vocabulary of module names of the SD UNets (both layouts) and CLIP text
encoders; a name with a part outside it is refused rather than guessed. SDXL kohya files name UNet
modules after the SGM layout; those are translated with the family's UNet name table (the same
table the model conversions use) built from the released block structure.
"""

from __future__ import annotations

import re

from ..families import FAMILIES
from ..families.parts.unet import name_map

WORDS = frozenset("""
down_blocks up_blocks mid_block attentions resnets transformer_blocks attn1 attn2 to_q to_k to_v to_out ff net proj
proj_in proj_out norm norm1 norm2 norm3 conv1 conv2 conv_shortcut time_emb_proj downsamplers upsamplers conv conv_in
conv_out conv_norm_out time_embedding linear_1 linear_2 add_embedding input_blocks output_blocks middle_block in_layers
out_layers emb_layers skip_connection op time_embed label_emb out text_model encoder layers self_attn q_proj k_proj
v_proj out_proj mlp fc1 fc2 layer_norm1 layer_norm2 final_layer_norm embeddings token_embedding position_embedding
text_projection
""".split())
_LONGEST = max(w.count("_") + 1 for w in WORDS)

SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def dotted(flat: str) -> str | None:
    """``down_blocks_0_attentions_0_proj_in`` → ``down_blocks.0.attentions.0.proj_in``; None if a part is unknown."""
    tokens, parts, i = flat.split("_"), [], 0
    while i < len(tokens):
        for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
            word = "_".join(tokens[i:i + n])
            if word in WORDS or (n == 1 and word.isdigit()):
                parts.append(word)
                i += n
                break
        else:
            return None
    return ".".join(parts)


def underscored(path: str) -> str:
    """A dotted module path as kohya writes it."""
    return path.replace(".", "_")


def unet_to_diffusers(path: str, family: str) -> str | None:
    """A UNet module path in diffusers names (SGM paths translated for the family); None if not a UNet module."""
    if path.split(".", 1)[0] not in SGM_ROOTS:
        return path
    hit = name_map(FAMILIES[family].unet_layout).to_diffusers(path + ".weight")
    return hit[0][: -len(".weight")] if hit else None


def unet_to_sgm(path: str, family: str) -> str | None:
    """A diffusers UNet module path in SGM names, as kohya names SDXL modules; None if the table has no such module."""
    hit = name_map(FAMILIES[family].unet_layout).to_ldm(path + ".weight")
    return hit[0][: -len(".weight")] if hit else None


def is_attention(path: str) -> re.Match | None:
    """``(attention module, projection)`` of a q/k/v/out projection path, UNet or CLIP names; None otherwise."""
    return re.fullmatch(r"(.+\.attn[12]|.+\.self_attn)\.(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)",
                        path)
