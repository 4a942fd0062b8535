"""sdport's MindSpore checkpoints against MindSpore itself (``mindspore.save_checkpoint`` / ``load_checkpoint``).

MindSpore 2.10 needs numpy < 2 (for bfloat16), so .ci/run runs this file in its own venv with
MindSpore and sdport's core only; in the main test venv it is skipped.
"""

from __future__ import annotations

import os
import zlib

import ml_dtypes
import numpy as np
import pytest
from conftest import run_cli

ms = pytest.importorskip("mindspore")
ms.set_device("CPU")

from sdport.io import open_tensors  # noqa: E402
from sdport.io.base import Slot  # noqa: E402
from sdport.io.mindspore import MindSporeWriter  # noqa: E402

CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
         np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"model.diffusion_model.input_blocks.0.0.conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
            "first_stage_model.encoder.norm_out.gamma": rng.standard_normal(32).astype(np.float16),
            "bf16": rng.standard_normal((3, 5)).astype(np.float32).astype(ml_dtypes.bfloat16),
            "logit_scale": np.array(4.6, np.float32), "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
            "i32": np.arange(4, dtype=np.int32), "u8": np.arange(5, dtype=np.uint8)}


def _ms_params(tensors: dict[str, np.ndarray]) -> list[dict]:
    out = []
    for name, a in tensors.items():
        t = ms.Tensor(a.astype(np.float32), ms.bfloat16) if a.dtype == ml_dtypes.bfloat16 else ms.Tensor(a)
        out.append({"name": name, "data": ms.Parameter(t, name=name)})
    return out


def _sdport_write(path: str, tensors: dict[str, np.ndarray], **kw) -> None:
    with MindSporeWriter(path, **kw) as w:
        w.begin([Slot(n, CODES[a.dtype], a.shape) for n, a in tensors.items()])
        for n, a in tensors.items():
            w.write(n, a)
        w.commit()


def _values(p) -> np.ndarray:
    t = p.data if hasattr(p, "data") else p
    return t.float().asnumpy() if t.dtype == ms.bfloat16 else t.asnumpy()


@pytest.mark.parametrize("crc", [False, True])
def test_sdport_writes_what_mindspore_writes_byte_for_byte(tmp_path, crc) -> None:
    tensors = _tensors()
    ours, theirs = str(tmp_path / "ours.ckpt"), str(tmp_path / "theirs.ckpt")
    _sdport_write(ours, tensors, crc=crc)
    ms.save_checkpoint(_ms_params(tensors), theirs, crc_check=crc)
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


def test_mindspore_loads_sdport_files_and_sdport_reads_mindspore_files(tmp_path) -> None:
    tensors = _tensors()
    ours, theirs = str(tmp_path / "ours.ckpt"), str(tmp_path / "theirs.ckpt")
    _sdport_write(ours, tensors)
    loaded = ms.load_checkpoint(ours)
    assert list(loaded) == list(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(_values(loaded[name]), want.astype(np.float32) if want.dtype ==
                                      ml_dtypes.bfloat16 else want)
    ms.save_checkpoint(_ms_params(tensors), theirs, crc_check=True)
    with open_tensors(theirs) as src:
        for name, want in tensors.items():
            got = src.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def test_a_parameter_over_512_mib_is_chunked_like_mindspore(tmp_path) -> None:
    big = {"big": np.random.default_rng(2).standard_normal((161, 1 << 20 >> 0), dtype=np.float32)}  # 675 MB
    theirs, ours = str(tmp_path / "theirs.ckpt"), str(tmp_path / "ours.ckpt")
    ms.save_checkpoint(_ms_params(big), theirs)
    with open_tensors(theirs) as src:
        assert len(src.tensors["big"].chunks) == 2
        np.testing.assert_array_equal(src.read("big"), big["big"])
    _sdport_write(ours, big)
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        while True:
            x, y = a.read(64 << 20), b.read(64 << 20)
            assert x == y
            if not x:
                break
    assert zlib.crc32(b"") == 0


def test_the_demo_model_as_mindone_loads_in_mindspore(tmp_path, demo_ckpt) -> None:
    out = str(tmp_path / "demo-mindone.ckpt")
    r = run_cli("convert", demo_ckpt, out, "--to", "mindspore")
    assert r.code == 0, r.err
    loaded = ms.load_checkpoint(out)
    with open_tensors(demo_ckpt) as src, open_tensors(out) as got:
        assert list(loaded) == list(got.tensors)
        assert "cond_stage_model.transformer.transformer_layer.resblocks.0.attn.attn.in_proj.weight" in loaded
        assert "model.diffusion_model.input_blocks.1.0.in_layers_norm.gamma" in loaded
        q = src.read("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
        fused = _values(loaded["cond_stage_model.transformer.transformer_layer.resblocks.0.attn.attn.in_proj.weight"])
        np.testing.assert_array_equal(fused[: q.shape[0]], q.astype(np.float32))  # rows [q; k; v]
        for name in got.tensors:
            assert loaded[name].dtype == ms.float32 or loaded[name].dtype in (ms.int64, ms.int32)
    assert os.path.getsize(out) > 0


def test_mindspore_verifies_the_crc_trailer_of_a_crc_conversion(tmp_path, demo_ckpt) -> None:
    out = str(tmp_path / "demo-crc.ckpt")
    assert run_cli("convert", demo_ckpt, out, "--to", "mindspore", "--crc").code == 0
    loaded = ms.load_checkpoint(out, crc_check=True)
    assert "model.diffusion_model.input_blocks.1.0.in_layers_norm.gamma" in loaded
    bad = bytearray(open(out, "rb").read())
    bad[100] ^= 1
    with open(out, "wb") as f:
        f.write(bad)
    with pytest.raises(ValueError):
        ms.load_checkpoint(out, crc_check=True)

