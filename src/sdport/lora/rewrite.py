"""Adapter files written anew: ``lora convert`` (kohya ⇄ PEFT ⇄ old diffusers) and ``lora combine``.

Every module first gets its canonical name — component and dotted diffusers path (``canonical``) — so
any input naming reaches any output naming. Renaming is lossless: factors are copied byte for byte
and alpha moves between kohya's per-module ``.alpha`` tensor and PEFT's ``lora_alpha`` /
``alpha_pattern`` metadata, so kohya → PEFT → kohya gives back the same tensors (a kohya file
without alphas comes back with ``alpha = rank`` written out: the same scale). What a format
cannot hold is refused by name (LoHa in PEFT, an MLP module in the old attention-processor
format) unless ``rank`` asks for a LoRA re-factorisation by SVD, whose relative error is reported
per module. ``combine`` concatenates ranks, which is exact: ``[s₁up₁ s₂up₂] @ [down₁; down₂]``.
Each output is a plan, validated (every input tensor written or left out for a stated reason) and
executed like a model conversion's.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from ..dtypes import cast
from ..errors import SdportError
from ..execute import execute
from ..io.base import TensorSource
from ..model import open_model
from ..patches import dora_axis
from ..plan import SAFETENSORS, OutputFile, OutputTensor, Plan, derive, validate
from ..request import LoraSpec
from ..sources import locate
from . import FORMATS
from .canonical import Canonical, Out, as_lora, canonical, computed, refactorable
from .describe import loads_in
from .formats import ROLES, kind_label
from .names import is_attention, underscored, unet_to_sgm

SUFFIX = {(kind, role): suffix for suffix, (kind, role) in ROLES.items() if kind}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
OLD_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out", "q_proj": "to_q", "k_proj": "to_k",
             "v_proj": "to_v", "out_proj": "to_out"}
ALPHA_DTYPE_KEY = "sdport_alpha_dtype"  # kohya alphas' dtype, kept through PEFT so a round trip is bit-exact


@dataclass
class Written:
    """What ``lora convert`` / ``combine`` wrote."""

    output: str
    format: str
    modules: int
    tensors: int
    errors: dict[str, float] = field(default_factory=dict)  # module → relative error of an SVD re-factorisation
    notes: list[str] = field(default_factory=list)
    kinds: tuple[str, ...] = ("lora",)  # the algorithms of its modules

    def lines(self) -> list[str]:
        out = [f"wrote {self.output}: {self.format}, {self.modules} modules, {self.tensors} tensors", loads_line(
            self.format, self.kinds)]
        if self.errors:
            errs = sorted(self.errors.values())
            out.append(f"{len(errs)} modules re-factorised to LoRA: relative error mean {np.mean(errs):.3g}, "
                       f"max {errs[-1]:.3g} ({max(self.errors, key=self.errors.get)})")
        return out + self.notes


def loads_line(fmt: str, kinds: tuple[str, ...] = ("lora",)) -> str:
    """Which programs load what was written, and what to do for the others."""
    programs, note = loads_in(fmt, kinds)
    return f"loads in: {', '.join(programs)}" + (f"; {note}" if note else "")


def check_format(to: str) -> None:
    if to not in FORMATS:
        raise SdportError(None, f"unknown adapter format {to!r}", f"choose one of {', '.join(FORMATS)}")


def entries(outs: list[Out], to: str, family: str, alpha_dtype: str, source: TensorSource
            ) -> tuple[list[OutputTensor], dict[str, str]]:
    """The output tensors (read from ``source``) and metadata of ``outs`` in format ``to``."""
    check_format(to)
    tensors: dict[str, OutputTensor] = {}
    metadata: dict[str, str] = {}
    if to == "kohya":
        for o in outs:
            _kohya(o, family, alpha_dtype, source, tensors)
    elif to == "peft":
        metadata = _peft(outs, source, tensors, alpha_dtype)
    else:
        _old(outs, source, tensors)
    return list(tensors.values()), metadata


def _copy(name: str, source: TensorSource, tensor: str, op: str = "identity", args: tuple = ()) -> OutputTensor:
    return derive(name, None, source, (tensor,), op, args)


def _kohya(o: Out, family: str, alpha_dtype: str, source: TensorSource, tensors: dict[str, OutputTensor]) -> None:
    from ..families import FAMILIES

    sgm = FAMILIES[family].kohya_sgm
    path = o.path
    if o.component == "unet" and sgm:
        path = unet_to_sgm(o.path, family) or o.path  # kohya names SDXL's UNet after SGM; others stay as diffusers
    prefix = "lora_te1" if sgm and o.component == "text_encoder" else KOHYA_PREFIX[o.component]
    name = f"{prefix}_{underscored(path)}"
    for role, t in o.factors.items():
        if role == "magnitude":  # PEFT's magnitude is per output row: LyCORIS's output-axis dora_scale [out, 1, …]
            info = source.tensors[t]
            ndim = len(source.tensors[o.factors["down"]].shape)
            tensors[f"{name}.dora_scale"] = _copy(f"{name}.dora_scale", source, t, "reshape",
                                                  ((info.numel,) + (1,) * (ndim - 1),))
            continue
        suffix = {"dora": "dora_scale", "bias": "b_norm" if o.kind == "norm" else "diff_b"}.get(role) \
            or SUFFIX[(o.kind, role)]
        tensors[f"{name}.{suffix}"] = _copy(f"{name}.{suffix}", source, t)
    alpha = o.alpha
    if o.rslora:  # rs-LoRA as LyCORIS stores it, so that alpha/rank gives the scale
        rank = o.rank(source)
        alpha = (o.alpha or rank) * math.sqrt(rank)
    if alpha is not None:
        tensors[f"{name}.alpha"] = _copy(f"{name}.alpha", source, computed(source, f"{name}.alpha",
                                                                           np.float32(alpha), alpha_dtype))
    if o.kind == "ia3":
        flag = source.put(f"computed:{name}.on_input", np.array(int(o.on_input), np.int64))
        tensors[f"{name}.on_input"] = _copy(f"{name}.on_input", source, flag)


def _peft(outs: list[Out], source: TensorSource, tensors: dict[str, OutputTensor], alpha_dtype: str) -> dict[str, str]:
    refused = [o.label for o in outs if o.kind != "lora" or "mid" in o.factors or "bias" in o.factors]
    if refused:
        raise SdportError(None, f"{len(refused)} modules are not plain LoRA and PEFT cannot hold them: "
                          + ", ".join(refused[:3]), "pass --rank R for a LoRA approximation, or keep kohya format")
    configs = {}
    for comp in sorted({o.component for o in outs}):
        mine = [o for o in outs if o.component == comp]
        configs[comp] = _peft_config(comp, mine, source)
        for o in mine:
            base = f"{comp}.{o.path}"
            for suffix, role in (("lora_A.weight", "down"), ("lora_B.weight", "up")):
                tensors[f"{base}.{suffix}"] = _copy(f"{base}.{suffix}", source, o.factors[role])
            mag = o.factors.get("magnitude") or o.factors.get("dora")
            if mag is not None:
                name = f"{base}.lora_magnitude_vector"
                tensors[name] = _copy(name, source, mag, "reshape", (_peft_magnitude(o, mag, source),))
    flat = {f"{comp}.{k}": v for comp, config in configs.items() for k, v in config.items()}
    return {"lora_adapter_metadata": json.dumps(flat, sort_keys=True), ALPHA_DTYPE_KEY: alpha_dtype}


def _peft_config(comp: str, mine: list[Out], source: TensorSource) -> dict[str, object]:
    """One component's LoraConfig: the most common rank and alpha, the others as patterns."""
    dora = {("dora" in o.factors or "magnitude" in o.factors) for o in mine}
    if len(dora) > 1 or len({o.rslora for o in mine}) > 1:
        raise SdportError(None, f"{comp}: some modules use DoRA (or rs-LoRA) and some do not",
                          "PEFT sets that once per component; keep kohya format")
    rank = {o.path: o.rank(source) for o in mine}
    alpha = {o.path: o.alpha or float(rank[o.path]) for o in mine}  # alpha 0 means alpha = rank; PEFT's 0 is 0
    r, a = Counter(rank.values()).most_common(1)[0][0], Counter(alpha.values()).most_common(1)[0][0]
    # PEFT matches these by suffix: without text_model. they fit CLIP with and without that level
    key = {o.path: o.path.removeprefix("text_model.") for o in mine}
    return {"r": r, "lora_alpha": a, "target_modules": sorted(key.values()),
            "rank_pattern": {key[p]: v for p, v in rank.items() if v != r},
            "alpha_pattern": {key[p]: v for p, v in alpha.items() if v != a},
            "use_dora": dora.pop(), "use_rslora": mine[0].rslora}


def _peft_magnitude(o: Out, mag: str, source: TensorSource) -> tuple[int, ...]:
    """DoRA's magnitude shape as PEFT holds it: [out] for a linear, [1, out, 1, 1] for a conv (output rows)."""
    block = (source.tensors[o.factors["up"]].shape[0], *source.tensors[o.factors["down"]].shape[1:])
    if "dora" in o.factors and dora_axis(source.tensors[mag].shape, block) != 0:
        raise SdportError(None, f"{o.label}: DoRA normed per input column cannot be written as PEFT",
                          "PEFT norms per output row; keep kohya format")
    return (1, block[0], 1, 1) if len(block) == 4 else (block[0],)


def _old(outs: list[Out], source: TensorSource, tensors: dict[str, OutputTensor]) -> None:
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
        tensors[f"{base}.down.weight"] = _copy(f"{base}.down.weight", source, o.factors["down"])
        scale = o.scale(source)  # the format has no alpha: alpha/rank is folded into up, rounded once to its dtype
        tensors[f"{base}.up.weight"] = _copy(f"{base}.up.weight", source, o.factors["up"],
                                             *(("scale", (scale,)) if scale != 1.0 else ()))


def write(dst: str, source: TensorSource, tensors: list[OutputTensor], metadata: dict[str, str],
          left_out: dict[str, str], *, force: bool, protect: tuple[str, ...] = ()) -> None:
    """Write the adapter file atomically (safetensors): validated — every tensor of ``source`` written or in
    ``left_out`` with its reason — and executed like any plan."""
    read = {i for t in tensors for i in t.reads}
    plan = Plan([OutputFile(".", SAFETENSORS, tensors, metadata)],
                dropped={k: why for k, why in left_out.items() if k not in read})
    validate(plan, source)
    execute(plan, source, dst, force=force, progress=False, protect=protect)


def convert_adapter(src: str, dst: str, *, to: str, rank: int | None = None, dtype: str | None = None,
                    force: bool = False) -> Written:
    """Rewrite adapter ``src`` in format ``to``; ``rank`` re-factorises LyCORIS modules as LoRA (lossy, reported)."""
    check_format(to)
    if rank is not None and rank < 1:
        raise SdportError(None, f"--rank {rank} is not a positive number", None)
    local = locate(src, kind="adapter").path
    with open_model(local) as model, TensorSource(local, "adapter", {}) as source:
        read = canonical(model, source)
        alpha_dtype = model.source.metadata.get(ALPHA_DTYPE_KEY, read.alpha_dtype)
        errors, left_out = {}, _alphas_left_out(read, to)
        for k, o in enumerate(read.outs):  # (IA)³, norm and bias updates stay as they are: kohya holds them
            if rank is not None and refactorable(o):
                factor_dtype = dtype or source.tensors[next(iter(o.factors.values()))].dtype
                read.outs[k], errors[o.label] = as_lora(o, source, rank, factor_dtype, read.family)
                left_out.update({f: f"re-factorised as LoRA of rank {rank}" for f in o.factors.values()})
        tensors, metadata = entries(read.outs, to, read.family, alpha_dtype, source)
        write(dst, source, tensors, {**kept_metadata(model.source.metadata, refactored=bool(errors)), **metadata},
              left_out, force=force)
        folded = sum(o.scale(source) != 1.0 for o in read.outs) if to == "diffusers-old" else 0
        kinds = tuple(sorted({kind_label(o.kind, o.factors, source) for o in read.outs}))
    notes = [f"alpha/rank folded into lora up for {folded} modules (the format has no alpha; values rounded "
             "once)"] if folded else []
    if read.left:
        notes.append(f"left out {len(read.left)} tensors that are no module's: {next(iter(read.left.values()))}")
    return Written(dst, to, len(read.outs), len(tensors), errors, notes, kinds)


def _alphas_left_out(read: Canonical, to: str) -> dict[str, str]:
    where = {"kohya": "written anew beside each module", "peft": "in lora_adapter_metadata",
             "diffusers-old": "folded into lora up"}[to]
    return {**dict.fromkeys(read.alpha_keys, f"alpha or (IA)³ flag: {where}"), **read.left}


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
    loras = [LoraSpec.parse(s) for s in specs]
    with ExitStack() as stack:
        paths = [locate(spec.source, kind="adapter").path for spec in loras]
        source = stack.enter_context(TensorSource(paths[0], "adapter", {}))
        groups: dict[str, list[tuple[Out, float]]] = {}
        families = set()
        for i, spec in enumerate(loras):
            read = canonical(stack.enter_context(open_model(paths[i])), source, f"{i}:")
            families.add(read.family)
            for o in read.outs:
                if o.kind != "lora" or set(o.factors) != {"up", "down"}:
                    raise SdportError(spec.source, f"module {o.label} is {o.kind}" + (
                        " with more than up/down" if o.kind == "lora" else ""), "combine concatenates plain LoRA "
                        "ranks; convert it with `sdport lora convert --rank R` first")
                groups.setdefault(o.label, []).append((o, spec.ratio))
        if len(families) > 1:
            raise SdportError(None, f"the adapters are for different families ({', '.join(sorted(families))})", None)
        outs = [_concat(label, parts, dtype, source) for label, parts in groups.items()]
        tensors, metadata = entries(outs, to, families.pop(), "F32", source)
        left_out = dict.fromkeys(source.tensors, "combined into the rank-concatenated factors")
        write(dst, source, tensors, {**metadata, "sdport_combined_from": json.dumps(specs)}, left_out, force=force)
    return Written(dst, to, len(outs), len(tensors))


def _concat(label: str, parts: list[tuple[Out, float]], dtype: str, source: TensorSource) -> Out:
    first = parts[0][0]
    want_up, want_down = source.tensors[first.factors["up"]].shape, source.tensors[first.factors["down"]].shape
    ups, downs = [], []
    for o, ratio in parts:
        up, down = cast(source.read(o.factors["up"]), "F32"), cast(source.read(o.factors["down"]), "F32")
        if up.shape[0] != want_up[0] or down.shape[1:] != tuple(want_down[1:]):
            raise SdportError(None, f"{label}: the adapters' factors have different shapes "
                              f"({list(down.shape)} vs {list(want_down)})", "they were made for different models or "
                              "kernels")
        ups.append(up * np.float32(ratio * o.scale(source)))
        downs.append(down)
    up, down = np.concatenate(ups, axis=1), np.concatenate(downs, axis=0)
    factors = {"up": computed(source, f"{label}.up", up, dtype), "down": computed(source, f"{label}.down", down, dtype)}
    return Out(first.component, first.path, "lora", factors, float(down.shape[0]))
