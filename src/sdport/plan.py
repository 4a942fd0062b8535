"""Conversion plans: what each output tensor is made of, validated in full before a byte is written.

A plan knows nothing of file formats. Each ``OutputTensor`` names its input tensors and one op
from a closed vocabulary (``OPS``); ``validate`` proves that every input is used or dropped for a
stated reason, every output is defined once, and every shape and dtype agrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .dtypes import BY_CODE, cast
from .errors import PlanError, UnknownKeyError
from .io.base import Slot, TensorSource
from .patches import Patch, apply_all, fits, low_rank, merge_low_rank

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Op:
    """An operation: how it computes (numpy) and what shape it gives (from the input shapes)."""

    compute: Callable[[list[np.ndarray], tuple], np.ndarray]
    shape: Callable[[list[Shape], tuple], Shape | None]  # None: the inputs do not fit


def _split_shape(shapes: list[Shape], args: tuple) -> Shape | None:
    axis, index, parts = args
    (s,) = shapes
    if s[axis] % parts or not 0 <= index < parts:
        return None
    return s[:axis] + (s[axis] // parts,) + s[axis + 1:]


def _concat_shape(shapes: list[Shape], args: tuple) -> Shape | None:
    (axis,) = args
    rest = {s[:axis] + s[axis + 1:] for s in shapes}
    return None if len(rest) != 1 else shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]


def _reshape_shape(shapes: list[Shape], args: tuple) -> Shape | None:
    (target,) = args
    return tuple(target) if math.prod(shapes[0]) == math.prod(target) else None


OPS: dict[str, Op] = {
    "identity": Op(lambda xs, a: xs[0], lambda ss, a: ss[0]),
    "reshape": Op(lambda xs, a: xs[0].reshape(a[0]), _reshape_shape),
    "transpose": Op(lambda xs, a: np.ascontiguousarray(xs[0].T),
                    lambda ss, a: ss[0][::-1] if len(ss[0]) == 2 else None),
    "split": Op(lambda xs, a: np.split(xs[0], a[2], axis=a[0])[a[1]], _split_shape),
    "concat": Op(lambda xs, a: np.concatenate(xs, axis=a[0]), _concat_shape),
    # times a constant in fp32, rounded once to the output's dtype (alpha/rank folded into a LoRA's up factor)
    "scale": Op(lambda xs, a: cast(xs[0], "F32") * np.float32(a[0]), lambda ss, a: ss[0]),
}
_ARITY = {"identity": 1, "reshape": 1, "transpose": 1, "split": 1, "scale": 1}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of an output file: ``op(inputs…)``, its inputs first updated by ``patches``, cast to ``dtype``."""

    name: str
    dtype: str
    shape: Shape
    inputs: tuple[str, ...]
    op: str = "identity"
    args: tuple = ()
    patches: tuple[Patch, ...] = ()

    def slot(self) -> Slot:
        return Slot(self.name, self.dtype, self.shape)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every tensor this output is computed from: its inputs and the factors of its patches."""
        return self.inputs + tuple(f for p in self.patches for f in p.factors)


@dataclass(frozen=True)
class WriterSpec:
    """The writer an output file goes to: a format of ``io.FORMATS`` and its options (``root``, ``crc``, a graph …)."""

    format: str
    options: dict[str, object] = field(default_factory=dict)


SAFETENSORS = WriterSpec("safetensors")


@dataclass
class OutputFile:
    """One file to write: its path relative to the output root, its writer, tensors and metadata."""

    path: str
    writer: WriterSpec
    tensors: list[OutputTensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """Everything a conversion will write, and what it leaves out and why."""

    files: list[OutputFile]
    dropped: dict[str, str] = field(default_factory=dict)  # input name → reason
    unknown: list[str] = field(default_factory=list)  # input names let through by --allow-unknown
    extra: dict[str, bytes] = field(default_factory=dict)  # other files of a folder output (configs, tokenizers)
    prediction_type: str = ""  # what the output's scheduler config says the UNet predicts, when it has one
    added: dict[str, str] = field(default_factory=dict)  # files the input lacked, filled in → from where

    @property
    def nbytes(self) -> int:
        return sum(t.slot().nbytes for f in self.files for t in f.tensors)


def validate(plan: Plan, source: TensorSource, *, allow_unknown: bool = False) -> None:
    """Check the plan against the source; raise one clear error on the first problem found."""
    used: set[str] = set()
    for out in plan.files:
        names: set[str] = set()
        for t in out.tensors:
            if t.name in names:
                raise PlanError(out.path, f"output tensor '{t.name}' defined twice", "a rule table is wrong")
            names.add(t.name)
            _check_tensor(t, source, out.path)
            used.update(t.reads)
    left = [k for k in source.tensors if k not in used and k not in plan.dropped]
    if left and not allow_unknown:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise UnknownKeyError(source.path, f"{len(left)} tensor(s) no rule knows: {shown}",
                              "pass --allow-unknown to copy them through unchanged, or report a bug")


def _check_tensor(t: OutputTensor, source: TensorSource, where: str) -> None:
    missing = [i for i in t.inputs if i not in source.tensors]
    if missing:
        raise PlanError(source.path, f"'{t.name}' needs tensor '{missing[0]}', which the file lacks",
                        "the model is incomplete or of another family")
    op = OPS.get(t.op)
    if op is None or len(t.inputs) != _ARITY.get(t.op, len(t.inputs)) or not t.inputs:
        raise PlanError(where, f"'{t.name}': invalid op {t.op!r} with {len(t.inputs)} input(s)", None)
    shapes = [source.tensors[i].shape for i in t.inputs]
    got = op.shape(shapes, t.args)
    if got != tuple(t.shape):
        raise PlanError(source.path, f"shape mismatch for '{t.name}': expected {list(t.shape)}, inputs give "
                        f"{[list(s) for s in shapes]}", "the model is of another family or damaged")
    if t.dtype not in BY_CODE:
        raise PlanError(where, f"'{t.name}': unknown dtype {t.dtype}", None)
    for patch in t.patches:
        _check_patch(t, patch, source)


def _check_patch(t: OutputTensor, patch: Patch, source: TensorSource) -> None:
    missing = [f for f in (patch.target, *patch.factors) if f not in source.tensors]
    if missing or patch.target not in t.inputs:
        raise PlanError(source.path, f"'{t.name}': patch of '{patch.target}' is incomplete ({missing})", None)
    target, shapes = source.tensors[patch.target].shape, [source.tensors[f].shape for f in patch.factors]
    if not fits(patch, target, shapes):
        raise PlanError(source.path, f"{patch.kind} update of '{patch.target}' {list(target)} from factors "
                        f"{[list(s) for s in shapes]} does not fit", "the adapter is for another model")


def derive(name: str, cast_to: str | None, source: TensorSource, inputs: tuple[str, ...], op: str = "identity",
           args: tuple = ()) -> OutputTensor:
    """The output tensor ``op(inputs)``: shape from the op; dtype the first input's, or ``cast_to`` for floats."""
    missing = [i for i in inputs if i not in source.tensors]
    if missing:
        raise PlanError(source.path, f"'{name}' needs tensor '{missing[0]}', which the model lacks",
                        "the model is incomplete or of another family")
    shape = OPS[op].shape([source.tensors[i].shape for i in inputs], args)
    if shape is None:
        shapes = [list(source.tensors[i].shape) for i in inputs]
        raise PlanError(source.path, f"tensors {list(inputs)} of shapes {shapes} do not fit '{op}' for '{name}'",
                        "the model is damaged or of another family")
    dtype = source.tensors[inputs[0]].dtype
    return OutputTensor(name, cast_to if cast_to and BY_CODE[dtype].is_float else dtype, shape, inputs, op, args)


def compute(t: OutputTensor, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The output tensor's values, reading its inputs (and its patches' factors) with ``read``."""
    if t.patches and len(t.inputs) == 1 and t.op in ("identity", "reshape") and all(map(low_rank, t.patches)):
        # the common merge: W + ΔW made, summed and narrowed block by block straight into the output
        weight = read(t.inputs[0])
        out = np.empty(weight.shape, BY_CODE[t.dtype].numpy)
        merge_low_rank(weight, t.patches, [[read(f) for f in p.factors] for p in t.patches], out)
        return OPS[t.op].compute([out], t.args)
    arrays = [read(i) for i in t.inputs]
    for k, name in enumerate(t.inputs):
        mine = [p for p in t.patches if p.target == name]
        if mine and name not in t.inputs[:k]:  # an input given twice is patched once, where it first stands
            arrays[k] = apply_all(arrays[k], mine, [[read(f) for f in p.factors] for p in mine])
    return cast(OPS[t.op].compute(arrays, t.args), t.dtype)


def is_elementwise(t: OutputTensor, source: TensorSource) -> bool:
    """True when the output is one contiguous input, element for element, perhaps cast (computable in pieces)."""
    return (t.op in ("identity", "reshape") and len(t.inputs) == 1 and not t.patches
            and source.tensors[t.inputs[0]].contiguous)


def is_passthrough(t: OutputTensor, source: TensorSource) -> bool:
    """True when the output bytes are exactly one input's bytes (copyable file to file)."""
    return is_elementwise(t, source) and source.tensors[t.inputs[0]].dtype == t.dtype
