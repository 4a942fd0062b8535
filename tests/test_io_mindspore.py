"""MindSpore ``.ckpt`` reading and writing, against protobuf's own serializer and parser.

The oracle is the ``google.protobuf`` runtime with MindSpore's checkpoint schema (``Checkpoint``,
``TensorProto``) declared here from its field numbers: sdport's streaming writer must produce the
bytes protobuf's ``SerializeToString`` does — one message per chunk, as ``mindspore.save_checkpoint``
concatenates them — and sdport's reader must find what protobuf's ``ParseFromString`` finds. With
MindSpore itself installed (CI gives it its own venv), test_mindspore_oracle.py checks against it.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from conftest import leftovers, run_cli, sha256
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import sdport
import sdport.io.mindspore as ms
from sdport.io import open_tensors
from sdport.io.base import Slot


def _checkpoint_class():
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="sdport_test_checkpoint.proto", syntax="proto2")
    tp = fdp.message_type.add(name="TensorProto")
    tp.field.add(name="dims", number=1, label=f.LABEL_REPEATED, type=f.TYPE_INT64)
    tp.field.add(name="tensor_type", number=2, label=f.LABEL_REQUIRED, type=f.TYPE_STRING)
    tp.field.add(name="tensor_content", number=3, label=f.LABEL_REQUIRED, type=f.TYPE_BYTES)
    ck = fdp.message_type.add(name="Checkpoint")
    v = ck.nested_type.add(name="Value")
    v.oneof_decl.add(name="value")
    v.field.add(name="tag", number=1, label=f.LABEL_REQUIRED, type=f.TYPE_STRING)
    v.field.add(name="tensor", number=2, label=f.LABEL_OPTIONAL, type=f.TYPE_MESSAGE, type_name=".TensorProto",
                oneof_index=0)
    ck.field.add(name="value", number=1, label=f.LABEL_REPEATED, type=f.TYPE_MESSAGE, type_name=".Checkpoint.Value")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("Checkpoint"))


Checkpoint = _checkpoint_class()
NAMES = {np.dtype(np.float32): "Float32", np.dtype(np.float16): "Float16", np.dtype(ml_dtypes.bfloat16): "BFloat16",
         np.dtype(np.int64): "Int64", np.dtype(np.int32): "Int32", np.dtype(np.uint8): "UInt8",
         np.dtype(np.bool_): "Bool", np.dtype(np.float64): "Float64"}
CODES = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Int64": "I64", "Int32": "I32", "UInt8": "U8",
         "Bool": "BOOL", "Float64": "F64"}


def reference_bytes(tensors: dict[str, np.ndarray], slice_size: int = ms.SLICE) -> bytes:
    """What mindspore.save_checkpoint writes: one serialized Checkpoint per chunk of each tensor's bytes."""
    out = []
    for name, arr in tensors.items():
        raw = np.asarray(arr, order="C").tobytes()
        for i in range(0, max(len(raw), 1), slice_size):
            c = Checkpoint()
            v = c.value.add()
            v.tag = name
            v.tensor.dims.extend(arr.shape)
            v.tensor.tensor_type = NAMES[arr.dtype]
            v.tensor.tensor_content = raw[i:i + slice_size]
            out.append(c.SerializeToString())
    return b"".join(out)


def write(path: str, tensors: dict[str, np.ndarray], **kw) -> None:
    with ms.MindSporeWriter(path, **kw) as w:
        w.begin([Slot(n, CODES[NAMES[a.dtype]], a.shape) for n, a in tensors.items()])
        for n, a in tensors.items():
            w.write(n, a)
        w.commit()


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"model.diffusion_model.input_blocks.0.0.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "first_stage_model.encoder.norm_out.gamma": rng.standard_normal(64).astype(np.float16),
            "bf": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
            "cond_stage_model.logit_scale": np.array(4.6, np.float32),  # 0-d
            "global_step": np.array([1000], np.int64), "mask": np.array([True, False, True]),
            "u8": np.arange(7, dtype=np.uint8), "empty": np.zeros((0, 4), np.float32),
            "名前.weight": np.ones((2, 2), np.float64)}


def test_writer_is_byte_identical_to_protobuf_and_the_reader_finds_every_tensor(tmp_path) -> None:
    tensors = sample()
    path = str(tmp_path / "a.ckpt")
    write(path, tensors)
    with open(path, "rb") as f:
        data = f.read()
    assert data == reference_bytes(tensors)
    parsed = Checkpoint()
    parsed.ParseFromString(data)
    assert [v.tag for v in parsed.value] == list(tensors)
    with open_tensors(path) as src:
        assert src.format == "mindspore" and list(src.tensors) == list(tensors)
        for name, want in tensors.items():
            got = src.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def test_chunked_parameters_are_cut_and_joined_like_mindspore(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ms, "SLICE", 1000)  # 512 MiB in real files: the same rule at a testable size
    rng = np.random.default_rng(1)
    tensors = {"big": rng.standard_normal((33, 17)).astype(np.float32), "small": np.arange(5, dtype=np.float16),
               "exact": np.zeros(250, np.float32)}  # exactly one chunk of 1000 bytes
    path = str(tmp_path / "c.ckpt")
    write(path, tensors)
    with open(path, "rb") as f:
        data = f.read()
    assert data == reference_bytes(tensors, 1000)
    parsed = Checkpoint()
    parsed.ParseFromString(data)
    assert [v.tag for v in parsed.value].count("big") == 3
    with open_tensors(path) as src:
        assert len(src.tensors["big"].chunks) == 3
        np.testing.assert_array_equal(src.read("big"), tensors["big"])
    # a chunked tensor passes through a conversion (read, joined, rechunked) unchanged
    out = str(tmp_path / "again.ckpt")
    sdport.convert(path, out, format="mindspore", progress=False)
    with open(out, "rb") as f:
        assert f.read() == data
    with open_tensors(out) as src:
        for name, want in tensors.items():
            np.testing.assert_array_equal(src.read(name), want)


def test_crc_trailer_is_written_verified_and_stripped(tmp_path) -> None:
    tensors = sample()
    path = str(tmp_path / "crc.ckpt")
    write(path, tensors, crc=True)
    with open(path, "rb") as f:
        data = f.read()
    body = reference_bytes(tensors)
    import zlib

    assert data == body + b"crc_num" + zlib.crc32(body).to_bytes(10, "big")
    with open_tensors(path) as src:
        np.testing.assert_array_equal(src.read("bf"), tensors["bf"])
    bad = bytearray(data)
    bad[40] ^= 1
    with open(str(tmp_path / "bad.ckpt"), "wb") as f:
        f.write(bad)
    r = run_cli("inspect", tmp_path / "bad.ckpt")
    assert r.code == 2 and "CRC" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["truncated", "length-past-end", "unknown-type", "dims-disagree", "map", "junk",
                                  "duplicate"])
def test_malformed_checkpoints_get_one_line(tmp_path, case) -> None:
    good = reference_bytes({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)})
    if case == "truncated":
        data = good[:-5]
    elif case == "length-past-end":
        data = good[:1] + bytes([0xFF, 0xFF, 0x03]) + good[2:]
    elif case == "unknown-type":
        c = Checkpoint()
        v = c.value.add()
        v.tag, v.tensor.tensor_type, v.tensor.tensor_content = "w", "Int4", b"\x00\x00"
        v.tensor.dims.extend([4])
        data = c.SerializeToString()
    elif case == "dims-disagree":
        c = Checkpoint()
        v = c.value.add()
        v.tag, v.tensor.tensor_type, v.tensor.tensor_content = "w", "Float32", b"\x00" * 12
        v.tensor.dims.extend([2, 3])
        data = c.SerializeToString()
    elif case == "duplicate":  # the same name again after another tensor: not a chunk, a second parameter
        data = good + reference_bytes({"a": np.zeros((2, 3), np.float32)})
    elif case == "map":
        data = b"\x0a\x07\x0a\x01m\x1a\x02\x0a\x00"
    else:
        data = b"\x0a\x03\x0a\x01" + os.urandom(200)
    path = str(tmp_path / f"{case}.ckpt")
    with open(path, "wb") as f:
        f.write(data)
    before = sha256(path)
    out = str(tmp_path / "out.safetensors")
    r = run_cli("convert", path, out)
    assert r.code == 2 and path in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not os.path.exists(out) and leftovers(tmp_path) == [] and sha256(path) == before


@pytest.mark.parametrize("flags", [["--to", "mindspore", "--crc"], ["--format", "mindspore", "--crc"]])
def test_crc_asks_the_writer_for_the_trailer_mindspore_checks(demo_ckpt, tmp_path, flags) -> None:
    import zlib

    out, plain = tmp_path / "crc.bin", tmp_path / "plain.bin"
    assert run_cli("convert", demo_ckpt, out, *flags).code == 0
    assert run_cli("convert", demo_ckpt, plain, *flags[:2]).code == 0
    data = out.read_bytes()
    body = plain.read_bytes()
    assert data == body + b"crc_num" + zlib.crc32(body).to_bytes(10, "big")
    with open_tensors(out) as a, open_tensors(plain) as b:
        assert list(a.tensors) == list(b.tensors)
