"""``lora extract``: a LoRA that turns a base into a fine-tune, by per-module SVD of their difference.

Both models are read through the same name index the merge uses, so they may be in different
layouts (a single file and a diffusers folder) — every linear and conv weight of the UNet and text
encoders is paired by its diffusers module path (q, k, v of a fused ``in_proj`` by row block). Each
difference is factorised in fp32 (convs flattened to [out, in·kh·kw], the kernel kept on ``down``),
one module at a time, so memory stays at one weight pair plus the factors written. The rank is
fixed, or chosen per module as the smallest keeping an energy share within ``min_rank..max_rank``;
the retained energy of every module is reported, and modules whose difference is at most
``min_diff`` are left out and counted, per component. For the old diffusers format, which holds
attention projections only, only those are extracted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..detect import prediction_type
from ..dtypes import cast
from ..errors import SdportError
from ..families import FAMILIES, Family
from ..io.base import TensorSource
from ..model import Model, open_model
from ..sources import locate
from .canonical import Out, computed
from .formats import base_metadata
from .names import is_attention
from .resolve import Target, build_index
from .rewrite import check_format, entries, loads_line, write
from .svd import pick_rank, retained, spectrum, split


@dataclass
class Extracted:
    """What ``lora extract`` wrote and kept."""

    output: str
    family: str
    format: str = "kohya"
    energy: dict[str, float] = field(default_factory=dict)  # module → retained share of Σ S²
    ranks: dict[str, int] = field(default_factory=dict)
    unchanged: Counter = field(default_factory=Counter)  # component → modules with no difference
    largest: dict[str, float] = field(default_factory=dict)  # component → max |ΔW|

    def lines(self, *, every: bool = False) -> list[str]:
        kept = list(self.energy.values())
        out = [f"wrote {self.output}: {len(kept)} modules ({self.family}), rank "
               f"{min(self.ranks.values(), default=0)}–{max(self.ranks.values(), default=0)}, retained energy "
               f"mean {np.mean(kept) if kept else 0:.4f}, min {min(kept, default=0):.4f}"]
        for comp in sorted(set(self.unchanged) | set(self.largest)):
            out.append(f"  {comp}: max |ΔW| {self.largest.get(comp, 0):.3g}, {self.unchanged[comp]} modules unchanged")
        if every:
            out += [f"  {label}: rank {self.ranks[label]}, energy {e:.4f}" for label, e in self.energy.items()]
        return out + [loads_line(self.format)]


def _pairable(model: Model) -> tuple[Family, bool]:
    """The model's family and whether it is in diffusers names; adapters and unknown models are refused."""
    found = model.found
    if found.family not in FAMILIES:
        raise SdportError(model.path, f"is not a full model sdport can pair modules of (found {found.family})",
                          "extract takes a fine-tuned checkpoint and its base")
    return FAMILIES[found.family], model.kind != "original"


def _weight(source: TensorSource, t: Target) -> np.ndarray:
    """The target weight in fp32; of a fused in_proj only its row block's bytes are read."""
    info = source.tensors[t.tensor]
    if t.rows is None or not info.contiguous:
        w = cast(source.read(t.tensor), "F32")
        return w if t.rows is None else w.reshape(t.rows[1], -1, *w.shape[1:])[t.rows[0]]
    k, parts = t.rows
    size = info.nbytes // parts
    block = source.read_flat(info, k * size, size).reshape(info.shape[0] // parts, *info.shape[1:])
    return cast(block, "F32")


def extract(tuned: str, base: str, dst: str, *, rank: int = 32, energy: float | None = None, min_rank: int = 1,
            max_rank: int | None = None, min_diff: float = 0.0, to: str = "kohya", dtype: str = "F16",
            force: bool = False) -> Extracted:
    """Write a LoRA of ``tuned − base`` to ``dst``; see the module docstring."""
    check_format(to)
    if rank < 1 or min_rank < 1 or (max_rank is not None and max_rank < min_rank):
        raise SdportError(None, f"ranks must be ≥ 1 with min ≤ max (rank {rank}, min {min_rank}, max {max_rank})", None)
    if energy is not None and not 0 < energy <= 1:
        raise SdportError(None, f"--energy {energy} is not in (0, 1]", "e.g. --energy 0.9")
    tuned_path, base_path = locate(tuned).path, locate(base).path
    with open_model(tuned_path) as tm, open_model(base_path) as bm, TensorSource(tuned_path, "adapter", {}) as source:
        (family, t_diffusers), (base_family, b_diffusers) = _pairable(tm), _pairable(bm)
        if family != base_family:
            raise SdportError(tuned, f"is {family.name}, the base {base} is {base_family.name}",
                              "extract from its own base")
        ti = build_index(tm.source, family, t_diffusers, aliases=False)
        bi = build_index(bm.source, family, b_diffusers, aliases=False)
        result = Extracted(dst, family.name, to)
        outs = []
        for key, target in ti.items():
            if key.endswith("#bias") or len(target.shape) not in (2, 4) or "embeddings." in key or key not in bi:
                continue
            component, path = key.split(":", 1)
            if to == "diffusers-old" and not is_attention(path):
                continue  # the old format holds attention projections only
            d = _difference(tm.source, target, bm.source, bi[key], key)
            biggest = float(np.max(np.abs(d))) if d.size else 0.0
            result.largest[component] = max(result.largest.get(component, 0.0), biggest)
            if biggest <= min_diff:
                result.unchanged[component] += 1
                continue
            u, s, vh = spectrum(d.reshape(d.shape[0], -1))
            r = pick_rank(s, rank=rank, energy=energy, min_rank=min_rank, max_rank=max_rank)
            up, down, _ = split(u, s, vh, r)
            factors = {"up": computed(source, f"{key}.up", up.reshape(d.shape[0], r, *([1] * (d.ndim - 2))), dtype),
                       "down": computed(source, f"{key}.down", down.reshape(r, *d.shape[1:]), dtype)}
            outs.append(Out(component, path, "lora", factors, float(r)))
            result.energy[key], result.ranks[key] = retained(s, r), r
        if not outs:
            raise SdportError(tuned, f"does not differ from {base} by more than {min_diff} anywhere",
                              "nothing to extract")
        tensors, metadata = entries(outs, to, family.name, dtype, source)
        info = {**base_metadata(family.name, prediction_type(bm.found)[0]), "ss_network_module": "networks.lora",
                "ss_network_dim": str(max(result.ranks.values())),
                "ss_network_alpha": str(max(result.ranks.values())),
                "sdport_extracted": json.dumps({"tuned": str(tuned), "base": str(base), "rank": rank,
                                                "energy": energy})}
        write(dst, source, tensors, {**info, **metadata}, {}, force=force, protect=(tuned_path, base_path))
    return result


def _difference(tuned: TensorSource, target: Target, base: TensorSource, base_target: Target, key: str) -> np.ndarray:
    """tuned − base of one module's weight, in fp32."""
    tuned_w, base_w = _weight(tuned, target), _weight(base, base_target)
    if tuned_w.shape != base_w.shape:
        raise SdportError(tuned.path, f"'{key}' is {list(tuned_w.shape)}, in the base {list(base_w.shape)}",
                          "extract from the model it was fine-tuned from (an inpainting model from an inpainting base)")
    return tuned_w - base_w
