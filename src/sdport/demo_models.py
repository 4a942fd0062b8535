"""The demo's other files, built with numpy from a fixed seed: what the README's examples read.

A tiny SDXL base single file and a tiny SD1 ControlNet with the real original (SGM/LDM) key names, an SDXL
VAE, kohya LoRAs and a LyCORIS LoHa for the demo SD1 (real ``lora_unet_…``/``lora_te_…`` names), a
diffusers/PEFT LoRA standing in for LCM-LoRA, a MindOne LoRA checkpoint, two textual-inversion embeddings
(A1111 and diffusers), an initial latent and an onnx-web ``extras.json``. No torch, no download.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .demo import Shapes, _conv, _lin, _norm, _resblock, _transformer, clip_l, sd_vae, sgm_unet, unet_down

#: the tiny SDXL base (the tests' widths): UNet 64/64/128 wide, CLIP-L 64, OpenCLIP bigG 128, VAE 32/32/64/64
XL_UNET, XL_CLIP_L, XL_BIGG, XL_TIME = 64, 64, 128, 8
XL_VAE = (32, (1, 1, 2, 2))
#: LoRA rank and alpha of the demo adapters
RANK, ALPHA = 4, 2.0
#: what kohya's sd-scripts writes beside an SD1 LoRA
KOHYA_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
                  "ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"}
#: the SD1 UNet and CLIP modules the demo adapters touch (diffusers paths), attention projections
_ATTN = re.compile(r"(.*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0))\.weight")
_TEXT = re.compile(r"(text_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj)\.weight")


def openclip(out: Shapes, p: str, d: int, layers: int, vocab: int = 49408) -> None:
    """OpenCLIP's text transformer in its own names (fused ``in_proj``), with ``text_projection``."""
    out[f"{p}token_embedding.weight"] = (vocab, d)
    out[f"{p}positional_embedding"] = (77, d)
    for i in range(layers):
        lp = f"{p}transformer.resblocks.{i}"
        _norm(out, f"{lp}.ln_1", d)
        out[f"{lp}.attn.in_proj_weight"] = (3 * d, d)
        out[f"{lp}.attn.in_proj_bias"] = (3 * d,)
        _lin(out, f"{lp}.attn.out_proj", d, d)
        _norm(out, f"{lp}.ln_2", d)
        _lin(out, f"{lp}.mlp.c_fc", 4 * d, d)
        _lin(out, f"{lp}.mlp.c_proj", d, 4 * d)
    _norm(out, f"{p}ln_final", d)
    out[f"{p}text_projection"] = (d, d)
    out[f"{p}logit_scale"] = ()


def sdxl_shapes() -> Shapes:
    """Name → shape of every weight of the tiny SDXL base single file (SGM names, as the released file)."""
    shapes: Shapes = {}
    sgm_unet(shapes, "model.diffusion_model.", XL_UNET, XL_CLIP_L + XL_BIGG, (1, 1, 2), (0, 2, 10), linear=True,
             adm=XL_BIGG + 6 * XL_TIME)
    sd_vae(shapes, "first_stage_model.", *XL_VAE)
    clip_l(shapes, "conditioner.embedders.0.transformer.", XL_CLIP_L)
    openclip(shapes, "conditioner.embedders.1.model.", XL_BIGG, 32)
    return shapes


def controlnet_shapes(ch: int = 32, ctx: int = 32) -> Shapes:
    """Name → shape of an SD1 ControlNet in the original names (``control_model.``), for the demo SD1's widths."""
    shapes: Shapes = {}
    p = "control_model."
    _lin(shapes, f"{p}time_embed.0", ch * 4, ch)
    _lin(shapes, f"{p}time_embed.2", ch * 4, ch * 4)
    hint = (3, 16, 16, 32, 32, 96, 96, 256)
    for k, (i, o) in enumerate(zip(hint, hint[1:] + (ch,), strict=True)):
        _conv(shapes, f"{p}input_hint_block.{2 * k}", o, i)
    skips = unet_down(shapes, p, ch, ctx, (1, 2, 4, 4), (1, 1, 1, 0))
    for n, c in enumerate(skips):
        _conv(shapes, f"{p}zero_convs.{n}.0", c, c, 1)
    _resblock(shapes, f"{p}middle_block.0", ch * 4, ch * 4, ch * 4)
    _transformer(shapes, f"{p}middle_block.1", ch * 4, ctx)
    _resblock(shapes, f"{p}middle_block.2", ch * 4, ch * 4, ch * 4)
    _conv(shapes, f"{p}middle_block_out.0", ch * 4, ch * 4, 1)
    return shapes


def weights(shapes: Shapes, seed: int, scale: float = 0.02) -> dict[str, np.ndarray]:
    """Random fp32 weights for ``shapes``: norms near 1 (and biases near 0), the rest small and centred."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".bias") or re.search(r"norm|ln_", name):
            base = 1.0 if not name.endswith("bias") else 0.0
            out[name] = np.full(shape, base, np.float32) + rng.standard_normal(shape, np.float32) * 0.01
        elif name.endswith("logit_scale"):
            out[name] = np.array(np.log(100.0), np.float32)
        else:
            out[name] = rng.standard_normal(shape, np.float32) * scale
    return out


def save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors (``.safetensors``) or a MindSpore checkpoint (``.ckpt``), atomically."""
    from .dtypes import code_of
    from .io.base import Slot
    from .io.mindspore import MindSporeWriter
    from .io.safetensors import SafetensorsWriter

    writer = MindSporeWriter(path, force=True) if path.endswith(".ckpt") else SafetensorsWriter(path, force=True)
    with writer as w:
        w.begin([Slot(k, code_of(v), v.shape) for k, v in tensors.items()], metadata or {})
        for k, v in tensors.items():
            w.write(k, v)
        w.commit()


def _modules(diffusers_folder: str) -> dict[str, tuple[int, int]]:
    """The SD1 attention projections of a diffusers folder: ``unet.PATH`` / ``text_encoder.PATH`` → (out, in)."""
    from safetensors import safe_open

    found = {}
    for component, pattern in (("unet", _ATTN), ("text_encoder", _TEXT)):
        folder = os.path.join(diffusers_folder, component)
        name = next(n for n in sorted(os.listdir(folder)) if n.endswith(".safetensors"))
        with safe_open(os.path.join(folder, name), "np") as f:
            for key in f.keys():
                m = pattern.fullmatch(key)
                if m:
                    out_, in_ = f.get_slice(key).get_shape()
                    found[f"{component}.{m.group(1)}"] = (out_, in_)
    return found


def kohya_name(module: str) -> str:
    """kohya's name of a diffusers module: ``lora_unet_`` / ``lora_te_`` + the path with underscores."""
    component, path = module.split(".", 1)
    return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")


def kohya_lora(modules: dict[str, tuple[int, int]], seed: int, *, unet_only: bool = False,
               loha: bool = False) -> dict[str, np.ndarray]:
    """A kohya LoRA (``lora_down``/``lora_up``/``alpha``) or LyCORIS LoHa (``hada_w1_a``…) over ``modules``."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (o, i) in sorted(modules.items()):
        if unet_only and not module.startswith("unet."):
            continue
        k = kohya_name(module)
        if loha:
            for n in ("1", "2"):
                out[f"{k}.hada_w{n}_a"] = rng.standard_normal((o, RANK), np.float32) * 0.3
                out[f"{k}.hada_w{n}_b"] = rng.standard_normal((RANK, i), np.float32) * 0.3
        else:
            out[f"{k}.lora_down.weight"] = rng.standard_normal((RANK, i), np.float32) * 0.1
            out[f"{k}.lora_up.weight"] = rng.standard_normal((o, RANK), np.float32) * 0.1
        out[f"{k}.alpha"] = np.array(ALPHA, np.float32)
    return out


def peft_lora(modules: dict[str, tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
    """A diffusers/PEFT LoRA on the UNet (``unet.….lora_A.weight``/``lora_B.weight``; alpha = rank), as LCM-LoRA."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (o, i) in sorted(modules.items()):
        if module.startswith("unet."):
            out[f"{module}.lora_A.weight"] = rng.standard_normal((RANK, i), np.float32) * 0.1
            out[f"{module}.lora_B.weight"] = rng.standard_normal((o, RANK), np.float32) * 0.1
    return out


def mindone_lora(seed: int) -> dict[str, np.ndarray]:
    """MindOne's SD1 LoRA: ``lora_down``/``lora_up`` on the original UNet's attention paths, no alpha."""
    from .demo import sd1_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sd1_shapes().items():
        m = re.fullmatch(r"(model\.diffusion_model\..*\.attn[12]\.to_[qkv])\.weight", name)
        if m:
            out[f"{m.group(1)}.lora_down.weight"] = rng.standard_normal((RANK, shape[1]), np.float32) * 0.1
            out[f"{m.group(1)}.lora_up.weight"] = rng.standard_normal((shape[0], RANK), np.float32) * 0.1
    return out


def extras(ckpt: str, lora: str, embedding: str) -> dict:
    """An onnx-web ``extras.json`` over the demo files (paths relative to it): two ONNX models and a LoRA."""
    return {
        "diffusion": [
            {"name": "diffusion-demo", "source": ckpt, "format": "ckpt",
             "loras": [{"name": "style", "source": lora, "weight": 0.8, "type": "lora", "model": "sd-scripts"}],
             "inversions": [{"name": "easyneg", "source": embedding, "token": "easyneg", "model": "embeddings"}]},
            {"name": "diffusion-knollingcase", "source": ckpt, "half": True},
        ],
        "networks": [{"name": "style", "source": lora, "type": "lora", "model": "sd-scripts"}],
    }


def write_extras(folder: str, echo) -> None:
    """Write every file of the demo beside the SD1 checkpoint and its diffusers folder, one line each."""
    def out(name: str, what: str) -> str:
        path = os.path.join(folder, name)
        echo(f"wrote {path}: {what}")
        return path

    modules = _modules(os.path.join(folder, "demo-sd1-diffusers"))
    save(os.path.join(folder, "demo-style.safetensors"), kohya_lora(modules, 11), KOHYA_METADATA)
    out("demo-style.safetensors", f"kohya LoRA for demo-sd1, UNet and text encoder, rank {RANK}")
    save(os.path.join(folder, "demo-detail.safetensors"), kohya_lora(modules, 12, unet_only=True), KOHYA_METADATA)
    out("demo-detail.safetensors", f"kohya LoRA for demo-sd1, UNet only, rank {RANK}")
    loha_metadata = {**KOHYA_METADATA, "ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}'}
    save(os.path.join(folder, "demo-loha.safetensors"), kohya_lora(modules, 13, loha=True), loha_metadata)
    out("demo-loha.safetensors", f"LyCORIS LoHa for demo-sd1, rank {RANK}")
    save(os.path.join(folder, "demo-lcm-lora.safetensors"), peft_lora(modules, 14),
         {"modelspec.architecture": "stable-diffusion-v1/lora"})
    out("demo-lcm-lora.safetensors", "diffusers/PEFT LoRA for demo-sd1 (an LCM-LoRA stand-in)")
    save(os.path.join(folder, "demo-mindone-lora.ckpt"), mindone_lora(15))
    out("demo-mindone-lora.ckpt", "MindOne LoRA (MindSpore .ckpt) for demo-sd1, no alpha stored")
    rng = np.random.default_rng(16)
    save(os.path.join(folder, "demo-embedding.safetensors"), {"emb_params": rng.standard_normal((2, 32), np.float32)})
    out("demo-embedding.safetensors", "A1111 textual-inversion embedding for demo-sd1, 2 vectors")
    save(os.path.join(folder, "demo-cat.safetensors"), {"<cat-toy>": rng.standard_normal((32,), np.float32)})
    out("demo-cat.safetensors", "diffusers learned_embeds embedding for demo-sd1 (<cat-toy>)")
    np.save(os.path.join(folder, "demo-latents.npy"), rng.standard_normal((1, 4, 8, 8), np.float32))
    out("demo-latents.npy", "an initial latent (1, 4, 8, 8) for verify --latents at --size 64x64")
    save(os.path.join(folder, "demo-sd1-ema.safetensors"), sd1_with_ema())
    out("demo-sd1-ema.safetensors", "demo-sd1 in fp16 with the UNet's EMA copy (model_ema.)")
    write_xl_and_control(folder, out)
    with open(os.path.join(folder, "extras.json"), "w") as f:
        json.dump(extras("demo-sd1.ckpt", "demo-style.safetensors", "demo-embedding.safetensors"), f, indent=2)
    out("extras.json", "onnx-web extras.json: demo-sd1 exported twice, one with a LoRA and an embedding")


def sd1_with_ema() -> dict[str, np.ndarray]:
    """The demo SD1 (fp16) with the UNet's EMA copy under ``model_ema.``, as the released SD1.5 ``-ema`` files."""
    from .demo import sd1_checkpoint
    from .steps import ema_name

    sd = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd1_checkpoint().items()}
    rng = np.random.default_rng(17)
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd[ema_name(k)] = sd[k] + (rng.standard_normal(sd[k].shape, np.float32) * 1e-3).astype(np.float16)
    sd["model_ema.decay"] = np.array(0.9999, np.float32)
    sd["model_ema.num_updates"] = np.array(10000, np.int32)
    return sd


def write_xl_and_control(folder: str, out) -> None:
    """The tiny SDXL base (fp16, as released), its VAE alone, and the SD1 ControlNet file and folder."""
    from .api import convert

    xl = {k: v.astype(np.float16) for k, v in weights(sdxl_shapes(), 21).items()}
    save(os.path.join(folder, "demo-sdxl.safetensors"), xl)
    out("demo-sdxl.safetensors", "SDXL base single file, fp16 (tiny, the released key names)")
    vae: Shapes = {}
    sd_vae(vae, "", *XL_VAE)
    save(os.path.join(folder, "demo-sdxl-vae.safetensors"), weights(vae, 22))
    out("demo-sdxl-vae.safetensors", "SDXL VAE alone (another VAE for --vae)")
    control = os.path.join(folder, "demo-controlnet.safetensors")
    save(control, weights(controlnet_shapes(), 23))
    out("demo-controlnet.safetensors", "ControlNet for demo-sd1 (control_model. names)")
    convert(control, os.path.join(folder, "demo-controlnet"), force=True)
    out("demo-controlnet", "the ControlNet as a diffusers ControlNetModel folder")
