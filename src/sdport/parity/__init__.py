"""``sdport verify``: whether two models are the same — tensor by tensor, component by component, image by image.

Each side (any form and source sdport reads, its LoRAs merged) is planned into the diffusers layout,
as a conversion would; the tensor check compares the two plans (``tensors``), the output check runs the
same ``outputs.Job`` through each side's runtime (torch for files and folders, onnxruntime for ONNX
exports, MindSpore for MindOne checkpoints) and compares what came out. ``report`` writes what people look at.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SdportError
from ..request import LoraSpec, parse_dtype
from .jobs import build_job
from .outputs import Job, OutputDiff, OutputReport, Tolerance, compare_outputs
from .sampling import SCHEDULERS
from .sides import DTYPE_LABELS, Side, open_side
from .tensors import TensorReport, compare_plans

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on mars"
Adapters = list[str | LoraSpec] | tuple[str | LoraSpec, ...]
Source = str | os.PathLike[str]


@dataclass
class Comparison:
    """One pair of runs: what ran where, the outputs compared, and both images (when the pair made them)."""

    label: str
    runtimes: tuple[str, str] = ("", "")
    tensors: TensorReport | None = None
    outputs: OutputReport | None = None
    images: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def passed(self) -> bool:
        return (self.tensors is None or self.tensors.passed) and (self.outputs is None or self.outputs.passed)

    def as_dict(self) -> dict[str, Any]:
        out = self.outputs
        return {"label": self.label, "passed": self.passed,
                "tensors": None if self.tensors is None else self.tensors.as_dict(),
                "outputs": None if out is None else {"runtimes": list(self.runtimes), "passed": out.passed,
                                                     "diffs": [d.as_dict() for d in out.diffs],
                                                     "only_one_side": out.skipped}}


@dataclass
class VerifyResult:
    """Everything ``verify`` found; ``passed`` is the verdict, ``png`` the picture (with ``report``)."""

    a: str
    b: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: str | None = None
    png: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": 1, "a": self.a, "b": self.b, "passed": self.passed,
                "comparisons": [c.as_dict() for c in self.comparisons], "notes": self.notes, "png": self.png}


def verify(a: Source, b: Source | None = None, *, tensors: bool | None = None,
           outputs: bool | None = None, loras: Adapters = (), loras_b: Adapters = (), dtypes: str | None = None,
           seed: int = 0, latents: Source | None = None, steps: int = 4, size: str | None = None,
           prompt: str = DEFAULT_PROMPT, prompt_embeds: str | None = None, scheduler: str = "euler",
           tolerance: str | Tolerance | None = None, report: Source | None = None,
           variant: str | None = None, progress: bool = False) -> VerifyResult:
    """Compare model ``a`` with ``b`` (or, with ``dtypes``, ``a`` with itself at other precisions).

    Args:
        tensors / outputs: which checks run; neither given: both.
        loras / loras_b: adapters merged into ``a`` / ``b`` first (``FILE[:RATIO]``).
        dtypes: ``fp32,fp16,bf16``: ``a`` at the first precision against each other one (no ``b``).
        seed / latents: the initial latent noise — from a seed, or a saved ``.npy`` (1, 4, h, w).
        steps, size (``WxH``), prompt, prompt_embeds (``random``/``zeros``: no text encoders), scheduler: the run.
        tolerance: ``pixel=5,cosine=0.999,ulp=0.5`` (any subset) or a ``Tolerance``.
        report: a folder for ``report.json``, ``init_latents.npy`` and ``compare.png``.
    """
    tol = tolerance if isinstance(tolerance, Tolerance) else Tolerance.parse(tolerance)
    tensors, outputs = (True, True) if tensors is None and outputs is None else (bool(tensors), bool(outputs))
    _check_args(b, dtypes, loras_b, steps, scheduler, prompt_embeds)
    result = VerifyResult(os.fspath(a), os.fspath(b) if b is not None else os.fspath(a))
    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="sdport-verify-"))
        pairs = _pairs(stack, a, b, loras, loras_b, dtypes, variant, progress, scratch, outputs)
        result.comparisons = [Comparison(label) for label, _, _ in pairs]
        result.notes += sorted({s.note for _, *sides in pairs for s in sides if s.note})
        if tensors:
            for c, (_, first, second) in zip(result.comparisons, pairs, strict=True):
                c.tensors = compare_plans(first.plan, first.read, second.plan, second.read, tolerance_ulp=tol.ulp)
        if outputs:
            job = build_job(pairs[0][1], pairs[0][2], seed=seed, latents=latents, steps=steps, size=size,
                            prompt=prompt, prompt_embeds=prompt_embeds, scheduler=scheduler, notes=result.notes,
                            scratch=scratch)
            _run_pairs(pairs, job, tol, result)
            if report is not None:
                np.save(os.path.join(_folder(report), "init_latents.npy"), job.latents)
        if report is not None:
            from .report import write_report

            write_report(result, _folder(report))
    return result


def _check_args(b: object, dtypes: str | None, loras_b: Adapters, steps: int, scheduler: str,
                prompt_embeds: str | None) -> None:
    if (b is None) == (dtypes is None):
        raise SdportError(None, "verify compares two models, or one with --dtypes", "give B or --dtypes, not both")
    if dtypes is not None and loras_b:
        raise SdportError(None, "--lora-b applies to B, and --dtypes has none", "use --lora")
    if not 1 <= steps <= 1000:
        raise SdportError(None, f"--steps {steps}", "use 1 to 1000")
    if scheduler not in SCHEDULERS:
        raise SdportError(None, f"unknown --scheduler {scheduler!r}", "use " + " or ".join(SCHEDULERS))
    if prompt_embeds not in (None, "random", "zeros"):
        raise SdportError(None, f"unknown --prompt-embeds {prompt_embeds!r}", "use random or zeros")


def _folder(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SdportError(path, "--report is a file", "give a folder")
    os.makedirs(path, exist_ok=True)
    return path


Pair = tuple[str, Side, Side]


def _pairs(stack: ExitStack, a: Source, b: Source | None, loras: Adapters, loras_b: Adapters, dtypes: str | None,
           variant: str | None, progress: bool, scratch: str, outputs: bool) -> list[Pair]:
    """(label, reference side, other side) of each comparison."""
    if dtypes is None:
        first = open_side(stack, a, "A", loras=loras, variant=variant, progress=progress, scratch=scratch,
                          runtime=outputs)
        second = open_side(stack, b or a, "B", loras=loras_b, variant=variant, progress=progress, scratch=scratch,
                           runtime=outputs)
        return [("A vs B", first, second)]
    codes = [parse_dtype(d.strip(), what="--dtypes") or "F32" for d in dtypes.split(",") if d.strip()]
    if len(codes) < 2 or len(set(codes)) != len(codes):
        raise SdportError(None, f"--dtypes {dtypes!r}", "name two or more different precisions, e.g. fp32,fp16,bf16")
    sides = [open_side(stack, a, DTYPE_LABELS[c], loras=loras, variant=variant, progress=progress, scratch=scratch,
                       dtype=c, runtime=outputs, torch_only=True) for c in codes]
    return [(f"{sides[0].label} vs {s.label}", sides[0], s) for s in sides[1:]]


#: the config entries two runnable components must share (else one side's inputs do not fit the other)
SHAPES = ("in_channels", "out_channels", "latent_channels", "cross_attention_dim", "block_out_channels",
          "addition_embed_type", "projection_class_embeddings_input_dim", "hidden_size", "projection_dim")


def mismatch(first: Side, second: Side) -> str:
    """Why the two sides' components cannot take the same inputs ("" when they can)."""
    if first.family != second.family:
        return f"A is {first.family}, B is {second.family}"
    for name in first.configs.keys() & second.configs.keys():
        a, b = first.configs[name], second.configs[name]
        for key in SHAPES:
            if key in a and key in b and a[key] != b[key]:
                return f"{name} {key}: {a[key]} vs {b[key]}"
    return ""


def _run_pairs(pairs: list[Pair], job: Job, tol: Tolerance, result: VerifyResult) -> None:
    done: dict[int, dict[str, np.ndarray]] = {}
    for c, (_, first, second) in zip(result.comparisons, pairs, strict=True):
        c.runtimes = (first.runtime, second.runtime)
        why = mismatch(first, second)
        if why:  # not the same model: nothing to run, and a failure (3), not bad input
            c.outputs = OutputReport([OutputDiff(f"architecture ({why})", math.inf, math.inf, passed=False)])
            continue
        outs = []
        for side in (first, second):
            if id(side) not in done:  # the reference of --dtypes runs once
                done[id(side)] = side.run(job)
            outs.append(done[id(side)])
        c.outputs = compare_outputs(outs[0], outs[1], tol)
        if "image" in outs[0] and "image" in outs[1]:
            c.images = (outs[0]["image"], outs[1]["image"])

