"""Tiny models with each family's real block structure, built by diffusers and transformers themselves.

Same block types, level counts, resnets per level, transformer depths, attention layout (SD1's 8
heads, 64-wide heads elsewhere), text-encoder layer counts and CLIP vocabulary as the released
models; only the channel widths are small. Weights are random from a fixed seed, and every norm
gets a random scale and shift so that a misplaced tensor changes the outputs.
"""

from __future__ import annotations

import os

import torch

#: family → (UNet kwargs, VAE kwargs, text encoders: (component, kind, layers, projection)); CLIP-L is 64 wide,
#: OpenCLIP-H / bigG 128 (two 64-wide heads), so that no two text encoders of a family have the same shapes
FAMILIES = {
    "sd1": (dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=64, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
            dict(block_out_channels=(32, 32, 64, 64)), (("text_encoder", "clip-l", 12, False),)),
    "sd2": (dict(block_out_channels=(64, 64, 128, 128), cross_attention_dim=128, attention_head_dim=(1, 1, 2, 2),
                 use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
            dict(block_out_channels=(32, 32, 64, 64)), (("text_encoder", "openclip", 23, False),)),
    "sdxl-base": (dict(block_out_channels=(64, 64, 128), cross_attention_dim=64 + 128, attention_head_dim=(1, 1, 2),
                       use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=128 + 6 * 8),
                  dict(block_out_channels=(32, 32, 64, 64), scaling_factor=0.13025, force_upcast=True),
                  (("text_encoder", "clip-l", 12, False), ("text_encoder_2", "openclip", 32, True))),
    "sdxl-refiner": (dict(block_out_channels=(64, 64, 128, 128), cross_attention_dim=128,
                          attention_head_dim=(1, 1, 2, 2), use_linear_projection=True, transformer_layers_per_block=4,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=128 + 5 * 8),
                     dict(block_out_channels=(32, 32, 64, 64), scaling_factor=0.13025, force_upcast=True),
                     (("text_encoder_2", "openclip", 32, True),)),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05) + (1.0 if p.ndim == 1 else 0))


def unet(family: str, in_channels: int = 4, seed: int = 1):
    from diffusers import UNet2DConditionModel

    kwargs = FAMILIES[family][0]
    model = UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2,
                                 norm_num_groups=32, **kwargs)
    _randomize(model, seed)
    return model.eval()


def vae(family: str = "sd1", seed: int = 2):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          sample_size=64, **FAMILIES[family][1])
    _randomize(model, seed)
    return model.eval()


def text_encoder(kind: str, layers: int, projection: bool, seed: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width = 64 if kind == "clip-l" else 128
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width,
                            hidden_act="quick_gelu" if kind == "clip-l" else "gelu", bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    _randomize(model, seed)
    return model.eval()


def controlnet(seed: int = 4):
    from diffusers import ControlNetModel

    kwargs = {k: v for k, v in FAMILIES["sd1"][0].items() if k != "up_block_types"}
    model = ControlNetModel(in_channels=4, layers_per_block=2, norm_num_groups=32,
                            conditioning_embedding_out_channels=(16, 32, 96, 256), **kwargs)
    _randomize(model, seed)
    return model.eval()


def save_pipeline(family: str, folder: str, *, in_channels: int = 4, prediction_type: str = "epsilon") -> str:
    """A whole tiny pipeline as a diffusers folder, with the tokenizers sdport ships (real CLIP BPE)."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    from sdport.families.configs import tokenizer_files

    tok_dir = os.path.join(folder + ".tokenizers")
    tokenizers = {}
    for pad in ("<|endoftext|>", "!"):
        sub = os.path.join(tok_dir, "openclip" if pad == "!" else "clip-l")
        os.makedirs(sub, exist_ok=True)
        for name, data in tokenizer_files(pad).items():
            with open(os.path.join(sub, name), "wb") as f:
                f.write(data)
        tokenizers[pad] = CLIPTokenizer.from_pretrained(sub)
    # the schedulers of the released pipelines (SD1.5: PNDM, SD2.1: DDIM, SDXL: Euler), as their Hub configs set them
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
                 steps_offset=1, timestep_spacing="leading")
    parts = {"unet": unet(family, in_channels), "vae": vae(family)}
    for k, (component, kind, layers, projection) in enumerate(FAMILIES[family][2]):
        parts[component] = text_encoder(kind, layers, projection, seed=10 + k)
        pad = "<|endoftext|>" if kind == "clip-l" else "!"
        parts[component.replace("text_encoder", "tokenizer")] = tokenizers[pad]
    if family == "sdxl-base":
        pipe = StableDiffusionXLPipeline(scheduler=EulerDiscreteScheduler(**betas, interpolation_type="linear"),
                                         **parts)
    elif family == "sdxl-refiner":
        pipe = StableDiffusionXLImg2ImgPipeline(scheduler=EulerDiscreteScheduler(**betas, interpolation_type="linear"),
                                                text_encoder=None,
                                                tokenizer=None, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False, **parts)
    else:
        cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
        scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False) if family == "sd2" else \
            PNDMScheduler(**betas, skip_prk_steps=True, set_alpha_to_one=False)
        pipe = cls(scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                   **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
