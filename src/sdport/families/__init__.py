"""The model families sdport converts, as data: which components each has, where they live in each layout.

A ``Family`` lists its ``Part``s: the diffusers component folder, the prefix of its tensors in an
original single file, the kind of name table that translates it, and the facts the weights do not
carry (head layout, pipeline class, scheduler, VAE scaling). Adding a family is adding a row here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One component of a family.

    Attributes:
        component: diffusers folder (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``controlnet``).
        ldm_prefix: where its tensors live in an original single file.
        kind: which name table translates it: ``unet``, ``vae``, ``clip-l``, ``openclip``, ``controlnet``.
        text_layers: OpenCLIP only: how many transformer layers diffusers keeps (SD2: 23 of 24).
        projection: OpenCLIP only: whether ``text_projection`` is kept (CLIPTextModelWithProjection).
    """

    component: str
    ldm_prefix: str
    kind: str
    text_layers: int | None = None
    projection: bool = False


@dataclass(frozen=True)
class Family:
    """A model family and the facts about it that are not in the weights.

    Attributes:
        unet_heads: ``("count", 8)`` — the same number of heads everywhere (SD1) — or ``("dim", 64)``.
        sample_size: default image size in pixels.
        vae_scale: the latent scaling factor.
        scheduler: diffusers scheduler class written to the pipeline.
    """

    name: str
    parts: tuple[Part, ...]
    pipeline: str
    unet_heads: tuple[str, int] = ("dim", 64)
    sample_size: int = 512
    vae_scale: float = 0.18215
    scheduler: str = "PNDMScheduler"

    def part(self, component: str) -> Part | None:
        return next((p for p in self.parts if p.component == component), None)


UNET = Part("unet", "model.diffusion_model.", "unet")
VAE = Part("vae", "first_stage_model.", "vae")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", (UNET, VAE, Part("text_encoder", "cond_stage_model.transformer.", "clip-l")),
           "StableDiffusionPipeline", unet_heads=("count", 8)),
    Family("sd2", (UNET, VAE, Part("text_encoder", "cond_stage_model.model.", "openclip", text_layers=23)),
           "StableDiffusionPipeline", sample_size=768, scheduler="DDIMScheduler"),
    Family("sdxl-base", (UNET, VAE, Part("text_encoder", "conditioner.embedders.0.transformer.", "clip-l"),
                         Part("text_encoder_2", "conditioner.embedders.1.model.", "openclip", projection=True)),
           "StableDiffusionXLPipeline", sample_size=1024, vae_scale=0.13025, scheduler="EulerDiscreteScheduler"),
    Family("sdxl-refiner", (UNET, VAE, Part("text_encoder_2", "conditioner.embedders.0.model.", "openclip",
                                            projection=True)),
           "StableDiffusionXLImg2ImgPipeline", sample_size=1024, vae_scale=0.13025,
           scheduler="EulerDiscreteScheduler"),
    # Single components. A VAE alone is written without a prefix, as sd-vae-ft-mse's .ckpt is.
    Family("vae", (Part("vae", "", "vae"),), "AutoencoderKL"),
    Family("unet", (UNET,), "UNet2DConditionModel"),
    Family("controlnet", (Part("controlnet", "control_model.", "controlnet"),), "ControlNetModel"),
)}

#: families whose original single file holds a whole pipeline
PIPELINES = ("sd1", "sd2", "sdxl-base", "sdxl-refiner")
