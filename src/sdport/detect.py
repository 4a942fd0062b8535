"""Says what a set of tensors is: family, variant and the evidence that decided, from a table of signatures.

Every signature is tried; the first that matches in table order wins (more specific ones come
first, and a test checks that each fixture matches exactly the one it should). A signature is
data: key patterns that must be present or absent, and facts about shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .io.base import TensorInfo


@dataclass(frozen=True)
class Fact:
    """``pattern`` names a tensor whose ``dim`` (an index, or "ndim") equals ``value``."""

    pattern: str
    dim: int | str
    value: int


@dataclass(frozen=True)
class Signature:
    family: str
    layout: str  # "ldm" (original single file), "diffusers", "adapter"
    all_of: tuple[str, ...]
    none_of: tuple[str, ...] = ()
    facts: tuple[Fact, ...] = ()


_UNET = r"model\.diffusion_model\."
_LABEL = r"model\.diffusion_model\.label_emb\.0\.0\.weight"
_PROJ_IN_LDM = r"model\.diffusion_model\.input_blocks\.1\.1\.proj_in\.weight"
_PROJ_IN_DIF = r"unet\.down_blocks\.0\.attentions\.0\.proj_in\.weight"

SIGNATURES: tuple[Signature, ...] = (
    Signature("sdxl-refiner", "ldm", (r"conditioner\.embedders\.0\.model\.ln_final\.weight", _LABEL),
              none_of=(r"conditioner\.embedders\.1\..*",)),
    Signature("sdxl-base", "ldm", (r"conditioner\.embedders\.0\.transformer\..*",
                                   r"conditioner\.embedders\.1\.model\.ln_final\.weight", _LABEL)),
    Signature("sd2", "ldm", (r"cond_stage_model\.model\.ln_final\.weight", _UNET + r"input_blocks\.0\.0\.weight"),
              facts=(Fact(_PROJ_IN_LDM, "ndim", 2),)),
    Signature("sd1", "ldm", (r"cond_stage_model\.transformer\..*", _UNET + r"input_blocks\.0\.0\.weight"),
              facts=(Fact(_PROJ_IN_LDM, "ndim", 4),)),
    Signature("controlnet", "ldm", (r"(control_model\.)?input_hint_block\.0\.weight",
                                    r"(control_model\.)?zero_convs\.0\.0\.weight")),
    Signature("unet", "ldm", (_UNET + r"input_blocks\.0\.0\.weight",),
              none_of=(r"cond_stage_model\..*", r"conditioner\..*")),
    Signature("vae", "ldm", (r"(first_stage_model\.|vae\.)?encoder\.down\.0\.block\.0\.conv1\.weight",
                             r"(first_stage_model\.|vae\.)?decoder\.conv_out\.weight",
                             r"(first_stage_model\.|vae\.)?quant_conv\.weight"), none_of=(_UNET + ".*",)),
    # diffusers pipelines by their UNet, so that a folder missing a text encoder is still recognised
    Signature("sdxl-refiner", "diffusers", (r"unet\.add_embedding\.linear_1\.weight", r"unet\.down_blocks\.3\..*")),
    Signature("sdxl-base", "diffusers", (r"unet\.add_embedding\.linear_1\.weight",),
              none_of=(r"unet\.down_blocks\.3\..*",)),
    Signature("sd2", "diffusers", (r"unet\.conv_in\.weight",), none_of=(r"unet\.add_embedding\..*",),
              facts=(Fact(_PROJ_IN_DIF, "ndim", 2),)),
    Signature("sd1", "diffusers", (r"unet\.conv_in\.weight",), none_of=(r"unet\.add_embedding\..*",),
              facts=(Fact(_PROJ_IN_DIF, "ndim", 4),)),
    Signature("controlnet", "diffusers", (r"controlnet_cond_embedding\.conv_in\.weight",)),
    Signature("unet", "diffusers", (r"conv_in\.weight", r"time_embedding\.linear_1\.weight", r"down_blocks\..*")),
    Signature("vae", "diffusers", (r"(vae\.)?encoder\.down_blocks\.0\.resnets\.0\.conv1\.weight",
                                   r"(vae\.)?decoder\.conv_out\.weight", r"(vae\.)?quant_conv\.weight"),
              none_of=(r"unet\..*",)),
    Signature("lora", "adapter",
              (r".*[._](lora_down|lora_A|lora\.down|hada_w1_a|lokr_w1|lokr_w1_a)(\.[A-Za-z_]+)?(\.weight)?"
               r"|(lora_unet|lora_te\d?|lycoris|oft_unet)_[^.]+\.(on_input|diff|diff_b|w_norm|b_norm|oft_blocks)"
               r"|(unet|text_encoder):\d+:(up|down)",)),
)

#: adapter naming schemes, first match wins (refined by the LoRA work)
ADAPTER_FORMATS: tuple[tuple[str, str], ...] = (
    ("lycoris", r".*\.(hada_w1_a|lokr_w1|lokr_w1_a|lokr_w2|on_input|diff|w_norm|b_norm|dora_scale|oft_blocks)"
                r"(\.weight)?|lycoris_.*"),
    ("kohya", r"lora_(unet|te\d?)_.*\.(lora_down|lora_up)\.weight"),
    ("mindone", r"model\.diffusion_model\..*\.(lora_down|lora_up|lora_A|lora_B)\.weight"),
    ("peft", r".*\.lora_[AB](\.[A-Za-z_]+)?\.weight"),
    ("diffusers-old", r".*\.processor\..*_lora\.(up|down)\.weight"),
    ("cloneofsimo", r"(unet|text_encoder):\d+:(up|down)"),
)


@dataclass
class Detection:
    """What a file is: family (``unknown`` when nothing matched), its layout, variant and why."""

    family: str = "unknown"
    layout: str = ""
    variant: str = ""
    adapter_format: str = ""
    evidence: list[str] = field(default_factory=list)
    prediction: tuple[str, str] = ("", "")  # what the file says the model predicts, and where it says so


def _first(pattern: str, tensors: dict[str, TensorInfo]) -> str | None:
    rx = re.compile(pattern)
    return next((k for k in tensors if rx.fullmatch(k)), None)


def match(sig: Signature, tensors: dict[str, TensorInfo]) -> list[str] | None:
    """The evidence for ``sig`` if it matches, else None."""
    evidence = []
    for pattern in sig.all_of:
        key = _first(pattern, tensors)
        if key is None:
            return None
        evidence.append(f"has {key}")
    for pattern in sig.none_of:
        if _first(pattern, tensors) is not None:
            return None
    for fact in sig.facts:
        key = _first(fact.pattern, tensors)
        if key is None:
            return None
        shape = tensors[key].shape
        got = len(shape) if fact.dim == "ndim" else (shape[fact.dim] if len(shape) > fact.dim else None)
        if got != fact.value:
            return None
        what = f"is {got}-d" if fact.dim == "ndim" else f"has size {got} in dim {fact.dim}"
        evidence.append(f"{key} {what}")
    return evidence


def detect(tensors: dict[str, TensorInfo], metadata: dict[str, str] | None = None) -> Detection:
    """Family, variant and adapter format of a set of tensors, each with the evidence that decided."""
    for sig in SIGNATURES:
        evidence = match(sig, tensors)
        if evidence is not None:
            found = Detection(sig.family, sig.layout, evidence=evidence)
            break
    else:
        return Detection(evidence=["no known signature matched"])
    if found.family == "lora":
        found.adapter_format = next((name for name, rx in ADAPTER_FORMATS if _first(rx, tensors)), "unknown")
    _variant(found, tensors, metadata or {})
    return found


def _variant(found: Detection, tensors: dict[str, TensorInfo], metadata: dict[str, str]) -> None:
    key = _first(_UNET + r"input_blocks\.0\.0\.weight|unet\.conv_in\.weight", tensors)
    if key is not None and len(tensors[key].shape) == 4:
        channels = tensors[key].shape[1]
        names = {9: "inpaint", 8: "instruct-pix2pix"}
        if channels in names:
            found.variant = names[channels]
            found.evidence.append(f"{key} takes {channels} input channels")
    said = metadata.get("modelspec.predict_key") or metadata.get("modelspec.prediction_type", "")
    if "v_pred" in tensors or said.startswith("v"):
        found.variant = (found.variant + "+v-prediction").lstrip("+")
        found.prediction = ("v_prediction", "v_pred marker present" if "v_pred" in tensors
                            else f"modelspec metadata says {said}")
        found.evidence.append(found.prediction[1])
    elif said.startswith("eps"):
        found.prediction = ("epsilon", f"modelspec metadata says {said}")


def prediction_type(found: Detection) -> tuple[str, str]:
    """``epsilon`` or ``v_prediction`` for a detected model, and how it was decided."""
    if found.prediction[0]:
        return found.prediction[0], f"the file says so ({found.prediction[1]})"
    if found.family == "sd2":
        return "v_prediction", ("SD2's default: the 768 px v-prediction models are the common ones; pass "
                                "--prediction-type epsilon for SD2-base (512 px)")
    return "epsilon", f"{found.family}'s default (the file has no v-prediction marker)"
