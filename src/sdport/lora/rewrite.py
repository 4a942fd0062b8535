"""Adapter files written anew: ``lora convert`` (kohya ⇄ PEFT ⇄ old diffusers) and ``lora combine``.

Every module first gets its canonical name — component and dotted diffusers path (``names``) — so
any input naming reaches any output naming. Renaming is lossless: factors are copied byte for byte
and alpha moves between kohya's per-module ``.alpha`` tensor and PEFT's ``lora_alpha`` /
``alpha_pattern`` metadata, so kohya → PEFT → kohya gives back the same tensors (a kohya file
without alphas comes back with ``alpha = rank`` written out: the same scale). What a format
cannot hold is refused by name (LoHa in PEFT, an MLP module in the old attention-processor
format) unless ``rank`` asks for a LoRA re-factorisation by SVD, whose relative error is reported
per module. ``combine`` concatenates ranks, which is exact: ``[s₁up₁ s₂up₂] @ [down₁; down₂]``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..dtypes import cast
from ..errors import FormatError, SdportError
from ..families.clip import hub_name
from ..io import open_tensors
from ..io.atomic import check_target
from ..io.base import Slot, TensorSource
from ..io.safetensors import SafetensorsWriter
from ..patches import MAGNITUDES, delta, dora_axis
from .formats import ROLES, Adapter, Module, base_family, parse, rank_role, read_alphas, scale
from .merge import parse_spec
from .names import dotted, is_attention, underscored, unet_to_diffusers, unet_to_sgm
from .svd import factorize

FORMATS = ("kohya", "peft", "diffusers-old")
SUFFIX = {(kind, role): suffix for suffix, (kind, role) in ROLES.items() if kind}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
OLD_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out", "q_proj": "to_q", "k_proj": "to_k",
             "v_proj": "to_v", "out_proj": "to_out"}
#: the SD UNet's 3×3 convs, by the end of their diffusers path
CONV3X3 = ("conv1", "conv2", "conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv")
SGM_NAME = r"(model[._]diffusion_model[._])?(input_blocks|middle_block|output_blocks)[._]"
ALPHA_DTYPE_KEY = "sdport_alpha_dtype"  # kohya alphas' dtype, kept through PEFT so a round trip is bit-exact


@dataclass
class Lazy:
    """A tensor to write: dtype code, shape, and how to get its values."""

    dtype: str
    shape: tuple[int, ...]
    get: Callable[[], np.ndarray]


@dataclass
class Out:
    """One module of the adapter being written, in canonical names."""

    component: str
    path: str
    kind: str  # lora, loha, lokr, ia3, full, norm
    factors: dict[str, Lazy]
    alpha: float | None = None
    rslora: bool = False
    on_input: bool = False

    @property
    def label(self) -> str:
        return f"{self.component}:{self.path}"

    @property
    def rank(self) -> int | None:
        key = rank_role(self.kind, self.factors)
        return self.factors[key].shape[0] if key else None

    @property
    def scale(self) -> float:
        return scale(self.rank, self.alpha, self.rslora)


@dataclass
class Written:
    """What ``lora convert`` / ``combine`` wrote."""

    output: str
    format: str
    modules: int
    tensors: int
    errors: dict[str, float] = field(default_factory=dict)  # module → relative error of an SVD re-factorisation
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"wrote {self.output}: {self.format}, {self.modules} modules, {self.tensors} tensors"]
        if self.errors:
            errs = sorted(self.errors.values())
            out.append(f"{len(errs)} modules re-factorised to LoRA: relative error mean {np.mean(errs):.3g}, "
                       f"max {errs[-1]:.3g} ({max(self.errors, key=self.errors.get)})")
        return out + self.notes


def adapter_family(source: TensorSource, modules: list[Module]) -> str:
    """The family whose names the adapter uses: SDXL when it says so or uses SGM names, else SD1/SD2's."""
    found = base_family(source, Adapter(source.path, "", modules, []))
    if found:
        return found
    if any(m.component == "text_encoder_2" for m in modules):
        return "sdxl-base"
    sgm = [m.name for m in modules if m.component == "unet" and re.match(SGM_NAME, m.name)]
    # SD1/SD2 have attention in input block 1 and twelve input blocks; SDXL has neither
    sd1 = any(re.match(r"(model[._]diffusion_model[._])?(input_blocks[._]1[._]1|(in|out)put_blocks[._](9|1[01]))[._]",
                       n) for n in sgm)
    return "sdxl-base" if sgm and not sd1 else "sd1"


def canonical(source: TensorSource, family: str | None = None) -> tuple[list[Out], str, str]:
    """The modules of an adapter file in canonical names, its family, and its alpha dtype."""
    alphas = read_alphas(source)
    adapter = parse(source, alphas)
    family = family or adapter_family(source, adapter.modules)
    alpha_dtypes = Counter(source.tensors[k].dtype for k in adapter.alpha_keys if k.endswith(".alpha"))
    outs: dict[str, Out] = {}
    for m in adapter.modules:
        path = dotted(m.name) if m.naming == "kohya" else m.name.removeprefix("model.diffusion_model.")
        if path is not None:
            path = unet_to_diffusers(path, family) if m.component == "unet" else hub_name(path)
        if path is None:
            raise FormatError(source.path, f"module '{m.name}' has a name sdport cannot map to a {family} module",
                              "merge it into a base instead: a base's own names resolve every module")
        factors = {role: _lazy(source, name) for role, name in m.factors.items()}
        out = Out(m.component, path, m.kind, factors, m.alpha, m.rslora, m.on_input)
        if out.label in outs:
            raise FormatError(source.path, f"two modules of the file update {out.label}", "the file is damaged")
        outs[out.label] = out
    return list(outs.values()), family, alpha_dtypes.most_common(1)[0][0] if alpha_dtypes else "F32"


def _lazy(source: TensorSource, name: str) -> Lazy:
    info = source.tensors[name]
    return Lazy(info.dtype, info.shape, lambda: source.read(name))


def computed(a: np.ndarray, dtype: str) -> Lazy:
    """Values computed here (fp32), written as ``dtype``."""
    a = cast(np.require(np.asarray(a, dtype=np.float32), requirements="C"), dtype)
    return Lazy(dtype, a.shape, lambda: a)


def refactorable(out: Out) -> bool:
    """Whether the module is a ΔW LoRA can approximate but not hold as it is (LoHa, LoKr, Tucker, full)."""
    return (out.kind in ("loha", "lokr", "full") or "mid" in out.factors) and "bias" not in out.factors


def as_lora(out: Out, rank: int, dtype: str, family: str) -> tuple[Out, float]:
    """A LoRA of at most ``rank`` closest to the module's scaled ΔW (SVD, alpha = rank), and its relative error.

    A DoRA magnitude is kept: it renormalises W + ΔW, whatever factors ΔW comes from.
    """
    roles = {r: f for r, f in out.factors.items() if r not in MAGNITUDES}
    d = out.scale * delta({"full": "diff"}.get(out.kind, out.kind), {r: f.get() for r, f in roles.items()})
    shape = _kernel_shape(out.path, d.shape, family)
    up, down, error = factorize(d.reshape(shape[0], -1), rank)
    factors = {"up": computed(up.reshape(shape[0], -1, *([1] * (len(shape) - 2))), dtype),
               "down": computed(down.reshape(down.shape[0], *shape[1:]), dtype),
               **{r: f for r, f in out.factors.items() if r in MAGNITUDES}}
    return Out(out.component, out.path, "lora", factors, float(up.shape[1])), error


def _kernel_shape(path: str, shape: tuple[int, ...], family: str) -> tuple[int, ...]:
    """ΔW's shape with its conv kernel: LoHa and LoKr store a conv's flattened, [out, in·kh·kw]."""
    if len(shape) != 2 or not path.startswith(("down_blocks", "up_blocks", "mid_block", "conv_")):
        return shape
    if path.endswith(CONV3X3) and shape[1] % 9 == 0:
        return (shape[0], shape[1] // 9, 3, 3)
    # 1×1 convs: every resnet's shortcut, and SD1's attention projections (SD2 and SDXL made them linear)
    if path.endswith("conv_shortcut") or (family == "sd1" and path.endswith(("proj_in", "proj_out"))):
        return (*shape, 1, 1)
    return shape


def check_format(to: str) -> None:
    if to not in FORMATS:
        raise SdportError(None, f"unknown adapter format {to!r}", f"choose one of {', '.join(FORMATS)}")


def entries(outs: list[Out], to: str, family: str, alpha_dtype: str) -> tuple[dict[str, Lazy], dict[str, str]]:
    """Tensor name → tensor, and metadata, of ``outs`` in format ``to``."""
    check_format(to)
    sdxl = family.startswith("sdxl")
    tensors: dict[str, Lazy] = {}
    if to == "kohya":
        for o in outs:
            _kohya(o, sdxl, family, alpha_dtype, tensors)
        return tensors, {}
    if to == "peft":
        return tensors, _peft(outs, tensors, alpha_dtype)
    _old(outs, tensors)
    return tensors, {}


def _kohya(o: Out, sdxl: bool, family: str, alpha_dtype: str, tensors: dict[str, Lazy]) -> None:
    path = o.path
    if o.component == "unet" and sdxl:
        path = unet_to_sgm(o.path, family) or o.path  # kohya names SDXL's UNet after SGM; others stay as diffusers
    prefix = "lora_te1" if sdxl and o.component == "text_encoder" else KOHYA_PREFIX[o.component]
    name = f"{prefix}_{underscored(path)}"
    for role, t in o.factors.items():
        if role == "magnitude":  # PEFT's magnitude is per output row: LyCORIS's output-axis dora_scale [out, 1, …]
            ndim = len(o.factors["down"].shape)
            t = Lazy(t.dtype, (math.prod(t.shape),) + (1,) * (ndim - 1), _reshaped(t, ndim))
            role = "dora"
        suffix = {"dora": "dora_scale", "bias": "b_norm" if o.kind == "norm" else "diff_b"}.get(role) \
            or SUFFIX[(o.kind, role)]
        tensors[f"{name}.{suffix}"] = t
    if o.rslora:  # rs-LoRA as LyCORIS stores it, so that alpha/rank gives the scale
        tensors[f"{name}.alpha"] = computed(np.float32((o.alpha or o.rank) * math.sqrt(o.rank)), alpha_dtype)
    elif o.alpha is not None:
        tensors[f"{name}.alpha"] = computed(np.float32(o.alpha), alpha_dtype)
    if o.kind == "ia3":
        tensors[f"{name}.on_input"] = Lazy("I64", (), lambda v=int(o.on_input): np.array(v, np.int64))


def _reshaped(t: Lazy, ndim: int) -> Callable[[], np.ndarray]:
    return lambda: t.get().reshape(-1, *([1] * (ndim - 1)))


def _peft(outs: list[Out], tensors: dict[str, Lazy], alpha_dtype: str) -> dict[str, str]:
    configs: dict[str, dict] = {}
    refused = [o.label for o in outs if o.kind != "lora" or "mid" in o.factors or "bias" in o.factors]
    if refused:
        raise SdportError(None, f"{len(refused)} modules are not plain LoRA and PEFT cannot hold them: "
                          + ", ".join(refused[:3]), "pass --rank R for a LoRA approximation, or keep kohya format")
    for comp in sorted({o.component for o in outs}):
        mine = [o for o in outs if o.component == comp]
        dora = {("dora" in o.factors or "magnitude" in o.factors) for o in mine}
        if len(dora) > 1 or len({o.rslora for o in mine}) > 1:
            raise SdportError(None, f"{comp}: some modules use DoRA (or rs-LoRA) and some do not",
                              "PEFT sets that once per component; keep kohya format")
        ranks = Counter(o.rank for o in mine)
        alphas = Counter(o.alpha or float(o.rank) for o in mine)  # alpha 0 means alpha = rank; PEFT's 0 is 0
        r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        # PEFT matches these by suffix: without text_model. they fit CLIP with and without that level
        key = {o.path: o.path.removeprefix("text_model.") for o in mine}
        configs[comp] = {"r": r, "lora_alpha": alpha, "target_modules": sorted(key.values()),
                         "rank_pattern": {key[o.path]: o.rank for o in mine if o.rank != r},
                         "alpha_pattern": {key[o.path]: a for o in mine if (a := o.alpha or float(o.rank)) != alpha},
                         "use_dora": dora.pop(), "use_rslora": mine[0].rslora}
        for o in mine:
            base = f"{comp}.{o.path}"
            tensors[f"{base}.lora_A.weight"], tensors[f"{base}.lora_B.weight"] = o.factors["down"], o.factors["up"]
            mag = o.factors.get("magnitude") or o.factors.get("dora")
            if mag is not None:
                tensors[f"{base}.lora_magnitude_vector"] = _peft_magnitude(o, mag)
    flat = {f"{comp}.{k}": v for comp, config in configs.items() for k, v in config.items()}
    return {"lora_adapter_metadata": json.dumps(flat, sort_keys=True), ALPHA_DTYPE_KEY: alpha_dtype}


def _peft_magnitude(o: Out, mag: Lazy) -> Lazy:
    """DoRA's magnitude as PEFT holds it: [out] for a linear, [1, out, 1, 1] for a conv; PEFT norms output rows."""
    block = (o.factors["up"].shape[0], *o.factors["down"].shape[1:])
    if "dora" in o.factors and dora_axis(mag.shape, block) != 0:
        raise SdportError(None, f"{o.label}: DoRA normed per input column cannot be written as PEFT",
                          "PEFT norms per output row; keep kohya format")
    shape = (1, block[0], 1, 1) if len(block) == 4 else (block[0],)
    return Lazy(mag.dtype, shape, lambda: mag.get().reshape(shape))


def _old(outs: list[Out], tensors: dict[str, Lazy]) -> None:
    refused = [o.label for o in outs if o.kind != "lora" or set(o.factors) != {"up", "down"}
               or not is_attention(o.path)]
    if refused:
        raise SdportError(None, f"{len(refused)} modules are not attention-projection LoRAs, all the old diffusers "
                          f"format holds: " + ", ".join(refused[:3]), "write kohya or peft instead")
    for o in outs:
        m = is_attention(o.path)
        attn, proj = m[1], OLD_NAMES[m[2]]
        base = f"{o.component}.{attn}.processor.{proj}_lora" if o.component == "unet" else \
            f"{o.component}.{attn}.{proj}_lora"
        up = o.factors["up"]
        if o.scale != 1.0:  # the format has no alpha: fold alpha/rank into up (rounded once to up's dtype)
            up = Lazy(up.dtype, up.shape, lambda u=up, s=o.scale: cast(cast(u.get(), "F32") * np.float32(s), u.dtype))
        tensors[f"{base}.down.weight"], tensors[f"{base}.up.weight"] = o.factors["down"], up


def write(dst: str, tensors: dict[str, Lazy], metadata: dict[str, str], *, force: bool, inputs: list[str]) -> None:
    """Write the adapter file atomically (safetensors)."""
    check_target(dst, force=force, inputs=inputs)
    with SafetensorsWriter(dst, force=force) as w:
        w.begin([Slot(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()], metadata)
        for name, t in tensors.items():
            w.write(name, t.get())
        w.commit()


def convert_adapter(src: str, dst: str, *, to: str, rank: int | None = None, dtype: str | None = None,
                    force: bool = False) -> Written:
    """Rewrite adapter ``src`` in format ``to``; ``rank`` re-factorises LyCORIS modules as LoRA (lossy, reported)."""
    check_format(to)
    with open_tensors(src) as source:
        outs, family, alpha_dtype = canonical(source)
        alpha_dtype = source.metadata.get(ALPHA_DTYPE_KEY, alpha_dtype)
        errors = {}
        if rank is not None:
            if rank < 1:
                raise SdportError(None, f"--rank {rank} is not a positive number", None)
            for k, o in enumerate(outs):  # (IA)³, norm and bias updates stay as they are: kohya holds them
                if refactorable(o):
                    factor_dtype = dtype or next(iter(o.factors.values())).dtype
                    outs[k], errors[o.label] = as_lora(o, rank, factor_dtype, family)
        tensors, metadata = entries(outs, to, family, alpha_dtype)
        write(dst, tensors, {**kept_metadata(source.metadata, refactored=bool(errors)), **metadata}, force=force,
              inputs=[src])
    notes = [f"alpha/rank folded into lora up for {sum(o.scale != 1.0 for o in outs)} modules (the format has "
             "no alpha; values rounded once)"] if to == "diffusers-old" and any(o.scale != 1.0 for o in outs) else []
    return Written(dst, to, len(outs), len(tensors), errors, notes)


def kept_metadata(metadata: dict[str, str], *, refactored: bool) -> dict[str, str]:
    """The training metadata worth carrying over: not the hashes of the old file's bytes, nor, once modules were
    re-factorised, what says which network algorithm and rank made them."""
    stale = ("sshs_", "modelspec.hash_") + (("ss_network_",) if refactored else ())
    return {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.")) and not k.startswith(stale)}


def combine(specs: list[str], dst: str, *, to: str = "kohya", dtype: str = "F32", force: bool = False) -> Written:
    """One LoRA equal to the sum of ``specs`` (``FILE[:RATIO]``) at their ratios, by concatenating ranks."""
    check_format(to)
    if len(specs) < 2:
        raise SdportError(None, "combine needs at least two adapters", "lora combine A[:R] B[:R] OUT")
    groups: dict[str, list[tuple[Out, float]]] = {}
    families = set()
    sources = []
    try:
        for spec in specs:
            path, ratio = parse_spec(spec)
            source = open_tensors(path)
            sources.append(source)
            outs, family, _ = canonical(source)
            families.add(family)
            for o in outs:
                if o.kind != "lora" or set(o.factors) != {"up", "down"}:
                    raise SdportError(path, f"module {o.label} is {o.kind}" + (" with more than up/down" if
                                      o.kind == "lora" else ""), "combine concatenates plain LoRA ranks; convert it "
                                      "with `sdport lora convert --rank R` first")
                groups.setdefault(o.label, []).append((o, ratio))
        if len(families) > 1:
            raise SdportError(None, f"the adapters are for different families ({', '.join(sorted(families))})", None)
        outs = [_concat(label, parts, dtype) for label, parts in groups.items()]
        tensors, metadata = entries(outs, to, families.pop(), "F32")
        write(dst, tensors, {**metadata, "sdport_combined_from": json.dumps(specs)}, force=force,
              inputs=[parse_spec(s)[0] for s in specs])
    finally:
        for source in sources:
            source.close()
    return Written(dst, to, len(outs), len(tensors))


def _concat(label: str, parts: list[tuple[Out, float]], dtype: str) -> Out:
    first = parts[0][0]
    ups, downs = [], []
    for o, ratio in parts:
        up, down = cast(o.factors["up"].get(), "F32"), cast(o.factors["down"].get(), "F32")
        if up.shape[0] != first.factors["up"].shape[0] or down.shape[1:] != tuple(first.factors["down"].shape[1:]):
            raise SdportError(None, f"{label}: the adapters' factors have different shapes "
                              f"({list(down.shape)} vs {list(first.factors['down'].shape)})",
                              "they were made for different models or kernels")
        ups.append(up * np.float32(ratio * o.scale))
        downs.append(down)
    up, down = np.concatenate(ups, axis=1), np.concatenate(downs, axis=0)
    return Out(first.component, first.path, "lora", {"up": computed(up, dtype), "down": computed(down, dtype)},
               float(down.shape[0]))


def output_dtype(name: str | None) -> str | None:
    """``fp16``/``bf16``/``fp32`` → dtype code; None or ``keep`` keeps the input's."""
    return {None: None, "keep": None, "fp16": "F16", "bf16": "BF16", "fp32": "F32"}[name]
