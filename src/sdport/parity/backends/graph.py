"""Stable Diffusion's components as plain functions of their diffusers-named weights, over any tensor library.

For runtimes that have no diffusers port that runs on the CPU (MindSpore: MindOne's ``mindone.diffusers``
needs Ascend kernels), the text encoders (CLIP-L, OpenCLIP), the UNet (SD1, SD2, SDXL, inpainting) and
the VAE are written here once, from their configs, as diffusers computes them; a runtime supplies only
``Ops`` — a dozen primitives (conv, matmul, norms, activations, reshapes). Index and sinusoid tables
(token lookup, timestep embeddings) are computed in numpy, in fp32, as diffusers does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

T = Any  # a tensor of the runtime


class Ops(Protocol):
    """The primitives a runtime gives the graphs (NCHW images, row-major matrices)."""

    def tensor(self, array: np.ndarray) -> T: ...
    def numpy(self, x: T) -> np.ndarray: ...
    def conv2d(self, x: T, w: T, b: T | None, stride: int, padding: int | tuple[int, int, int, int]) -> T: ...
    def matmul(self, a: T, b: T) -> T: ...  # batched over leading axes
    def transpose(self, x: T, perm: tuple[int, ...]) -> T: ...
    def reshape(self, x: T, shape: tuple[int, ...]) -> T: ...
    def concat(self, xs: list[T], axis: int) -> T: ...
    def mean(self, x: T, axes: tuple[int, ...]) -> T: ...  # keeps the reduced axes
    def rsqrt(self, x: T) -> T: ...
    def softmax(self, x: T) -> T: ...  # over the last axis
    def sigmoid(self, x: T) -> T: ...
    def erf(self, x: T) -> T: ...
    def upsample2x(self, x: T) -> T: ...  # nearest
    def shape(self, x: T) -> tuple[int, ...]: ...


class Weights:
    """A component's weights by diffusers name, turned into runtime tensors on first use (each once)."""

    def __init__(self, ops: Ops, arrays: Mapping[str, np.ndarray]):
        self.ops, self.arrays, self.cache = ops, arrays, {}

    def __call__(self, name: str) -> T:
        if name not in self.cache:
            self.cache[name] = self.ops.tensor(np.ascontiguousarray(self.arrays[name], np.float32))
        return self.cache[name]

    def has(self, name: str) -> bool:
        return name in self.arrays


# -- layers --------------------------------------------------------------------------------------------------------

def linear(o: Ops, w: Weights, name: str, x: T) -> T:
    """x Wᵀ + b, with Wᵀ made once per weight."""
    key = f"{name}.weight^T"
    if key not in w.cache:
        w.cache[key] = o.tensor(np.ascontiguousarray(np.asarray(w.arrays[f"{name}.weight"], np.float32).T))
    y = o.matmul(x, w.cache[key])
    return y + w(f"{name}.bias") if w.has(f"{name}.bias") else y


def conv(o: Ops, w: Weights, name: str, x: T, *, stride: int = 1, padding: Any = None) -> T:
    k = w.arrays[f"{name}.weight"].shape[-1]
    return o.conv2d(x, w(f"{name}.weight"), w(f"{name}.bias") if w.has(f"{name}.bias") else None, stride,
                    k // 2 if padding is None else padding)


def group_norm(o: Ops, w: Weights, name: str, x: T, groups: int, eps: float) -> T:
    b, c, h, wd = o.shape(x)
    g = o.reshape(x, (b, groups, -1))
    mean = o.mean(g, (2,))
    var = o.mean((g - mean) * (g - mean), (2,))
    g = o.reshape((g - mean) * o.rsqrt(var + eps), (b, c, h, wd))
    return g * o.reshape(w(f"{name}.weight"), (1, c, 1, 1)) + o.reshape(w(f"{name}.bias"), (1, c, 1, 1))


def layer_norm(o: Ops, w: Weights, name: str, x: T, eps: float = 1e-5) -> T:
    mean = o.mean(x, (-1,))
    var = o.mean((x - mean) * (x - mean), (-1,))
    return (x - mean) * o.rsqrt(var + eps) * w(f"{name}.weight") + w(f"{name}.bias")


def silu(o: Ops, x: T) -> T:
    return x * o.sigmoid(x)


def gelu(o: Ops, x: T) -> T:
    return x * (o.erf(x * (1 / math.sqrt(2))) + 1.0) * 0.5


def attention(o: Ops, q: T, k: T, v: T, heads: int, mask: T | None = None) -> T:
    """softmax(q kᵀ / √d + mask) v over ``heads`` heads; (b, n, c) in and out."""
    b, n, c = o.shape(q)
    m, d = o.shape(k)[1], c // heads
    q = o.transpose(o.reshape(q, (b, n, heads, d)), (0, 2, 1, 3))
    k = o.transpose(o.reshape(k, (b, m, heads, d)), (0, 2, 3, 1))
    v = o.transpose(o.reshape(v, (b, m, heads, d)), (0, 2, 1, 3))
    scores = o.matmul(q, k) * (1 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask
    out = o.matmul(o.softmax(scores), v)
    return o.reshape(o.transpose(out, (0, 2, 1, 3)), (b, n, c))


def sinusoids(t: np.ndarray, dim: int, *, flip: bool = True, shift: float = 0.0) -> np.ndarray:
    """diffusers' ``get_timestep_embedding`` in fp32."""
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float32) / (half - shift)).astype(np.float32)
    args = t.astype(np.float32)[:, None] * freqs[None]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    return np.concatenate([emb[:, half:], emb[:, :half]], axis=-1) if flip else emb


# -- UNet ----------------------------------------------------------------------------------------------------------

def resnet(o: Ops, w: Weights, name: str, x: T, emb: T | None, groups: int, eps: float) -> T:
    h = conv(o, w, f"{name}.conv1", silu(o, group_norm(o, w, f"{name}.norm1", x, groups, eps)))
    if emb is not None:
        h = h + o.reshape(linear(o, w, f"{name}.time_emb_proj", silu(o, emb)), (o.shape(h)[0], -1, 1, 1))
    h = conv(o, w, f"{name}.conv2", silu(o, group_norm(o, w, f"{name}.norm2", h, groups, eps)))
    return (conv(o, w, f"{name}.conv_shortcut", x) if w.has(f"{name}.conv_shortcut.weight") else x) + h


def transformer(o: Ops, w: Weights, name: str, x: T, context: T, heads: int, layers: int, linear_proj: bool,
                groups: int) -> T:
    b, c, hgt, wd = o.shape(x)
    h = group_norm(o, w, f"{name}.norm", x, groups, 1e-6)

    def flat(t: T) -> T:
        return o.reshape(o.transpose(t, (0, 2, 3, 1)), (b, hgt * wd, -1))

    h = linear(o, w, f"{name}.proj_in", flat(h)) if linear_proj else flat(conv(o, w, f"{name}.proj_in", h))
    for k in range(layers):
        blk = f"{name}.transformer_blocks.{k}"
        n = layer_norm(o, w, f"{blk}.norm1", h)
        h = h + _attn(o, w, f"{blk}.attn1", n, n, heads)
        n = layer_norm(o, w, f"{blk}.norm2", h)
        h = h + _attn(o, w, f"{blk}.attn2", n, context, heads)
        proj = linear(o, w, f"{blk}.ff.net.0.proj", layer_norm(o, w, f"{blk}.norm3", h))
        inner = o.shape(proj)[-1] // 2
        value, gate = _halves(o, proj, inner)
        h = h + linear(o, w, f"{blk}.ff.net.2", value * gelu(o, gate))
    if linear_proj:
        h = linear(o, w, f"{name}.proj_out", h)
    h = o.transpose(o.reshape(h, (b, hgt, wd, -1)), (0, 3, 1, 2))
    return (h if linear_proj else conv(o, w, f"{name}.proj_out", h)) + x


def _halves(o: Ops, x: T, n: int) -> tuple[T, T]:
    """The two halves of the last axis (GEGLU's value and gate), by reshaping: (…, 2n) → (…, 2, n)."""
    shape = o.shape(x)
    both = o.transpose(o.reshape(x, (*shape[:-1], 2, n)), (len(shape) - 1, *range(len(shape) - 1), len(shape)))
    return both[0], both[1]


def _attn(o: Ops, w: Weights, name: str, x: T, context: T, heads: int) -> T:
    q, k, v = (linear(o, w, f"{name}.{p}", s) for p, s in (("to_q", x), ("to_k", context), ("to_v", context)))
    return linear(o, w, f"{name}.to_out.0", attention(o, q, k, v, heads))


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet(o: Ops, w: Weights, cfg: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """UNet2DConditionModel's forward: ``sample``, ``timestep``, ``encoder_hidden_states`` (and SDXL's
    ``text_embeds``, ``time_ids``) → ``out_sample``."""
    boc, n = cfg["block_out_channels"], len(cfg["block_out_channels"])
    heads = _per_block(cfg.get("num_attention_heads") or cfg["attention_head_dim"], n)
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), n)
    per = _per_block(cfg["layers_per_block"], n)
    groups, eps, lin = cfg.get("norm_num_groups", 32), cfg.get("norm_eps", 1e-5), cfg.get("use_linear_projection")
    flip, shift = cfg.get("flip_sin_to_cos", True), cfg.get("freq_shift", 0)
    x = o.tensor(inputs["sample"])
    batch = o.shape(x)[0]
    t = np.broadcast_to(inputs["timestep"].astype(np.float32).reshape(-1), (batch,))
    emb = _mlp(o, w, "time_embedding", o.tensor(sinusoids(t, boc[0], flip=flip, shift=shift)))
    if cfg.get("addition_embed_type") == "text_time":
        times = sinusoids(inputs["time_ids"].reshape(-1), cfg["addition_time_embed_dim"], flip=flip, shift=shift)
        added = np.concatenate([inputs["text_embeds"], times.reshape(batch, -1)], axis=-1)
        emb = emb + _mlp(o, w, "add_embedding", o.tensor(added.astype(np.float32)))
    context = o.tensor(inputs["encoder_hidden_states"])
    h = conv(o, w, "conv_in", x)
    skips = [h]
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(per[i]):
            h = resnet(o, w, f"down_blocks.{i}.resnets.{j}", h, emb, groups, eps)
            if "CrossAttn" in kind:
                h = transformer(o, w, f"down_blocks.{i}.attentions.{j}", h, context, heads[i], depth[i], lin, groups)
            skips.append(h)
        if i < n - 1:
            h = conv(o, w, f"down_blocks.{i}.downsamplers.0.conv", h, stride=2)
            skips.append(h)
    h = resnet(o, w, "mid_block.resnets.0", h, emb, groups, eps)
    if w.has("mid_block.resnets.1.conv1.weight"):
        h = transformer(o, w, "mid_block.attentions.0", h, context, heads[-1], depth[-1], lin, groups)
        h = resnet(o, w, "mid_block.resnets.1", h, emb, groups, eps)
    rheads, rdepth, rper = heads[::-1], depth[::-1], per[::-1]
    for i, kind in enumerate(cfg["up_block_types"]):
        for j in range(rper[i] + 1):
            h = resnet(o, w, f"up_blocks.{i}.resnets.{j}", o.concat([h, skips.pop()], 1), emb, groups, eps)
            if "CrossAttn" in kind:
                h = transformer(o, w, f"up_blocks.{i}.attentions.{j}", h, context, rheads[i], rdepth[i], lin, groups)
        if i < n - 1:
            h = conv(o, w, f"up_blocks.{i}.upsamplers.0.conv", o.upsample2x(h))
    h = silu(o, group_norm(o, w, "conv_norm_out", h, groups, eps))
    return {"out_sample": o.numpy(conv(o, w, "conv_out", h))}


def _mlp(o: Ops, w: Weights, name: str, x: T) -> T:
    return linear(o, w, f"{name}.linear_2", silu(o, linear(o, w, f"{name}.linear_1", x)))


# -- VAE -----------------------------------------------------------------------------------------------------------

def _vae_mid(o: Ops, w: Weights, name: str, h: T, groups: int) -> T:
    h = resnet(o, w, f"{name}.resnets.0", h, None, groups, 1e-6)
    if w.has(f"{name}.attentions.0.to_q.weight"):
        a = f"{name}.attentions.0"
        b, c, hgt, wd = o.shape(h)
        n = o.reshape(o.transpose(o.reshape(group_norm(o, w, f"{a}.group_norm", h, groups, 1e-6), (b, c, -1)),
                                  (0, 2, 1)), (b, hgt * wd, c))
        out = linear(o, w, f"{a}.to_out.0", attention(o, *(linear(o, w, f"{a}.{p}", n)
                                                           for p in ("to_q", "to_k", "to_v")), 1))
        h = o.reshape(o.transpose(out, (0, 2, 1)), (b, c, hgt, wd)) + h
    return resnet(o, w, f"{name}.resnets.1", h, None, groups, 1e-6)


def vae_encoder(o: Ops, w: Weights, cfg: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """AutoencoderKL's encoder and quant_conv: ``sample`` → ``latent_sample``, the posterior's mean."""
    groups, n = cfg.get("norm_num_groups", 32), len(cfg["block_out_channels"])
    h = conv(o, w, "encoder.conv_in", o.tensor(inputs["sample"]))
    for i in range(n):
        for j in range(cfg["layers_per_block"]):
            h = resnet(o, w, f"encoder.down_blocks.{i}.resnets.{j}", h, None, groups, 1e-6)
        if i < n - 1:
            h = conv(o, w, f"encoder.down_blocks.{i}.downsamplers.0.conv", h, stride=2, padding=(0, 1, 0, 1))
    h = _vae_mid(o, w, "encoder.mid_block", h, groups)
    h = conv(o, w, "encoder.conv_out", silu(o, group_norm(o, w, "encoder.conv_norm_out", h, groups, 1e-6)))
    moments = o.numpy(conv(o, w, "quant_conv", h)) if w.has("quant_conv.weight") else o.numpy(h)
    return {"latent_sample": moments[:, : moments.shape[1] // 2]}


def vae_decoder(o: Ops, w: Weights, cfg: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """post_quant_conv and AutoencoderKL's decoder: ``latent_sample`` → ``sample``."""
    groups, n = cfg.get("norm_num_groups", 32), len(cfg["block_out_channels"])
    h = o.tensor(inputs["latent_sample"])
    if w.has("post_quant_conv.weight"):
        h = conv(o, w, "post_quant_conv", h)
    h = _vae_mid(o, w, "decoder.mid_block", conv(o, w, "decoder.conv_in", h), groups)
    for i in range(n):
        for j in range(cfg["layers_per_block"] + 1):
            h = resnet(o, w, f"decoder.up_blocks.{i}.resnets.{j}", h, None, groups, 1e-6)
        if i < n - 1:
            h = conv(o, w, f"decoder.up_blocks.{i}.upsamplers.0.conv", o.upsample2x(h))
    h = conv(o, w, "decoder.conv_out", silu(o, group_norm(o, w, "decoder.conv_norm_out", h, groups, 1e-6)))
    return {"sample": o.numpy(h)}


# -- CLIP text encoders --------------------------------------------------------------------------------------------

def text_encoder(o: Ops, w: Weights, cfg: dict, inputs: dict[str, np.ndarray], *, hidden: bool
                 ) -> dict[str, np.ndarray]:
    """CLIPTextModel(WithProjection): ``input_ids`` → the last hidden state, the pooled (or projected) embedding,
    and with ``hidden`` every layer's hidden state (SDXL reads the penultimate one)."""
    ids = inputs["input_ids"].astype(np.int64)
    b, n = ids.shape
    p = "text_model."
    table = np.asarray(w.arrays[f"{p}embeddings.token_embedding.weight"], np.float32)
    pos = np.asarray(w.arrays[f"{p}embeddings.position_embedding.weight"], np.float32)[:n]
    h = o.tensor(table[ids] + pos[None])
    mask = o.tensor(np.triu(np.full((n, n), np.finfo(np.float32).min, np.float32), 1)[None, None])
    heads, act = cfg["num_attention_heads"], cfg.get("hidden_act", "quick_gelu")
    states = [h]
    for k in range(cfg["num_hidden_layers"]):
        layer = f"{p}encoder.layers.{k}"
        x = layer_norm(o, w, f"{layer}.layer_norm1", h, cfg.get("layer_norm_eps", 1e-5))
        q, kk, v = (linear(o, w, f"{layer}.self_attn.{s}_proj", x) for s in "qkv")
        h = h + linear(o, w, f"{layer}.self_attn.out_proj", attention(o, q, kk, v, heads, mask))
        x = linear(o, w, f"{layer}.mlp.fc1", layer_norm(o, w, f"{layer}.layer_norm2", h, cfg.get("layer_norm_eps",
                                                                                                  1e-5)))
        x = x * o.sigmoid(x * 1.702) if act == "quick_gelu" else gelu(o, x)
        h = h + linear(o, w, f"{layer}.mlp.fc2", x)
        states.append(h)
    last = o.numpy(layer_norm(o, w, f"{p}final_layer_norm", h, cfg.get("layer_norm_eps", 1e-5)))
    eos = ids.argmax(-1) if cfg.get("eos_token_id", 2) == 2 else (ids == cfg["eos_token_id"]).argmax(-1)
    pooled = last[np.arange(b), eos]
    out = {"last_hidden_state": last}
    if w.has("text_projection.weight"):
        out["text_embeds"] = o.numpy(linear(o, w, "text_projection", o.tensor(pooled)))
    else:
        out["pooler_output"] = pooled
    if hidden:
        out.update({f"hidden_states.{i}": o.numpy(s) for i, s in enumerate(states)})
    return out


COMPONENTS: dict[str, Callable[..., dict[str, np.ndarray]]] = {"unet": unet, "vae_encoder": vae_encoder,
                                                               "vae_decoder": vae_decoder}
