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
keep their name. This module holds the rows every family shares and the builders of text-encoder
rows; each family's ``MindOneRules`` (in its own module) says which apply. ``to_mindone`` names one
original tensor (None: not in MindOne files); ``from_mindone`` the reverse.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from ...errors import FormatError
from ...io.base import TensorInfo, TensorSource
from .names import Pattern, translate

if TYPE_CHECKING:
    from ..base import MindOneRules

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
#: MindOne's SD1/SD2 text encoder (one class for both), by role; ``text_rules`` pairs them with a family's names
_MS_TEXT = {"token": TEXT + "embedding_table", "position": TEXT + "positional_embedding", "ln_final": TEXT + "ln_final",
            "ln_1": _MS_LAYER + "ln_1", "ln_2": _MS_LAYER + "ln_2", "in_proj": _MS_LAYER + "attn.attn.in_proj",
            "out_proj": _MS_LAYER + "attn.attn.out_proj", "c_fc": _MS_LAYER + "c_fc", "c_proj": _MS_LAYER + "c_proj"}


def text_rules(original: dict[str, str]) -> tuple[Pattern, ...]:
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


HF_LAYER = HF_TEXT + "encoder.layers.{i}."
#: SD1's q, k, v (original names, per layer and param) fused into MindOne's in_proj, in this row order
SD1_FUSED = re.compile(re.escape(HF_TEXT) + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
QKV = ("q", "k", "v")


def sgm_text_rules(prefix: str, openclip: bool) -> tuple[Pattern, ...]:
    """Rows of an SDXL text encoder under ``prefix``: only norms and embeddings are renamed."""
    if openclip:
        return (Pattern(prefix + "token_embedding.weight", prefix + "token_embedding.embedding_table"),
                *_norms(prefix, ("ln_final",)), *_norms(prefix + "transformer.resblocks.{i}.", ("ln_{j}",)))
    hf = prefix + "text_model."
    return (Pattern(hf + "embeddings.token_embedding.weight", hf + "embeddings.token_embedding.embedding_table"),
            Pattern(hf + "embeddings.position_embedding.weight", hf + "embeddings.position_embedding.embedding_table"),
            *_norms(hf, ("final_layer_norm",)), *_norms(hf + "encoder.layers.{i}.", ("layer_norm{j}",)))


#: in no MindOne file: the schedule buffers, EMA copies and position ids of the original files
NOT_IN_MINDONE = (r"betas|alphas_cumprod.*|alphas_cumprod_prev|sqrt_.*|log_one_minus_.*|posterior_.*"
                  r"|model_ema\..*|.*\.position_ids")


def _tables(rules: MindOneRules) -> list[tuple[str, tuple[Pattern, ...]]]:
    """(prefix, patterns) per part; patterns of text encoders carry their full names (prefix "")."""
    return [(UNET, LDM_UNET if rules.style == "ldm" else SGM_UNET), (VAE, VAE_RULES), ("", rules.text)]


def _translate(name: str, rules: MindOneRules, side: int) -> str:
    for prefix, patterns in _tables(rules):
        if not name.startswith(prefix):
            continue
        hit = translate(patterns, name[len(prefix):], side)
        if hit is not None:
            return prefix + hit[1]
    return name


def to_mindone(name: str, rules: MindOneRules) -> str | None:
    """The MindOne name of an original tensor; None when MindOne files do not hold it."""
    held = re.fullmatch(NOT_IN_MINDONE, name) is None and not (rules.not_held and re.fullmatch(rules.not_held, name))
    return _translate(name, rules, 0) if held else None


def from_mindone(name: str, rules: MindOneRules) -> str:
    """The original name of a MindOne tensor (SD1's fused ``in_proj`` keeps its MindOne name: see ``SD1_FUSED``)."""
    return _translate(name, rules, 1)


def fused_name(layer: str, param: str) -> str:
    """MindOne's name of SD1 text layer ``layer``'s fused in_proj ``weight`` or ``bias``."""
    return f"{TEXT}transformer_layer.resblocks.{layer}.attn.attn.in_proj.{param}"


#: CLIP-L's token embedding under the name a stored mindspore_key_base.yaml gives it by mistake
TYPO = "conditioner.embedders.1.model.token_embedding..embedding_table"


def view(source: TensorSource, rules: MindOneRules) -> TensorSource:
    """A MindOne checkpoint under the original names (``rules``: its family's), SD1's fused ``in_proj`` as its q, k, v
    row blocks — byte ranges of the file, nothing copied — so conversions, inspection and merges work on it
    unchanged."""
    tensors: dict[str, TensorInfo] = {}
    dropped = {}
    for name, info in source.tensors.items():
        if name.endswith(".position_ids"):  # saved from a MindOne network: not a weight
            dropped[name] = "position ids (not a weight)"
            continue
        if name == TYPO and info.shape[:1] == (49408,):
            name = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table"
        fused = _fused(name) if rules.fused_qkv else None
        if fused is not None:
            for k, q in enumerate(QKV):
                _put(tensors, source, f"{HF_TEXT}encoder.layers.{fused[0]}.self_attn.{q}_proj.{fused[1]}",
                     _rows(source, info, k))
            continue
        _put(tensors, source, from_mindone(name, rules), info)
    return TensorSource(path=source.path, format=source.format, tensors=tensors, metadata=dict(source.metadata),
                        non_tensors={**source.non_tensors, **dropped})


def _fused(name: str) -> tuple[str, str] | None:
    prefix = TEXT + "transformer_layer.resblocks."
    if not name.startswith(prefix) or ".attn.attn.in_proj." not in name:
        return None
    layer, _, param = name[len(prefix):].partition(".attn.attn.in_proj.")
    return (layer, param) if layer.isdigit() and param in ("weight", "bias") else None


def _rows(source: TensorSource, info: TensorInfo, k: int) -> TensorInfo:
    """Row block k of 3 of a fused tensor, as its own byte range."""
    if not info.contiguous or not info.shape or info.shape[0] % 3:
        raise FormatError(source.path, f"'{info.name}' {list(info.shape)} is not three row blocks",
                          "the text encoder's in_proj is damaged")
    size = info.nbytes // 3
    return replace(info, shape=(info.shape[0] // 3, *info.shape[1:]), offset=info.offset + k * size, nbytes=size)


def _put(tensors: dict[str, TensorInfo], source: TensorSource, name: str, info: TensorInfo) -> None:
    if name in tensors:
        raise FormatError(source.path, f"two tensors map to '{name}'", "the checkpoint mixes naming schemes")
    tensors[name] = replace(info, name=name)
