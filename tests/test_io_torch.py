"""PyTorch checkpoints read without torch must equal ``torch.load``; written ones must load in ``torch.load``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdport.dtypes import BY_TORCH_NAME
from sdport.io import open_tensors
from sdport.io.base import Slot
from sdport.io.torch import TorchWriter

DTYPES = [torch.uint16, torch.uint32, torch.uint64, torch.float32, torch.float16, torch.bfloat16, torch.float64,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2]


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy()
    return t.numpy()


def _raw(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8 if a.itemsize == 1 else np.int16) if a.dtype.kind == "V" or "float8" in str(a.dtype) \
        or "bfloat16" in str(a.dtype) else a


UNTYPED = (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)


def _zoo(legacy: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    # torch's own legacy format cannot hold dtypes without a typed storage class (torch.load fails on them)
    out = {f"d.{str(d).split('.')[-1]}": (base * 3).to(d) for d in DTYPES if not (legacy and d in UNTYPED)}
    out.update({"transposed": base.t(), "sliced": base[2:5, 1:3], "strided": base[::2], "scalar": torch.tensor(2.5),
                "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.ones(3)),
                "shared_a": base[0], "shared_b": base[1], "expanded": torch.ones(3, 1).expand(3, 4)})
    return out


def _assert_equal(path: str, ref: dict) -> None:
    with open_tensors(path) as src:
        assert set(src.keys()) == set(ref)
        for name, t in ref.items():
            got = src.read(name)
            assert got.shape == tuple(t.shape), name
            np.testing.assert_array_equal(_raw(got), _np(t), err_msg=name)


@pytest.mark.parametrize("zipfmt", [True, False], ids=["zip", "legacy"])
def test_reader_equals_torch_load_for_every_dtype_and_view(tmp_path, zipfmt: bool) -> None:
    path = str(tmp_path / "m.ckpt")
    zoo = _zoo(legacy=not zipfmt)
    torch.save({"state_dict": zoo, "global_step": 12, "epoch": 3}, path, _use_new_zipfile_serialization=zipfmt)
    _assert_equal(path, torch.load(path, weights_only=True)["state_dict"])
    with open_tensors(path) as src:
        assert src.root == "state_dict"
        assert src.non_tensors == {"global_step": "12", "epoch": "3"}


def test_module_state_dict_with_metadata_and_nested_dicts_is_flattened(tmp_path) -> None:
    path = str(tmp_path / "nested.pt")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    torch.save({"model": model.state_dict(), "ema": {"w": torch.ones(2)}, "note": "hello"}, path)
    with open_tensors(path) as src:
        assert src.root == "model"
        assert set(src.keys()) == set(model.state_dict())
        assert set(src.non_tensors) == {"ema", "note"}


def test_lists_of_tensors_get_index_names(tmp_path) -> None:
    path = str(tmp_path / "list.pt")
    torch.save({"layers": [torch.zeros(2), torch.ones(3)]}, path)
    with open_tensors(path) as src:
        assert src.keys() == ["layers.0", "layers.1"]
        assert src.read("layers.1").tolist() == [1.0, 1.0, 1.0]


def test_numpy_scalars_are_reported_not_built(tmp_path) -> None:
    path = str(tmp_path / "np.ckpt")
    torch.save({"state_dict": {"w": torch.ones(1)}, "loss": np.float64(0.5)}, path)
    with open_tensors(path) as src:
        assert src.non_tensors["loss"].endswith("multiarray.scalar")


@pytest.mark.parametrize("root", ["state_dict", ""])
def test_writer_output_loads_in_torch_weights_only(tmp_path, root: str) -> None:
    path = str(tmp_path / "out.ckpt")
    zoo = {k: v.contiguous() for k, v in _zoo().items()}
    with TorchWriter(path, root=root) as w:
        w.begin([Slot(k, BY_TORCH_NAME[str(v.dtype).removeprefix("torch.")].code, tuple(v.shape))
                 for k, v in zoo.items()])
        for k, v in zoo.items():
            src = _np(v)
            w.write(k, src)
        w.commit()
    loaded = torch.load(path, weights_only=True)
    loaded = loaded[root] if root else loaded
    assert list(loaded) == list(zoo)
    for k, v in zoo.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k].reshape(-1).view(torch.uint8), v.detach().reshape(-1).view(torch.uint8))
    import struct
    import zipfile

    raw = open(path, "rb").read()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC is right
        for info in z.infolist():
            name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0  # data aligned as torch aligns it


def test_writer_handles_more_than_one_setitems_batch(tmp_path) -> None:
    path = str(tmp_path / "many.ckpt")
    with TorchWriter(path, root="") as w:
        w.begin([Slot(f"t{i}", "F32", (1,)) for i in range(2500)])
        for i in range(2500):
            w.write(f"t{i}", np.array([i], np.float32))
        w.commit()
    loaded = torch.load(path, weights_only=True)
    assert len(loaded) == 2500 and loaded["t2499"].item() == 2499
