"""Single components (VAE, UNet, ControlNet), variants (inpainting, EMA, SD2's extra layer, v-prediction) and refusals.

Oracles: diffusers' ``from_single_file(config=…)`` for each component class, and the tiny models
diffusers itself built (tests/models.py).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import leftovers, run_cli, sha256

import sdport

diffusers = pytest.importorskip("diffusers")
import models  # noqa: E402

warnings.filterwarnings("ignore")


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("name", ["vae", "unet", "controlnet"])
def test_a_component_alone_converts_both_ways_against_from_single_file(name, tmp_path) -> None:
    model = {"vae": models.vae, "unet": lambda: models.unet("sd1"), "controlnet": models.controlnet}[name]()
    cls = type(model)
    model.save_pretrained(tmp_path / "ref")
    single, back = tmp_path / "single.safetensors", tmp_path / "back"
    assert run_cli("convert", tmp_path / "ref", single).code == 0
    with safetensors.safe_open(str(single), "np") as f:
        keys = set(f.keys())
    probe = {"vae": "encoder.down.0.block.0.conv1.weight", "unet": "model.diffusion_model.input_blocks.0.0.weight",
             "controlnet": "control_model.input_hint_block.0.weight"}[name]
    assert probe in keys and all(k.startswith(probe.split(".")[0] + ".") or name == "vae" for k in keys)
    _equal(cls.from_single_file(str(single), config=str(tmp_path / "ref"), local_files_only=True).state_dict(),
           model.state_dict())
    assert run_cli("convert", single, back).code == 0
    assert sorted(os.listdir(back)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ours, info = cls.from_pretrained(str(back), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _equal(ours.state_dict(), model.state_dict())
    assert sdport.inspect(str(single))["family"] == sdport.inspect(str(back))["family"] == name


def test_vae_with_pre_0_14_attention_names_and_a_first_stage_prefix(tmp_path) -> None:
    model = models.vae()
    model.save_pretrained(tmp_path / "new")
    old = {}
    for k, v in model.state_dict().items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old[k] = v.contiguous()
    os.makedirs(tmp_path / "old")
    safetensors.torch.save_file(old, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    assert run_cli("convert", tmp_path / "old", tmp_path / "a.safetensors").code == 0
    assert run_cli("convert", tmp_path / "new", tmp_path / "b.safetensors").code == 0
    a, b = (safetensors.torch.load_file(str(tmp_path / n)) for n in ("a.safetensors", "b.safetensors"))
    _equal(a, b)
    assert a["decoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)  # linear → 1×1 conv
    prefixed = {"first_stage_model." + k: v for k, v in a.items()}
    safetensors.torch.save_file(prefixed, str(tmp_path / "p.safetensors"))
    assert run_cli("convert", tmp_path / "p.safetensors", tmp_path / "p").code == 0
    _equal(diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "p")).state_dict(), model.state_dict())


def test_inpainting_model_gets_the_inpainting_pipeline(tmp_path) -> None:
    ref = models.save_pipeline("sd1", str(tmp_path / "ref"), in_channels=9)
    single, back = tmp_path / "inpaint.safetensors", tmp_path / "back"
    assert run_cli("convert", ref, single).code == 0
    assert sdport.inspect(str(single))["variant"] == "inpaint"
    assert run_cli("convert", single, back).code == 0
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(back), local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    _equal(pipe.unet.state_dict(), diffusers.UNet2DConditionModel.from_pretrained(ref, subfolder="unet").state_dict())


def _single_file(tmp_path_factory, family: str) -> str:
    """A tiny pipeline of ``family``, written by diffusers, as sdport's original-layout single file."""
    root = tmp_path_factory.mktemp(family)
    models.save_pipeline(family, str(root / "ref"))
    assert run_cli("convert", root / "ref", root / "model.safetensors").code == 0
    return str(root / "model.safetensors")


@pytest.fixture(scope="module")
def sd1_single(tmp_path_factory) -> str:
    return _single_file(tmp_path_factory, "sd1")


def test_ema_weights_are_taken_only_with_ema(sd1_single, tmp_path) -> None:
    sd = safetensors.torch.load_file(sd1_single)
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    sd.update({"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in unet.items()})
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000, dtype=torch.int32)
    src = str(tmp_path / "ema.safetensors")
    safetensors.torch.save_file(sd, src)
    plain, ema = tmp_path / "plain", tmp_path / "ema"
    r = run_cli("convert", src, plain, "--report")
    assert r.code == 0 and "EMA copy of the UNet (pass --ema" in r.out
    assert run_cli("convert", src, ema, "--ema").code == 0
    a = safetensors.torch.load_file(str(plain / "unet" / "diffusion_pytorch_model.safetensors"))
    b = safetensors.torch.load_file(str(ema / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k] + 1, b[k]) for k in a)
    r = run_cli("convert", sd1_single, tmp_path / "none", "--ema")
    assert r.code == 2 and "no EMA weights" in r.err
    # a LoRA merged with --ema lands on the EMA copy, the weights that are written
    key = next(k for k in unet if k.endswith("attn1.to_q.weight"))
    name = "lora_unet_" + key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
    up, down = torch.ones(unet[key].shape[0], 1), torch.full((1, unet[key].shape[1]), 0.5)
    safetensors.torch.save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down},
                                str(tmp_path / "l.safetensors"))
    r = run_cli("convert", src, tmp_path / "ema.safetensors", "--ema", "--to", "single-file", "--lora",
                tmp_path / "l.safetensors")
    assert r.code == 2 and "need a conversion to or from diffusers" in r.err
    assert run_cli("convert", src, tmp_path / "emal", "--ema", "--lora", tmp_path / "l.safetensors").code == 0
    merged = safetensors.torch.load_file(str(tmp_path / "emal" / "unet" / "diffusion_pytorch_model.safetensors"))
    diffusers_name = next(k for k in b if torch.equal(b[k], unet[key] + 1))
    assert torch.equal(merged[diffusers_name], unet[key] + 1 + up @ down)


def test_unknown_tensor_is_refused_by_name_unless_allowed(sd1_single, tmp_path) -> None:
    sd = safetensors.torch.load_file(sd1_single)
    sd["model.diffusion_model.mystery.weight"] = torch.zeros(3)
    src = str(tmp_path / "odd.safetensors")
    safetensors.torch.save_file(sd, src)
    before = sha256(src)
    r = run_cli("convert", src, tmp_path / "out")
    assert r.code == 2 and "model.diffusion_model.mystery.weight" in r.err and "--allow-unknown" in r.err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [] and sha256(src) == before
    r = run_cli("convert", src, tmp_path / "out", "--allow-unknown", "--report")
    assert r.code == 0 and "model.diffusion_model.mystery.weight" in r.out
    r = run_cli("convert", tmp_path / "out", tmp_path / "single.safetensors")
    assert r.code == 0


def test_components_limits_the_output_and_says_what_was_left_out(sd1_single, tmp_path) -> None:
    r = run_cli("convert", sd1_single, tmp_path / "out", "--components", "unet,vae", "--report")
    assert r.code == 0, r.err
    assert sorted(os.listdir(tmp_path / "out")) == ["model_index.json", "scheduler", "unet", "vae"]
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["text_encoder"] == index["tokenizer"] == [None, None]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True,
                                                             text_encoder=None, tokenizer=None)
    assert pipe.text_encoder is None and pipe.unet is not None
    assert "text_encoder left out (--components)" in r.out
    r = run_cli("convert", sd1_single, tmp_path / "bad", "--components", "text_encoder_2")
    assert r.code == 2 and "text_encoder_2" in r.err


def test_sd2_extra_text_layer_is_dropped_with_its_reason_and_prediction_type_is_stated(tmp_path) -> None:
    root = tmp_path
    models.save_pipeline("sd2", str(root / "ref"), prediction_type="v_prediction")
    assert run_cli("convert", root / "ref", root / "sd2.safetensors").code == 0
    sd = safetensors.torch.load_file(str(root / "sd2.safetensors"))
    layer = "cond_stage_model.model.transformer.resblocks."
    last = {k: v for k, v in sd.items() if k.startswith(f"{layer}22.")}
    sd.update({k.replace(f"{layer}22.", f"{layer}23."): v.clone() for k, v in last.items()})
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    src = str(root / "sd2-24.safetensors")
    safetensors.torch.save_file(sd, src)
    r = run_cli("convert", src, root / "v", "--report")
    assert r.code == 0 and "layer 23: this text encoder uses only its first 23 layers" in r.out
    assert json.loads((root / "v" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    assert run_cli("convert", src, root / "eps", "--prediction-type", "epsilon").code == 0
    assert json.loads((root / "eps" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "epsilon"
    report = sdport.inspect(src)
    assert report["prediction_type"] == "v_prediction" and "--prediction-type epsilon" in report["prediction_reason"]
    a = safetensors.torch.load_file(str(root / "v" / "text_encoder" / "model.safetensors"))
    b = diffusers.StableDiffusionPipeline.from_pretrained(str(root / "ref")).text_encoder.state_dict()
    assert all(torch.equal(a["text_model." + k.removeprefix("text_model.")], v) for k, v in b.items())


def test_v_pred_marker_sets_v_prediction(sd1_single, tmp_path) -> None:
    sd = safetensors.torch.load_file(sd1_single)
    sd["v_pred"] = torch.tensor([])
    src = str(tmp_path / "v.safetensors")
    safetensors.torch.save_file(sd, src)
    assert sdport.inspect(src)["prediction_type"] == "v_prediction"
    r = run_cli("convert", src, tmp_path / "out", "--report")
    assert r.code == 0 and "v-prediction marker" in r.out
    assert json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"


def test_ckpt_output_of_a_pipeline_loads_in_torch_and_diffusers(sd1_single, tmp_path) -> None:
    out = tmp_path / "model.ckpt"
    assert run_cli("convert", sd1_single, tmp_path / "d").code == 0
    assert run_cli("convert", tmp_path / "d", out).code == 0
    sd = torch.load(out, weights_only=True)
    assert list(sd) == ["state_dict"]
    ref = safetensors.torch.load_file(sd1_single)
    assert sd["state_dict"].keys() == ref.keys() and all(torch.equal(sd["state_dict"][k], ref[k]) for k in ref)


def test_half_precision_folder_equals_torch_half(sd1_single, tmp_path) -> None:
    assert run_cli("convert", sd1_single, tmp_path / "h", "--dtype", "fp16").code == 0
    ref = safetensors.torch.load_file(sd1_single)
    unet = safetensors.torch.load_file(str(tmp_path / "h" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(unet["conv_in.weight"], ref["model.diffusion_model.input_blocks.0.0.weight"].half())
    assert np.all([v.dtype == torch.float16 for v in unet.values()])


def test_zero_terminal_snr_marker_and_old_text_encoder_names(sd1_single, tmp_path) -> None:
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in safetensors.torch.load_file(sd1_single).items()}
    sd["ztsnr"] = torch.tensor([])
    src = str(tmp_path / "old.safetensors")
    safetensors.torch.save_file(sd, src)
    assert run_cli("convert", src, tmp_path / "out").code == 0
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["_class_name"] == "DDIMScheduler"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert pipe.scheduler.config.rescale_betas_zero_snr and type(pipe.scheduler).__name__ == "DDIMScheduler"
    want = {k: v for k, v in safetensors.torch.load_file(sd1_single).items() if "cond_stage_model" in k}
    got = safetensors.torch.load_file(str(tmp_path / "out" / "text_encoder" / "model.safetensors"))
    assert {"cond_stage_model.transformer." + k: v for k, v in got.items()}.keys() == want.keys()


def _tree(folder) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), folder): sha256(os.path.join(d, f))
            for d, _, fs in os.walk(folder) for f in fs}


def test_a_folder_output_appears_whole_or_not_at_all(sd1_single, tmp_path, monkeypatch) -> None:
    import errno

    from sdport.errors import OutputError

    out = tmp_path / "out"
    sdport.convert(sd1_single, out)
    before = _tree(out)

    rename, failed = os.rename, []

    def full(src, dst):  # publishing the new folder, the very last step, fails (once)
        if os.path.isdir(src) and ".sdport-" in os.fspath(src) and not failed:
            failed.append(src)
            raise OSError(errno.ENOSPC, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", full)
    with pytest.raises(OutputError, match="no space left"):
        sdport.convert(sd1_single, out, force=True, dtype="fp16")
    assert _tree(out) == before and leftovers(tmp_path) == []  # the old folder stands, no temp folder is left
    failed.clear()
    with pytest.raises(OutputError, match="no space left"):
        sdport.convert(sd1_single, tmp_path / "new")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    sdport.convert(sd1_single, out, force=True, dtype="fp16")
    assert _tree(out) != before and sdport.inspect(out)["dtypes"] == {"F16": sdport.inspect(sd1_single)["tensors"]}


@pytest.fixture(scope="module")
def sdxl_single(tmp_path_factory) -> str:
    return _single_file(tmp_path_factory, "sdxl-base")


@pytest.mark.parametrize("cut,words", [("conditioner.embedders.1.model.text_projection", "text_projection is missing"),
                                       ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.",
                                        "CLIP-L has 11 of its 12 layers")])
def test_sdxl_text_encoders_that_would_be_misread_are_refused(sdxl_single, tmp_path, cut, words) -> None:
    sd = {k: v for k, v in safetensors.torch.load_file(sdxl_single).items() if not k.startswith(cut)}
    src = str(tmp_path / "cut.safetensors")
    safetensors.torch.save_file(sd, src)
    r = run_cli("convert", src, tmp_path / "out")
    assert r.code == 2 and words in r.err and src in r.err and not (tmp_path / "out").exists()
    r = run_cli("convert", src, tmp_path / "unet", "--components", "unet,vae")
    assert r.code == 0, r.err


def test_a_pipeline_folder_missing_a_component_says_which(sd1_single, tmp_path) -> None:
    import shutil

    assert run_cli("convert", sd1_single, tmp_path / "full").code == 0
    shutil.copytree(tmp_path / "full", tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / "text_encoder")
    r = run_cli("convert", tmp_path / "partial", tmp_path / "out.safetensors")
    assert r.code == 2 and "no text_encoder weights" in r.err and "--components" in r.err
    r = run_cli("convert", tmp_path / "partial", tmp_path / "out.safetensors", "--components", "unet,vae")
    assert r.code == 0, r.err
    with safetensors.safe_open(str(tmp_path / "out.safetensors"), "np") as f:
        assert not any(k.startswith("cond_stage_model.") for k in f.keys())


def test_fp16_variant_folders_and_modelspec_metadata_are_carried_across(tmp_path) -> None:
    import shutil

    ref = models.save_pipeline("sd2", str(tmp_path / "ref"), prediction_type="epsilon")
    shutil.copytree(ref, tmp_path / "variant")
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        folder = tmp_path / "variant" / comp
        os.rename(folder / f"{stem}.safetensors", folder / f"{stem}.fp16.safetensors")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_cli("convert", ref, a).code == 0
    assert run_cli("convert", tmp_path / "variant", b).code == 0
    assert sha256(a) == sha256(b)
    with safetensors.safe_open(str(a), "np") as f:
        assert f.metadata()["modelspec.predict_key"] == "epsilon"  # from the scheduler config
    report = sdport.inspect(str(a))
    assert report["prediction_type"] == "epsilon" and "modelspec metadata says epsilon" in report["prediction_reason"]
    assert run_cli("convert", a, tmp_path / "back").code == 0  # an SD2 file that says epsilon stays epsilon
    scheduler = json.loads((tmp_path / "back" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"
    with safetensors.safe_open(str(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        assert f.metadata()["modelspec.predict_key"] == "epsilon"


def test_the_demo_makes_a_checkpoint_a_half_precision_file_and_a_pipeline_that_diffusers_loads(tmp_path) -> None:
    r = run_cli("demo", tmp_path / "demo")
    assert r.code == 0, r.err
    # (the adapters, SDXL and ControlNet it writes besides are checked in test_readme.py)
    assert {"demo-sd1-diffusers", "demo-sd1.ckpt", "demo-sd1.fp16.safetensors"} <= set(os.listdir(tmp_path / "demo"))
    assert "family      sd1" in r.out and "prediction type epsilon" in r.out
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "demo" / "demo-sd1-diffusers"),
                                                             local_files_only=True)
    ref = torch.load(tmp_path / "demo" / "demo-sd1.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(pipe.unet.conv_in.weight, ref["model.diffusion_model.input_blocks.0.0.weight"])


def test_an_output_folder_that_holds_the_input_is_refused_even_with_force(sd1_single, tmp_path) -> None:
    import shutil

    folder = tmp_path / "models"
    folder.mkdir()
    src = folder / "in.safetensors"
    shutil.copy(sd1_single, src)
    r = run_cli("convert", src, folder, "--force")
    assert r.code == 2 and "would overwrite the input" in r.err and src.exists()


def test_components_choose_parts_of_a_folder_for_a_single_file(sd1_single, tmp_path) -> None:
    assert run_cli("convert", sd1_single, tmp_path / "d").code == 0
    r = run_cli("convert", tmp_path / "d", tmp_path / "u.safetensors", "--components", "unet", "--report")
    assert r.code == 0, r.err
    assert "text_encoder left out (--components)" in r.out and "vae left out (--components)" in r.out
    with safetensors.safe_open(str(tmp_path / "u.safetensors"), "np") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"model"}


def test_ctrl_c_while_swapping_folders_puts_the_old_one_back(sd1_single, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    sdport.convert(sd1_single, out)
    before = _tree(out)
    rename = os.rename

    def interrupted(src, dst):
        if ".sdport-" in os.fspath(src) and "-old-" not in os.fspath(src):
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sdport.convert(sd1_single, out, force=True, dtype="fp16")
    monkeypatch.undo()
    assert _tree(out) == before and leftovers(tmp_path) == []


def test_a_partial_folder_goes_into_a_base_without_components_spelled_out(demo_ckpt, tmp_path) -> None:
    import shutil

    folder = tmp_path / "folder"
    assert run_cli("convert", demo_ckpt, folder).code == 0
    for part in ("text_encoder", "vae", "tokenizer"):
        shutil.rmtree(folder / part)
    r = run_cli("convert", folder, tmp_path / "no-base.safetensors")
    assert r.code == 2 and "--components without" in r.err  # alone, a partial folder names the flag
    r = run_cli("convert", folder, tmp_path / "a.safetensors", "--base", demo_ckpt)
    assert r.code == 0, r.err
    assert run_cli("convert", folder / "unet", tmp_path / "b.safetensors", "--base", demo_ckpt).code == 0
    assert sha256(tmp_path / "a.safetensors") == sha256(tmp_path / "b.safetensors")
    assert run_cli("convert", demo_ckpt, tmp_path / "whole.safetensors").code == 0
    with safetensors.safe_open(str(tmp_path / "a.safetensors"), "np") as a, \
            safetensors.safe_open(str(tmp_path / "whole.safetensors"), "np") as whole:
        assert set(a.keys()) == set(whole.keys())  # the base gave the text encoder and VAE the folder lacked
