"""Casts between float dtypes must equal torch's ``.to(dtype)`` bit for bit (torch is the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdport.dtypes import BY_CODE, cast

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
FLOATS = list(TORCH)


def _to_torch(a: np.ndarray, code: str) -> torch.Tensor:
    if code == "BF16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _bits(t: torch.Tensor) -> np.ndarray:
    size = t.element_size()
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.contiguous().view(view).numpy()


def _from_bits(bits: list[int], code: str) -> np.ndarray:
    width = BY_CODE[code].itemsize
    raw = np.array(bits, dtype={2: np.uint16, 4: np.uint32, 8: np.uint64}[width])
    return raw.view(BY_CODE[code].numpy)


def assert_same_as_torch(ours: np.ndarray, theirs: torch.Tensor, src: str) -> None:
    """Bits equal; except that torch's own NaN bits from float16 to wider types depend on whether an
    element falls in its vector body or its scalar tail (the tail even drops the sign), so there only
    NaN-ness is compared."""
    want = _bits(theirs)
    got = ours.view(want.dtype)
    wide = theirs.dtype in (torch.float32, torch.float64)
    nan = theirs.float().isnan().numpy() if theirs.dtype != torch.float64 else theirs.isnan().numpy()
    if src == "F16" and wide:
        assert np.array_equal(np.isnan(ours), nan)
        np.testing.assert_array_equal(got[~nan], want[~nan])
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
def test_cast_matches_torch_on_every_special_value(src: str, dst: str) -> None:
    width = BY_CODE[src].itemsize * 8
    specials = [0, 1, (1 << (width - 1)), (1 << (width - 1)) | 1]  # ±0, smallest subnormals
    exp_bits = {16: 5, 32: 8, 64: 11}[width] if src != "BF16" else 8
    mant = width - 1 - exp_bits
    inf = ((1 << exp_bits) - 1) << mant
    specials += [inf, inf | (1 << (width - 1)), inf | 1, inf | (1 << (mant - 1)), inf | ((1 << mant) - 1),
                 (1 << mant) - 1, 1 << mant, inf - 1]
    rng = np.random.default_rng(0)
    randoms = rng.integers(0, 1 << min(width, 63), size=20000, dtype=np.uint64).tolist()
    a = _from_bits(specials + randoms, src)
    assert_same_as_torch(cast(a, dst), _to_torch(a, src).to(TORCH[dst]), src)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=1,
                max_size=64), st.sampled_from(["F16", "BF16", "F64"]))
def test_f32_cast_property_matches_torch(values: list[float], dst: str) -> None:
    a = np.array(values, dtype=np.float32)
    assert_same_as_torch(cast(a, dst), torch.from_numpy(a).to(TORCH[dst]), "F32")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64), st.sampled_from(["F16", "BF16"]),
       st.sampled_from(FLOATS))
def test_16bit_cast_property_matches_torch(bits: list[int], src: str, dst: str) -> None:
    a = _from_bits(bits, src)
    assert_same_as_torch(cast(a, dst), _to_torch(a, src).to(TORCH[dst]), src)


def test_fp16_overflow_becomes_infinity_like_torch() -> None:
    a = np.array([65504.0, 65520.0, 1e6, -1e6], dtype=np.float32)
    assert cast(a, "F16").tolist() == [65504.0, float("inf"), float("inf"), float("-inf")]


def test_zero_dimensional_nan_stays_nan() -> None:
    # torch's scalar path gives 0-d tensors other NaN payload bits; sdport promises NaN, sign kept.
    for code in ("F16", "BF16"):
        out = cast(np.array(-np.nan, dtype=np.float32).reshape(()), code).astype(np.float32)
        assert np.isnan(out) and np.signbit(out) == np.signbit(np.float32(-np.nan))
