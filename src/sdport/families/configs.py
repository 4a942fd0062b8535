"""diffusers and transformers config files derived from tensor shapes plus the family's facts — no Hub look-ups.

Every number that is in the weights (channels, depths, vocabulary, layers) is read from the shapes
of the diffusers-side tensors; what is not (head layout, activation, sample size, scaling,
scheduler) comes from the ``Family`` row. ``files`` returns every non-weight file of a pipeline
folder: ``model_index.json``, configs, scheduler and the bundled CLIP tokenizer.
"""

from __future__ import annotations

import json
import re
from importlib import resources

from ..io.diffusers import SCHEDULER_SOURCE
from . import FAMILIES
from .base import Family
from .parts.unet import CONV_HEADS, UNetLayout
from .parts.vae import VAELayout

Shapes = dict[str, tuple[int, ...]]
DIFFUSERS_VERSION = "0.30.0"
#: hidden size per head of every CLIP text encoder SD uses (CLIP-L 12 × 64, OpenCLIP-H 16 × 64, bigG 20 × 64)
CLIP_HEAD_DIM = 64
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
         "trained_betas": None, "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False}
SCHEDULERS = {
    "PNDMScheduler": {"skip_prk_steps": True, "clip_sample": False},
    "DDIMScheduler": {"clip_sample": False},
    "EulerDiscreteScheduler": {"interpolation_type": "linear", "use_karras_sigmas": False, "skip_prk_steps": True,
                               "sample_max_value": 1.0},
}


def _count(shapes: Shapes, pattern: str) -> int:
    return len({m[1] for k in shapes if (m := re.match(pattern, k))})


def _find(shapes: Shapes, suffix: str) -> tuple[int, ...] | None:
    return next((s for k, s in shapes.items() if k.endswith(suffix)), None)


def unet_heads(family: Family, linear: bool) -> tuple[str, int]:
    """The head layout: the family's, or for a UNet/ControlNet alone, SD1's (8 heads) when it projects with convs."""
    if family.unet_heads is None:
        return ("dim", 64) if linear else CONV_HEADS
    return family.unet_heads


def unet_config(shapes: Shapes, family: Family, layout: UNetLayout, *, pooled_dim: int | None = None) -> dict:
    """UNet2DConditionModel's (or ControlNetModel's) config from the diffusers-side shapes."""
    boc = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(layout.levels)]
    cross = _find(shapes, "attn2.to_k.weight")[1]
    # transformer blocks per attention level; levels without attention take the common depth if there is one
    # (else 1), except the last, whose value diffusers gives the mid block
    depth = [_count(shapes, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
             for i in range(layout.levels)]
    mid = max(1, _count(shapes, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    common = {d for d in depth if d} | {mid}
    fill = common.pop() if len(common) == 1 else 1
    depth = [d or fill for d in depth[:-1]] + [depth[-1] or mid]
    linear = len(_find(shapes, "proj_in.weight")) == 2
    kind, n = unet_heads(family, linear)
    cfg = {
        "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "attention_head_dim": n if kind == "count" else [c // n for c in boc],
        "block_out_channels": boc, "cross_attention_dim": cross, "downsample_padding": 1, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": shapes["conv_in.weight"][1], "layers_per_block": layout.layers,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attn],
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "sample_size": family.sample_size // 8, "upcast_attention": False,
    }
    if "add_embedding.linear_1.weight" in shapes:
        adm = shapes["add_embedding.linear_1.weight"][1]
        # SDXL conditions on the pooled text embedding plus 6 (base) or 5 (refiner) sinusoidal sizes of 256
        count = family.time_ids
        time_dim = (adm - pooled_dim) // count if pooled_dim and (adm - pooled_dim) % count == 0 else 256
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                   projection_class_embeddings_input_dim=adm)
    if layout.controlnet:
        cfg.update(_class_name="ControlNetModel",
                   conditioning_channels=shapes["controlnet_cond_embedding.conv_in.weight"][1],
                   conditioning_embedding_out_channels=[
                       shapes[f"controlnet_cond_embedding.blocks.{k}.weight"][0] for k in range(0, 6, 2)
                   ] + [shapes["controlnet_cond_embedding.conv_out.weight"][1]],
                   controlnet_conditioning_channel_order="rgb")
        del cfg["sample_size"]
    else:
        cfg.update(_class_name="UNet2DConditionModel", out_channels=shapes["conv_out.weight"][0],
                   center_input_sample=False,
                   up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attn])
    return cfg


def vae_config(shapes: Shapes, family: Family, layout: VAELayout) -> dict:
    """AutoencoderKL's config from the diffusers-side shapes."""
    boc = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(layout.levels)]
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": boc, "down_block_types": ["DownEncoderBlock2D"] * layout.levels,
        "up_block_types": ["UpDecoderBlock2D"] * layout.levels, "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0], "latent_channels": shapes["post_quant_conv.weight"][0],
        "layers_per_block": layout.layers, "norm_num_groups": 32, "sample_size": family.sample_size,
        "scaling_factor": family.vae_scale, "force_upcast": family.vae_upcast,
    }


def text_config(shapes: Shapes, kind: str) -> dict:
    """CLIPTextConfig for CLIP-L (``clip-l``) or OpenCLIP (``openclip``) from the diffusers-side shapes."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    projection = shapes.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
        "initializer_range": 0.02, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "hidden_act": "quick_gelu" if kind == "clip-l" else "gelu", "hidden_size": hidden,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM),
        "num_hidden_layers": _count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        "projection_dim": projection[0] if projection else hidden, "vocab_size": vocab,
    }


def scheduler_config(family: Family, prediction_type: str, *, zero_snr: bool = False, origin: str = "default"
                     ) -> dict:
    """The family's scheduler; a zero-terminal-SNR model gets DDIM (PNDM cannot rescale) with rescaled betas.
    ``origin`` (``detect.prediction_origin``) is kept under a private key diffusers does not read."""
    name = "DDIMScheduler" if zero_snr and family.scheduler == "PNDMScheduler" else family.scheduler
    cfg = {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, SCHEDULER_SOURCE: origin,
           **BETAS, **SCHEDULERS[name], "prediction_type": prediction_type}
    if zero_snr:
        cfg.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cfg


def tokenizer_files(pad: str) -> dict[str, bytes]:
    """CLIP's BPE tokenizer (bundled with sdport); ``pad`` is ``<|endoftext|>`` for CLIP-L, ``!`` for OpenCLIP."""
    data = resources.files("sdport") / "data" / "clip"
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", "clean_up_tokenization_spaces": True}
    return {"vocab.json": (data / "vocab.json").read_bytes(), "merges.txt": (data / "merges.txt").read_bytes(),
            "special_tokens_map.json": json_bytes(special), "tokenizer_config.json": json_bytes(config)}


def tokenizer_for(kind: str) -> dict[str, bytes]:
    """The tokenizer files of a text encoder of this kind: CLIP-L pads with ``<|endoftext|>``, OpenCLIP with ``!``."""
    return tokenizer_files("<|endoftext|>" if kind == "clip-l" else "!")


def model_index(family: Family, components: set[str], variant: str, scheduler: str) -> dict:
    """model_index.json of the pipeline; components left out (``--components``) are written as null."""
    pipeline = family.inpaint_pipeline if variant == "inpaint" and family.inpaint_pipeline else family.pipeline
    entries = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "scheduler": ["diffusers", scheduler]}
    for part in family.parts:
        if part.component.startswith("text_encoder"):
            cls = "CLIPTextModelWithProjection" if part.projection else "CLIPTextModel"
            entries[part.component] = ["transformers", cls]
            entries[part.component.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION}
    for name, value in entries.items():
        needs = name.replace("tokenizer", "text_encoder")  # a tokenizer is written with its text encoder
        index[name] = value if needs in components or name == "scheduler" else [None, None]
    index.update(family.index)
    return index


def json_bytes(obj: object) -> bytes:
    """A config file's bytes as diffusers and transformers write them: indented, sorted keys, final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def pipeline_files(family_name: str, shapes: dict[str, Shapes], layouts: dict, *, prediction_type: str,
                   variant: str = "", zero_snr: bool = False, origin: str = "default") -> dict[str, bytes]:
    """Every non-weight file of a diffusers folder for the components in ``shapes`` (component → shapes)."""
    family = FAMILIES[family_name]
    files: dict[str, bytes] = {}
    folder = "{}/" if family.whole else ""  # a component alone is its own folder
    pooled = shapes.get("text_encoder_2", {}).get("text_projection.weight", (None,))[0]
    for component, comp_shapes in shapes.items():
        part = family.part(component)
        if part.kind in ("unet", "controlnet"):
            cfg = unet_config(comp_shapes, family, layouts[component], pooled_dim=pooled)
        elif part.kind == "vae":
            cfg = vae_config(comp_shapes, family, layouts[component])
        else:
            cfg = text_config(comp_shapes, part.kind)
            tokenizer = component.replace("text_encoder", "tokenizer")
            files.update({f"{tokenizer}/{k}": v for k, v in tokenizer_for(part.kind).items()})
        files[folder.format(component) + "config.json"] = json_bytes(cfg)
    if family.whole:
        scheduler = scheduler_config(family, prediction_type, zero_snr=zero_snr, origin=origin)
        files["scheduler/scheduler_config.json"] = json_bytes(scheduler)
        files["model_index.json"] = json_bytes(model_index(family, set(shapes), variant, scheduler["_class_name"]))
    return files
