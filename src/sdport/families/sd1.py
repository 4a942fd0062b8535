"""Stable Diffusion 1.x: CLIP-L text encoder, 8 attention heads everywhere, attention projected by 1×1 convs."""

from __future__ import annotations

from .base import NO_SAFETY_CHECKER, UNET, VAE, Family, MindOneRules, Part, sd_signatures
from .parts.mindone import HF_LAYER, HF_TEXT, text_rules
from .parts.unet import UNetLayout

#: MindOne's SD1 text encoder: one OpenCLIP-like class whose in_proj holds CLIP-L's q, k, v
MINDONE = MindOneRules("ldm", text_rules({
    "token": HF_TEXT + "embeddings.token_embedding.weight",
    "position": HF_TEXT + "embeddings.position_embedding.weight",
    "ln_final": HF_TEXT + "final_layer_norm", "ln_1": HF_LAYER + "layer_norm1", "ln_2": HF_LAYER + "layer_norm2",
    "c_fc": HF_LAYER + "mlp.fc1", "c_proj": HF_LAYER + "mlp.fc2", "out_proj": HF_LAYER + "self_attn.out_proj"}),
    fused_qkv=True)

FAMILY = Family(
    "sd1", (UNET, VAE, Part("text_encoder", "cond_stage_model.transformer.", "clip-l")),
    "StableDiffusionPipeline",
    signatures=sd_signatures("sd1", r"cond_stage_model\.transformer\..*", proj_ndim=4, text_width=768),
    unet_heads=("count", 8),
    unet_layout=UNetLayout(4, 2, (True, True, True, False), (False, True, True, True)),
    cross_width=768, conv_projections=True,
    inpaint_pipeline="StableDiffusionInpaintPipeline",
    index=NO_SAFETY_CHECKER,
    ort_class="ORTStableDiffusionPipeline", mindone=MINDONE,
)
