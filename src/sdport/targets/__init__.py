"""Where a conversion can go: the route table — for each target, the planner of each kind of input it takes.

A target turns an opened model (``model.Model``: its tensors, what it is, its kind) and the request into
a ``Plan``; ``steps`` then apply ``--allow-unknown``, ``--ema``, ``--base``, ``--lora`` and the cast, and
the target's ``finish`` (if any) gives the plan its final form — MindOne names, ONNX graphs. Adding a
target is adding a module here and a row in ``ROUTES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SdportError
from ..model import KINDS, Model
from ..plan import Plan
from ..request import ConvertRequest
from . import diffusers, mindone, onnx, single_file

if TYPE_CHECKING:
    from ..steps import Run

Planner = Callable[[Model, ConvertRequest], Plan]


@dataclass(frozen=True)
class Target:
    """A target: its planner for each kind of input, its last pass, and how the cast step treats it.

    Attributes:
        plans: input kind (``original``, ``diffusers``, ``onnx``) → the planner; a kind missing is refused.
        finish: the pass after the steps (renames, graphs); None when the steps' plan is final.
        default_dtype: the dtype floats are cast to when the request keeps the input's (MindOne: fp32).
        casts: whether the cast step applies (an ONNX export types each graph itself).
    """

    name: str
    plans: Mapping[str, Planner]
    finish: Callable[[Plan, Run], Plan] | None = None
    default_dtype: str | None = None
    casts: bool = True


#: target → planner per input kind
ROUTES: dict[str, Target] = {t.name: t for t in (
    Target("single-file", {"original": single_file.repackage, "diffusers": single_file.from_diffusers,
                           "onnx": single_file.from_export}),
    Target("diffusers", {"original": diffusers.from_original, "diffusers": diffusers.rewrite,
                         "onnx": diffusers.from_export}),
    Target("mindspore", {"original": single_file.repackage, "diffusers": single_file.from_diffusers,
                         "onnx": single_file.from_export}, finish=mindone.finish, default_dtype=mindone.DEFAULT_DTYPE),
    Target("onnx", {"original": onnx.from_original, "diffusers": onnx.from_diffusers, "onnx": onnx.rewrite},
           finish=onnx.finish, casts=False),
)}


def route(model: Model, request: ConvertRequest) -> tuple[Target, Planner]:
    """The target of ``request`` for this input, and the planner for its kind.

    Without ``--to``, an output with a suffix is a single file, else a diffusers folder — or, when the
    input is an ONNX export, the export re-written (adapters blended in).
    """
    name = request.target or ("onnx" if model.kind == "onnx" else "diffusers")
    target = ROUTES[name]
    planner = target.plans.get(model.kind)
    if planner is None:
        takes = ", ".join(k for k in KINDS if k in target.plans)
        raise SdportError(model.path, f"a {model.kind} model does not convert to {name}", f"{name} takes {takes}")
    return target, planner
