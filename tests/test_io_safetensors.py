"""safetensors reader and writer, checked against the safetensors package (the reference implementation)."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdport.dtypes import BY_CODE
from sdport.errors import FormatError
from sdport.io import open_tensors
from sdport.io.base import Slot
from sdport.io.safetensors import SafetensorsWriter, header_bytes, parse_header

ALL = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
       "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {f"t.{code}": (rng.standard_normal((3, 5)) * 4).astype(dt) for code, dt in ALL.items()}
    out["scalar"] = np.array(1.5, np.float32)
    out["empty"] = np.zeros((2, 0), np.float16)
    return out


def test_reader_matches_reference_for_every_dtype(tmp_path) -> None:
    path = str(tmp_path / "all.safetensors")
    arrays = _arrays()
    safetensors.numpy.save_file(arrays, path, metadata={"k": "v"})
    with open_tensors(path) as src:
        assert src.metadata == {"k": "v"}
        assert set(src.keys()) == set(arrays)
        for name, ref in arrays.items():
            got = src.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert got.tobytes() == ref.tobytes()


def test_writer_output_is_read_back_exactly_by_reference(tmp_path) -> None:
    path = str(tmp_path / "w.safetensors")
    arrays = _arrays()
    slots = [Slot(n, next(c for c, d in ALL.items() if np.dtype(d) == a.dtype) if n.startswith("t.") else
                  ("F32" if n == "scalar" else "F16"), a.shape) for n, a in arrays.items()]
    with SafetensorsWriter(path) as w:
        w.begin(slots, {"format": "pt"})
        for name, a in arrays.items():
            w.write(name, a)
        w.commit()
    import safetensors.torch  # the numpy backend cannot load float8

    back = safetensors.torch.load_file(path)
    for name, ref in arrays.items():
        assert back[name].reshape(-1).view(torch.uint8).numpy().tobytes() == ref.tobytes()
        assert tuple(back[name].shape) == ref.shape
    with safetensors.safe_open(path, "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_header_bytes_are_exactly_the_documented_layout() -> None:
    raw = header_bytes([Slot("a", "F32", (2,)), Slot("b", "F16", ())], {"x": "y"})
    body = b'{"__metadata__":{"x":"y"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
           b'"b":{"dtype":"F16","shape":[],"data_offsets":[8,10]}}'
    body += b" " * (-(len(body) + 8) % 8)
    assert raw == struct.pack("<Q", len(body)) + body
    assert len(raw) % 8 == 0


def test_writer_refuses_out_of_order_and_wrong_sizes(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(str(path)) as w:
        w.begin([Slot("a", "F32", (2,)), Slot("b", "F32", (2,))])
        with pytest.raises(RuntimeError, match="out of order"):
            w.write("b", np.zeros(2, np.float32))
        with pytest.raises(RuntimeError, match="bytes for a slot"):
            w.write("a", np.zeros(3, np.float32))
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_leading_and_trailing_json_whitespace_is_accepted_like_the_reference() -> None:
    head = b'  {"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}  '
    entries, meta = parse_header("x", head, 1)
    assert entries == {"a": ("U8", (1,), 0, 1)} and meta == {}


@pytest.mark.parametrize("head,problem", [
    (b'{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', "invalid tensor shape"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}', "unexpected field"),
    (b'\xef\xbb\xbf{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "must be a JSON object"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],'
     b'"data_offsets":[0,1]}}', "duplicate key 'a'"),
])
def test_header_checks_beyond_the_reference(head: bytes, problem: str) -> None:
    with pytest.raises(FormatError, match=problem):
        parse_header("x", head, 1)


_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__")


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_names, st.tuples(st.sampled_from(sorted(BY_CODE)),
                                         st.lists(st.integers(0, 4), max_size=3)), max_size=6),
       st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_roundtrip_property_any_dtypes_and_shapes(tmp_path_factory, spec, metadata) -> None:
    path = str(tmp_path_factory.mktemp("p") / "p.safetensors")
    rng = np.random.default_rng(1)
    arrays = {n: rng.integers(0, 255, size=int(np.prod(s)) * BY_CODE[d].itemsize, dtype=np.uint8)
              .view(BY_CODE[d].numpy).reshape(s) for n, (d, s) in spec.items()}
    with SafetensorsWriter(path) as w:
        w.begin([Slot(n, d, tuple(s)) for n, (d, s) in spec.items()], metadata)
        for n, a in arrays.items():
            w.write(n, a)
        w.commit()
    with safetensors.safe_open(path, "np") as f:  # the reference accepts what we write
        assert set(f.keys()) == set(arrays)
    with open_tensors(path) as src:
        assert src.metadata == metadata
        for n, a in arrays.items():
            assert src.read(n).tobytes() == a.tobytes()


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12), st.integers(0, 64))
def test_header_parser_only_ever_raises_format_error(doc, data_size) -> None:
    head = json.dumps(doc).encode()
    try:
        parse_header("x", head, data_size)
    except FormatError:
        pass
