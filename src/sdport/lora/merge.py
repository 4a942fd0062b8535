"""Merging adapters into a conversion plan: each module becomes a ``Patch`` on the base tensor it updates.

The adapters' tensors join the base's in one ``TensorSource`` (named ``lora<i>:<key>``), so the
plan streams them like any input: a patched output reads its base tensor and its factors, applies
each adapter's update in fp32 (``Σ ratio · alpha/rank · ΔW``, DoRA and (IA)³ as ``patches`` says),
then the usual op and one cast. Every module must land on a base weight (and bias, for ``diff_b``
and ``b_norm``) with a matching shape; anything else is an error naming the modules, unless the
user allows unmatched ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from ..errors import SdportError
from ..families import Family
from ..io.base import TensorSource
from ..model import Model
from ..patches import Patch, fits
from ..plan import Plan
from .formats import Adapter, Module, base_family, module_kind, parse, read_alphas, scale
from .resolve import Target, build_index

#: the reason of an adapter's alpha (or (IA)³ flag) tensors: not left out, read into the scale of the merge
READ_INTO_MERGE = "alpha or flag, read into the merge"

@dataclass
class AdapterReport:
    """What one adapter did: modules applied by component and kind, and those that found no target."""

    path: str
    format: str
    ratio: float
    applied: Counter = field(default_factory=Counter)  # (component, kind) → count
    unmatched: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = ", ".join(f"{comp} {kind} {n}" for (comp, kind), n in sorted(self.applied.items()))
        return (f"{self.path} ({self.format}, ratio {self.ratio:g}): {sum(self.applied.values())} modules applied"
                + (f" ({parts})" if parts else "") + (f", {len(self.unmatched)} unmatched" if self.unmatched else ""))


def merge_adapters(plan: Plan, source: TensorSource, family: Family, diffusers_layout: bool,
                   adapters: list[tuple[Model, float]], *, allow_unmatched: bool = False,
                   read_as: dict[str, str] | None = None, default_alpha: float | None = None) -> list[AdapterReport]:
    """Attach every adapter (opened, with its ratio) to ``plan`` as patches; their tensors join ``source``.

    ``default_alpha`` is the alpha of modules whose file stores none (MindOne's LoRAs; the user says it).
    ``read_as`` maps a base weight to the tensor the plan reads in its place (``--ema``: its EMA copy),
    so the update lands on what is written.
    """
    index = build_index(source, family, diffusers_layout)
    patches: dict[str, list[Patch]] = {}
    reports = []
    for i, (model, ratio) in enumerate(adapters):
        tensors = model.source
        adapter = parse(tensors, read_alphas(tensors), model.found.adapter_format)
        trained_on = base_family(tensors, adapter)
        if trained_on and family.whole and trained_on != family.name:
            raise SdportError(model.path, f"is a LoRA for {trained_on}, the base is {family.name}",
                              "use a base of the family the LoRA was trained on")
        names = source.join(f"lora{i}:", tensors)
        plan.dropped.update({names[k]: READ_INTO_MERGE for k in adapter.alpha_keys})
        plan.dropped.update({names[k]: why for k, why in adapter.left.items()})
        report = AdapterReport(model.path, adapter.format, ratio)
        for module in adapter.modules:
            found = _targets(index, module, read_as or {})
            if found is None:
                report.unmatched.append(module.label)
                plan.dropped.update({names[f]: "unmatched LoRA module (--allow-unmatched)"
                                     for f in module.factors.values()})
                continue
            if module.alpha is None and default_alpha is not None:
                module.alpha = default_alpha
            for target, roles in found:
                patch = _patch(tensors, adapter, module, roles, target, names, ratio)
                patches.setdefault(target.tensor, []).append(patch)
            report.applied[(module.component, module_kind(tensors, module))] += 1
        _check_matches(adapter, report, family.name, allow_unmatched)
        reports.append(report)
    _attach(plan, patches)
    return reports


def _targets(index: dict[str, Target], module: Module, read_as: dict[str, str]
             ) -> list[tuple[Target, tuple[str, ...]]] | None:
    """The weight (and bias) a module updates, each with the roles of the factors that update it; None if absent."""
    key = f"{module.component}:{module.name}"
    weight_roles = tuple(r for r in module.factors if r != "bias")
    wanted = ([(key, weight_roles)] if weight_roles else []) + ([(key + "#bias", ("bias",))]
                                                                 if "bias" in module.factors else [])
    found = []
    for name, roles in wanted:
        target = index.get(name)
        if target is None:
            return None
        found.append((replace(target, tensor=read_as.get(target.tensor, target.tensor)), roles))
    return found


def _patch(source: TensorSource, adapter: Adapter, module: Module, roles: tuple[str, ...], target: Target,
           names: dict[str, str], ratio: float) -> Patch:
    if roles == ("bias",):  # a bias update is a plain difference, whatever the algorithm of the weight's
        patch = Patch(target.tensor, (names[module.factors["bias"]],), ("diff",), 1.0, "diff", target.rows, ratio)
    else:
        patch = Patch(target.tensor, tuple(names[module.factors[r]] for r in roles), roles,
                      scale(module.rank(source), module.alpha, module.rslora), module.patch_kind, target.rows, ratio)
    shapes = [source.tensors[module.factors[r]].shape for r in roles]
    if not fits(patch, target.shape, shapes):
        raise SdportError(adapter.path, f"{module.kind} module '{module.label}' ({[list(s) for s in shapes]}) does "
                          f"not fit '{target.tensor}' {list(target.shape)}",
                          "the LoRA was made for another model (family or size)")
    return patch


def _check_matches(adapter: Adapter, report: AdapterReport, family: str, allow_unmatched: bool) -> None:
    if report.unmatched and not report.applied:
        hint = "it is an SDXL adapter" if any(m.component == "text_encoder_2" or "input_blocks_7" in m.name
                                               for m in adapter.modules) else "it was made for another model"
        raise SdportError(adapter.path, f"none of its {len(adapter.modules)} modules matches this {family} model",
                          f"{hint}; use a base of the family it was trained on")
    if report.unmatched and not allow_unmatched:
        shown = ", ".join(report.unmatched[:5]) + (f" and {len(report.unmatched) - 5} more"
                                                   if len(report.unmatched) > 5 else "")
        raise SdportError(adapter.path, f"{len(report.unmatched)} module(s) match no weight of the base: {shown}",
                          "pass --allow-unmatched to merge the rest")


def _attach(plan: Plan, patches: dict[str, list[Patch]]) -> None:
    """Give every output the patches of its inputs; an update whose base tensor is not written is an error."""
    placed = set()
    for out in plan.files:
        for k, t in enumerate(out.tensors):
            mine = tuple(p for i in t.inputs for p in patches.get(i, ()))
            if mine:
                out.tensors[k] = replace(t, patches=mine)
                placed.update(t.inputs)
    missing = [name for name in patches if name not in placed]
    if missing:
        raise SdportError(None, f"LoRA updates {missing[:3]} target weights this conversion does not write",
                          "include their component in --components")
