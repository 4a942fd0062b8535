"""ONNX export, blending and the way back: onnxruntime against torch, diffusers' ONNX pipeline against its torch one.

The tiny pipelines of tests/models.py (real block structure and names) are exported by sdport;
each graph is run by onnxruntime on the same inputs as the torch module diffusers/transformers load
from the same weights. LoRAs blended into an export must equal the export of the merged model and
compute what diffusers' ``fuse_lora`` computes; an export read back must be the weights bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import leftovers, only, run_cli, sha256
from safetensors.numpy import load_file

import sdport
import sdport.io.onnx as sdonnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
diffusers = pytest.importorskip("diffusers")
import models  # noqa: E402
from test_lora import kohya_file, make_lora  # noqa: E402

warnings.filterwarnings("ignore")
PIPES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl-base": "StableDiffusionXLPipeline",
         "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}


def session(folder, component: str):
    return ort.InferenceSession(os.path.join(folder, component, "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=list(PIPES))
def setup(request, tmp_path_factory) -> dict:
    name = request.param
    root = tmp_path_factory.mktemp("onnx-" + name)
    ref = models.save_pipeline(name, str(root / "ref"), prediction_type="v_prediction" if name == "sd2" else "epsilon")
    single = str(root / "model.safetensors")
    assert run_cli("convert", ref, single).code == 0
    out = str(root / "onnx")
    r = run_cli("convert", single, out, "--to", "onnx")  # from the original single file: any source
    assert r.code == 0, r.err
    pipe = getattr(diffusers, PIPES[name]).from_pretrained(ref)
    return {"name": name, "root": root, "ref": ref, "single": single, "onnx": out, "pipe": pipe}


def _unet_inputs(pipe, rng, dtype=np.float32) -> dict[str, np.ndarray]:
    cfg = pipe.unet.config
    feed = {"sample": rng.standard_normal((2, cfg.in_channels, 16, 24)), "timestep": np.array([611.0]),
            "encoder_hidden_states": rng.standard_normal((2, 77, cfg.cross_attention_dim))}
    if cfg.addition_embed_type == "text_time":  # a base's 6 time ids (sizes, crop), a refiner's 5 (aesthetic score)
        pooled = pipe.text_encoder_2.config.projection_dim
        ids = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim
        feed["text_embeds"] = rng.standard_normal((2, pooled))
        feed["time_ids"] = np.tile(np.array([[64.0, 64, 0, 0, 64, 64][:ids - 1] + [6.0]]), (2, 1))
    return {k: v.astype(dtype) for k, v in feed.items()}


def _torch_unet(pipe, feed: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in feed.items()}
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if "text_embeds" in t else None
    with torch.no_grad():
        return pipe.unet(t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=added).sample.numpy()


def _compare_components(pipe, folder, rng, tol: float, dtype=np.float32) -> dict[str, float]:
    """Max abs error of each graph against the torch module on the same inputs."""
    errors = {}
    ids = np.array([[49406, 320, 1125, 539, 320, 1929, 2368, 49407] + [49407] * 69], dtype=np.int32)
    for comp in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        sess = session(folder, comp)
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": ids}), strict=True))
        with torch.no_grad():
            ref = module(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
        want = {"last_hidden_state": ref.last_hidden_state,
                **({"text_embeds": ref.text_embeds} if hasattr(ref, "text_embeds") else
                   {"pooler_output": ref.pooler_output}),
                **{f"hidden_states.{i}": h for i, h in enumerate(ref.hidden_states)}}
        assert set(got) <= set(want) and {"last_hidden_state"} < set(got)
        errors[comp] = max(float(np.abs(got[k].astype(np.float32) - want[k].numpy()).max()) for k in got)
    feed = _unet_inputs(pipe, rng, dtype)
    errors["unet"] = float(np.abs(session(folder, "unet").run(None, feed)[0] - _torch_unet(pipe, feed)).max())
    image = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        mean = pipe.vae.encode(torch.tensor(image)).latent_dist.mean.numpy()
    got = session(folder, "vae_encoder").run(None, {"sample": image.astype(dtype)})[0]
    errors["vae_encoder"] = float(np.abs(got - mean).max())
    latent = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.tensor(latent)).sample.numpy()
    got = session(folder, "vae_decoder").run(None, {"latent_sample": latent.astype(dtype)})[0]
    errors["vae_decoder"] = float(np.abs(got - decoded).max())
    return errors


def test_every_graph_computes_what_the_torch_module_computes(setup) -> None:
    errors = _compare_components(setup["pipe"], setup["onnx"], np.random.default_rng(0), 1e-4)
    want = {"unet", "vae_encoder", "vae_decoder"} | ({"text_encoder"} if setup["name"] != "sdxl-refiner" else set())
    want |= {"text_encoder_2"} if "xl" in setup["name"] else set()
    assert set(errors) == want
    assert max(errors.values()) < 1e-4, errors


def test_graphs_take_what_the_pipelines_pass(setup) -> None:
    te_name = "text_encoder_2" if setup["name"] == "sdxl-refiner" else "text_encoder"
    unet, te = session(setup["onnx"], "unet"), session(setup["onnx"], te_name)
    assert [(i.name, i.type) for i in te.get_inputs()] == [("input_ids", "tensor(int32)")]
    inputs = {i.name: (i.type, i.shape) for i in unet.get_inputs()}
    assert inputs["timestep"][0] == "tensor(float)"
    assert inputs["sample"][1] == ["batch_size", inputs["sample"][1][1], "height", "width"]
    feed = _unet_inputs(setup["pipe"], np.random.default_rng(1))
    one = unet.run(None, {**feed, "timestep": np.array([611.0], np.float32)})[0]  # (1,) beside a batch of 2
    two = unet.run(None, {**feed, "timestep": np.array([611.0, 611.0], np.float32)})[0]
    assert one.shape == feed["sample"].shape and np.array_equal(one, two)
    scheduler = json.loads((setup["root"] / "onnx" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == setup["pipe"].scheduler.config.prediction_type  # v_prediction for sd2
    names = json.loads((setup["root"] / "onnx" / "unet" / "sdport-names.json").read_text())["tensors"]
    assert set(names) == set(setup["pipe"].unet.state_dict())  # every weight, under its diffusers name


def test_fp16_export_is_half_the_size_and_close(setup, tmp_path) -> None:
    out = str(tmp_path / "fp16")
    r = run_cli("convert", setup["ref"], out, "--to", "onnx", "--dtype", "fp16", "--vae-dtype", "fp32")
    assert r.code == 0, r.err
    assert session(out, "unet").get_inputs()[0].type == "tensor(float16)"
    # the fp32 VAE takes and gives fp16 (the pipelines pass it the fp16 latents) and computes in fp32
    assert session(out, "vae_decoder").get_inputs()[0].type == "tensor(float16)"
    assert {t.dtype for t in sdonnx.open_onnx(os.path.join(out, "vae_decoder", "model.onnx")).tensors.values()} \
        == {"F32"}
    weights = lambda f: sum(t.nbytes for t in sdonnx.open_onnx(os.path.join(f, "unet", "model.onnx")).tensors.values())  # noqa: E731
    assert weights(out) * 2 == weights(setup["onnx"])
    rng = np.random.default_rng(2)
    feed = _unet_inputs(setup["pipe"], rng, np.float16)
    got = session(out, "unet").run(None, feed)[0].astype(np.float32)
    want = _torch_unet(setup["pipe"], {k: v.astype(np.float32) for k, v in feed.items()})
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert got.dtype == np.float32 and rel < 1e-2, rel  # measured ≈ 2e-3 (fp16 weights and activations)


def test_fp16_keeps_the_time_embeddings_in_fp32(setup, tmp_path) -> None:
    """Late timesteps and SDXL's real-size time ids: in fp16 their sinusoids would be off by a quarter radian."""
    out = str(tmp_path / "fp16")
    sdport.convert(setup["ref"], out, to="onnx", dtype="fp16", components="unet")
    feed = _unet_inputs(setup["pipe"], np.random.default_rng(8))
    feed["timestep"] = np.array([999.0], np.float32)
    if "time_ids" in feed:
        feed["time_ids"] = np.tile(np.array([[1024.0, 1024, 0, 0, 1024, 1024][:feed["time_ids"].shape[1]]]), (2, 1))
    want = _torch_unet(setup["pipe"], feed)
    got = session(out, "unet").run(None, {k: v.astype(np.float16) for k, v in feed.items()})[0].astype(np.float32)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-2


@only("setup", "sd1")  # one family is enough
def test_an_fp16_vae_in_an_fp32_export_takes_fp32(setup, tmp_path) -> None:
    out = str(tmp_path / "vae16")
    sdport.convert(setup["ref"], out, to="onnx", vae_dtype="fp16", components="vae_decoder")
    sess = session(out, "vae_decoder")
    assert sess.get_inputs()[0].type == sess.get_outputs()[0].type == "tensor(float)"
    weights = sdonnx.open_onnx(os.path.join(out, "vae_decoder", "model.onnx")).tensors.values()
    assert {t.dtype for t in weights} == {"F16"}
    latent = np.random.default_rng(9).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = setup["pipe"].vae.decode(torch.tensor(latent)).sample.numpy()
    assert np.abs(sess.run(None, {"latent_sample": latent})[0] - want).max() < 0.05


@only("setup", "sd1", "sd2")  # diffusers has no SDXL ONNX pipeline (the optimum layout serves SDXL)
def test_diffusers_onnx_pipeline_gives_the_torch_image(setup) -> None:
    onnx_pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(setup["onnx"], provider="CPUExecutionProvider")
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", guidance_scale=7.5)
    got = onnx_pipe("a photo of a red cat", latents=latents, **kw).images
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(setup["ref"], safety_checker=None)
    want = torch_pipe("a photo of a red cat", latents=torch.tensor(latents), **kw).images
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert np.abs(got - want).max() < 1e-4
    half = str(setup["root"] / "fp16-pipeline")  # fp16 graphs, fp32 VAE: what the pipeline passes, fp16 latents
    assert run_cli("convert", setup["single"], half, "--to", "onnx", "--dtype", "fp16", "--vae-dtype", "fp32").code == 0
    onnx_pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(half, provider="CPUExecutionProvider")
    got16 = onnx_pipe("a photo of a red cat", latents=latents.astype(np.float16), **kw).images
    err = float(np.abs(got16.astype(np.float32) - want).max())
    print(f"fp16 export vs torch fp32 image: max abs {err:.2e}")
    assert np.isfinite(got16).all() and err < 0.05


def test_back_from_onnx_is_bit_exact(setup, tmp_path) -> None:
    back = str(tmp_path / "back.safetensors")
    assert run_cli("convert", setup["onnx"], back).code == 0
    a, b = load_file(back), load_file(setup["single"])
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in b)
    folder = str(tmp_path / "folder")
    r = run_cli("convert", setup["onnx"], folder, "--to", "diffusers")
    assert r.code == 0, r.err
    pipe = type(setup["pipe"]).from_pretrained(folder)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(setup["pipe"], comp, None) is None:
            continue
        mine, ref = getattr(pipe, comp).state_dict(), getattr(setup["pipe"], comp).state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), comp


def test_weights_past_the_limit_go_to_an_external_file(setup, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sdonnx, "EXTERNAL_MARGIN", sdonnx.PROTO_LIMIT - 1_000_000)  # every graph above 1 MB
    out = str(tmp_path / "ext")
    sdport.convert(setup["ref"], out, to="onnx", components="unet,vae_decoder")
    assert sorted(os.listdir(os.path.join(out, "unet"))) == ["config.json", "model.onnx", "sdport-names.json",
                                                              "weights.pb"]
    onnx.checker.check_model(os.path.join(out, "unet", "model.onnx"))
    model = onnx.load(os.path.join(out, "unet", "model.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"weights.pb"}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    feed = _unet_inputs(setup["pipe"], np.random.default_rng(4))
    assert np.array_equal(session(out, "unet").run(None, feed)[0], session(setup["onnx"], "unet").run(None, feed)[0])
    back = str(tmp_path / "unet.safetensors")
    sdport.convert(out, back, to="diffusers")
    assert not os.path.exists(os.path.join(out, "text_encoder"))
    a = load_file(os.path.join(back, "unet", "diffusion_pytorch_model.safetensors"))
    ref = setup["pipe"].unet.state_dict()
    assert all(np.array_equal(a[k], ref[k].numpy()) for k in ref)


@only("setup", "sd1", "sdxl-base")  # SD1 and SDXL base cover both text-encoder kinds
def test_lora_blended_into_an_export_equals_exporting_the_merged_model(setup, tmp_path) -> None:
    pipe = setup["pipe"]
    lora = kohya_file(make_lora(pipe), str(tmp_path / "lora.safetensors"),
                      te_prefix="lora_te1" if "xl" in setup["name"] else "lora_te")
    blended, merged = str(tmp_path / "blended"), str(tmp_path / "merged")
    before = sha256(os.path.join(setup["onnx"], "unet", "model.onnx"))
    # without torch, onnx or onnxruntime: the blend is sdport's own protobuf and numpy
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'onnx', 'onnxruntime', 'diffusers')]"
    r = subprocess.run([sys.executable, "-c", f"{blocked}; from sdport.cli import main; sys.exit(main())", "convert",
                        setup["onnx"], blended, "--lora", f"{lora}:0.7", "--report"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "unmatched" not in r.stdout and "lora " in r.stdout
    assert sha256(os.path.join(setup["onnx"], "unet", "model.onnx")) == before
    assert run_cli("convert", setup["single"], merged, "--to", "onnx", "--lora", f"{lora}:0.7").code == 0
    a, b = sdport.io.open_tensors(blended), sdport.io.open_tensors(merged)
    assert set(a.tensors) == set(b.tensors)
    changed = [k for k in a.tensors if not np.array_equal(a.read(k), b.read(k))]
    assert not changed
    base = sdport.io.open_tensors(setup["onnx"])
    assert sum(not np.array_equal(a.read(k), base.read(k)) for k in a.tensors) > 20
    # the oracle: diffusers' own load + fuse, run in torch, against onnxruntime on the blended graph
    pipe = type(pipe).from_pretrained(setup["ref"])
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.7, components=["unet"])
    feed = _unet_inputs(pipe, np.random.default_rng(5))
    got = session(blended, "unet").run(None, feed)[0]
    assert np.abs(got - _torch_unet(pipe, feed)).max() < 1e-4


@only("setup", "sd1")  # one family is enough
def test_lora_blends_into_a_foreign_export_through_its_node_names(setup, tmp_path) -> None:
    """A UNet exported as diffusers' script and onnx-web do (torch's exporter, constant folding): linear weights
    are stored transposed under made-up names; sdport finds them by their MatMul node and blends exactly."""
    pipe = setup["pipe"]
    folder = tmp_path / "foreign"
    (folder / "unet").mkdir(parents=True)
    feed = _unet_inputs(pipe, np.random.default_rng(7))
    args = tuple(torch.tensor(feed[k]) for k in ("sample", "timestep", "encoder_hidden_states"))
    with torch.no_grad():
        torch.onnx.export(pipe.unet, args, str(folder / "unet" / "model.onnx"), dynamo=False, opset_version=17,
                          do_constant_folding=True, input_names=["sample", "timestep", "encoder_hidden_states"],
                          output_names=["out_sample"],
                          dynamic_axes={"sample": {0: "b", 2: "h", 3: "w"}, "encoder_hidden_states": {0: "b"}})
    stored = sdonnx.open_onnx(str(folder / "unet" / "model.onnx")).tensors
    assert sum(k.startswith("onnx::MatMul") for k in stored) > 20  # the transposed weights this is about
    lora = kohya_file(make_lora(pipe), str(tmp_path / "lora.safetensors"))
    out = str(tmp_path / "blended")
    r = run_cli("convert", str(folder), out, "--lora", f"{lora}:0.7", "--allow-unmatched", "--report")
    assert r.code == 0, r.err
    unmatched = [line for line in r.out.splitlines() if line.startswith("  unmatched")]
    assert unmatched and all("te_" in line or "text" in line for line in unmatched)  # only the text encoder's
    fused = type(pipe).from_pretrained(setup["ref"])
    fused.load_lora_weights(lora)
    fused.fuse_lora(lora_scale=0.7, components=["unet"])
    got = session(out, "unet").run(None, feed)[0]
    assert np.abs(got - _torch_unet(fused, feed)).max() < 1e-4
    assert np.abs(got - session(str(folder), "unet").run(None, feed)[0]).max() > 1e-3  # it did change
    r = run_cli("convert", str(folder), str(tmp_path / "back.safetensors"))
    assert r.code == 2 and "not exported by sdport" in r.err


@only("setup", "sd1")  # one family is enough
def test_blending_says_what_it_could_not_place(setup, tmp_path) -> None:
    import safetensors.torch

    lora = str(tmp_path / "odd.safetensors")
    safetensors.torch.save_file({"lora_unet_no_such_block_proj.lora_up.weight": torch.ones(4, 2),
                                 "lora_unet_no_such_block_proj.lora_down.weight": torch.ones(2, 4),
                                 "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1) * 0.01,
                                 "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)}, lora)
    out = str(tmp_path / "out")
    r = run_cli("convert", setup["onnx"], out, "--lora", lora)
    assert r.code == 2 and "no_such_block" in r.err and len(r.err.strip().splitlines()) == 1
    assert not os.path.exists(out) and not leftovers(tmp_path)
    r = run_cli("convert", setup["onnx"], out, "--lora", lora, "--allow-unmatched", "--report")
    assert r.code == 0 and "unmatched" in r.out and "no_such_block" in r.out


@only("setup", "sd1")  # the tiny ControlNet has SD1's structure
def test_controlnet_graph_feeds_the_cnet_unet_as_torch_does(setup, tmp_path) -> None:
    cn = models.controlnet()
    cn.save_pretrained(str(tmp_path / "cn"))
    cn_out, pipe_out = str(tmp_path / "cn-onnx"), str(tmp_path / "pipe-onnx")
    assert run_cli("convert", str(tmp_path / "cn"), cn_out, "--to", "onnx").code == 0
    r = run_cli("convert", setup["single"], pipe_out, "--to", "onnx", "--controlnet", "--components", "unet")
    assert r.code == 0, r.err
    assert sorted(os.listdir(pipe_out)) == ["cnet", "model_index.json", "scheduler", "tokenizer", "unet"]
    rng = np.random.default_rng(6)
    feed = _unet_inputs(setup["pipe"], rng)
    image = rng.standard_normal((2, 3, 128, 192)).astype(np.float32)
    residuals = session(cn_out, "controlnet").run(None, {**feed, "controlnet_cond": image})
    t = {k: torch.tensor(v) for k, v in feed.items()}
    with torch.no_grad():
        down, mid = cn(t["sample"], t["timestep"], t["encoder_hidden_states"], torch.tensor(image), return_dict=False)
        want = setup["pipe"].unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert max(float(np.abs(a - b.numpy()).max()) for a, b in zip(residuals, [*down, mid], strict=True)) < 1e-4
    cnet = session(pipe_out, "cnet")
    names = [i.name for i in cnet.get_inputs()]
    assert names[3:] == [o.name for o in session(cn_out, "controlnet").get_outputs()]  # wired by name
    got = cnet.run(None, {**feed, **dict(zip(names[3:], residuals, strict=True))})[0]
    assert np.abs(got - want.numpy()).max() < 1e-4
    # a LoRA blended into the export reaches both UNets; reading the export back takes the UNet once
    lora = kohya_file(make_lora(setup["pipe"]), str(tmp_path / "lora.safetensors"))
    blended = str(tmp_path / "blended")
    assert run_cli("convert", pipe_out, blended, "--lora", f"{lora}:0.5", "--allow-unmatched").code == 0
    unet, cnet_w = (sdonnx.open_onnx(os.path.join(blended, c, "model.onnx")) for c in ("unet", "cnet"))
    assert all(np.array_equal(unet.read(k), cnet_w.read(k)) for k in unet.tensors)
    base = sdonnx.open_onnx(os.path.join(pipe_out, "unet", "model.onnx"))
    assert sum(not np.array_equal(unet.read(k), base.read(k)) for k in unet.tensors) > 20
    back = str(tmp_path / "back")
    assert run_cli("convert", pipe_out, back, "--to", "diffusers").code == 0
    assert sorted(os.listdir(back)) == ["model_index.json", "scheduler", "tokenizer", "unet"]  # no cnet/
    got = load_file(os.path.join(back, "unet", "diffusion_pytorch_model.safetensors"))
    ref = setup["pipe"].unet.state_dict()
    assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k].numpy()) for k in ref)


def test_optimum_layout_has_every_config(setup, tmp_path) -> None:
    out = str(tmp_path / "opt")
    assert run_cli("convert", setup["ref"], out, "--to", "onnx", "--layout", "optimum").code == 0
    index = json.loads(open(os.path.join(out, "model_index.json")).read())
    assert index["_class_name"].startswith("ORTStableDiffusion")
    comps = ["unet", "vae_encoder", "vae_decoder"] + [c for c in ("text_encoder", "text_encoder_2")
                                                     if getattr(setup["pipe"], c, None) is not None]
    for comp in comps:
        assert index[comp] and os.path.isfile(os.path.join(out, comp, "config.json"))
    assert os.path.isfile(os.path.join(out, "scheduler", "scheduler_config.json"))
    for comp in comps:
        if comp.startswith("text_encoder"):
            tokenizer = comp.replace("text_encoder", "tokenizer")
            assert index[tokenizer] and os.path.isfile(os.path.join(out, tokenizer, "vocab.json"))


@only("setup", "sd1")  # the tiny ControlNet has SD1's structure
def test_a_lone_controlnet_export_converts_back(setup, tmp_path) -> None:
    cn = models.controlnet()
    cn.save_pretrained(str(tmp_path / "cn"))
    assert run_cli("convert", str(tmp_path / "cn"), str(tmp_path / "cn-onnx"), "--to", "onnx").code == 0
    r = run_cli("convert", str(tmp_path / "cn-onnx"), str(tmp_path / "back"), "--to", "diffusers")
    assert r.code == 0, r.err
    back = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "back")).state_dict()
    assert set(back) == set(cn.state_dict()) and all(torch.equal(back[k], v) for k, v in cn.state_dict().items())


@only("setup", "sd1")  # one family is enough
def test_constants_in_external_data_are_refused_for_blending(setup, tmp_path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path / "ext-const"
    (folder / "unet").mkdir(parents=True)
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4096, np.float32)))
    nodes = [const, helper.make_node("Add", ["x", "c"], ["xc"]), helper.make_node("Add", ["xc", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
                              [numpy_helper.from_array(np.zeros(4096, np.float32), "w")])
    onnx.save(helper.make_model(graph), str(folder / "unet" / "model.onnx"), save_as_external_data=True,
              location="model.onnx_data", size_threshold=0, convert_attribute=True)
    lora = kohya_file(make_lora(setup["pipe"]), str(tmp_path / "lora.safetensors"))
    r = run_cli("convert", str(folder), str(tmp_path / "out"), "--lora", lora, "--allow-unmatched")
    assert r.code == 2 and "graph constants are stored in external data" in r.err
    assert not os.path.exists(tmp_path / "out")


def test_bad_requests_exit_2_with_one_line_and_nothing_written(setup, tmp_path) -> None:
    vae = str(tmp_path / "vae.safetensors")
    assert run_cli("convert", os.path.join(setup["ref"], "vae"), vae).code == 0
    unet_graph = os.path.join(setup["onnx"], "unet", "model.onnx")
    for args, words, extra in ((vae, "whole pipeline", ["--to", "onnx"]),
                               (setup["ref"], "--components", ["--to", "onnx", "--components", "unet,nope"]),
                               (setup["onnx"], "converts as it is", ["--to", "onnx", "--dtype", "fp16"]),
                               (setup["onnx"], "converts as it is", ["--components", "unet"]),
                               (setup["ref"], "shape an ONNX export", ["--to", "diffusers", "--vae-dtype", "fp32"]),
                               (setup["onnx"], "shape an ONNX export", ["--opset", "18"]),
                               (unet_graph, "a lone ONNX graph", [])):
        out = str(tmp_path / "out")
        r = run_cli("convert", args, out, *extra)
        assert r.code == 2 and words in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1
        assert not os.path.exists(out)
    r = run_cli("convert", setup["ref"], str(tmp_path / "out"), "--to", "onnx", "--opset", "9")
    assert r.code == 2 and not os.path.exists(tmp_path / "out")


def _external_model(folder, location: str, *, offset: str = "0", length: str = "64", extra: dict | None = None) -> str:
    """A one-initializer model whose weights are 16 float32 in an external file at ``location``."""
    from onnx import TensorProto, helper

    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[16], data_location=TensorProto.EXTERNAL)
    for k, v in {"location": location, "offset": offset, "length": length, **(extra or {})}.items():
        t.external_data.add(key=k, value=v)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [t])
    path = os.path.join(folder, "model.onnx")
    onnx.save(helper.make_model(graph), path)
    return path


@pytest.mark.parametrize("case, words", [
    ("../secret.bin", "escapes model folder"),
    ("/etc/passwd", "escapes model folder"),
    ("sub/../../secret.bin", "escapes model folder"),
    ("link.bin", "is a symlink"),
    ("d/w.bin", "is a symlink"),
    ("hard.bin", "multiple hard links"),
    ("offset", "invalid external data offset/length"),
    ("huge", "invalid external data offset/length"),
    ("dunder", "unknown external_data key"),
    ("length", "external data length mismatch"),
    ("missing.bin", "is missing"),
])
def test_hostile_external_data_is_refused_by_name(tmp_path, case, words) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(bytes(4096))
    model_dir = tmp_path / "m"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "w.bin").write_bytes(bytes(64))
    os.symlink(outside, model_dir / "link.bin")
    os.symlink(tmp_path, model_dir / "d")
    os.link(outside, model_dir / "hard.bin")
    kwargs = {"offset": dict(location="w.bin", offset="-1"), "huge": dict(location="w.bin", length=str(2 ** 50)),
              "dunder": dict(location="w.bin", extra={"__class__": "x"}), "length": dict(location="w.bin", length="60"),
              }.get(case, dict(location=case))
    path = _external_model(str(model_dir), **kwargs)
    with pytest.raises(sdport.errors.FormatError, match=words):
        sdonnx.open_onnx(path)
    r = run_cli("inspect", path)
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1


def test_a_plain_external_model_reads_its_bytes(tmp_path) -> None:
    (tmp_path / "w.bin").write_bytes(np.arange(20, dtype=np.float32).tobytes())
    path = _external_model(str(tmp_path), "w.bin", offset="16", length="64")
    source = sdonnx.open_onnx(path)
    assert np.array_equal(source.read("w"), np.arange(4, 20, dtype=np.float32))


def test_a_second_export_takes_its_graphs_from_the_cache_and_writes_the_same_bytes(setup, tmp_path,
                                                                                    monkeypatch) -> None:
    """Cold cache: traced and stored; warm: no trace at all (tracing is made to fail) and every file identical;
    a corrupted or truncated entry is traced again and replaced; SDPORT_GRAPH_CACHE=off stores nothing."""
    import sdport.trace.onnx as trace_onnx

    graphs = tmp_path / "graphs"
    monkeypatch.setenv("SDPORT_GRAPH_CACHE", str(graphs))

    def files(folder) -> dict[str, str]:
        return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}

    cold = tmp_path / "cold"
    sdport.convert(setup["single"], str(cold), to="onnx", dtype="fp16", progress=False)
    entries = sorted(p.name for p in graphs.iterdir())
    components = [c for c in ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
                  if (cold / c).is_dir()]
    assert len(entries) == 2 * len(components) and {p.rsplit(".", 1)[1] for p in entries} == {"onnx", "json"}
    cached = onnx.load(str(next(graphs.glob("*.onnx"))))  # an entry is a real ONNX model without weights
    assert len(cached.graph.node) > 0 and len(cached.graph.initializer) == 0

    def no_trace(*args, **kw):
        raise AssertionError("traced although the graph was cached")

    monkeypatch.setattr(trace_onnx, "trace", no_trace)
    warm = tmp_path / "warm"
    sdport.convert(setup["single"], str(warm), to="onnx", dtype="fp16", progress=False)
    assert files(warm) == files(cold)

    monkeypatch.undo()
    monkeypatch.setenv("SDPORT_GRAPH_CACHE", str(graphs))
    first = next(graphs.glob("*.onnx"))
    first.write_bytes(first.read_bytes()[:100])  # truncated: its hash no longer matches
    again = tmp_path / "again"
    sdport.convert(setup["single"], str(again), to="onnx", dtype="fp16", progress=False)
    assert files(again) == files(cold) and sorted(p.name for p in graphs.iterdir()) == entries
    assert first.stat().st_size > 100

    monkeypatch.setenv("SDPORT_GRAPH_CACHE", "off")
    off = tmp_path / "off"
    sdport.convert(setup["single"], str(off), to="onnx", dtype="fp16", progress=False)
    assert files(off) == files(cold) and sorted(p.name for p in graphs.iterdir()) == entries


def test_a_folder_without_scheduler_or_tokenizers_gets_them_filled_in_and_said(setup, tmp_path) -> None:
    """A diffusers folder kept with its weights only: the export (and a diffusers rewrite) gets the family's schedule
    and sdport's CLIP tokenizers, says so, and loads in the pipelines — it used to exit 0 with folders missing."""
    import shutil

    part = tmp_path / "part"
    shutil.copytree(setup["ref"], part)
    gone = sorted(p.name for p in part.iterdir() if p.name.startswith(("tokenizer", "scheduler")))
    for name in gone:
        shutil.rmtree(part / name)
    out, again = tmp_path / "onnx", tmp_path / "again"
    r = run_cli("convert", part, out, "--to", "onnx")
    assert r.code == 0, r.err
    assert sorted(line.split(":")[0] for line in r.err.splitlines() if line.startswith("added ")) == \
        [f"added {n}/" for n in gone]
    index = json.loads((out / "model_index.json").read_text())
    assert all(index[n][0] and (out / n).is_dir() for n in gone)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == sdport.inspect(str(part))["prediction_type"]
    ref = setup["pipe"]
    for n in (n for n in gone if n.startswith("tokenizer")):
        tok = __import__("transformers").CLIPTokenizer.from_pretrained(str(out / n))
        assert tok("a photo of a cat").input_ids == getattr(ref, n)("a photo of a cat").input_ids
    if setup["name"] in ("sd1", "sd2"):
        pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(out), provider="CPUExecutionProvider")
        assert type(pipe.scheduler).__name__ == scheduler["_class_name"]
    assert run_cli("convert", part, again, "--dtype", "fp16").code == 0
    loaded = getattr(diffusers, PIPES[setup["name"]]).from_pretrained(str(again))
    assert all(getattr(loaded, n) is not None for n in gone)
