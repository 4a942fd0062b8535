"""A tiny SD1.x checkpoint with the real original (LDM) key names, built deterministically.

Same blocks, layer counts and names as the released SD1.5 file (UNet, VAE, CLIP-L text encoder,
scheduler buffers), tiny channel widths, random weights from a fixed seed. Used by ``sdport demo``
and by the tests; no download. The UNet, VAE and CLIP shape builders here serve every family's demo model
(``demo_models`` builds the SDXL, ControlNet and adapters from them); ``run_demo`` is the verb.
"""

from __future__ import annotations

import numpy as np

Shapes = dict[str, tuple[int, ...]]


def _norm(out: Shapes, p: str, c: int) -> None:
    out[f"{p}.weight"] = (c,)
    out[f"{p}.bias"] = (c,)


def _lin(out: Shapes, p: str, o: int, i: int, bias: bool = True) -> None:
    out[f"{p}.weight"] = (o, i)
    if bias:
        out[f"{p}.bias"] = (o,)


def _conv(out: Shapes, p: str, o: int, i: int, k: int = 3) -> None:
    out[f"{p}.weight"] = (o, i, k, k)
    out[f"{p}.bias"] = (o,)


def _resblock(out: Shapes, p: str, cin: int, cout: int, temb: int) -> None:
    _norm(out, f"{p}.in_layers.0", cin)
    _conv(out, f"{p}.in_layers.2", cout, cin)
    _lin(out, f"{p}.emb_layers.1", cout, temb)
    _norm(out, f"{p}.out_layers.0", cout)
    _conv(out, f"{p}.out_layers.3", cout, cout)
    if cin != cout:
        _conv(out, f"{p}.skip_connection", cout, cin, 1)


def _transformer(out: Shapes, p: str, c: int, ctx: int, depth: int = 1, linear: bool = False) -> None:
    _norm(out, f"{p}.norm", c)
    (_lin if linear else _conv)(out, f"{p}.proj_in", c, c, *(() if linear else (1,)))
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            _lin(out, f"{b}.{attn}.to_q", c, c, bias=False)
            _lin(out, f"{b}.{attn}.to_k", c, kv, bias=False)
            _lin(out, f"{b}.{attn}.to_v", c, kv, bias=False)
            _lin(out, f"{b}.{attn}.to_out.0", c, c)
        _lin(out, f"{b}.ff.net.0.proj", c * 8, c)
        _lin(out, f"{b}.ff.net.2", c, c * 4)
        for n in (1, 2, 3):
            _norm(out, f"{b}.norm{n}", c)
    (_lin if linear else _conv)(out, f"{p}.proj_out", c, c, *(() if linear else (1,)))


def sd1_unet(out: Shapes, p: str, ch: int, ctx: int, mult: tuple[int, ...] = (1, 2, 4, 4)) -> None:
    """The SD1.x UNet: 12 input blocks, middle block, 12 output blocks, attention on the first 3 levels."""
    depth = tuple(1 if level < len(mult) - 1 else 0 for level in range(len(mult)))
    sgm_unet(out, p, ch, ctx, mult, depth)


def sgm_unet(out: Shapes, p: str, ch: int, ctx: int, mult: tuple[int, ...], depth: tuple[int, ...], *,
             linear: bool = False, adm: int = 0) -> None:
    """An LDM/SGM UNet: two ResBlocks per level (``depth[level]`` transformer blocks after each, none at 0),
    a middle block (the deepest level's depth, at least 1), three ResBlocks per level going up; ``linear``
    projections in and out of the transformers (SD2, SDXL); ``adm`` wide ``label_emb`` (SDXL)."""
    temb = ch * 4
    _lin(out, f"{p}time_embed.0", temb, ch)
    _lin(out, f"{p}time_embed.2", temb, temb)
    if adm:
        _lin(out, f"{p}label_emb.0.0", temb, adm)
        _lin(out, f"{p}label_emb.0.2", temb, temb)
    skips = unet_down(out, p, ch, ctx, mult, depth, linear=linear)
    cur = ch * mult[-1]
    _resblock(out, f"{p}middle_block.0", cur, cur, temb)
    _transformer(out, f"{p}middle_block.1", cur, ctx, max(depth[-1], 1), linear)
    _resblock(out, f"{p}middle_block.2", cur, cur, temb)
    i = 0
    for level, m in reversed(list(enumerate(mult))):
        for r in range(3):
            _resblock(out, f"{p}output_blocks.{i}.0", cur + skips.pop(), ch * m, temb)
            cur = ch * m
            sub = 1
            if depth[level]:
                _transformer(out, f"{p}output_blocks.{i}.1", cur, ctx, depth[level], linear)
                sub = 2
            if level > 0 and r == 2:
                _conv(out, f"{p}output_blocks.{i}.{sub}.conv", cur, cur)
            i += 1
    _norm(out, f"{p}out.0", ch)
    _conv(out, f"{p}out.2", 4, ch)


def unet_down(out: Shapes, p: str, ch: int, ctx: int, mult: tuple[int, ...], depth: tuple[int, ...], *,
              linear: bool = False) -> list[int]:
    """The UNet's input blocks (a ControlNet's too); the channels of each block's output, for the skips."""
    temb = ch * 4
    _conv(out, f"{p}input_blocks.0.0", ch, 4)
    skips, cur, i = [ch], ch, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            _resblock(out, f"{p}input_blocks.{i}.0", cur, ch * m, temb)
            cur = ch * m
            if depth[level]:
                _transformer(out, f"{p}input_blocks.{i}.1", cur, ctx, depth[level], linear)
            skips.append(cur)
            i += 1
        if level < len(mult) - 1:
            _conv(out, f"{p}input_blocks.{i}.0.op", cur, cur)
            skips.append(cur)
            i += 1
    return skips


def _vae_block(out: Shapes, p: str, cin: int, cout: int) -> None:
    _norm(out, f"{p}.norm1", cin)
    _conv(out, f"{p}.conv1", cout, cin)
    _norm(out, f"{p}.norm2", cout)
    _conv(out, f"{p}.conv2", cout, cout)
    if cin != cout:
        _conv(out, f"{p}.nin_shortcut", cout, cin, 1)


def _vae_mid(out: Shapes, p: str, c: int) -> None:
    _vae_block(out, f"{p}.mid.block_1", c, c)
    _norm(out, f"{p}.mid.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(out, f"{p}.mid.attn_1.{n}", c, c, 1)
    _vae_block(out, f"{p}.mid.block_2", c, c)


def sd_vae(out: Shapes, p: str, ch: int, mult: tuple[int, ...] = (1, 2, 4, 4), z: int = 4) -> None:
    """The KL-f8 autoencoder of SD1/SD2/SDXL in LDM names."""
    _conv(out, f"{p}encoder.conv_in", ch, 3)
    cur = ch
    for level, m in enumerate(mult):
        for b in range(2):
            _vae_block(out, f"{p}encoder.down.{level}.block.{b}", cur, ch * m)
            cur = ch * m
        if level < len(mult) - 1:
            _conv(out, f"{p}encoder.down.{level}.downsample.conv", cur, cur)
    _vae_mid(out, f"{p}encoder", cur)
    _norm(out, f"{p}encoder.norm_out", cur)
    _conv(out, f"{p}encoder.conv_out", 2 * z, cur)
    _conv(out, f"{p}decoder.conv_in", cur, z)
    _vae_mid(out, f"{p}decoder", cur)
    for level, m in reversed(list(enumerate(mult))):
        for b in range(3):
            _vae_block(out, f"{p}decoder.up.{level}.block.{b}", cur, ch * m)
            cur = ch * m
        if level > 0:
            _conv(out, f"{p}decoder.up.{level}.upsample.conv", cur, cur)
    _norm(out, f"{p}decoder.norm_out", cur)
    _conv(out, f"{p}decoder.conv_out", 3, cur)
    _conv(out, f"{p}quant_conv", 2 * z, 2 * z, 1)
    _conv(out, f"{p}post_quant_conv", z, z, 1)


def clip_l(out: Shapes, p: str, d: int, layers: int = 12, vocab: int = 49408) -> None:
    """CLIP-L's text transformer in transformers' names (``text_model.`` level included)."""
    out[f"{p}text_model.embeddings.token_embedding.weight"] = (vocab, d)
    out[f"{p}text_model.embeddings.position_embedding.weight"] = (77, d)
    for i in range(layers):
        lp = f"{p}text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _lin(out, f"{lp}.self_attn.{n}", d, d)
        _norm(out, f"{lp}.layer_norm1", d)
        _lin(out, f"{lp}.mlp.fc1", d * 4, d)
        _lin(out, f"{lp}.mlp.fc2", d, d * 4)
        _norm(out, f"{lp}.layer_norm2", d)
    _norm(out, f"{p}text_model.final_layer_norm", d)


SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def sd1_shapes(width: int = 32, *, full_size: bool = False) -> Shapes:
    """Name → shape of every weight of an SD1.x single file: tiny (all widths ``width``) or SD1.5's real sizes."""
    unet, ctx, vae = (320, 768, 128) if full_size else (width, width, width)
    shapes: Shapes = {}
    sd1_unet(shapes, "model.diffusion_model.", unet, ctx)
    sd_vae(shapes, "first_stage_model.", vae)
    clip_l(shapes, "cond_stage_model.transformer.", ctx)
    return shapes


def sd1_checkpoint(width: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """A whole SD1.x single-file state dict (fp32) with tiny widths and the real key names."""
    shapes = sd1_shapes(width)
    rng = np.random.default_rng(seed)
    sd = {}
    for name in SCHEDULE_BUFFERS:
        sd[name] = rng.random(1000, dtype=np.float32)
    for name, shape in shapes.items():
        if name.endswith(".bias") or "norm" in name:
            base = 1.0 if name.endswith("weight") else 0.0
            sd[name] = np.full(shape, base, np.float32) + rng.standard_normal(shape, np.float32) * 0.01
        else:
            sd[name] = rng.standard_normal(shape, np.float32) * 0.02
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return sd


def write_demo_checkpoint(path: str, *, force: bool = False) -> None:
    """Write the demo SD1.x checkpoint as a torch zip ``.ckpt`` (``{"state_dict": …}``), without torch."""
    from .io.base import Slot
    from .io.torch import TorchWriter

    sd = sd1_checkpoint()
    with TorchWriter(path, force=force, root="state_dict") as w:
        w.begin([Slot(k, "I64" if v.dtype == np.int64 else "F32", v.shape) for k, v in sd.items()])
        for k, v in sd.items():
            w.write(k, v)
        w.commit()


def run_demo(folder: str, echo) -> None:
    """Build the demo checkpoint in ``folder``, inspect it, convert it to fp16 safetensors and to a diffusers folder."""
    import os

    from .api import convert
    from .demo_models import write_extras
    from .inspection import inspect, render

    os.makedirs(folder, exist_ok=True)
    ckpt = os.path.join(folder, "demo-sd1.ckpt")
    out = os.path.join(folder, "demo-sd1.fp16.safetensors")
    write_demo_checkpoint(ckpt, force=True)
    echo(f"$ sdport inspect {ckpt}")
    echo(render(inspect(ckpt)))
    echo(f"\n$ sdport convert {ckpt} {out} --dtype fp16")
    result = convert(ckpt, out, dtype="fp16", force=True)
    echo(f"wrote {out}: {result.tensors} tensors, {result.bytes:,} bytes")
    echo(f"\n$ sdport inspect {out}")
    echo(render(inspect(out)))
    folder_out = os.path.join(folder, "demo-sd1-diffusers")
    echo(f"\n$ sdport convert {ckpt} {folder_out} --report")
    result = convert(ckpt, folder_out, force=True)
    echo(f"wrote {folder_out}: {result.tensors} tensors, {result.bytes:,} bytes, prediction type "
         f"{result.prediction_type}")
    for name, why in result.dropped.items():
        echo(f"dropped {name}: {why}")
    for root, _, files in sorted(os.walk(folder_out)):
        for name in sorted(files):
            path = os.path.join(root, name)
            echo(f"  {os.path.relpath(path, folder_out):50s} {os.path.getsize(path):>12,} bytes")
    echo("\nthe files the README's examples read:")
    write_extras(folder, echo)
