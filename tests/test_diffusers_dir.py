"""diffusers folders: components, shards through their index, and paths that must stay inside the folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy

import sdport
from sdport.errors import FormatError, UnsafeFileError
from sdport.io import open_tensors


def _component(folder, name: str, tensors: dict, *, shards: int = 1, stem: str = "diffusion_pytorch_model") -> None:
    d = folder / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    if shards == 1:
        safetensors.numpy.save_file(tensors, str(d / f"{stem}.safetensors"))
        return
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        safetensors.numpy.save_file(part, str(d / fname))
        weight_map.update({k: fname for k in part})
    (d / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def pipeline(tmp_path):
    rng = np.random.default_rng(0)
    unet = {f"down_blocks.{i}.w": rng.standard_normal((2, 3), np.float32) for i in range(6)}
    unet["conv_in.weight"] = rng.standard_normal((4, 4, 3, 3), np.float32)
    (tmp_path / "model_index.json").write_text("{}")
    _component(tmp_path, "unet", unet, shards=3)
    _component(tmp_path, "text_encoder", {"text_model.final_layer_norm.weight": np.ones(4, np.float16)},
               stem="model")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    return tmp_path, unet


def test_components_and_shards_are_one_source_with_prefixed_names(pipeline) -> None:
    folder, unet = pipeline
    with open_tensors(folder) as src:
        assert src.format == "diffusers"
        assert set(src.keys()) == {f"unet.{k}" for k in unet} | {"text_encoder.text_model.final_layer_norm.weight"}
        for k, v in unet.items():
            np.testing.assert_array_equal(src.read(f"unet.{k}"), v)
    assert sdport.inspect(folder)["files"] == 4


def test_a_single_component_folder_keeps_plain_names(pipeline) -> None:
    folder, unet = pipeline
    with open_tensors(folder / "unet") as src:
        assert set(src.keys()) == set(unet)


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_weight_map_paths_must_stay_in_the_folder(pipeline, bad: str) -> None:
    folder, _ = pipeline
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["conv_in.weight"] = bad
    index.write_text(json.dumps(doc))
    with pytest.raises(UnsafeFileError, match="escapes its folder"):
        open_tensors(folder)


def test_a_shard_that_is_a_symlink_out_of_the_folder_is_refused(pipeline, tmp_path_factory) -> None:
    folder, _ = pipeline
    outside = tmp_path_factory.mktemp("outside") / "secret.safetensors"
    safetensors.numpy.save_file({"secret": np.ones(1, np.float32)}, str(outside))
    shard = folder / "unet" / "diffusion_pytorch_model-00001-of-00003.safetensors"
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="leads outside its folder"):
        open_tensors(folder)


def test_index_that_disagrees_with_the_shards_is_refused(pipeline) -> None:
    folder, _ = pipeline
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost"] = "diffusion_pytorch_model-00001-of-00003.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="weight_map disagrees with the shards"):
        open_tensors(folder)


def test_duplicate_keys_in_an_index_are_refused(pipeline) -> None:
    folder, _ = pipeline
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    text = index.read_text().replace('"weight_map": {', '"weight_map": {"conv_in.weight": "x.safetensors", ', 1)
    index.write_text(text)
    with pytest.raises(FormatError, match="duplicate key 'conv_in.weight'"):
        open_tensors(folder)


def test_a_folder_without_weights_says_so(tmp_path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FormatError, match="no model weights in this folder"):
        open_tensors(tmp_path)


def test_git_lfs_pointer_is_named(tmp_path) -> None:
    p = tmp_path / "model.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(FormatError, match="Git LFS pointer"):
        open_tensors(p)
    assert os.path.getsize(p) > 0
