"""Adapter files → canonical ``Module``s: which module of which component, its factor tensors and its alpha.

Formats read: kohya / A1111 / LyCORIS (``lora_unet_…``, ``lora_te[12]_…``, the LyCORIS wrapper's
``lycoris_…``; LoRA/LoCon ``lora_down``/``lora_up``/``alpha``, Tucker ``lora_mid``, LoHa ``hada_*``,
LoKr ``lokr_*``, DoRA ``dora_scale``, (IA)³ ``weight``/``on_input``, full ``diff``/``diff_b``, norm
``w_norm``/``b_norm``), diffusers / PEFT (``unet.….lora_A.weight``/``lora_B.weight``, DoRA
``lora_magnitude_vector``, alphas from ``lora_adapter_metadata`` or per-module ``.alpha``), and the old
diffusers attention-processor format (``….processor.to_q_lora.down.weight``) and cloneofsimo/lora's numbered
modules (``cloneofsimo``: "safeloras" and ``.pt`` lists). Algorithms sdport cannot
merge (OFT, GLoRA) are refused by name, never skipped.

``ADAPTERS`` is the one registry of adapter formats: their signatures (which ``detect`` scores beside the
families') and, in ``PARSERS``, how each is read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import FormatError, SdportError
from ..families import FAMILIES, Signature
from ..io.base import TensorSource

KOHYA_COMPONENTS = {"lora_unet": "unet", "lycoris": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: old diffusers attention-processor names → the module they patch (UNet attention, then CLIP attention)
OLD_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "b1.weight": "GLoRA"}

#: cross-attention width of the base each family's LoRAs are trained on (attn2's to_k input)
CROSS_WIDTH = {f.cross_width: f.name for f in FAMILIES.values() if f.cross_width}

#: kohya/LyCORIS tensor suffix → (algorithm, or None for parts any algorithm may carry; role in patches)
ROLES = {"lora_up.weight": ("lora", "up"), "lora_down.weight": ("lora", "down"), "lora_mid.weight": ("lora", "mid"),
         **{f"hada_{k}": ("loha", k.replace("_", "")) for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
         **{f"lokr_{k}": ("lokr", k.replace("_", "")) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
         "diff": ("full", "diff"), "w_norm": ("norm", "diff"), "b_norm": ("norm", "bias"), "weight": ("ia3", "w"),
         "diff_b": (None, "bias"), "dora_scale": (None, "dora")}
#: numbers read when the plan is made, not factors: LoRA alphas and (IA)³'s on_input flag
SCALARS = ("alpha", "on_input")
REQUIRED = {"lora": (("up",), ("down",)), "loha": (("w1a",), ("w1b",), ("w2a",), ("w2b",)),
            "lokr": (("w1", "w1a"), ("w2", "w2a")), "ia3": (("w",),), "full": (), "norm": ()}

_KOHYA = re.compile(r"(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_([^.]+)\.("
                    + "|".join(re.escape(k) for k in (*ROLES, *SCALARS)) + ")")
_PEFT = re.compile(r"(?:base_model\.model\.)?(?:(unet|text_encoder_2|text_encoder)\.)?(.+)\."
                   r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")
#: MindOne's SD1/SD2 LoRA (MindSpore .ckpt): lora_down/lora_up on the original UNet paths, no alpha stored
_MINDONE = re.compile(r"(model\.diffusion_model\.[^:]+)\.(lora_down|lora_up)\.weight")
_SAFELORAS = re.compile(r"(unet|text_encoder):\d+:(up|down)")
_LYCORIS = r".*\.(hada_w1_a|lokr_w1|lokr_w1_a|lokr_w2|on_input|diff|w_norm|b_norm|dora_scale|oft_blocks)(\.weight)?"
_SPECIFIC = {
    "lycoris": r"lycoris_.*",
    "kohya": r"lora_(unet|te\d?)_.*\.(lora_down|lora_up)\.weight",
    "mindone": r"model\.diffusion_model\..*\.(lora_down|lora_up|lora_A|lora_B)\.weight",
    "peft": r".*\.lora_[AB](\.[A-Za-z_]+)?\.weight",
    "diffusers-old": r".*\.processor\..*_lora\.(up|down)\.weight",
    "cloneofsimo": _SAFELORAS.pattern,
}
#: cloneofsimo's .pt lists: torch.save of [up, down, up, down …], read as tensors "0", "1", …
_NUMBERED = Signature("lora", "adapter", (r"\d+",), none_of=(r".*\D.*",), tag="cloneofsimo")
#: adapter formats as detect sees them; of several that match, the one asking the most wins (kohya names
#: with LyCORIS tensors are LyCORIS); ``unknown``: adapter-like names of no format sdport reads
ADAPTERS: tuple[Signature, ...] = (
    Signature("lora", "adapter", (r"(lora_unet|lora_te\d?)_.*", _LYCORIS), tag="lycoris"),
    *(Signature("lora", "adapter", (rx,), tag=tag) for tag, rx in _SPECIFIC.items() if tag != "peft"),
    _NUMBERED,
    Signature("lora", "adapter", (_SPECIFIC["peft"],), none_of=(r"model\.diffusion_model\..*",), tag="peft"),
    Signature("lora", "adapter", (r".*[._](lora_down|lora_A|lora\.down|hada_w1_a|lokr_w1|lokr_w1_a)(\.[A-Za-z_]+)?"
                                  r"(\.weight)?|(lora_unet|lora_te\d?|lycoris|oft_unet)_[^.]+\.(on_input|diff|diff_b"
                                  r"|w_norm|b_norm|oft_blocks)",),
              none_of=(_LYCORIS, *_SPECIFIC.values()), tag="unknown"),
)
PEFT_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_magnitude_vector": "magnitude",
              "lora_magnitude_vector.weight": "magnitude"}
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
        factors: tensor names in the file by role (see ``patches``): the algorithm's factors, and
            ``dora``/``magnitude`` (DoRA, LyCORIS/PEFT) and ``bias`` (``diff_b``, ``b_norm``) on any of them.
        alpha: the stored alpha; None means alpha = rank (scale 1).
    """

    component: str
    name: str
    naming: str
    factors: dict[str, str] = field(default_factory=dict)  # role (patches.delta) → tensor name
    alpha: float | None = None
    kind: str = ""  # lora (LoCon, Tucker), loha, lokr, ia3, full, norm
    rslora: bool = False  # PEFT's use_rslora: the scale is alpha / sqrt(rank)
    on_input: bool = False  # (IA)³ scales input columns instead of output rows

    def rank(self, source: TensorSource) -> int | None:
        """The rank alpha is divided by; None when there is none (scale 1): a LoKr of two full halves, (IA)³, diff."""
        key = rank_role(self.kind, self.factors)
        return source.tensors[self.factors[key]].shape[0] if key else None

    @property
    def patch_kind(self) -> str:
        """How ``patches`` applies the weight update."""
        if self.kind == "ia3":
            return "ia3-in" if self.on_input else "ia3"
        return "diff" if self.kind in ("full", "norm") else self.kind

    @property
    def label(self) -> str:
        return f"{self.component}:{self.name}"


def scale(rank: int | None, alpha: float | None, rslora: bool = False) -> float:
    """alpha/rank (alpha/√rank with rs-LoRA); alpha missing or 0 means alpha = rank, as kohya and LyCORIS read
    it; 1 without a rank (a LoKr of two full halves, (IA)³, diff)."""
    if not rank:
        return 1.0
    return (alpha or rank) / (math.sqrt(rank) if rslora else rank)


def rank_role(kind: str, roles: Iterable[str]) -> str | None:
    """The factor whose first dimension is the rank alpha is divided by; None when the algorithm has none."""
    roles = set(roles)
    key = ("w2b" if "w2b" in roles else "w1b") if kind == "lokr" else {"lora": "down", "loha": "w1b"}.get(kind)
    return key if key in roles else None


@dataclass
class Adapter:
    """A parsed adapter file."""

    path: str
    format: str
    modules: list[Module]
    alpha_keys: list[str]  # tensors folded into the scale (read at plan time)
    left: dict[str, str] = field(default_factory=dict)  # tensors that are not modules' factors → why not used


def parse(source: TensorSource, alphas: dict[str, float], fmt: str) -> Adapter:
    """The modules of an adapter file in format ``fmt`` (as ``detect`` named it); ``alphas`` maps its ``.alpha``
    (and ``.on_input``) tensors to their values."""
    names = list(source.tensors)
    for name in names:
        leaf = name.rsplit(".", 2)
        for suffix, algo in UNSUPPORTED.items():
            if name.endswith("." + suffix) or leaf[-1] == suffix:
                raise FormatError(source.path, f"uses {algo} (tensor '{name}'), which this version cannot merge",
                                  "LoRA/LoCon/Tucker, LoHa, LoKr, DoRA, (IA)³, full/diff and norm are merged")
    if fmt == "cloneofsimo":
        return _cloneofsimo(source)
    if fmt in ("kohya", "lycoris"):
        return _kohya(source, names, alphas)
    if fmt == "diffusers-old":
        return _old_diffusers(source, names)
    if fmt == "mindone" and all(_MINDONE.fullmatch(n) for n in names):
        return _mindone(source, names)
    if fmt in ("peft", "mindone"):  # MindOne's SDXL LoRAs are PEFT-shaped under the original UNet names
        return _peft(source, names, alphas)
    raise FormatError(source.path, "not a LoRA adapter sdport recognises",
                      "kohya (lora_unet_…), diffusers/PEFT (lora_A/lora_B), old diffusers (…_lora.up) and "
                      "cloneofsimo's (unet:0:up, .pt lists) are read")


def _kohya(source: TensorSource, names: list[str], alphas: dict[str, float]) -> Adapter:
    modules: dict[str, Module] = {}
    alpha_keys = []
    for name in names:
        m = _KOHYA.fullmatch(name)
        if m is None:
            raise FormatError(source.path, f"tensor '{name}' is not a kohya LoRA tensor", "the file mixes formats")
        mod = modules.setdefault(m[1] + "_" + m[2], Module(KOHYA_COMPONENTS[m[1]], m[2], "kohya"))
        if m[3] in SCALARS:
            alpha_keys.append(name)
            if m[3] == "alpha":
                mod.alpha = alphas[name]
            else:
                mod.on_input = bool(alphas[name])
            continue
        kind, role = ROLES[m[3]]
        if kind and mod.kind and mod.kind != kind:
            raise FormatError(source.path, f"module '{m[2]}' mixes {mod.kind} and {kind} tensors",
                              "the file is damaged")
        mod.kind, mod.factors[role] = kind or mod.kind, name
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
            mod = modules.setdefault((component, m[2]), Module(component, m[2], "diffusers", kind="lora"))
            mod.factors[PEFT_ROLES[m[3]]] = name
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
        mod = modules.setdefault((component, path), Module(component, path, "diffusers", kind="lora"))
        mod.factors[m[4]] = name
    return Adapter(source.path, "diffusers-old", _complete(source, modules), [])


def _mindone(source: TensorSource, names: list[str]) -> Adapter:
    modules: dict[str, Module] = {}
    for name in names:
        m = _MINDONE.fullmatch(name)
        mod = modules.setdefault(m[1], Module("unet", m[1], "diffusers", kind="lora"))
        mod.factors["up" if m[2] == "lora_up" else "down"] = name
    return Adapter(source.path, "mindone", _complete(source, modules), [])


def _cloneofsimo(source: TensorSource) -> Adapter:
    from .cloneofsimo import placed

    pairs, embeds = placed(source)
    modules = [Module(component, path, "diffusers", {"up": up, "down": down}, kind="lora")
               for component, path, up, down in pairs]
    why = "a textual-inversion token riding along (give the file to --inversion to add it)"
    return Adapter(source.path, "cloneofsimo", _complete(source, {m.label: m for m in modules}), [],
                   dict.fromkeys(embeds, why))


def _guess_component(path: str) -> str:
    return "text_encoder" if path.startswith("text_model.") else "unet"


def _complete(source: TensorSource, modules: dict) -> list[Module]:
    for mod in modules.values():
        mod.kind = mod.kind or "full"  # only a diff_b
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
    """The value of every 0-d ``alpha`` and ``on_input`` tensor (read now: they are part of the plan)."""
    out = {}
    for name, info in source.tensors.items():
        if name.endswith((".alpha", ".on_input")):
            if info.numel != 1:
                raise SdportError(source.path, f"'{name}' is not a single number", "the adapter is damaged")
            value = float(source.read(name).reshape(-1)[0])
            if not value == value or value in (float("inf"), float("-inf")) or value < 0:
                raise SdportError(source.path, f"'{name}' is {value}", "alpha must be a finite number ≥ 0")
            out[name] = value
    return out


def module_kind(source: TensorSource, m: Module) -> str:
    """The algorithm: ``loha``, ``lokr``, ``ia3``, ``full``, ``norm``, or for LoRA ``tucker`` (a ``lora_mid``
    core), ``locon`` (a conv kernel) or ``lora``; ``+dora`` when it carries a DoRA magnitude."""
    return kind_label(m.kind, m.factors, source)


def kind_label(kind: str, factors: dict[str, str], source: TensorSource) -> str:
    """``module_kind`` of a module given by its algorithm and factor names (tensors in ``source``)."""
    if kind == "lora":
        down = source.tensors[factors["down"]].shape
        kind = "tucker" if "mid" in factors else "locon" if len(down) == 4 and down[2:] != (1, 1) else "lora"
    return kind + ("+dora" if "dora" in factors or "magnitude" in factors else "")


#: the base an adapter was made for, in the words trainers write: kohya's ``ss_base_model_version`` and the
#: modelspec ``architecture`` (``stable-diffusion-v1/lora``), by prefix
STATED_BASES = {"ss_base_model_version": (("sdxl_base", "sdxl-base"), ("sdxl_refiner", "sdxl-refiner"),
                                          ("sd_v2", "sd2"), ("sd_v1", "sd1")),
                "modelspec.architecture": (("stable-diffusion-xl-v1-base", "sdxl-base"),
                                           ("stable-diffusion-xl-v1-refiner", "sdxl-refiner"),
                                           ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))}
#: what sdport writes for each family (kohya's and modelspec's names for it)
BASE_METADATA = {"sd1": ("sd_v1", "stable-diffusion-v1"), "sd2": ("sd_v2", "stable-diffusion-v2-512"),
                 "sdxl-base": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
                 "sdxl-refiner": ("sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner")}


def stated_base(metadata: dict[str, str]) -> str:
    """The family an adapter's metadata says it was made for; "" when it says nothing sdport knows."""
    for key, prefixes in STATED_BASES.items():
        value = metadata.get(key, "")
        found = next((family for prefix, family in prefixes if value.startswith(prefix)), "")
        if found:
            return found
    return ""


def base_metadata(family: str, prediction: str = "epsilon") -> dict[str, str]:
    """The metadata saying an adapter is for ``family`` (kohya's and modelspec's keys; SD2's 768-v architecture when
    the base predicts v), for the files sdport makes."""
    if family not in BASE_METADATA:
        return {}
    kohya, arch = BASE_METADATA[family]
    if family == "sd2" and prediction == "v_prediction":
        arch = "stable-diffusion-v2-768-v"
    return {"ss_base_model_version": kohya, "modelspec.architecture": f"{arch}/lora"}


def base_family(source: TensorSource, adapter: Adapter) -> str:
    """The family an adapter was trained on, from its cross-attention width and text encoders, else from what its
    metadata says; "" if unsure."""
    base = ""
    for m in adapter.modules:
        down = m.factors.get("down") or m.factors.get("w1b")
        shape = source.tensors[down].shape if down else ()
        if m.component == "unet" and ("attn2_to_k" in m.name or "attn2.to_k" in m.name) and len(shape) == 2:
            base = CROSS_WIDTH.get(shape[1], "")
            break
    if any(m.component == "text_encoder_2" for m in adapter.modules) and not (base and FAMILIES[base].part(
            "text_encoder_2")):  # two text encoders: the family that has both
        base = next(f.name for f in FAMILIES.values() if f.part("text_encoder") and f.part("text_encoder_2"))
    return base or stated_base(source.metadata)
