"""``sdport verify``: tensor parity, component and image parity, the report — against diffusers' own pipelines.

The oracle for the output check is diffusers: verify's image of a model must equal the image
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` make from the same latent, prompt and Euler
schedule. Everything else is checked on values: identical models give zero error, one perturbed
tensor is named and moves the UNet's output, casts stay within half an ULP, torch and onnxruntime agree.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import safetensors.numpy
from conftest import run_cli

from sdport.parity import verify
from sdport.parity.report import AMPLIFY, GAP, heat
from sdport.parity.tensors import compare

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
import models  # noqa: E402

SIZE = ("--size", "64x64")
PROMPT = "a photograph of an astronaut riding a horse on mars"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("verify-sd1")
    folder = models.save_pipeline("sd1", str(root / "pipe"))
    single = str(root / "model.safetensors")
    assert run_cli("convert", folder, single, "-q").code == 0
    return {"root": root, "folder": folder, "single": single}


def _read_png(path) -> np.ndarray:
    """Decode the PNGs verify writes (8-bit RGB, filter 0) — enough to check their pixels."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert not raw[:, 0].any()
    return raw[:, 1:].reshape(h, w, 3)


def test_identical_models_pass_with_zero_error_and_a_black_difference_panel(sd1, tmp_path) -> None:
    r = run_cli("verify", sd1["folder"], sd1["single"], *SIZE, "--report", tmp_path / "rep")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    (c,) = report["comparisons"]
    assert report["passed"] and c["tensors"]["identical"] == c["tensors"]["compared"] > 1000
    assert not c["tensors"]["only_a"] and not c["tensors"]["only_b"]
    diffs = {d["name"]: d for d in c["outputs"]["diffs"]}
    assert set(diffs) == {"text_encoder.last_hidden_state", "text_encoder.pooler_output", "unet.out_sample",
                          "vae_decoder.sample", "vae_encoder.latent_sample", "image"}
    assert all(d["max_abs"] == 0 for d in diffs.values()) and diffs["image"]["psnr"] == "inf"
    image = _read_png(tmp_path / "rep" / "compare.png")
    assert image.shape == (64, 3 * 64 + 2 * GAP, 3) and f"image comparison: {tmp_path / 'rep' / 'compare.png'}" in r.out
    assert not image[:, 2 * (64 + GAP):].any()  # the difference panel is black
    assert image[:, :64].std() > 10  # and the image itself is not
    latents = np.load(tmp_path / "rep" / "init_latents.npy")
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == np.float32


def test_the_image_is_the_one_diffusers_pipeline_makes_from_the_same_latent(sd1) -> None:
    result = verify(sd1["single"], sd1["folder"], outputs=True, size="64x64", steps=4, seed=3)
    ours = result.comparisons[0].images[0]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1["folder"])
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    latents = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 4, 8, 8), np.float32))
    ref = pipe(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=7.5, latents=latents,
               output_type="np").images[0]
    assert np.abs(np.round(ref * 255).astype(int) - ours.astype(int)).max() <= 1


def test_one_perturbed_tensor_is_named_and_moves_the_unet_output(sd1, tmp_path) -> None:
    tensors = safetensors.numpy.load_file(sd1["single"])
    name = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    tensors[name] = tensors[name] + np.float32(0.01)
    bad = str(tmp_path / "perturbed.safetensors")
    safetensors.numpy.save_file(tensors, bad)
    r = run_cli("verify", sd1["single"], bad, *SIZE, "--json")
    assert r.code == 3, r.err
    (c,) = json.loads(r.out)["comparisons"]
    assert c["tensors"]["different"] == 1 and c["tensors"]["identical"] == c["tensors"]["compared"] - 1
    worst = c["tensors"]["worst"][0]
    assert worst["name"] == "unet/down_blocks.0.attentions.0.proj_in.weight" and worst["status"] == "different"
    assert worst["max_abs"] == pytest.approx(0.01, rel=1e-3)
    diffs = {d["name"]: d for d in c["outputs"]["diffs"]}
    assert diffs["unet.out_sample"]["max_abs"] > 1e-4 and diffs["vae_decoder.sample"]["max_abs"] == 0
    assert diffs["text_encoder.last_hidden_state"]["max_abs"] == 0


@pytest.fixture(scope="module")
def sd1_onnx(sd1) -> str:
    export = str(sd1["root"] / "onnx")
    assert run_cli("convert", sd1["single"], export, "--to", "onnx", "-q").code == 0
    return export


def test_torch_and_its_onnx_export_agree(sd1, sd1_onnx) -> None:
    export = sd1_onnx
    result = verify(sd1["single"], export, size="64x64")
    c = result.comparisons[0]
    assert result.passed and c.runtimes == ("torch", "onnxruntime")
    assert c.tensors.identical == c.tensors.compared
    diffs = {d.name: d for d in c.outputs.diffs}
    assert all(d.cosine > 0.99999 and d.max_abs < 1e-3 for n, d in diffs.items() if n != "image")
    assert 0 < diffs["image"].mean_abs < 0.5


def test_fp16_against_fp32_is_within_half_an_ulp_and_passes_the_image_threshold(sd1) -> None:
    half = str(sd1["root"] / "half.safetensors")
    assert run_cli("convert", sd1["single"], half, "--dtype", "fp16", "-q").code == 0
    result = verify(sd1["single"], half, size="64x64")
    c = result.comparisons[0]
    assert result.passed and c.tensors.within == c.tensors.compared and c.tensors.worst[0].max_ulp <= 0.5
    image = next(d for d in c.outputs.diffs if d.name == "image")
    assert 0 < image.mean_abs < 5


def test_a_merged_lora_equals_the_base_with_the_same_lora(sd1, tmp_path) -> None:
    from test_lora import kohya_file, make_lora

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1["folder"])
    lora = kohya_file(make_lora(pipe), str(tmp_path / "style.safetensors"))
    merged = str(tmp_path / "merged.safetensors")
    assert run_cli("convert", sd1["single"], merged, "--lora", f"{lora}:0.7", "-q").code == 0
    r = run_cli("verify", sd1["folder"], merged, "--lora", f"{lora}:0.7", *SIZE, "--json")
    assert r.code == 0, r.out + r.err
    (c,) = json.loads(r.out)["comparisons"]
    assert c["tensors"]["identical"] == c["tensors"]["compared"]
    assert all(d["max_abs"] == 0 for d in c["outputs"]["diffs"])
    r = run_cli("verify", sd1["folder"], merged, *SIZE, "--tensors", "--json")  # without the adapter: different
    assert r.code == 3 and json.loads(r.out)["comparisons"][0]["tensors"]["different"] > 10


def test_an_export_with_a_lora_blended_in_agrees_with_the_file_with_it_merged(sd1, sd1_onnx, tmp_path) -> None:
    from test_lora import kohya_file, make_lora

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1["folder"])
    lora = kohya_file(make_lora(pipe, seed=4), str(tmp_path / "style.safetensors"))
    result = verify(sd1["single"], sd1_onnx, loras=[f"{lora}:0.5"], loras_b=[f"{lora}:0.5"], size="64x64",
                    steps=2)
    c = result.comparisons[0]
    assert result.passed and c.runtimes == ("torch", "onnxruntime") and c.tensors.identical == c.tensors.compared
    plain = verify(sd1["single"], sd1_onnx, loras=[f"{lora}:0.5"], size="64x64", steps=2)
    unet = next(d for d in plain.comparisons[0].outputs.diffs if d.name == "unet.out_sample")
    assert not plain.passed and unet.max_abs > 1e-3  # the adapter on one side only


def test_models_of_different_architectures_fail_without_running(sd1, tmp_path) -> None:
    other = models.save_pipeline("sd2", str(tmp_path / "sd2"))
    r = run_cli("verify", sd1["folder"], other, *SIZE, "--json")
    assert r.code == 3, r.err
    (c,) = json.loads(r.out)["comparisons"]
    assert c["outputs"]["diffs"][0]["name"] == "architecture (A is sd1, B is sd2)"
    assert c["tensors"]["different"] > 100 and "(shape " in c["tensors"]["worst"][0]["name"]


def test_a_downloaded_source_verifies_like_the_local_file(sd1, tmp_path, monkeypatch) -> None:
    from servers import Server

    monkeypatch.setenv("SDPORT_CACHE", str(tmp_path / "cache"))
    with Server() as server:
        server.files["model.safetensors"] = open(sd1["single"], "rb").read()
        result = verify(f"{server.url}/plain/model.safetensors", sd1["folder"], size="64x64", steps=1)
    c = result.comparisons[0]
    assert result.passed and c.tensors.identical == c.tensors.compared > 1000
    assert all(d.max_abs == 0 for d in c.outputs.diffs)


def test_dtypes_compares_one_model_at_each_precision_one_row_each(sd1, tmp_path) -> None:
    r = run_cli("verify", sd1["single"], "--dtypes", "fp32,fp16,bf16", *SIZE, "--outputs", "--report", tmp_path)
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["label"] for c in report["comparisons"]] == ["fp32 vs fp16", "fp32 vs bf16"]
    pixel = [next(d for d in c["outputs"]["diffs"] if d["name"] == "image")["mean_abs"]
             for c in report["comparisons"]]
    assert 0 < pixel[0] < pixel[1]  # bf16 keeps 8 bits of mantissa, fp16 11
    assert report["comparisons"][1]["outputs"]["runtimes"] == ["torch", "torch (bf16)"]
    assert _read_png(tmp_path / "compare.png").shape == (2 * 64 + GAP, 3 * 64 + 2 * GAP, 3)


def test_saved_latents_reproduce_the_run(sd1, tmp_path) -> None:
    first = verify(sd1["single"], sd1["folder"], outputs=True, size="64x64", seed=11, report=tmp_path)
    again = verify(sd1["single"], sd1["folder"], outputs=True, latents=tmp_path / "init_latents.npy", seed=0)
    assert np.array_equal(first.comparisons[0].images[0], again.comparisons[0].images[0])


def test_sdxl_torch_and_onnx_agree_and_match_diffusers_pipeline(tmp_path) -> None:
    folder = models.save_pipeline("sdxl-base", str(tmp_path / "xl"))
    export = str(tmp_path / "xl-onnx")
    assert run_cli("convert", folder, export, "--to", "onnx", "-q", timeout=600).code == 0
    result = verify(folder, export, size="64x64", seed=5)
    c = result.comparisons[0]
    assert result.passed and c.runtimes == ("torch", "onnxruntime"), [d.as_dict() for d in c.outputs.diffs]
    names = {d.name for d in c.outputs.diffs}  # the penultimate hidden states, which SDXL reads, and no others
    assert {"text_encoder_2.text_embeds", "text_encoder_2.hidden_states.31", "text_encoder.hidden_states.11"} <= names
    assert not any(n.startswith("text_encoder_2.hidden_states.3") and n.endswith(("0", "2")) for n in names)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    latents = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 4, 8, 8), np.float32))
    ref = pipe(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=7.5, latents=latents,
               original_size=(64, 64), target_size=(64, 64), output_type="np").images[0]
    assert np.abs(np.round(ref * 255).astype(int) - c.images[0].astype(int)).max() <= 1


def test_convert_verify_checks_the_output_against_its_source(sd1, tmp_path) -> None:
    out = tmp_path / "model.ckpt"
    r = run_cli("convert", sd1["folder"], out, "--dtype", "fp16", "--verify", "-q")
    assert r.code == 0, r.err
    assert "verdict: PASS" in r.out and "unet.out_sample" in r.out


@pytest.mark.parametrize("args, words", [
    (["--dtypes", "fp32,fp16"], "give B or --dtypes, not both"),
    (["--size", "60x64"], "--size '60x64'"),
    (["--tolerance", "pixel=abc"], "bad --tolerance 'pixel=abc'"),
    (["--steps", "0"], "--steps 0"),
    (["--latents", "BAD_LATENTS"], "latents of shape (1, 3, 8, 8)"),
    (["--latents", "NOT_NPY"], "is not a .npy array"),
])
def test_bad_options_get_one_line_and_exit_2(sd1, tmp_path, args, words) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))
    (tmp_path / "not.npy").write_bytes(b"\x93NUMPY garbage")
    subst = {"BAD_LATENTS": str(tmp_path / "bad.npy"), "NOT_NPY": str(tmp_path / "not.npy")}
    args = [subst.get(a, a) for a in args]
    r = run_cli("verify", sd1["single"], sd1["folder"], *args, "--outputs")
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_a_lora_given_as_a_model_is_refused(sd1, tmp_path) -> None:
    from test_lora import kohya_file, make_lora

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1["folder"])
    lora = kohya_file(make_lora(pipe), str(tmp_path / "style.safetensors"))
    r = run_cli("verify", lora, sd1["single"], "--tensors")
    assert r.code == 2 and "is a LoRA adapter" in r.err


def test_ulps_across_a_cast_and_exact_equality_within_one_dtype() -> None:
    rng = np.random.default_rng(0)
    wide = (rng.standard_normal(10_000) * np.exp(rng.uniform(-20, 5, 10_000))).astype(np.float32)
    wide[:3] = [0.0, 6e-8, -65504.0]  # zero, an fp16 subnormal, fp16's largest
    narrow = wide.astype(np.float16)
    d = compare("w", wide, narrow, "F32", "F16")
    assert d.status == "within" and 0.25 < d.max_ulp <= 0.5
    off = narrow.copy()
    off[100] = np.nextafter(off[100], np.float16(np.inf))
    d = compare("w", wide, off, "F32", "F16")
    assert d.status == "different" and 0.5 < d.max_ulp <= 1.5
    assert compare("w", wide, wide.copy(), "F32", "F32").status == "identical"
    nudged = wide.copy()
    nudged[5] = np.nextafter(nudged[5], np.float32(np.inf))
    assert compare("w", wide, nudged, "F32", "F32").status == "different"
    with_nan = wide.copy()
    with_nan[7] = np.nan
    assert compare("w", with_nan, with_nan.copy(), "F32", "F32").status == "identical"
    assert compare("w", with_nan, wide, "F32", "F32").status == "different"


def test_heat_map_amplifies_a_one_level_difference() -> None:
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 1] = 1
    h = heat(a, b)
    assert h[0, 0].max() == round(min(3 * AMPLIFY / 255, 1) * 255) and not h[1:].any() and not h[0, 1].any()
