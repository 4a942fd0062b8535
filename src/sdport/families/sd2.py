"""Stable Diffusion 2.x: OpenCLIP-H text encoder (its penultimate layer), 64-wide heads, linear attention
projections; the 768 px models predict v, SD2-base (512 px) ε — the weights cannot tell them apart."""

from __future__ import annotations

from .base import NO_SAFETY_CHECKER, UNET, VAE, Family, MindOneRules, Part, sd_signatures
from .parts.mindone import text_rules
from .parts.unet import UNetLayout

_OC = "cond_stage_model.model."
_LAYER = _OC + "transformer.resblocks.{i}."
#: MindOne's SD2 text encoder: OpenCLIP's first 23 layers (the ones SD2 reads), no projection
MINDONE = MindOneRules("ldm", text_rules({
    "token": _OC + "token_embedding.weight", "position": _OC + "positional_embedding", "ln_final": _OC + "ln_final",
    "ln_1": _LAYER + "ln_1", "ln_2": _LAYER + "ln_2", "in_proj": _LAYER + "attn.in_proj",
    "out_proj": _LAYER + "attn.out_proj", "c_fc": _LAYER + "mlp.c_fc", "c_proj": _LAYER + "mlp.c_proj"}),
    not_held=r"cond_stage_model\.model\.(text_projection|logit_scale)"
             r"|cond_stage_model\.model\.transformer\.resblocks\.(2[3-9]|[3-9]\d|\d{3,})\..*")

FAMILY = Family(
    "sd2", (UNET, VAE, Part("text_encoder", "cond_stage_model.model.", "openclip", text_layers=23)),
    "StableDiffusionPipeline",
    signatures=sd_signatures("sd2", r"cond_stage_model\.model\.ln_final\.weight", proj_ndim=2, text_width=1024),
    unet_layout=UNetLayout(4, 2, (True, True, True, False), (False, True, True, True)),
    cross_width=1024, sample_size=768, scheduler="DDIMScheduler",
    prediction=("v_prediction", "SD2's default: the 768 px v-prediction models are the common ones; pass "
                                "--prediction-type epsilon for SD2-base (512 px)"),
    inpaint_pipeline="StableDiffusionInpaintPipeline",
    index=NO_SAFETY_CHECKER,
    ort_class="ORTStableDiffusionPipeline", mindone=MINDONE,
)
