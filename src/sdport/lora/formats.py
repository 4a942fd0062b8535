"""Adapter files → canonical ``Module``s: which module of which component, its factor tensors and its alpha.

Formats read: kohya / A1111 (``lora_unet_…``, ``lora_te[12]_…``; ``lora_down``/``lora_up``/``alpha``,
LoCon on convs, Tucker ``lora_mid``), diffusers / PEFT (``unet.….lora_A.weight``/``lora_B.weight``,
alphas from ``lora_adapter_metadata`` or per-module ``.alpha``), and the old diffusers
attention-processor format (``….processor.to_q_lora.down.weight``). Algorithms this version cannot
merge (LoHa, LoKr, DoRA, (IA)³, OFT, GLoRA, full/diff, norm) are refused by name, never skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import FormatError, SdportError
from ..io.base import TensorSource

KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: old diffusers attention-processor names → the module they patch (UNet attention, then CLIP attention)
OLD_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "oft_blocks": "OFT", "on_input": "(IA)³",
               "a1.weight": "GLoRA", "diff": "full/diff", "diff_b": "full/diff", "w_norm": "norm", "b_norm": "norm"}

#: cross-attention width of the base each family's LoRAs are trained on (attn2's to_k input)
CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}

#: kohya/LyCORIS tensor suffix → (algorithm, role of the factor in patches.delta)
ROLES = {"lora_up.weight": ("lora", "up"), "lora_down.weight": ("lora", "down"), "lora_mid.weight": ("lora", "mid"),
         **{f"hada_{k}": ("loha", k.replace("_", "")) for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
         **{f"lokr_{k}": ("lokr", k.replace("_", "")) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}}
REQUIRED = {"lora": (("up",), ("down",)), "loha": (("w1a",), ("w1b",), ("w2a",), ("w2b",)),
            "lokr": (("w1", "w1a"), ("w2", "w2a"))}

_KOHYA = re.compile(r"(lora_(unet|te1|te2|te))_(.+)\.(" + "|".join(re.escape(k) for k in ROLES) + r"|alpha)")
_PEFT = re.compile(r"(?:base_model\.model\.)?(?:(unet|text_encoder_2|text_encoder)\.)?(.+)\.(lora_A|lora_B)\.weight")
_ALPHA = re.compile(r"(?:base_model\.model\.)?(?:(unet|text_encoder_2|text_encoder)\.)?(.+)\.alpha")
_OLD = re.compile(r"(?:(unet|text_encoder_2|text_encoder)\.)?(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora"
                  r"\.(up|down)\.weight")


@dataclass
class Module:
    """One adapted module.

    Attributes:
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        name: for ``naming == "kohya"`` the underscored name after the prefix (``down_blocks_0_…_to_q``);
            for ``"diffusers"`` the dotted module path in diffusers/transformers names.
        factors: tensor names in the file: up, down[, mid].
        alpha: the stored alpha; None means alpha = rank (scale 1).
    """

    component: str
    name: str
    naming: str
    factors: dict[str, str] = field(default_factory=dict)  # role (patches.delta) → tensor name
    alpha: float | None = None
    kind: str = "lora"  # lora (LoCon, Tucker), loha, lokr
    rslora: bool = False  # PEFT's use_rslora: the scale is alpha / sqrt(rank)

    def rank(self, source: TensorSource) -> int | None:
        """The rank alpha is divided by; None for a LoKr whose halves are both full (scale 1)."""
        key = {"lora": "down", "loha": "w1b"}.get(self.kind) or ("w2b" if "w2b" in self.factors else "w1b")
        return source.tensors[self.factors[key]].shape[0] if key in self.factors else None

    @property
    def label(self) -> str:
        return f"{self.component}:{self.name}"


@dataclass
class Adapter:
    """A parsed adapter file."""

    path: str
    format: str
    modules: list[Module]
    alpha_keys: list[str]  # tensors folded into the scale (read at plan time)


def parse(source: TensorSource, alphas: dict[str, float]) -> Adapter:
    """The modules of an adapter file; ``alphas`` maps its ``.alpha`` tensor names to their values."""
    names = list(source.tensors)
    for name in names:
        leaf = name.rsplit(".", 2)
        for suffix, algo in UNSUPPORTED.items():
            if name.endswith("." + suffix) or leaf[-1] == suffix:
                raise FormatError(source.path, f"uses {algo} (tensor '{name}'), which this version cannot merge",
                                  "LoRA, LoCon, Tucker, LoHa and LoKr adapters are merged so far")
    if any(_KOHYA.fullmatch(n) for n in names):
        return _kohya(source, names, alphas)
    if any(_OLD.fullmatch(n) for n in names):
        return _old_diffusers(source, names)
    if any(_PEFT.fullmatch(n) for n in names):
        return _peft(source, names, alphas)
    raise FormatError(source.path, "not a LoRA adapter sdport recognises",
                      "kohya (lora_unet_…), diffusers/PEFT (lora_A/lora_B) and old diffusers (…_lora.up) are read")


def _kohya(source: TensorSource, names: list[str], alphas: dict[str, float]) -> Adapter:
    modules: dict[str, Module] = {}
    alpha_keys = []
    for name in names:
        m = _KOHYA.fullmatch(name)
        if m is None:
            raise FormatError(source.path, f"tensor '{name}' is not a kohya LoRA tensor", "the file mixes formats")
        mod = modules.setdefault(m[1] + "_" + m[3], Module(KOHYA_COMPONENTS[m[2]], m[3], "kohya"))
        if m[4] == "alpha":
            mod.alpha, _ = alphas[name], alpha_keys.append(name)
            continue
        kind, role = ROLES[m[4]]
        if mod.factors and mod.kind != kind:
            raise FormatError(source.path, f"module '{m[3]}' mixes {mod.kind} and {kind} tensors",
                              "the file is damaged")
        mod.kind, mod.factors[role] = kind, name
    return Adapter(source.path, "kohya", _complete(source, modules), alpha_keys)


def _peft(source: TensorSource, names: list[str], alphas: dict[str, float]) -> Adapter:
    config = _peft_metadata(source)
    modules: dict[tuple[str, str], Module] = {}
    stored: dict[tuple[str, str], float] = {}
    alpha_keys = []
    for name in names:
        m = _PEFT.fullmatch(name)
        if m is not None:
            component = m[1] or _guess_component(m[2])
            mod = modules.setdefault((component, m[2]), Module(component, m[2], "diffusers"))
            mod.factors["up" if m[3] == "lora_B" else "down"] = name
            continue
        a = _ALPHA.fullmatch(name)
        if a is None:
            raise FormatError(source.path, f"tensor '{name}' is not a PEFT LoRA tensor", "the file mixes formats")
        alpha_keys.append(name)
        stored[(a[1] or _guess_component(a[2]), a[2])] = alphas[name]
    for (component, path), mod in modules.items():
        component_config = config.get(component, {})
        mod.alpha = stored.get((component, path), _metadata_alpha(component_config, path))
        mod.rslora = bool(component_config.get("use_rslora"))
    return Adapter(source.path, "peft", _complete(source, modules), alpha_keys)


def _old_diffusers(source: TensorSource, names: list[str]) -> Adapter:
    modules: dict[tuple[str, str], Module] = {}
    for name in names:
        m = _OLD.fullmatch(name)
        if m is None:
            raise FormatError(source.path, f"tensor '{name}' is not an attention-processor LoRA tensor",
                              "the file mixes formats")
        component = m[1] or _guess_component(m[2])
        leaf = (OLD_UNET if component == "unet" else OLD_TEXT)[m[3]]
        path = f"{m[2]}.{leaf}"
        mod = modules.setdefault((component, path), Module(component, path, "diffusers"))
        mod.factors[m[4]] = name
    return Adapter(source.path, "diffusers-old", _complete(source, modules), [])


def _guess_component(path: str) -> str:
    return "text_encoder" if path.startswith("text_model.") else "unet"


def _complete(source: TensorSource, modules: dict) -> list[Module]:
    for mod in modules.values():
        if any(not any(r in mod.factors for r in choice) for choice in REQUIRED[mod.kind]):
            raise FormatError(source.path, f"{mod.kind} module '{mod.name}' lacks some of its factors "
                              f"(has {sorted(mod.factors)})", "the file is damaged")
    return list(modules.values())


def _peft_metadata(source: TensorSource) -> dict[str, dict]:
    """Per-component LoraConfig (``r``, ``lora_alpha``, ``alpha_pattern``) from diffusers' metadata, if any."""
    raw = source.metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        raise FormatError(source.path, "lora_adapter_metadata is not JSON", None) from None
    if not isinstance(doc, dict):
        return {}
    if "lora_alpha" in doc or "r" in doc:  # one config for the whole file
        return dict.fromkeys(COMPONENTS, doc)
    configs: dict[str, dict] = {}
    for key, value in doc.items():
        component, _, field_name = key.partition(".")
        if component in COMPONENTS and field_name:  # diffusers writes flat "unet.lora_alpha", "unet.r" …
            configs.setdefault(component, {})[field_name] = value
        elif component in COMPONENTS and isinstance(value, dict):  # or one dict per component
            configs.setdefault(component, {}).update(value)
    return configs


def _metadata_alpha(config: dict, path: str) -> float | None:
    pattern = config.get("alpha_pattern") or {}
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return float(value)
    if "lora_alpha" in config:
        return float(config["lora_alpha"])
    return None


def read_alphas(source: TensorSource) -> dict[str, float]:
    """The value of every 0-d ``alpha`` tensor (read now: the scale is part of the plan)."""
    out = {}
    for name, info in source.tensors.items():
        if name.endswith(".alpha"):
            if info.numel != 1:
                raise SdportError(source.path, f"'{name}' is not a single number", "the adapter is damaged")
            value = float(source.read(name).reshape(-1)[0])
            if not value == value or value in (float("inf"), float("-inf")) or value < 0:
                raise SdportError(source.path, f"'{name}' is {value}", "alpha must be a finite number ≥ 0")
            out[name] = value
    return out


def module_kind(source: TensorSource, m: Module) -> str:
    """``loha``, ``lokr``, or for LoRA ``tucker`` (a ``lora_mid`` core), ``locon`` (a conv kernel) or ``lora``."""
    if m.kind != "lora":
        return m.kind
    down = source.tensors[m.factors["down"]].shape
    return "tucker" if "mid" in m.factors else "locon" if len(down) == 4 and down[2:] != (1, 1) else "lora"


def base_family(source: TensorSource, adapter: Adapter) -> str:
    """The family an adapter was trained on, from its cross-attention width and text encoders; "" if unsure."""
    base = ""
    for m in adapter.modules:
        down = m.factors.get("down") or m.factors.get("w1b")
        shape = source.tensors[down].shape if down else ()
        if m.component == "unet" and ("attn2_to_k" in m.name or "attn2.to_k" in m.name) and len(shape) == 2:
            base = CROSS_WIDTH.get(shape[1], "")
            break
    if any(m.component == "text_encoder_2" for m in adapter.modules) and base != "sdxl-refiner":
        base = "sdxl-base"
    return base
