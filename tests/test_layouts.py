"""Single file ⇄ diffusers for SD1, SD2, SDXL base and refiner, checked against diffusers' own single-file loader.

The fixtures are tiny pipelines with each family's real block structure, built and saved by
diffusers itself. The oracle for the original layout is ``from_single_file(config=<fixture>)``:
what sdport writes must load there into exactly the fixture's weights, and what sdport makes of
that file must equal what diffusers makes of it, tensor for tensor and image for image.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import run_cli

import sdport

diffusers = pytest.importorskip("diffusers")
import models  # noqa: E402  (tests/models.py, needs diffusers)

warnings.filterwarnings("ignore")
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl-base": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", params=list(PIPELINES))
def family(request, tmp_path_factory) -> dict:
    """A tiny diffusers pipeline, the single file sdport makes of it, and the folder sdport makes of that."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    ref = models.save_pipeline(name, str(root / "ref"), prediction_type="v_prediction" if name == "sd2" else "epsilon")
    single, back = str(root / "model.safetensors"), str(root / "back")
    assert run_cli("convert", ref, single).code == 0
    r = run_cli("convert", single, back, "--report")
    assert r.code == 0, r.err
    cls = getattr(diffusers, PIPELINES[name])
    return {"name": name, "ref": ref, "single": single, "back": back, "cls": cls, "report": r.out,
            "oracle": cls.from_single_file(single, config=ref, local_files_only=True)}


def _components(pipe) -> dict:
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS if getattr(pipe, c, None) is not None}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for comp in a:
        assert a[comp].keys() == b[comp].keys(), comp
        for k in a[comp]:
            assert torch.equal(a[comp][k], b[comp][k]), f"{comp}.{k}"


def test_single_file_loads_in_diffusers_from_single_file_into_the_exact_weights(family) -> None:
    ref = family["cls"].from_pretrained(family["ref"], local_files_only=True)
    _assert_same(_components(family["oracle"]), _components(ref))


def test_single_file_to_diffusers_equals_diffusers_own_conversion(family) -> None:
    ours = family["cls"].from_pretrained(family["back"], local_files_only=True)
    _assert_same(_components(ours), _components(family["oracle"]))


def test_every_component_loads_with_no_missing_or_unexpected_keys(family) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = json.load(open(os.path.join(family["back"], "model_index.json")))
    assert index["_class_name"] == PIPELINES[family["name"]]
    for comp in COMPONENTS:
        if index.get(comp, [None])[0] is None:
            continue
        folder = os.path.join(family["back"], comp)
        if comp == "unet":
            _, info = diffusers.UNet2DConditionModel.from_pretrained(folder, output_loading_info=True)
        elif comp == "vae":
            _, info = diffusers.AutoencoderKL.from_pretrained(folder, output_loading_info=True)
        else:
            cls = CLIPTextModelWithProjection if comp == "text_encoder_2" else CLIPTextModel
            _, info = cls.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (comp, info)


def test_pipeline_output_equals_the_pipeline_diffusers_builds_from_the_same_file(family) -> None:
    ours = family["cls"].from_pretrained(family["back"], local_files_only=True)
    assert ours.scheduler.config.prediction_type == ("v_prediction" if family["name"] == "sd2" else "epsilon")
    images = []
    for pipe in (ours, family["oracle"]):
        kwargs = dict(prompt="a lighthouse at dusk, oil painting", num_inference_steps=4, output_type="np",
                      generator=torch.Generator().manual_seed(0))
        if family["name"] == "sdxl-refiner":
            kwargs["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        else:
            kwargs.update(height=64, width=64)
        images.append(pipe(**kwargs).images)
    assert images[0].shape[-1] == 3 and np.isfinite(images[0]).all()
    assert np.array_equal(images[0], images[1])


def test_both_round_trips_are_bit_exact(family, tmp_path) -> None:
    again = str(tmp_path / "again.safetensors")
    assert run_cli("convert", family["back"], again).code == 0
    first, second = safetensors.torch.load_file(family["single"]), safetensors.torch.load_file(again)
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    for comp in COMPONENTS:
        weights = "diffusion_pytorch_model" if comp in ("unet", "vae") else "model"
        a_path = os.path.join(family["ref"], comp, f"{weights}.safetensors")
        if not os.path.exists(a_path):
            continue
        a = safetensors.torch.load_file(a_path)
        b = safetensors.torch.load_file(os.path.join(family["back"], comp, f"{weights}.safetensors"))
        if comp.startswith("text_encoder"):  # transformers >= 5.6 saves CLIPTextModel without the Hub's text_model.
            a = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in a.items()}
        assert a.keys() == b.keys(), comp
        assert all(torch.equal(a[k], b[k]) for k in a), comp


def test_original_names_follow_each_family_layout(family) -> None:
    with safetensors.safe_open(family["single"], "np") as f:
        keys = set(f.keys())
    expect = {"sd1": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
              "sd2": ["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                      "model.diffusion_model.input_blocks.1.1.proj_in.weight"],
              "sdxl-base": ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                            "conditioner.embedders.1.model.text_projection",
                            "model.diffusion_model.label_emb.0.0.weight"],
              "sdxl-refiner": ["conditioner.embedders.0.model.text_projection",
                               "model.diffusion_model.label_emb.0.2.bias"]}[family["name"]]
    assert {"first_stage_model.decoder.up.0.block.0.conv1.weight", "model.diffusion_model.out.2.weight"} <= keys
    assert set(expect) <= keys
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)


def test_inspect_says_which_family_and_layout(family) -> None:
    for path, layout in ((family["single"], "ldm"), (family["back"], "diffusers")):
        report = sdport.inspect(path)
        assert (report["family"], report["layout"]) == (family["name"], layout)
