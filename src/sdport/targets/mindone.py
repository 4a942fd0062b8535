"""``--to mindspore``: a MindSpore checkpoint in MindOne's names (mindspore-lab/mindone), from any plan that writes an
original single file — repackaged, from diffusers, from an ONNX export, LoRAs merged, a ``--base`` filled in.

The plan's outputs are renamed by the family's MindOne rules, SD1's q, k, v fused into one ``in_proj``
(rows [q; k; v]), and what MindOne files never hold left out; floats are fp32 unless a dtype was asked
for, as MindOne's own converters write them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import FormatError
from ..families import Family
from ..families.parts import mindone as names
from ..plan import OutputFile, OutputTensor, Plan

if TYPE_CHECKING:
    from ..steps import Run

#: MindOne's converters write fp32
DEFAULT_DTYPE = "F32"


def finish(plan: Plan, run: Run) -> Plan:
    """The original single file's plan, written as a MindOne checkpoint instead."""
    family = run.family()
    if family.mindone is None:
        raise FormatError(run.model.path, f"MindOne has no names for a {family.name} model",
                          "MindOne checkpoints hold SD1.x, SD2.x and SDXL pipelines")
    return to_mindone(plan, family)


def to_mindone(plan: Plan, family: Family) -> Plan:
    """The plan of an original single file of ``family`` with MindOne's names, SD1's q, k, v fused."""
    rules = family.mindone
    (out,) = plan.files
    tensors: list[OutputTensor] = []
    fused: dict[tuple[str, str], dict[str, OutputTensor]] = {}
    for t in out.tensors:
        m = names.SD1_FUSED.fullmatch(t.name) if rules.fused_qkv else None
        if m is not None:
            fused.setdefault((m[1], m[3]), {})[m[2]] = t
            if len(fused[(m[1], m[3])]) == 3:
                tensors.append(_fuse(fused.pop((m[1], m[3])), m[1], m[3]))
            continue
        new = names.to_mindone(t.name, rules)
        if new is None:
            plan.dropped.update({i: "not held by MindOne checkpoints" for i in t.inputs})
            continue
        tensors.append(replace(t, name=new))
    if fused:
        raise FormatError(None, f"text-encoder layer {next(iter(fused))[0]} lacks some of q, k, v", None)
    return Plan([OutputFile(".", out.writer, tensors)], plan.dropped, plan.unknown)


def _fuse(parts: dict[str, OutputTensor], layer: str, param: str) -> OutputTensor:
    q, k, v = (parts[x] for x in names.QKV)
    for t in (q, k, v):
        if t.op != "identity" or len(t.inputs) != 1:
            raise FormatError(None, f"'{t.name}' is computed ({t.op}); sdport fuses only stored q, k, v", None)
    shape = (q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:])
    return OutputTensor(names.fused_name(layer, param), q.dtype, shape, q.inputs + k.inputs + v.inputs, "concat",
                        (0,), q.patches + k.patches + v.patches)
