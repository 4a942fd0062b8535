"""One side of a check: a model (any form or source, its adapters merged) planned into the diffusers layout,
and — for the output check — the runtime that runs it."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from ..errors import SdportError
from ..request import ConvertRequest, LoraSpec
from ..targets.onnx import component_configs, component_tensors
from .outputs import run_job

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from ..plan import Plan
    from .outputs import Backend, Job

DTYPE_LABELS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
#: a lone component's diffusers class → the pipeline component it is
LONE = {"AutoencoderKL": "vae", "UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder",
        "CLIPTextModelWithProjection": "text_encoder_2"}


@dataclass
class Side:
    """A model as verify sees it: its diffusers-layout plan, how to read the plan's inputs, and its runtime."""

    label: str
    shown: str  # the source as the user gave it
    path: str  # where it is on disk (a download's place in the cache)
    plan: Plan
    read: Callable[[str], np.ndarray]
    family: str
    layout: str
    configs: dict[str, dict]
    runtime: str = ""
    backend: Backend | None = None
    worker: Callable[[Job], dict[str, np.ndarray]] | None = None  # a runtime in another interpreter
    note: str = ""

    def run(self, job: Job) -> dict[str, np.ndarray]:
        """Every output of ``job`` on this side, in its runtime."""
        if self.worker is not None:
            return self.worker(job)
        if self.backend is None:
            raise SdportError(self.shown, "was opened without a runtime", "report a bug")
        return run_job(self.backend, job)


def open_side(stack: ExitStack, source: str | os.PathLike[str], label: str, *,
              loras: list[str | LoraSpec] | tuple[str | LoraSpec, ...] = (), variant: str | None = None,
              progress: bool = False, scratch: str = "", dtype: str | None = None, runtime: bool = False,
              torch_only: bool = False) -> Side:
    """Open ``source`` (its LoRAs merged, cast to ``dtype``) as a plan; with ``runtime``, load nothing yet but
    choose the runtime: onnxruntime for an ONNX export, else torch computing in ``dtype`` (fp32 by default)."""
    from ..api import planned

    shown = os.fspath(source)
    request = replace(ConvertRequest.build(shown, f"<{label}>", to="diffusers", dtype=dtype or "keep", loras=loras,
                                           variant=variant), in_memory=True)
    plan, job = stack.enter_context(planned(request, progress=progress))
    found = job.model.found
    if found.family == "lora":
        raise SdportError(shown, "is a LoRA adapter: verify compares models", "merge it into one with --lora")
    side = Side(label, shown, job.model.path, plan, job.source.read, found.family, found.layout, {})
    if runtime:
        tensors = component_tensors(plan)
        side.configs = component_configs(plan, list(tensors))
        if "" in tensors:  # a lone component: named after its class
            cfg = side.configs.pop("")
            name = LONE.get(cfg.get("_class_name") or (cfg.get("architectures") or [""])[0], "")
            if not name:
                raise SdportError(shown, f"a lone {found.family} has no outputs verify can compare",
                                  "compare its tensors with --tensors")
            tensors[name], side.configs[name] = tensors.pop(""), cfg
        _attach(side, job.model.kind, tensors, request, scratch, torch_only, dtype, progress)
    return side


def _attach(side: Side, kind: str, tensors, request: ConvertRequest, scratch: str,
            torch_only: bool, dtype: str | None, progress: bool) -> None:
    if kind == "onnx":
        if torch_only:
            raise SdportError(side.shown, "--dtypes runs a model through torch at each precision, and this is an "
                              "ONNX export", "export it at each precision and compare the exports")
        from .backends.ort import OrtBackend

        folder = side.path if not request.loras else _blended(request, scratch, side.label, progress)
        side.backend, side.runtime = OrtBackend(folder), "onnxruntime"
        return
    if side.layout == "mindone" and not torch_only and _mindspore(side, tensors, request, scratch):
        return
    from ..trace.onnx import specs
    from .backends.torch import TorchBackend

    names = [c for c in ("text_encoder", "text_encoder_2", "unet", "vae") if c in tensors]
    side.backend = TorchBackend(tensors, side.read, side.configs, specs(names, side.configs),
                                dtype=dtype or "F32", label=side.shown)
    side.runtime = "torch" + ("" if dtype in (None, "F32") else f" ({DTYPE_LABELS[dtype]})")


def _mindspore(side: Side, tensors, request: ConvertRequest, scratch: str) -> bool:
    """Run a MindOne checkpoint in MindSpore: here if it imports, else in ``SDPORT_MINDSPORE_PYTHON``'s interpreter;
    False (torch runs it, and the report says so) when there is neither."""
    from .backends import mindspore

    if mindspore.available():
        side.backend = mindspore.GraphBackend(mindspore.MindSporeOps(), tensors, side.read, side.configs)
        side.runtime = "mindspore"
        return True
    python = mindspore.worker_python()
    if python is None:
        side.note = (f"{side.label} is a MindOne checkpoint, run in torch: MindSpore is not installed here "
                     f"(set {mindspore.ENV} to the python of MindSpore's environment)")
        return False
    side.worker = partial(mindspore.run_elsewhere, python, side.path, folder=scratch, loras=request.loras,
                          variant=request.variant)
    side.runtime = "mindspore"
    return True


def _blended(request: ConvertRequest, scratch: str, label: str, progress: bool) -> str:
    """An ONNX export with the side's adapters blended in, written to the scratch folder (onnxruntime reads files)."""
    from ..api import convert

    out = os.path.join(scratch, f"side-{label}")
    convert(request.source, out, to="onnx", loras=list(request.loras), progress=progress)
    return out
