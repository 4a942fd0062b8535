"""Plans are validated in full before anything is written; ops compute what numpy says they should."""

from __future__ import annotations

import numpy as np
import pytest

from sdport.dtypes import cast
from sdport.errors import PlanError, UnknownKeyError
from sdport.io.base import TensorInfo, TensorSource
from sdport.patches import Patch
from sdport.plan import SAFETENSORS, OutputFile, OutputTensor, Plan, compute, validate


def _source(**shapes: tuple[int, ...]) -> TensorSource:
    return TensorSource("m.safetensors", "safetensors",
                        {k: TensorInfo(k, "F32", s, "m.safetensors", 0, 0) for k, s in shapes.items()})


def _plan(*tensors: OutputTensor, dropped: dict | None = None) -> Plan:
    return Plan([OutputFile("out", SAFETENSORS, list(tensors))], dropped=dropped or {})


def test_every_input_must_be_used_or_dropped_with_a_reason() -> None:
    src = _source(a=(2,), b=(2,), c=(2,))
    plan = _plan(OutputTensor("a", "F32", (2,), ("a",)), dropped={"b": "EMA copy"})
    with pytest.raises(UnknownKeyError, match=r"1 tensor\(s\) no rule knows: c \(pass --allow-unknown"):
        validate(plan, src)
    validate(plan, src, allow_unknown=True)


def test_shape_mismatch_names_both_shapes() -> None:
    plan = _plan(OutputTensor("q", "F32", (4, 4), ("qkv",), "split", (0, 0, 3)))
    with pytest.raises(PlanError, match=r"shape mismatch for 'q': expected \[4, 4\], inputs give \[\[12, 5\]\]"):
        validate(plan, _source(qkv=(12, 5)))


def test_an_output_defined_twice_is_refused() -> None:
    t = OutputTensor("a", "F32", (2,), ("a",))
    with pytest.raises(PlanError, match="defined twice"):
        validate(_plan(t, t), _source(a=(2,)))


def test_a_missing_input_is_refused() -> None:
    with pytest.raises(PlanError, match="needs tensor 'zz'"):
        validate(_plan(OutputTensor("a", "F32", (2,), ("zz",))), _source(a=(2,)))


def test_split_concat_transpose_reshape_compute_like_numpy() -> None:
    qkv = np.arange(36, dtype=np.float32).reshape(6, 6)
    arrays = {"qkv": qkv, "x": qkv}
    parts = [compute(OutputTensor(f"p{i}", "F32", (2, 6), ("qkv",), "split", (0, i, 3)), arrays.get) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), qkv)
    arrays.update(a=parts[0], b=parts[1], c=parts[2])
    joined = compute(OutputTensor("j", "F32", (6, 6), ("a", "b", "c"), "concat", (0,)), arrays.get)
    np.testing.assert_array_equal(joined, qkv)
    np.testing.assert_array_equal(compute(OutputTensor("t", "F32", (6, 6), ("x",), "transpose"), arrays.get), qkv.T)
    conv = compute(OutputTensor("r", "F16", (6, 6, 1, 1), ("x",), "reshape", ((6, 6, 1, 1),)), arrays.get)
    assert conv.shape == (6, 6, 1, 1) and conv.dtype == np.float16


def test_patches_add_low_rank_updates_in_fp32_to_whole_tensors_and_row_blocks() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float16)
    up, down = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    arrays = {"w": w, "up": up, "down": down}
    lora = ("up", "down")
    got = compute(OutputTensor("w", "F16", (6, 4), ("w",), patches=(Patch("w", lora, lora, 0.5, rows=(1, 3)),)),
                  arrays.get)
    want = w.astype(np.float32)
    want[2:4] += 0.5 * up @ down
    np.testing.assert_array_equal(got, want.astype(np.float16))
    conv_up, conv_down = rng.standard_normal((6, 3, 1, 1)), rng.standard_normal((3, 2, 3, 3))
    mid = rng.standard_normal((3, 3, 3, 3))
    arrays.update(cw=np.zeros((6, 2, 3, 3), np.float32), cu=conv_up, cd=conv_down, mid=mid)
    locon = compute(OutputTensor("cw", "F32", (6, 2, 3, 3), ("cw",), patches=(Patch("cw", ("cu", "cd"), lora, 1.0),)),
                    arrays.get)
    np.testing.assert_allclose(locon, np.einsum("or,rikl->oikl", conv_up[:, :, 0, 0], conv_down), rtol=1e-5, atol=1e-5)
    tucker_down = rng.standard_normal((3, 2, 1, 1))
    arrays["td"] = tucker_down
    tucker = compute(OutputTensor("cw", "F32", (6, 2, 3, 3), ("cw",),
                                  patches=(Patch("cw", ("cu", "td", "mid"), ("up", "down", "mid"), 2.0),)), arrays.get)
    want = 2 * np.einsum("mnkl,im,nj->ijkl", mid, conv_up[:, :, 0, 0], tucker_down[:, :, 0, 0])
    np.testing.assert_allclose(tucker, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-casts", "numpy-casts"])
def test_low_rank_updates_are_added_in_blocks_bit_for_bit_and_several_as_one_product(monkeypatch, compiled) -> None:
    """One adapter: blocks of rows give the very bits of ``W + (up @ down)·s`` made whole (the formula diffusers'
    fuse_lora uses; tests/test_lora.py checks them against it); several: one rank-concatenated product, equal to
    adding them in turn up to fp32 rounding; a run broken by another kind keeps its order; the input is unchanged.
    The same with the compiled casts and with numpy's."""
    import sdport.dtypes as dtypes
    import sdport.patches as patches

    if not compiled:
        monkeypatch.setattr(dtypes, "_casts", None)

    rng = np.random.default_rng(3)
    shapes = {"w": ((1280, 640), np.float16), "u1": ((1280, 32), np.float16), "d1": ((32, 640), np.float16),
              "u2": ((1280, 8), np.float32), "d2": ((8, 640), np.float32), "w1": ((1280, 1), np.float32),
              "w2": ((1, 640), np.float32)}
    arrays = {k: rng.standard_normal(shape).astype(t) for k, (shape, t) in shapes.items()}
    before = arrays["w"].copy()
    w32 = arrays["w"].astype(np.float32)
    one = Patch("w", ("u1", "d1"), ("up", "down"), 0.25, ratio=0.8)
    two = Patch("w", ("d2", "u2"), ("down", "up"), 1.0, ratio=-0.5)
    loha = Patch("w", ("w1", "w2", "w1", "w2"), ("w1a", "w1b", "w2a", "w2b"), 1.0, kind="loha")
    monkeypatch.setattr(patches, "BLOCK", 4 * 640 * 7)  # 7 rows a block: 183 blocks and a short last one
    d1 = arrays["u1"].astype(np.float32) @ arrays["d1"].astype(np.float32)
    d2 = arrays["u2"] @ arrays["d2"]
    got = compute(OutputTensor("w", "F32", (1280, 640), ("w",), patches=(one,)), arrays.get)
    assert np.array_equal(got, d1 * np.float32(0.2) + w32)
    for code in ("F16", "BF16"):  # narrowed block by block into the output: the bits of the whole sum cast once
        got = compute(OutputTensor("w", code, (640, 1280), ("w",), "reshape", ((640, 1280),), patches=(one,)),
                      arrays.get)
        assert np.array_equal(got.view(np.uint16), cast(d1 * np.float32(0.2) + w32, code).reshape(640, 1280)
                              .view(np.uint16))
    got = compute(OutputTensor("w", "F32", (1280, 640), ("w",), patches=(one, two)), arrays.get)
    np.testing.assert_allclose(got, w32 + d1 * np.float32(0.2) - d2 * np.float32(0.5), rtol=1e-5, atol=1e-4)
    product = (arrays["w1"] @ arrays["w2"]) ** 2
    got = compute(OutputTensor("w", "F32", (1280, 640), ("w",), patches=(one, loha, two)), arrays.get)
    np.testing.assert_allclose(got, w32 + d1 * np.float32(0.2) + product - d2 * np.float32(0.5), rtol=1e-5, atol=1e-4)
    assert np.array_equal(arrays["w"], before)
