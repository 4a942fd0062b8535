"""Some components of a model written into a whole one: a fine-tuned UNet folder into a full original or MindOne file.

The partial input's plan (its tensors under original single-file names) replaces the matching
tensors of the base's own plan; every other tensor comes from the base unchanged. Each replaced
tensor must have the base's shape, and every tensor of the input must land on one of the base's —
anything else is an error naming the tensor, so a UNet of another family cannot slip in.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import SdportError
from .io.base import TensorSource
from .plan import OutputFile, Plan

PREFIX = "base:"


def into_base(plan: Plan, source: TensorSource, base: TensorSource, base_plan: Plan) -> tuple[Plan, TensorSource]:
    """The base's plan with the input's tensors in place of its own, and the source holding both."""
    provided = {t.name: t for t in plan.files[0].tensors}
    tensors, replaced = [], {}
    for t in base_plan.files[0].tensors:
        mine = provided.pop(t.name, None)
        if mine is None:
            tensors.append(replace(t, inputs=tuple(PREFIX + i for i in t.inputs)))
        elif mine.shape != t.shape:
            raise SdportError(source.path, f"'{t.name}' is {list(mine.shape)}, in the base {list(t.shape)}",
                              "the input is not a part of this base's family")
        else:
            tensors.append(mine)
            replaced.update({PREFIX + i: f"replaced by {source.path}" for i in t.inputs})
    if provided:
        name = next(iter(provided))
        raise SdportError(source.path, f"{len(provided)} tensors have no place in the base {base.path}, e.g. '{name}'",
                          "the input is not a part of this base's family")
    combined = TensorSource(source.path, source.format, {**source.tensors, **{
        PREFIX + k: replace(v, name=PREFIX + k) for k, v in base.tensors.items()}}, dict(source.metadata))
    out = base_plan.files[0]
    dropped = {**{PREFIX + k: v for k, v in base_plan.dropped.items()}, **replaced, **plan.dropped}
    return Plan([OutputFile(out.path, out.format, tensors, out.metadata, out.root)], dropped), combined
