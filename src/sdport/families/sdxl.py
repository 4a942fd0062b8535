"""Stable Diffusion XL, base and refiner: OpenCLIP-bigG (with its projection: the pooled embedding), CLIP-L beside it
in the base, a UNet conditioned on text and time ids, a VAE that overflows in fp16."""

from __future__ import annotations

from .base import LDM_LABEL, MINDONE_NAMES, UNET, VAE, Family, MindOneRules, Part, Signature
from .parts.mindone import sgm_text_rules
from .parts.unet import UNetLayout

_COMMON = dict(pipeline="StableDiffusionXLPipeline", sample_size=1024, vae_scale=0.13025, vae_upcast=True,
               scheduler="EulerDiscreteScheduler", kohya_sgm=True)

BASE = Family(
    "sdxl-base", (UNET, VAE, Part("text_encoder", "conditioner.embedders.0.transformer.", "clip-l", all_layers=12),
                  Part("text_encoder_2", "conditioner.embedders.1.model.", "openclip", projection=True)),
    signatures=(
        Signature("sdxl-base", "ldm", (r"conditioner\.embedders\.0\.transformer\..*",
                                       r"conditioner\.embedders\.1\.model\.ln_final\.weight", LDM_LABEL)),
        # diffusers pipelines by their UNet, so that a folder missing a text encoder is still recognised
        Signature("sdxl-base", "diffusers", (r"unet\.add_embedding\.linear_1\.weight",),
                  none_of=(r"unet\.down_blocks\.3\..*",)),
        Signature("sdxl-base", "mindone", (MINDONE_NAMES, r"conditioner\.embedders\.1\.model\..*")),
    ),
    unet_layout=UNetLayout(3, 2, (False, True, True), (True, True, False)), cross_width=2048,
    inpaint_pipeline="StableDiffusionXLInpaintPipeline", index={"force_zeros_for_empty_prompt": True},
    ort_class="ORTStableDiffusionXLPipeline",
    mindone=MindOneRules("sgm", (*sgm_text_rules("conditioner.embedders.0.transformer.", False),
                                 *sgm_text_rules("conditioner.embedders.1.model.", True))),
    **_COMMON,
)

REFINER = Family(
    "sdxl-refiner", (UNET, VAE, Part("text_encoder_2", "conditioner.embedders.0.model.", "openclip", projection=True)),
    signatures=(
        Signature("sdxl-refiner", "ldm", (r"conditioner\.embedders\.0\.model\.ln_final\.weight", LDM_LABEL),
                  none_of=(r"conditioner\.embedders\.1\..*",)),
        Signature("sdxl-refiner", "diffusers", (r"unet\.add_embedding\.linear_1\.weight", r"unet\.down_blocks\.3\..*")),
        Signature("sdxl-refiner", "mindone", (MINDONE_NAMES, r"conditioner\.embedders\.0\.model\..*"),
                  none_of=(r"conditioner\.embedders\.1\..*",)),
    ),
    unet_layout=UNetLayout(4, 2, (False, True, True, False), (False, True, True, False)), cross_width=1280,
    time_ids=5,  # the refiner's time ids: original size, crop, aesthetic score
    index={"text_encoder": [None, None], "tokenizer": [None, None], "requires_aesthetics_score": True,
           "force_zeros_for_empty_prompt": False},
    ort_class="ORTStableDiffusionXLImg2ImgPipeline",
    mindone=MindOneRules("sgm", sgm_text_rules("conditioner.embedders.0.model.", True)),
    **{**_COMMON, "pipeline": "StableDiffusionXLImg2ImgPipeline"},
)
