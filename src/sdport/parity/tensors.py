"""Tensor-level parity (no torch): two models mapped to one layout, compared tensor by tensor.

Both sides are planned into the diffusers layout by the same route table a conversion uses (their
LoRAs merged, their dtype kept), so any two forms sdport reads compare name for name. Each pair is
computed in memory one at a time and measured: max abs error, max relative error and, when the
dtypes differ, the distance in ULPs of the narrower dtype. The default tolerance is exact for the
same dtype and half an ULP of the narrower dtype for a cast — what a correctly rounded cast gives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..families.parts.clip import hub_name
from ..plan import OutputTensor, Plan, compute

#: float dtype → (mantissa bits, smallest normal exponent): what one ULP is at each magnitude
_FLOATS = {"F64": (52, -1022), "F32": (23, -126), "F16": (10, -14), "BF16": (7, -126)}
#: elements measured at once (bounds the temporaries of one big tensor)
_CHUNK = 1 << 22
#: how many differing tensors a report lists by name
WORST = 10


@dataclass
class TensorDiff:
    """One tensor present on both sides: where it differs and by how much."""

    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: float | None = None  # None: same dtype, or not a float
    status: str = "identical"  # identical | within | different

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype_a": self.dtype_a, "dtype_b": self.dtype_b,
                "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
                "max_ulp": None if self.max_ulp is None else _num(self.max_ulp), "status": self.status}


@dataclass
class TensorReport:
    """The tensor-level verdict: counts, the worst offenders, tensors on one side only."""

    compared: int = 0
    identical: int = 0
    within: int = 0
    different: int = 0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    worst: list[TensorDiff] = field(default_factory=list)
    tolerance_ulp: float = 0.5

    @property
    def passed(self) -> bool:
        return not (self.different or self.only_a or self.only_b)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "compared": self.compared, "identical": self.identical, "within": self.within,
                "different": self.different, "only_a": self.only_a, "only_b": self.only_b,
                "tolerance_ulp": self.tolerance_ulp, "worst": [d.as_dict() for d in self.worst]}


def _num(x: float) -> float | str:
    """JSON has no inf or nan: those are written as strings."""
    return x if math.isfinite(x) else str(x)


def keyed(plan: Plan) -> dict[str, OutputTensor]:
    """A plan's tensors by ``component/name`` (the component is the output file's folder; text encoders' names in
    the Hub's ``text_model.`` form, which transformers 5 saves without)."""
    out = {}
    for f in plan.files:
        folder = os.path.dirname(f.path)
        norm = hub_name if folder.startswith("text_encoder") else (lambda n: n)
        for t in f.tensors:
            out[f"{folder}/{norm(t.name)}" if folder else t.name] = t
    return out


def compare_plans(a: Plan, read_a: Callable[[str], np.ndarray], b: Plan, read_b: Callable[[str], np.ndarray], *,
                  tolerance_ulp: float = 0.5) -> TensorReport:
    """Compare every tensor of two plans in the same layout, one pair in memory at a time."""
    ta, tb = keyed(a), keyed(b)
    report = TensorReport(only_a=sorted(ta.keys() - tb.keys()), only_b=sorted(tb.keys() - ta.keys()),
                          tolerance_ulp=tolerance_ulp)
    diffs = []
    for key in sorted(ta.keys() & tb.keys()):
        d = compare(key, compute(ta[key], read_a), compute(tb[key], read_b), ta[key].dtype, tb[key].dtype,
                    tolerance_ulp=tolerance_ulp)
        report.compared += 1
        setattr(report, d.status, getattr(report, d.status) + 1)
        if d.status != "identical":
            diffs.append(d)
    diffs.sort(key=lambda d: (d.status == "different", d.max_ulp or 0.0, d.max_abs), reverse=True)
    report.worst = diffs[:WORST]
    return report


def compare(name: str, a: np.ndarray, b: np.ndarray, dtype_a: str, dtype_b: str, *,
            tolerance_ulp: float = 0.5) -> TensorDiff:
    """Measure one pair: exact equality for the same dtype, ULPs of the narrower dtype across a cast."""
    d = TensorDiff(name, tuple(a.shape), dtype_a, dtype_b)
    if a.shape != b.shape:
        d.status, d.max_abs, d.max_rel = "different", math.inf, math.inf
        d.name = f"{name} (shape {tuple(a.shape)} vs {tuple(b.shape)})"
        return d
    floats = dtype_a in _FLOATS and dtype_b in _FLOATS
    if not floats:
        same = dtype_a == dtype_b and np.array_equal(a, b)
        d.status = "identical" if same else "different"
        if not same and a.dtype.kind in "iub" and b.dtype.kind in "iub":
            d.max_abs = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        return d
    narrow = None
    if dtype_a != dtype_b:
        d.max_ulp = 0.0
        narrow = dtype_b if _FLOATS[dtype_b][0] < _FLOATS[dtype_a][0] else dtype_a
    for x, y in _chunks(a, b):
        _measure(d, x, y, narrow, narrow_is_b=narrow == dtype_b)
    if d.max_abs == 0.0 and (d.max_ulp or 0.0) == 0.0:
        d.status = "identical"
    elif d.max_ulp is not None and d.max_ulp <= tolerance_ulp:
        d.status = "within"
    else:
        d.status = "different"
    return d


def _chunks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    fa, fb = a.reshape(-1), b.reshape(-1)
    wide = np.float64 if np.float64 in (a.dtype, b.dtype) else np.float32
    for start in range(0, fa.size, _CHUNK):
        yield fa[start:start + _CHUNK].astype(wide), fb[start:start + _CHUNK].astype(wide)


def _measure(d: TensorDiff, x: np.ndarray, y: np.ndarray, narrow: str | None, *, narrow_is_b: bool) -> None:
    """Fold one chunk into the tensor's maxima; NaN matches NaN, and an infinity only the same infinity."""
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    if np.any(nan_x != nan_y) or np.any(np.isinf(x) != np.isinf(y)) or np.any(x[np.isinf(x)] != y[np.isinf(x)]):
        d.max_abs = d.max_rel = math.inf
        if d.max_ulp is not None:
            d.max_ulp = math.inf
        return
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not x.size:
        return
    err = np.abs(x - y)
    d.max_abs = max(d.max_abs, float(err.max()))
    scale = np.maximum(np.abs(x), np.abs(y))
    rel = np.divide(err, scale, out=np.zeros_like(err), where=scale > 0)
    d.max_rel = max(d.max_rel, float(rel.max()))
    if narrow is not None:
        d.max_ulp = max(d.max_ulp or 0.0, float(np.max(err / ulp(y if narrow_is_b else x, narrow))))


def ulp(x: np.ndarray, code: str) -> np.ndarray:
    """The spacing of dtype ``code`` at each value's magnitude (subnormals: the smallest spacing)."""
    bits, emin = _FLOATS[code]
    _, exp = np.frexp(np.abs(x).astype(np.float64))
    return np.ldexp(1.0, np.maximum(exp - 1, emin) - bits)

