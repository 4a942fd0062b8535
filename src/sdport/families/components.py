"""Components alone: a VAE (KL-f8, shared by SD1, SD2 and SDXL), a UNet, a ControlNet — each its own file or folder."""

from __future__ import annotations

from .base import LDM_CONV_IN, LDM_UNET, UNET, Family, Part, Signature

_VAE_LDM = r"(first_stage_model\.|vae\.)?"

VAE = Family(  # written without a prefix, as sd-vae-ft-mse's .ckpt is
    "vae", (Part("vae", "", "vae"),), "AutoencoderKL", whole=False,
    signatures=(
        Signature("vae", "ldm", (_VAE_LDM + r"encoder\.down\.0\.block\.0\.conv1\.weight",
                                 _VAE_LDM + r"decoder\.conv_out\.weight", _VAE_LDM + r"quant_conv\.weight"),
                  none_of=(LDM_UNET + ".*",)),
        Signature("vae", "diffusers", (r"(vae\.)?encoder\.down_blocks\.0\.resnets\.0\.conv1\.weight",
                                       r"(vae\.)?decoder\.conv_out\.weight", r"(vae\.)?quant_conv\.weight"),
                  none_of=(r"unet\..*",)),
    ),
)

UNET_ALONE = Family(
    "unet", (UNET,), "UNet2DConditionModel", whole=False, unet_heads=None,
    signatures=(
        Signature("unet", "ldm", (LDM_CONV_IN,), none_of=(r"cond_stage_model\..*", r"conditioner\..*")),
        Signature("unet", "diffusers", (r"conv_in\.weight", r"time_embedding\.linear_1\.weight", r"down_blocks\..*"),
                  none_of=(r"controlnet_cond_embedding\..*",)),
    ),
)

CONTROLNET = Family(
    "controlnet", (Part("controlnet", "control_model.", "controlnet"),), "ControlNetModel", whole=False,
    unet_heads=None,
    signatures=(
        Signature("controlnet", "ldm", (r"(control_model\.)?input_hint_block\.0\.weight",
                                        r"(control_model\.)?zero_convs\.0\.0\.weight")),
        Signature("controlnet", "diffusers", (r"controlnet_cond_embedding\.conv_in\.weight",)),
    ),
)
