"""The compiled casts (``sdport._casts``) against numpy's path and torch's ``.to()``, bit for bit, and the fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from sdport import dtypes
from sdport.dtypes import cast, fast_casts

ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
NUMPY = {"F16": np.float16, "BF16": ml_dtypes.bfloat16}
TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _slow(a: np.ndarray, code: str, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The same cast through numpy only."""
    with monkeypatch.context() as m:
        m.setattr(dtypes, "_casts", None)
        return cast(a, code)


def _torch(a: np.ndarray, code: str) -> np.ndarray:
    src = torch.from_numpy(a.view(np.int16).copy()).view(TORCH[dtypes.code_of(a)]) if a.itemsize == 2 \
        else torch.from_numpy(a.copy())
    out = src.to(TORCH[code]).contiguous()
    return out.view(torch.int16 if out.element_size() == 2 else torch.int32).numpy()


def _specials32() -> np.ndarray:
    bits = [0, 0x8000_0000, 1, 0x8000_0001, 0x007F_FFFF, 0x0080_0000, 0x7F7F_FFFF, 0xFF7F_FFFF, 0x7F80_0000,
            0xFF80_0000, 0x7F80_0001, 0x7FC0_0000, 0xFFC0_0001, 0x7FFF_FFFF, 0xFF80_2000,
            0x477F_E000, 0x477F_EFFF, 0x477F_F000, 0x477F_F001,  # fp16's max and the overflow boundary
            0x3380_0000, 0x3380_0001, 0x3300_0000, 0x3300_0001, 0x387F_E000, 0x387F_F000,  # fp16 subnormal edges
            0x3F80_8000, 0x3F81_8000, 0x3F80_8001, 0x3F80_7FFF]  # bf16 ties to even
    rng = np.random.default_rng(1)
    randoms = rng.integers(0, 1 << 32, size=300_001, dtype=np.uint64).astype(np.uint32)
    normals = rng.standard_normal(100_003).astype(np.float32).view(np.uint32)
    return np.concatenate([np.array(bits, np.uint32), randoms, normals]).view(np.float32)


needs_fast = pytest.mark.skipif(not fast_casts(), reason="sdport._casts not built or this CPU lacks F16C/AVX2")


def test_fast_path_runs_where_the_cpu_has_f16c() -> None:
    """A machine with F16C and AVX2 must not fall back silently (a failed build, a broken dispatch)."""
    if os.environ.get("SDPORT_NO_FASTCAST", "0") not in ("", "0"):
        pytest.skip("SDPORT_NO_FASTCAST is set")
    flags = _cpu_flags()
    if {"f16c", "avx2", "fma"} <= flags:
        assert fast_casts() in ("avx512", "avx2+f16c")
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert fast_casts() == "avx512"


@needs_fast
@pytest.mark.parametrize("src", ["F16", "BF16"])
@pytest.mark.parametrize("dst", ["F32", "F16", "BF16"])
def test_every_16_bit_pattern_casts_as_numpy_and_torch(src: str, dst: str, monkeypatch) -> None:
    a = ALL16.view(NUMPY[src])
    got = cast(a, dst)
    want = _slow(a, dst, monkeypatch)
    unsigned = np.uint32 if got.itemsize == 4 else np.uint16
    np.testing.assert_array_equal(got.view(unsigned), want.view(unsigned))
    theirs = _torch(a, dst)
    ours = got.view(theirs.dtype)
    nan = np.isnan(got.astype(np.float32))
    if dst == "F32":  # torch's tail loop drops NaN signs (see test_dtypes); NaN-ness and every other bit agree
        assert np.array_equal(nan, np.isnan(torch.from_numpy(theirs).view(torch.float32).numpy()))
        np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    else:
        np.testing.assert_array_equal(ours, theirs)


@needs_fast
@pytest.mark.parametrize("dst", ["F16", "BF16"])
def test_float32_values_cast_as_numpy_and_torch(dst: str, monkeypatch) -> None:
    a = _specials32()
    got = cast(a, dst).view(np.uint16)
    np.testing.assert_array_equal(got, _slow(a, dst, monkeypatch).view(np.uint16))
    np.testing.assert_array_equal(got.view(np.int16), _torch(a, dst))


@needs_fast
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 1000])
@pytest.mark.parametrize("dst", ["F16", "BF16"])
def test_every_tail_length_and_layout(n: int, dst: str, monkeypatch) -> None:
    """Vector bodies, padded and masked tails, and inputs that are views (strided, transposed, 0-d)."""
    a = _specials32()[: 2 * n].reshape(2, n)
    for view in (a, a[:, ::2], a.T, a[0]):
        narrow = cast(view, dst)
        assert narrow.shape == view.shape
        np.testing.assert_array_equal(narrow.view(np.uint16), _slow(view, dst, monkeypatch).view(np.uint16))
        wide = cast(narrow, "F32")
        np.testing.assert_array_equal(wide.view(np.uint32), _slow(narrow, "F32", monkeypatch).view(np.uint32))
    scalar = np.array(-1.5, np.float32)
    assert cast(scalar, dst).shape == () and float(cast(scalar, dst)) == -1.5


@needs_fast
def test_the_kernels_refuse_buffers_that_disagree() -> None:
    from sdport import _casts

    with pytest.raises(ValueError, match="sizes disagree"):
        _casts.f32_to_f16(np.zeros(4, np.float32), np.zeros(3, np.uint16))
    with pytest.raises(TypeError):
        _casts.f16_to_f32(np.zeros(4, np.uint16), np.zeros(4, np.float32).tobytes())  # read-only destination


def test_numpy_fallback_when_forced_by_the_environment() -> None:
    """SDPORT_NO_FASTCAST=1: the extension picks no kernel, numpy casts, and the results are the same bits."""
    code = ("import numpy as np; from sdport.dtypes import cast, fast_casts; "
            "a = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16); "
            "w = cast(a, 'F32'); s = lambda x: int(x.view(np.uint32 if x.itemsize == 4 else np.uint16).sum()); "
            "print(repr(fast_casts()), s(w), s(cast(w, 'BF16')), s(cast(w, 'F16')))")
    runs = {}
    for off in ("1", "0"):
        env = {**os.environ, "SDPORT_NO_FASTCAST": off}
        runs[off] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.split()
    assert runs["1"][0] == "''"
    assert runs["1"][1:] == runs["0"][1:]
    if {"f16c", "avx2", "fma"} <= _cpu_flags():
        assert runs["0"][0] != "''"


def test_doctor_says_which_casts_run() -> None:
    from conftest import run_cli

    fast = run_cli("doctor")
    assert fast.code == 0 and "traced ONNX graphs:" in fast.out
    want = f"casts: compiled ({fast_casts()})" if fast_casts() else "casts: numpy"
    assert want in fast.out.splitlines()[1]
    slow = run_cli("doctor", env={**os.environ, "SDPORT_NO_FASTCAST": "1"})
    assert slow.code == 0 and slow.out.splitlines()[1].startswith("casts: numpy (slower: SDPORT_NO_FASTCAST is set")
