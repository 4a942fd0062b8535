"""Weight updates merged from adapters: the ``Patch`` record, each algorithm's ΔW, and its size from shapes alone.

A patch names its factor tensors by role; ``kind`` says how they make ΔW (always in fp32):

- ``lora``: ``up``, ``down`` [, ``mid``] — ``up @ down`` over flattened factors (LoCon convs included), or
  the Tucker contraction around ``mid``;
- ``loha``: ``w1a``, ``w1b``, ``w2a``, ``w2b`` [, ``t1``, ``t2``] — ``(w1a @ w1b) ⊙ (w2a @ w2b)``, each half
  contracted around its Tucker core when it has one;
- ``lokr``: ``w1`` or ``w1a``+``w1b``, and ``w2`` or ``w2a``+``w2b`` [+ ``t2``] — ``kron(w1, w2)``;
- ``diff``: ``diff`` — ΔW itself (LyCORIS full/diff, ``diff_b`` biases, norm ``w_norm``/``b_norm``);
- ``ia3`` / ``ia3-in``: ``w`` — not added but multiplied: each output row (input column) times ``1 + ratio·w``.

ΔW is reshaped to the target (or to one row block of it, for q, k or v of a fused ``in_proj``),
scaled by ``scale`` (alpha/rank) and ``ratio`` (the user's strength), and added. With a ``dora``
factor (LyCORIS DoRA's ``dora_scale``) the weight is instead ``V = W + scale·ΔW`` renormalised to
that magnitude per output row or input column (the factor's shape says which; a ``magnitude``
factor, PEFT's ``lora_magnitude_vector``, is always per output row), and ``ratio`` interpolates
between W and that, as A1111 and ComfyUI apply it. ``delta_shape`` computes ΔW's shape without data, so
plans are checked first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dtypes import cast, cast_into

Shape = tuple[int, ...]
#: DoRA magnitude roles: LyCORIS ``dora_scale`` (axis from its shape) and PEFT's magnitude (output rows)
MAGNITUDES = ("dora", "magnitude")
#: bytes of ΔW made at a time by ``merge_low_rank``: a block of rows of ``up @ down`` is added while it is in the cache
BLOCK = 1 << 20


@dataclass(frozen=True)
class Patch:
    """``ratio · scale · ΔW`` added, in fp32, to input ``target`` of an output tensor before its op.

    With ``rows = (k, parts)`` only the k-th of ``parts`` equal row blocks is updated.
    """

    target: str
    factors: tuple[str, ...]
    roles: tuple[str, ...]
    scale: float
    kind: str = "lora"
    rows: tuple[int, int] | None = None
    ratio: float = 1.0


def _tucker(core: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LyCORIS's Tucker rebuild ``einsum("i j k l, i p, j r -> p r k l")``: the core between a [r, out], b [r, in]."""
    return np.einsum("ij...,ip,jr->pr...", core, a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` over flattened factors, keeping ``b``'s trailing (kernel) dims."""
    return (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], *b.shape[1:])


def delta(kind: str, f: dict[str, np.ndarray]) -> np.ndarray:
    """ΔW of one patch from its factors by role, in fp32."""
    f = {k: cast(v, "F32") for k, v in f.items()}
    if kind == "diff":
        return np.array(f["diff"])  # a copy: callers scale ΔW in place, and an fp32 factor is not cast
    if kind == "lora":
        if "mid" in f:
            return np.einsum("mnkl,im,nj->ijkl", f["mid"], f["up"].reshape(f["up"].shape[0], -1),
                             f["down"].reshape(f["down"].shape[0], -1))
        return f["up"].reshape(f["up"].shape[0], -1) @ f["down"].reshape(f["down"].shape[0], -1)
    if kind == "loha":
        if "t1" in f:
            return _tucker(f["t1"], f["w1a"], f["w1b"]) * _tucker(f["t2"], f["w2a"], f["w2b"])
        return _product(f["w1a"], f["w1b"]) * _product(f["w2a"], f["w2b"])
    if kind == "lokr":
        w1 = f["w1"] if "w1" in f else _product(f["w1a"], f["w1b"])
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2 = _tucker(f["t2"], f["w2a"], f["w2b"])
        else:
            w2 = _product(f["w2a"], f["w2b"])
        w1 = w1.reshape(w1.shape + (1,) * (w2.ndim - w1.ndim))
        return np.kron(w1, w2)
    raise ValueError(f"unknown patch kind {kind}")


def delta_shape(kind: str, s: dict[str, Shape]) -> Shape | None:
    """The shape ``delta`` will have for factors of these shapes, or None when they do not fit together."""
    try:
        if kind == "diff":
            return s["diff"]
        if kind == "lora":
            up, down = s["up"], s["down"]
            if "mid" in s:
                ok = up[1] == s["mid"][0] and down[0] == s["mid"][1]
                return (up[0], math.prod(down[1:]), *s["mid"][2:]) if ok else None
            return (up[0], math.prod(down[1:])) if len(up) > 1 and up[1] == down[0] else None
        if kind == "loha":
            halves = []
            for k in "12":
                a, b = s[f"w{k}a"], s[f"w{k}b"]
                if f"t{k}" in s:
                    t = s[f"t{k}"]
                    halves.append((a[1], b[1], *t[2:]) if (t[0], t[1]) == (a[0], b[0]) else None)
                else:
                    halves.append((a[0], *b[1:]) if len(a) > 1 and a[1] == b[0] else None)
            return halves[0] if halves[0] is not None and halves[0] == halves[1] else None
        if kind == "lokr":
            w1 = s["w1"] if "w1" in s else ((s["w1a"][0], *s["w1b"][1:]) if s["w1a"][1] == s["w1b"][0] else None)
            if "w2" in s:
                w2 = s["w2"]
            elif "t2" in s:
                t, a, b = s["t2"], s["w2a"], s["w2b"]
                w2 = (a[1], b[1], *t[2:]) if (t[0], t[1]) == (a[0], b[0]) else None
            else:
                w2 = (s["w2a"][0], *s["w2b"][1:]) if s["w2a"][1] == s["w2b"][0] else None
            if w1 is None or w2 is None or len(w1) > len(w2):
                return None
            w1 = tuple(w1) + (1,) * (len(w2) - len(w1))
            return tuple(x * y for x, y in zip(w1, w2, strict=True))
    except (KeyError, IndexError):
        return None
    return None


def fits(patch: Patch, target: Shape, factor_shapes: Sequence[Shape]) -> bool:
    """Whether the patch's ΔW has its target's (or target row block's) rows and element count."""
    shapes = dict(zip(patch.roles, factor_shapes, strict=True))
    parts = patch.rows[1] if patch.rows else 1
    if target[0] % parts:
        return False
    block = (target[0] // parts, *target[1:])
    if patch.kind in ("ia3", "ia3-in"):
        axis = 0 if patch.kind == "ia3" else 1
        return len(block) > axis and math.prod(shapes["w"]) == block[axis]
    if "dora" in shapes and dora_axis(shapes["dora"], block) is None:
        return False
    if "magnitude" in shapes and math.prod(shapes["magnitude"]) != block[0]:
        return False
    shape = delta_shape(patch.kind, {k: v for k, v in shapes.items() if k not in MAGNITUDES})
    # the output width must match too, not only the element count, or a transposed update would scramble W
    return shape is not None and shape[0] == block[0] and math.prod(shape) == math.prod(block)


def dora_axis(magnitude: Shape, block: Shape) -> int | None:
    """0 when a DoRA magnitude norms output rows (PEFT, LyCORIS ≥ 3.1.1), 1 for input columns (older LyCORIS)."""
    n = math.prod(magnitude)
    if n == block[0] and (len(magnitude) == 1 or magnitude[0] == block[0]):
        return 0
    if len(block) > 1 and n == block[1] and len(magnitude) > 1 and magnitude[1] == block[1]:
        return 1
    return None


def low_rank(patch: Patch) -> bool:
    """A plain LoRA update of a whole tensor: ``W + s·up @ down`` (no Tucker core, row block or DoRA)."""
    return patch.kind == "lora" and patch.rows is None and sorted(patch.roles) == ["down", "up"]


def apply_all(weight: np.ndarray, patches: Sequence[Patch], factors: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """``weight`` in fp32 with the patches applied in order (a new array; ``weight`` is never changed).

    Runs of plain LoRA updates go through ``merge_low_rank``, the others through ``apply``.
    """
    out: np.ndarray | None = None
    i = 0
    while i < len(patches):
        j = i
        while j < len(patches) and low_rank(patches[j]):
            j += 1
        if j == i:
            out = apply(weight if out is None else out, patches[i], factors[i])
            i += 1
            continue
        if out is None:
            out = np.empty(weight.shape, np.float32)
            merge_low_rank(weight, patches[i:j], factors[i:j], out)
        else:
            merge_low_rank(out, patches[i:j], factors[i:j], out)  # in place: each block is read before it is written
        i = j
    return weight if out is None else out


def merge_low_rank(weight: np.ndarray, patches: Sequence[Patch], factors: Sequence[Sequence[np.ndarray]],
                   out: np.ndarray) -> None:
    """``out[...] = W + Σ s·up @ down`` in ``out``'s dtype, one block of rows at a time.

    Each block of ΔW (``BLOCK`` bytes of fp32) is made, W's rows widened beside it, summed and narrowed
    into ``out`` while all three are in the cache: nothing of the tensor's size exists in fp32. One
    adapter is added as ``(up @ down)·s`` (bit for bit ``apply``: the formula of diffusers' fuse_lora),
    several as one product of their factors concatenated along the rank, each ``up`` scaled by its
    ``s``. ``out`` may be ``weight`` itself (fp32).
    """
    ups, downs = [], []
    for p, f in zip(patches, factors, strict=True):
        named = dict(zip(p.roles, f, strict=True))
        ups.append(cast(named["up"], "F32").reshape(named["up"].shape[0], -1))
        downs.append(cast(named["down"], "F32").reshape(named["down"].shape[0], -1))
    scale = np.float32(patches[0].ratio * patches[0].scale) if len(patches) == 1 else None
    if scale is None:
        up = np.concatenate([u * np.float32(p.ratio * p.scale) for u, p in zip(ups, patches, strict=True)], axis=1)
        down = np.concatenate(downs, axis=0)
    else:
        up, down = ups[0], downs[0]
    n = up.shape[0]
    w, o = np.require(weight, requirements="C").reshape(n, -1), out.reshape(n, -1)
    rows = max(1, BLOCK // (4 * w.shape[1]))
    delta_rows = np.empty((min(rows, n), w.shape[1]), np.float32)
    wide = None if w.dtype == np.float32 else np.empty_like(delta_rows)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        d = delta_rows[: stop - start]
        np.matmul(up[start:stop], down, out=d)
        if scale is not None:
            d *= scale
        if wide is None:
            d += w[start:stop]
        else:
            cast_into(w[start:stop], wide[: stop - start])
            d += wide[: stop - start]
        cast_into(d, o[start:stop])


def apply(weight: np.ndarray, patch: Patch, factors: Sequence[np.ndarray]) -> np.ndarray:
    """``weight`` in fp32 with the patch applied (a new array; ``weight`` is never changed)."""
    if patch.rows is None and patch.kind not in ("ia3", "ia3-in") and not any(r in patch.roles for r in MAGNITUDES):
        # LyCORIS kinds over a whole tensor: ΔW scaled in place, then W added (IEEE addition commutes, so this is
        # bit for bit W + s·ΔW); W widened by the compiled casts, not by numpy's mixed-type (scalar) loop
        d = delta(patch.kind, dict(zip(patch.roles, factors, strict=True))).reshape(weight.shape)
        d *= np.float32(patch.ratio * patch.scale)
        d += cast(weight, "F32")
        return d
    out = cast(weight, "F32")
    if out is weight:
        out = out.copy()
    block = out if patch.rows is None else out.reshape(patch.rows[1], -1, *out.shape[1:])[patch.rows[0]]
    f = dict(zip(patch.roles, factors, strict=True))
    if patch.kind in ("ia3", "ia3-in"):
        axis = 0 if patch.kind == "ia3" else 1
        shape = [1] * block.ndim
        shape[axis] = -1
        block *= 1 + np.float32(patch.ratio) * cast(f["w"], "F32").reshape(shape)
        return out
    magnitude, role = next(((f.pop(r), r) for r in MAGNITUDES if r in f), (None, ""))
    d = delta(patch.kind, f).reshape(block.shape)
    if magnitude is None:
        block += np.float32(patch.ratio * patch.scale) * d
        return out
    v = block + np.float32(patch.scale) * d
    axis = dora_axis(magnitude.shape, block.shape) if role == "dora" else 0
    norm = np.sqrt(np.sum(np.square(v), axis=tuple(k for k in range(v.ndim) if k != axis), keepdims=True))
    g = cast(magnitude, "F32").reshape(norm.shape)
    block += np.float32(patch.ratio) * (g * v / (norm + np.finfo(np.float32).eps) - block)
    return out
