"""The dtypes sdport understands, their names in each format, and casts bit-identical to torch.

A dtype is named by its safetensors code (``F16``, ``BF16`` …) everywhere inside sdport.
Casts between float types reproduce ``torch.Tensor.to(dtype)`` on the CPU bit for bit: round to
nearest even, subnormals and infinities kept, and NaNs given the bit patterns torch's vectorised
kernels produce (torch's scalar path differs only in NaN payloads of 0-d tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

try:
    from . import _casts
except ImportError:  # not built here (no compiler at install time): numpy does the casts
    _casts = None  # type: ignore[assignment]


@dataclass(frozen=True)
class DType:
    code: str  # safetensors name
    numpy: np.dtype
    torch_storage: str  # torch.<X>Storage
    torch_name: str  # torch.<x>

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self.code in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


_TABLE = (
    DType("F64", np.dtype("<f8"), "DoubleStorage", "float64"),
    DType("F32", np.dtype("<f4"), "FloatStorage", "float32"),
    DType("F16", np.dtype("<f2"), "HalfStorage", "float16"),
    DType("BF16", np.dtype(ml_dtypes.bfloat16), "BFloat16Storage", "bfloat16"),
    DType("I64", np.dtype("<i8"), "LongStorage", "int64"),
    DType("I32", np.dtype("<i4"), "IntStorage", "int32"),
    DType("I16", np.dtype("<i2"), "ShortStorage", "int16"),
    DType("I8", np.dtype("i1"), "CharStorage", "int8"),
    DType("U8", np.dtype("u1"), "ByteStorage", "uint8"),
    DType("BOOL", np.dtype("?"), "BoolStorage", "bool"),
    # No typed torch storage class: torch pickles these with _rebuild_tensor_v3 over an untyped storage.
    DType("U16", np.dtype("<u2"), "", "uint16"),
    DType("U32", np.dtype("<u4"), "", "uint32"),
    DType("U64", np.dtype("<u8"), "", "uint64"),
    DType("F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn), "", "float8_e4m3fn"),
    DType("F8_E5M2", np.dtype(ml_dtypes.float8_e5m2), "", "float8_e5m2"),
)

BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}
BY_STORAGE: dict[str, DType] = {d.torch_storage: d for d in _TABLE if d.torch_storage}
BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in _TABLE}


def dtype(code: str) -> DType:
    """The DType for a safetensors code; KeyError if sdport does not know it."""
    return BY_CODE[code]


def fast_casts() -> str:
    """The compiled kernels the casts use ('avx512', 'avx2+f16c'), or '' when numpy does them."""
    return _casts.level() if _casts is not None else ""


#: (from, to) → the compiled kernel and its NaN pattern (bfloat16 from float32: torch's vectorised kernel's 0xFFFF)
_KERNELS = {("F16", "F32"): ("f16_to_f32", ()), ("BF16", "F32"): ("bf16_to_f32", ()),
            ("F32", "F16"): ("f32_to_f16", ()), ("F32", "BF16"): ("f32_to_bf16", (0xFFFF,))}
_UNSIGNED = {2: np.uint16, 4: np.uint32}  # numpy exports no buffer of ml_dtypes' types: kernels get the bits


def _run(src: np.ndarray, dst: np.ndarray, kernel: str, args: tuple[int, ...]) -> bool:
    """Convert C-contiguous ``src`` into C-contiguous ``dst`` with a compiled kernel; False without one."""
    if _casts is None or not _casts.level():
        return False
    getattr(_casts, kernel)(src.reshape(-1).view(_UNSIGNED[src.itemsize]),
                            dst.reshape(-1).view(_UNSIGNED[dst.itemsize]), *args)
    return True


def _fast(a: np.ndarray, src: str, dst: str, *nan_bits: int) -> np.ndarray | None:
    """``a`` (of dtype ``src``) converted to ``dst`` by its compiled kernel into a new array, or None without one.
    ``nan_bits`` replaces the kernel's NaN pattern (bfloat16 from float16: 0x7FC0)."""
    kernel, args = _KERNELS[(src, dst)]
    out = np.empty(a.shape, BY_CODE[dst].numpy)
    return out if _run(np.require(a, requirements="C"), out, kernel, nan_bits or args) else None


def cast_into(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = cast(src, <dst's dtype>)``, straight into ``dst`` when a compiled kernel does it (no temporary)."""
    kernel = _KERNELS.get((code_of(src), code_of(dst)))
    if kernel is None or not (src.flags.c_contiguous and dst.flags.c_contiguous) \
            or not _run(src, dst, *kernel):
        dst[...] = cast(src, code_of(dst))


def _to_f32(a: np.ndarray) -> np.ndarray:
    """Exact widening to float32, NaNs made quiet as torch does."""
    code = code_of(a)
    if code == "F32":
        return a
    if code in ("F16", "BF16"):
        fast = _fast(a, code, "F32")
        if fast is not None:
            return fast
    out = a.astype(np.float32)
    if code == "F16":
        bits = out.view(np.uint32)
        nan = np.isnan(out)
        bits[nan] |= np.uint32(0x0040_0000)
    return out


def _f32_to_f16(a: np.ndarray) -> np.ndarray:
    fast = _fast(a, "F32", "F16")
    if fast is not None:
        return fast
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(np.float16)
    nan = np.isnan(a)
    if nan.any():
        bits = a.view(np.uint32)[nan]
        fixed = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits & 0x7F_FFFF) >> 13)
        out.view(np.uint16)[nan] = fixed.astype(np.uint16)
    return out


def _f32_to_bf16(a: np.ndarray, nan_bits: int) -> np.ndarray:
    fast = _fast(a, "F32", "BF16", nan_bits)
    if fast is not None:
        return fast
    bits = np.ascontiguousarray(a).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(a)] = nan_bits
    return out.view(ml_dtypes.bfloat16)


def cast(a: np.ndarray, code: str) -> np.ndarray:
    """Return ``a`` converted to the dtype named by ``code`` exactly as torch's ``.to()`` would.

    Float targets go through float32 first, as torch's CPU kernels do (so float64 → float16
    rounds twice, like torch). Integer and bool casts use numpy's C casting.
    """
    src = code_of(a)
    if src == code:
        return a
    target = BY_CODE[code]
    if not target.is_float or not BY_CODE[src].is_float:
        return a.astype(target.numpy)
    if code == "F64":
        return _to_f32(a).astype(np.float64) if src != "F32" else a.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = _to_f32(a) if src != "F64" else a.astype(np.float32)
    if code == "F32":
        return f32
    if code == "F16":
        return _f32_to_f16(f32)
    if code == "BF16":
        # torch widens half to float in a scalar loop whose bf16 NaN is 0x7FC0; from float32 and
        # float64 its vectorised kernel writes 0xFFFF.
        return _f32_to_bf16(f32, 0x7FC0 if src == "F16" else 0xFFFF)
    with np.errstate(over="ignore", invalid="ignore"):
        return f32.astype(target.numpy)


def code_of(a: np.ndarray) -> str:
    """The dtype code of a numpy array."""
    for d in _TABLE:
        if d.numpy == a.dtype:
            return d.code
    raise TypeError(f"no sdport dtype for numpy {a.dtype}")
