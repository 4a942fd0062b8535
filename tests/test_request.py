"""The way into a conversion: requests built and checked once, the route table, targets' options, typed verbs.

Every option that belongs to another target (or does nothing) is refused by the request with one
line, from the API and the CLI alike, before any file is opened — the source below does not exist,
so an error about the option proves nothing was read.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import safetensors.numpy
from conftest import run_cli

import sdport
from sdport.errors import SdportError
from sdport.request import ConvertRequest, LoraSpec, MindOneOptions, OnnxOptions, SingleFileOptions, parse_dtype
from sdport.targets import ROUTES

MISSING = "/nonexistent/model.safetensors"

#: (API keywords, CLI flags, destination, the words the one-line error must hold)
MISPLACED = [
    (dict(opset=18), ["--opset", "18"], "out", "shape an ONNX export"),
    (dict(onnx_layout="optimum"), ["--layout", "optimum"], "out.safetensors", "shape an ONNX export"),
    (dict(vae_dtype="fp16"), ["--vae-dtype", "fp16"], "out", "shape an ONNX export"),
    (dict(controlnet=True), ["--controlnet"], "out", "shape an ONNX export"),
    (dict(to="onnx", format="ckpt"), ["--to", "onnx", "--format", "ckpt"], "out", "choose a single file's format"),
    (dict(format="ckpt"), ["--format", "ckpt"], "out", "the output is a folder"),
    (dict(crc=True), ["--crc"], "out.safetensors", "MindSpore's checkpoint trailer"),
    (dict(to="mindspore", format="safetensors"), ["--to", "mindspore", "--format", "safetensors"], "out.ckpt",
     "writes a MindSpore checkpoint"),
    (dict(base="b.safetensors"), ["--base", "b.safetensors"], "out", "--base takes the input into a single file"),
    (dict(base="b.safetensors", loras=["l.safetensors"]), ["--base", "b.safetensors", "--lora", "l.safetensors"],
     "out.safetensors", "without --lora or --ema"),
    (dict(allow_unmatched=True), ["--allow-unmatched"], "out", "apply to the adapters of --lora"),
    (dict(lora_alpha=8.0), ["--lora-alpha", "8"], "out", "apply to the adapters of --lora"),
    (dict(prediction_type="epsilon"), ["--prediction-type", "epsilon"], "out.safetensors",
     "written into a diffusers or ONNX folder"),
    (dict(loras=["style.safetensors:abc"]), ["--lora", "style.safetensors:abc"], "out",
     "ratio 'abc' is not a number"),
]


@pytest.mark.parametrize("api,flags,dst,words", MISPLACED, ids=[" ".join(m[1]) for m in MISPLACED])
def test_a_misplaced_option_is_refused_by_the_request_before_any_file_is_opened(tmp_path, api, flags, dst,
                                                                                words) -> None:
    with pytest.raises(SdportError, match=words.replace("(", r"\(")):
        sdport.convert(MISSING, tmp_path / dst, **api)
    r = run_cli("convert", MISSING, tmp_path / dst, *flags)
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert "no such file" not in r.err


def test_a_request_is_frozen_and_survives_pickling() -> None:
    request = ConvertRequest.build("in.ckpt", "out", to="onnx", dtype="fp16", loras=["a.safetensors:0.5", "b"],
                                   vae_dtype="fp32", opset=18, components="unet, vae_decoder")
    assert request.loras == (LoraSpec("a.safetensors", 0.5), LoraSpec("b", 1.0))
    assert request.options == OnnxOptions("diffusers", "F32", 18, False)
    assert (request.dtype, request.components) == ("F16", ("unet", "vae_decoder"))
    assert pickle.loads(pickle.dumps(request)) == request
    with pytest.raises(AttributeError):
        request.dtype = "F32"  # type: ignore[misc]


def test_each_target_gets_its_own_options() -> None:
    assert ConvertRequest.build("a", "b.ckpt").options == SingleFileOptions("ckpt")
    assert ConvertRequest.build("a", "b.bin", format="mindspore", crc=True).options == SingleFileOptions(
        "mindspore", True)
    assert ConvertRequest.build("a", "b.ckpt", to="mindspore", crc=True).options == MindOneOptions(True)
    assert ConvertRequest.build("a", "folder").options is None and ConvertRequest.build("a", "folder").target is None


@pytest.mark.parametrize("name,code", [("keep", None), ("fp16", "F16"), ("half", "F16"), ("bf16", "BF16"),
                                       ("F32", "F32"), ("float32", "F32")])
def test_one_dtype_parser_for_every_verb(name, code) -> None:
    assert parse_dtype(name) == code
    with pytest.raises(SdportError, match="unknown --dtype 'fp8'"):
        parse_dtype("fp8")


def test_lora_combine_takes_dtype_names_like_convert(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for i in (1, 2):
        safetensors.numpy.save_file({
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": rng.standard_normal((2, 8), np.float32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": rng.standard_normal((8, 2), np.float32),
        }, str(tmp_path / f"{i}.safetensors"))
    out = tmp_path / "ab.safetensors"
    written = sdport.lora.combine([str(tmp_path / "1.safetensors"), str(tmp_path / "2.safetensors:0.5")], out,
                                  dtype="fp16")
    got = safetensors.numpy.load_file(str(out))
    assert written.modules == 1 and {a.dtype for k, a in got.items() if ".lora_" in k} == {np.dtype(np.float16)}
    assert got["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 8)


def test_the_route_table_takes_every_input_kind_for_every_target() -> None:
    assert set(ROUTES) == {"single-file", "diffusers", "mindspore", "onnx"}
    assert {name: sorted(t.plans) for name, t in ROUTES.items()} == {
        name: ["diffusers", "onnx", "original"] for name in ROUTES}
    assert ROUTES["mindspore"].default_dtype == "F32" and not ROUTES["onnx"].casts


def test_a_lora_given_as_a_model_points_at_sdport_lora(tmp_path) -> None:
    src = tmp_path / "style.safetensors"
    safetensors.numpy.save_file({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((2, 8), np.float32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((8, 2), np.float32)}, str(src))
    r = run_cli("convert", src, tmp_path / "out")
    assert r.code == 2 and "is a LoRA adapter, not a model" in r.err and "sdport lora convert" in r.err
    r = run_cli("convert", src, tmp_path / "same.safetensors")  # repackaging a file keeps it, and says where to go
    assert r.code == 0 and "repackaged as it is" in r.err and "sdport lora convert" in r.err


def test_a_missing_extra_names_the_pip_line(monkeypatch) -> None:
    import importlib.util

    from sdport.errors import MissingExtraError
    from sdport.trace import onnx

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name))
    with pytest.raises(MissingExtraError) as err:
        onnx._torch()
    assert err.value.message() == ("ONNX export needs the 'onnx' extra (onnxruntime not installed) "
                                   "(pip install 'sdport[onnx]')")
    assert isinstance(err.value, ImportError)


def test_an_unknown_output_suffix_is_refused_with_the_formats(demo_ckpt, tmp_path) -> None:
    """``out.gguf`` was written as safetensors under that name; now one line naming the suffixes, nothing written.
    ``--format`` still writes any name, and the known suffixes pick their format in any case."""
    for name in ("out.gguf", "out.onnx", "model.v2"):
        r = run_cli("convert", demo_ckpt, tmp_path / name)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
        assert f"unknown output suffix '.{name.rsplit('.', 1)[1]}'" in r.err and name in r.err
        assert ".safetensors, .ckpt, .pt, .pth, .bin" in r.err and not (tmp_path / name).exists()
    assert run_cli("convert", demo_ckpt, tmp_path / "x.weights", "--format", "safetensors").code == 0
    assert sdport.inspect(str(tmp_path / "x.weights"))["format"] == "safetensors"
    assert run_cli("convert", demo_ckpt, tmp_path / "y.PTH").code == 0
    assert sdport.inspect(str(tmp_path / "y.PTH"))["format"] == "torch-zip"


def test_every_extra_is_used_and_installed_by_the_test_run() -> None:
    """No extra that installs nothing sdport imports (gradio, tpu-mlir, MindSpore beside numpy 2 were): each names
    what a feature imports, and .ci/run installs all of it (the test extra pins them)."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]
    assert set(extras) == {"torch", "onnx", "verify", "batch", "ray", "all", "test"}
    for name, reqs in extras.items():
        for req in reqs:
            dist = req.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
            if dist != "sdport":
                assert version(dist), f"[{name}] {dist} is not installed by the test run"
    assert (Path(__file__).parents[1] / "LICENSE").read_text().startswith("MIT License")
