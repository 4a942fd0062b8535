"""The records a family is made of: ``Part`` (a component and where it lives), ``Signature`` and ``Fact`` (how
``detect`` recognises it) and ``Family`` (every fact about it that its weights do not carry)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .parts.names import Pattern
from .parts.unet import UNetLayout


@dataclass(frozen=True)
class Fact:
    """``pattern`` names a tensor whose ``dim`` (an index, or "ndim") equals ``value``."""

    pattern: str
    dim: int | str
    value: int


@dataclass(frozen=True)
class Signature:
    """``family`` in ``layout`` when every ``all_of`` pattern names a tensor, no ``none_of`` pattern does, and every
    fact holds (patterns are regular expressions over whole names). ``tag`` names an adapter format or a variant.

    ``layout``: ``ldm`` (original single file), ``diffusers``, ``mindone``, ``adapter``, or ``variant``.
    """

    family: str
    layout: str
    all_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    facts: tuple[Fact, ...] = ()
    tag: str = ""

    @property
    def size(self) -> int:
        """How much the signature asks: a full match of a larger signature is the more specific answer."""
        return len(self.all_of) + len(self.none_of) + len(self.facts)

    @property
    def label(self) -> str:
        return f"{self.tag or self.family} ({self.layout})"


@dataclass(frozen=True)
class Part:
    """One component of a family.

    Attributes:
        component: diffusers folder (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``controlnet``).
        ldm_prefix: where its tensors live in an original single file.
        kind: which name table translates it: ``unet``, ``vae``, ``clip-l``, ``openclip``, ``controlnet``.
        text_layers: OpenCLIP only: how many transformer layers diffusers keeps (SD2: 23 of 24).
        projection: OpenCLIP only: whether ``text_projection`` is kept (CLIPTextModelWithProjection).
        all_layers: a text encoder that must hold this many layers (SDXL reads CLIP-L's second-to-last one,
            so a CLIP-L stored without its last layer would silently give other embeddings).
    """

    component: str
    ldm_prefix: str
    kind: str
    text_layers: int | None = None
    projection: bool = False
    all_layers: int | None = None


UNET = Part("unet", "model.diffusion_model.", "unet")
VAE = Part("vae", "first_stage_model.", "vae")


@dataclass(frozen=True)
class MindOneRules:
    """How MindOne (mindspore-lab/mindone) names a family: its UNet style (``ldm``: SD1/SD2's conv wrappers and
    flat ResBlocks; ``sgm``: SDXL's original names), its text encoders' rules, whether q, k, v are one fused
    ``in_proj`` (SD1), and the original tensors MindOne files do not hold beyond every family's (SD2's 24th layer)."""

    style: str
    text: tuple[Pattern, ...]
    fused_qkv: bool = False
    not_held: str = ""


@dataclass(frozen=True)
class Family:
    """A model family and the facts about it that are not in the weights.

    Attributes:
        whole: a pipeline (UNet, VAE, text encoders); else one component alone.
        unet_heads: ``("count", 8)`` — the same number of heads everywhere (SD1) — or ``("dim", 64)``;
            None for a UNet or ControlNet alone: SD1's when it projects attention with 1×1 convs, else 64-dim.
        unet_layout: the released UNet's block structure (to read kohya names of adapters without a base).
        cross_width: the released UNet's cross-attention width (which base an adapter was trained on).
        conv_projections: attention ``proj_in``/``proj_out`` are 1×1 convs (SD1), not linear layers.
        time_ids: sinusoidal sizes SDXL's added embedding takes besides the pooled text (6; the refiner's 5).
        vae_upcast: the VAE overflows in fp16 (diffusers' ``force_upcast``).
        prediction: what the UNet predicts when the file does not say, and why.
        index: model_index.json entries of the family's own.
        ort_class: Optimum's ONNX Runtime pipeline class.
        kohya_sgm: kohya names this family's UNet modules after the original (SGM) layout.
    """

    name: str
    parts: tuple[Part, ...]
    pipeline: str
    signatures: tuple[Signature, ...] = ()
    whole: bool = True
    unet_heads: tuple[str, int] | None = ("dim", 64)
    unet_layout: UNetLayout | None = None
    cross_width: int | None = None
    conv_projections: bool = False
    time_ids: int = 6
    sample_size: int = 512
    vae_scale: float = 0.18215
    vae_upcast: bool = False
    scheduler: str = "PNDMScheduler"
    prediction: tuple[str, str] = ("epsilon", "")
    inpaint_pipeline: str | None = None
    index: Mapping[str, object] = field(default_factory=dict)
    ort_class: str | None = None
    mindone: MindOneRules | None = None
    kohya_sgm: bool = False

    def part(self, component: str) -> Part | None:
        return next((p for p in self.parts if p.component == component), None)

    def default_prediction(self) -> tuple[str, str]:
        """The prediction type when the file does not say, and the reason given to the user."""
        value, why = self.prediction
        return value, why or f"{self.name}'s default (the file has no v-prediction marker)"


# Name patterns the families' signatures share (regular expressions over whole tensor names).
LDM_UNET = r"model\.diffusion_model\."
LDM_CONV_IN = LDM_UNET + r"input_blocks\.0\.0\.weight"
LDM_PROJ_IN = LDM_UNET + r"input_blocks\.1\.1\.proj_in\.weight"
LDM_LABEL = LDM_UNET + r"label_emb\.0\.0\.weight"
DIF_PROJ_IN = r"unet\.down_blocks\.0\.attentions\.0\.proj_in\.weight"
DIF_ADDED = r"unet\.add_embedding\..*"
#: MindOne's SD1/SD2 UNet (its ResBlocks' flat layer names) and MindOne's renamed norms and embeddings (every family)
MINDONE_LDM_UNET = LDM_UNET + r".*\.(in_layers_norm\.gamma|in_layers_conv\.conv\.weight)"
MINDONE_NAMES = r"(model\.diffusion_model|conditioner|first_stage_model)\..*\.(gamma|embedding_table)"
MINDONE_TEXT = r"cond_stage_model\.transformer\.embedding_table"
#: model_index.json entries of the SD1/SD2 pipelines: no safety checker
NO_SAFETY_CHECKER = {"safety_checker": [None, None], "feature_extractor": [None, None],
                     "requires_safety_checker": False}


def sd_signatures(family: str, text: str, proj_ndim: int, text_width: int) -> tuple[Signature, ...]:
    """An SD1/SD2-style pipeline in the original, diffusers and MindOne layouts: its text encoder under ``text`` (a
    pattern), told apart from its sibling by how its attention projects (``proj_ndim``: 4 for 1×1 convs, 2 for
    linears) — or, in a MindOne file without its UNet, by its text encoder's width."""
    return (
        Signature(family, "ldm", (text, LDM_CONV_IN), facts=(Fact(LDM_PROJ_IN, "ndim", proj_ndim),)),
        Signature(family, "diffusers", (r"unet\.conv_in\.weight",), none_of=(DIF_ADDED,),
                  facts=(Fact(DIF_PROJ_IN, "ndim", proj_ndim),)),
        Signature(family, "mindone", (MINDONE_LDM_UNET,), facts=(Fact(LDM_PROJ_IN, "ndim", proj_ndim),)),
        Signature(family, "mindone", (MINDONE_TEXT,), none_of=(MINDONE_LDM_UNET,),
                  facts=(Fact(MINDONE_TEXT, 1, text_width),)),
    )
