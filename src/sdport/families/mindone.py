"""MindOne (mindspore-lab/mindone) names ⇄ the original single-file names, by rule and shape, never by line.

MindOne keeps the original prefixes and block numbering. What differs:

- every family: LayerNorm/GroupNorm ``weight``/``bias`` are ``gamma``/``beta``, ``nn.Embedding``
  weights are ``embedding_table`` (UNet, VAE and text-encoder norms alike);
- SD1/SD2 UNets (MindOne's ``ldm`` code): each conv sits in a wrapper cell (``….conv.weight``), and
  ResBlocks name their layers flat (``in_layers.0`` → ``in_layers_norm``, ``in_layers.2`` →
  ``in_layers_conv.conv``, the same for ``out_layers``);
- SD1/SD2 text encoders are one OpenCLIP-like class under ``cond_stage_model.transformer.``
  (``transformer_layer.resblocks.N.attn.attn.in_proj``, ``c_fc``/``c_proj``, ``ln_1/ln_2/ln_final``,
  ``embedding_table``, ``positional_embedding``); SD1's separate q, k, v become one ``in_proj`` of
  rows [q; k; v] (weights and biases), SD2 keeps 23 of OpenCLIP's 24 layers and no
  ``text_projection``/``logit_scale``;
- no scheduler buffers, EMA copies or ``position_ids``.

The rules are ``Pattern`` rows read in both directions (first match wins); names no rule matches
keep their name. ``to_mindone`` names one original tensor (None: not in MindOne files);
``from_mindone`` the reverse.
"""

from __future__ import annotations

import re

from .names import Pattern, translate

UNET = "model.diffusion_model."
VAE = "first_stage_model."


def _norms(prefix: str, names: tuple[str, ...]) -> list[Pattern]:
    out = []
    for n in names:
        out += [Pattern(f"{prefix}{n}.weight", f"{prefix}{n}.gamma"), Pattern(f"{prefix}{n}.bias", f"{prefix}{n}.beta")]
    return out


#: SD1/SD2 UNet (after the model prefix): conv wrappers and flat ResBlock layers first, then norms
LDM_UNET = (
    Pattern("input_blocks.0.0.{p}", "input_blocks.0.0.conv.{p}"),
    Pattern("{rest}.in_layers.0.weight", "{rest}.in_layers_norm.gamma"),
    Pattern("{rest}.in_layers.0.bias", "{rest}.in_layers_norm.beta"),
    Pattern("{rest}.in_layers.2.{p}", "{rest}.in_layers_conv.conv.{p}"),
    Pattern("{rest}.out_layers.0.weight", "{rest}.out_layers_norm.gamma"),
    Pattern("{rest}.out_layers.0.bias", "{rest}.out_layers_norm.beta"),
    Pattern("{rest}.out_layers.3.{p}", "{rest}.out_layers_conv.conv.{p}"),
    Pattern("{rest}.skip_connection.{p}", "{rest}.skip_connection.conv.{p}"),
    Pattern("{rest}.op.{p}", "{rest}.op.conv.{p}"),
    Pattern("out.2.{p}", "out.2.conv.{p}"),
    Pattern("{rest}.conv.{p}", "{rest}.conv.conv.{p}"),  # the upsamplers
    *_norms("", ("out.0",)),
    *_norms("{rest}.", ("norm", "norm{i}")),
)
#: SDXL UNet: the original names, norms renamed
SGM_UNET = (*_norms("{rest}.", ("in_layers.0", "out_layers.0", "norm", "norm{i}")), *_norms("", ("out.0",)))
VAE_RULES = tuple(_norms("{rest}.", ("norm", "norm{i}", "norm_out")))

TEXT = "cond_stage_model.transformer."
HF_TEXT = TEXT + "text_model."
_MS_LAYER = TEXT + "transformer_layer.resblocks.{i}."
#: MindOne's SD1/SD2 text encoder (one class for both), by role; ``_text_rules`` pairs them with a family's names
_MS_TEXT = {"token": TEXT + "embedding_table", "position": TEXT + "positional_embedding", "ln_final": TEXT + "ln_final",
            "ln_1": _MS_LAYER + "ln_1", "ln_2": _MS_LAYER + "ln_2", "in_proj": _MS_LAYER + "attn.attn.in_proj",
            "out_proj": _MS_LAYER + "attn.attn.out_proj", "c_fc": _MS_LAYER + "c_fc", "c_proj": _MS_LAYER + "c_proj"}


def _text_rules(original: dict[str, str]) -> tuple[Pattern, ...]:
    """Rows from a family's text-encoder names by role: embeddings whole, norms to gamma/beta, in_proj (OpenCLIP's
    ``in_proj_weight``/``in_proj_bias``) to weight/bias, linear layers param for param."""
    out = []
    for role, name in original.items():
        ms = _MS_TEXT[role]
        if role in ("token", "position"):
            out.append(Pattern(name, ms))
        elif role.startswith("ln"):
            out += [Pattern(f"{name}.weight", f"{ms}.gamma"), Pattern(f"{name}.bias", f"{ms}.beta")]
        elif role == "in_proj":
            out += [Pattern(f"{name}_weight", f"{ms}.weight"), Pattern(f"{name}_bias", f"{ms}.bias")]
        else:
            out.append(Pattern(name + ".{p}", ms + ".{p}"))
    return tuple(out)


_HF_LAYER = HF_TEXT + "encoder.layers.{i}."
SD1_TEXT = _text_rules({
    "token": HF_TEXT + "embeddings.token_embedding.weight",
    "position": HF_TEXT + "embeddings.position_embedding.weight",
    "ln_final": HF_TEXT + "final_layer_norm", "ln_1": _HF_LAYER + "layer_norm1", "ln_2": _HF_LAYER + "layer_norm2",
    "c_fc": _HF_LAYER + "mlp.fc1", "c_proj": _HF_LAYER + "mlp.fc2", "out_proj": _HF_LAYER + "self_attn.out_proj"})
#: SD1's q, k, v (original names, per layer and param) fused into MindOne's in_proj, in this row order
SD1_FUSED = re.compile(re.escape(HF_TEXT) + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
QKV = ("q", "k", "v")

_OC = "cond_stage_model.model."
_OC_LAYER = _OC + "transformer.resblocks.{i}."
SD2_TEXT = _text_rules({
    "token": _OC + "token_embedding.weight", "position": _OC + "positional_embedding", "ln_final": _OC + "ln_final",
    "ln_1": _OC_LAYER + "ln_1", "ln_2": _OC_LAYER + "ln_2", "in_proj": _OC_LAYER + "attn.in_proj",
    "out_proj": _OC_LAYER + "attn.out_proj", "c_fc": _OC_LAYER + "mlp.c_fc", "c_proj": _OC_LAYER + "mlp.c_proj"})


def _sgm_text(prefix: str, openclip: bool) -> tuple[Pattern, ...]:
    if openclip:
        return (Pattern(prefix + "token_embedding.weight", prefix + "token_embedding.embedding_table"),
                *_norms(prefix, ("ln_final",)), *_norms(prefix + "transformer.resblocks.{i}.", ("ln_{j}",)))
    hf = prefix + "text_model."
    return (Pattern(hf + "embeddings.token_embedding.weight", hf + "embeddings.token_embedding.embedding_table"),
            Pattern(hf + "embeddings.position_embedding.weight", hf + "embeddings.position_embedding.embedding_table"),
            *_norms(hf, ("final_layer_norm",)), *_norms(hf + "encoder.layers.{i}.", ("layer_norm{j}",)))


SDXL_TEXT = {"sdxl-base": (*_sgm_text("conditioner.embedders.0.transformer.", False),
                           *_sgm_text("conditioner.embedders.1.model.", True)),
             "sdxl-refiner": _sgm_text("conditioner.embedders.0.model.", True)}
#: in no MindOne file: the schedule buffers, EMA copies and position ids of the original files
#: (SD2: MindOne keeps OpenCLIP-H's first 23 layers, the ones SD2 uses, and not its projection)
NOT_IN_MINDONE = re.compile(r"(betas|alphas_cumprod.*|alphas_cumprod_prev|sqrt_.*|log_one_minus_.*|posterior_.*"
                            r"|model_ema\..*|.*\.position_ids|cond_stage_model\.model\.(text_projection|logit_scale)"
                            r"|cond_stage_model\.model\.transformer\.resblocks\.(2[3-9]|[3-9]\d|\d{3,})\..*)")


def _tables(family: str) -> list[tuple[str, tuple[Pattern, ...]]]:
    """(prefix, patterns) per part; patterns of text encoders carry their full names (prefix "")."""
    ldm = family in ("sd1", "sd2")
    text = {"sd1": SD1_TEXT, "sd2": SD2_TEXT}.get(family) or SDXL_TEXT[family]
    return [(UNET, LDM_UNET if ldm else SGM_UNET), (VAE, VAE_RULES), ("", text)]


def _translate(name: str, family: str, side: int) -> str:
    for prefix, patterns in _tables(family):
        if not name.startswith(prefix):
            continue
        hit = translate(patterns, name[len(prefix):], side)
        if hit is not None:
            return prefix + hit[1]
    return name


def to_mindone(name: str, family: str) -> str | None:
    """The MindOne name of an original tensor; None when MindOne files do not hold it."""
    return None if NOT_IN_MINDONE.fullmatch(name) else _translate(name, family, 0)


def from_mindone(name: str, family: str) -> str:
    """The original name of a MindOne tensor (SD1's fused ``in_proj`` keeps its MindOne name: see ``SD1_FUSED``)."""
    return _translate(name, family, 1)


def fused_name(layer: str, param: str) -> str:
    """MindOne's name of SD1 text layer ``layer``'s fused in_proj ``weight`` or ``bias``."""
    return f"{TEXT}transformer_layer.resblocks.{layer}.attn.attn.in_proj.{param}"


def is_mindone(names: list[str]) -> str | None:
    """``ldm`` (SD1/SD2) or ``sgm`` (SDXL) when the names are MindOne's, else None."""
    joined = set(names)
    if any(n.startswith(UNET) and n.endswith((".in_layers_norm.gamma", ".in_layers_conv.conv.weight"))
           for n in joined) or TEXT + "embedding_table" in joined:
        return "ldm"
    if any(n.endswith((".gamma", ".embedding_table")) and n.startswith((UNET, "conditioner.", VAE)) for n in joined):
        return "sgm"
    return None
