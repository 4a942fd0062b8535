"""Merging adapters into a conversion plan: each module becomes a ``Patch`` on the base tensor it updates.

The adapters' tensors join the base's in one ``TensorSource`` (named ``lora<i>:<key>``), so the
plan streams them like any input: a patched output reads its base tensor and its factors, applies
each adapter's update in fp32 (``Σ ratio · alpha/rank · ΔW``, DoRA and (IA)³ as ``patches`` says),
then the usual op and one cast. Every module must land on a base weight (and bias, for ``diff_b``
and ``b_norm``) with a matching shape; anything else is an error naming the modules, unless the
user allows unmatched ones.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace

from ..errors import SdportError
from ..families import PIPELINES
from ..io import open_tensors
from ..io.base import TensorSource
from ..patches import Patch, fits
from ..plan import Plan
from .formats import Adapter, Module, base_family, module_kind, parse, read_alphas, scale
from .resolve import Target, build_index


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


def parse_spec(spec: str) -> tuple[str, float]:
    """``FILE[:RATIO]`` → (file, ratio); the ratio defaults to 1."""
    path, sep, ratio = spec.rpartition(":")
    if sep and path and not os.path.exists(spec):
        try:
            value = float(ratio)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value):
            raise SdportError(path, f"ratio {ratio!r} is not a finite number", "write FILE:0.8")
        return path, value
    return spec, 1.0


def merge_adapters(plan: Plan, base: TensorSource, family: str, diffusers_layout: bool, specs: list[str], *,
                   allow_unmatched: bool = False, read_as: dict[str, str] | None = None,
                   default_alpha: float | None = None) -> tuple[TensorSource, list[AdapterReport]]:
    """Attach every adapter in ``specs`` to ``plan`` as patches; returns the combined source to execute with.

    ``default_alpha`` is the alpha of modules whose file stores none (MindOne's LoRAs; the user says it).

    ``read_as`` maps a base weight to the tensor the plan reads in its place (``--ema``: its EMA copy),
    so the update lands on what is written.
    """
    index = build_index(base, family, diffusers_layout)
    combined = TensorSource(base.path, base.format, dict(base.tensors), dict(base.metadata), dict(base.non_tensors),
                            base.root)
    patches: dict[str, list[Patch]] = {}
    reports = []
    for i, spec in enumerate(specs):
        path, ratio = parse_spec(spec)
        with open_tensors(path) as source:
            adapter = parse(source, read_alphas(source))
            trained_on = base_family(source, adapter)
            if trained_on and family in PIPELINES and trained_on != family:
                raise SdportError(path, f"is a LoRA for {trained_on}, the base is {family}",
                                  "use a base of the family the LoRA was trained on")
            names = {k: f"lora{i}:{k}" for k in source.tensors}
            combined.tensors.update({names[k]: replace(v, name=names[k]) for k, v in source.tensors.items()})
            plan.dropped.update({names[k]: "alpha or flag, read into the merge" for k in adapter.alpha_keys})
            report = AdapterReport(path, adapter.format, ratio)
            for module in adapter.modules:
                found = _targets(index, module, read_as or {})
                if found is None:
                    report.unmatched.append(module.label)
                    plan.dropped.update({names[f]: "unmatched LoRA module (--allow-unmatched)"
                                         for f in module.factors.values()})
                    continue
                for target, roles in found:
                    if module.alpha is None and default_alpha is not None:
                        module.alpha = default_alpha
                    patch = _patch(source, adapter, module, roles, target, names, ratio)
                    patches.setdefault(target.tensor, []).append(patch)
                report.applied[(module.component, module_kind(source, module))] += 1
            _check_matches(adapter, report, family, allow_unmatched)
            reports.append(report)
    _attach(plan, patches)
    return combined, reports


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
