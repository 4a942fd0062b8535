"""Where a fact came from survives round trips: a prediction type sdport guessed is never read back as the
file's word, one the user gave is reported as theirs, and an extracted adapter says which family it is for.

Oracles: diffusers' scheduler loader reads the scheduler configs sdport writes (its private key included);
the safetensors metadata is read with the safetensors library.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from conftest import run_cli

import sdport

diffusers = pytest.importorskip("diffusers")


def _scheduler(folder) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def _metadata(path) -> dict:
    with safetensors.safe_open(str(path), "np") as f:
        return f.metadata() or {}


def test_a_family_default_stays_a_default_after_a_round_trip(demo_ckpt, tmp_path) -> None:
    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    assert run_cli("convert", demo_ckpt, folder).code == 0
    config = _scheduler(folder)
    assert config["prediction_type"] == "epsilon" and config["_sdport_prediction_type_source"] == "default"
    loaded = diffusers.PNDMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    assert loaded.config.prediction_type == "epsilon"
    assert run_cli("convert", folder, back).code == 0
    meta = _metadata(back)  # a guess is not written as modelspec's fact, which other programs would believe
    assert meta["sdport.prediction_type_source"] == "default" and "modelspec.predict_key" not in meta
    for path in (folder, back):
        report = sdport.inspect(str(path))
        assert report["prediction_type"] == "epsilon", path
        assert "says so" not in report["prediction_reason"] and "default" in report["prediction_reason"], path


def test_the_users_prediction_type_is_reported_as_theirs(demo_ckpt, tmp_path) -> None:
    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    assert run_cli("convert", demo_ckpt, folder, "--prediction-type", "v_prediction").code == 0
    assert _scheduler(folder)["_sdport_prediction_type_source"] == "user"
    assert run_cli("convert", folder, back).code == 0
    meta = _metadata(back)
    assert meta["modelspec.predict_key"] == "v" and meta["sdport.prediction_type_source"] == "user"
    report = sdport.inspect(str(back))
    assert report["prediction_type"] == "v_prediction" and "user said so" in report["prediction_reason"]


def test_what_the_file_said_stays_the_files_word(demo_state_dict, tmp_path) -> None:
    src, folder, back = tmp_path / "v.safetensors", tmp_path / "folder", tmp_path / "back.safetensors"
    safetensors.numpy.save_file(demo_state_dict, str(src), metadata={"modelspec.predict_key": "v"})
    assert run_cli("convert", src, folder).code == 0
    config = _scheduler(folder)
    assert config["prediction_type"] == "v_prediction" and config["_sdport_prediction_type_source"] == "metadata"
    assert run_cli("convert", folder, back).code == 0
    report = sdport.inspect(str(back))
    assert report["prediction_type"] == "v_prediction" and "the file says so" in report["prediction_reason"]


def test_a_scheduler_edited_since_is_believed_over_the_tag(demo_ckpt, tmp_path) -> None:
    folder = tmp_path / "folder"
    assert run_cli("convert", demo_ckpt, folder).code == 0
    path = folder / "scheduler" / "scheduler_config.json"
    config = _scheduler(folder)
    for edited in ({**config, "prediction_type": "v_prediction"},  # the value changed by hand, the tag left
                   {k: v for k, v in {**config, "prediction_type": "v_prediction"}.items()
                    if k != "_sdport_prediction_type_source"}):  # a scheduler saved by diffusers since
        path.write_text(json.dumps(edited))
        report = sdport.inspect(str(folder))
        assert report["prediction_type"] == "v_prediction" and "the file says so" in report["prediction_reason"]
        back = tmp_path / "back.safetensors"
        assert run_cli("convert", folder, back, "--force").code == 0
        meta = _metadata(back)  # value and tag from the same place: no file that contradicts itself
        assert meta["modelspec.predict_key"] == "v" and meta["sdport.prediction_type_source"] == "metadata"


def test_prediction_type_given_for_a_folder_goes_into_its_scheduler(demo_ckpt, tmp_path) -> None:
    folder, out = tmp_path / "folder", tmp_path / "out"
    assert run_cli("convert", demo_ckpt, folder).code == 0
    r = run_cli("convert", folder, out, "--dtype", "fp16", "--prediction-type", "v_prediction")
    assert r.code == 0, r.err
    config = _scheduler(out)
    assert config["prediction_type"] == "v_prediction" and config["_sdport_prediction_type_source"] == "user"
    assert "user said so" in sdport.inspect(str(out))["prediction_reason"]


def test_an_extracted_adapter_names_its_base_family(demo_ckpt, demo_state_dict, tmp_path) -> None:
    tuned, out = tmp_path / "tuned.safetensors", tmp_path / "diff.safetensors"
    weights = dict(demo_state_dict)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weights[key] = weights[key] * 1.5
    safetensors.numpy.save_file(weights, str(tuned))
    r = run_cli("lora", "extract", tuned, demo_ckpt, out, "--rank", "2")
    assert r.code == 0 and "(sd1)" in r.out, r.out + r.err
    meta = _metadata(out)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert sdport.inspect(str(out))["adapter"]["base_family"] == "sd1"  # tiny widths: only the metadata can say
    assert "loads in: ComfyUI, A1111, Forge" in r.out
    peft = tmp_path / "diff-peft.safetensors"
    r = run_cli("lora", "convert", out, peft, "--to", "peft")
    assert r.code == 0 and "loads in: diffusers" in r.out and "not for ComfyUI" in r.out, r.out
    report = sdport.inspect(str(peft))["adapter"]
    assert report["base_family"] == "sd1"  # carried across formats
    assert report["loads_in"][0].startswith("diffusers") and "--to kohya" in report["loads_in_note"]


def test_inspect_names_the_programs_an_adapter_loads_in(demo_ckpt, tmp_path) -> None:
    kohya = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (2, 32),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": (32, 2)}
    loha = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_" + k: s
            for k, s in (("w1_a", (32, 2)), ("w1_b", (2, 32)), ("w2_a", (32, 2)), ("w2_b", (2, 32)))}
    for name, tensors, first, absent in (("plain", kohya, "ComfyUI", ""), ("loha", loha, "ComfyUI", "diffusers")):
        path = tmp_path / f"{name}.safetensors"
        safetensors.numpy.save_file({k: np.ones(s, np.float32) for k, s in tensors.items()}, str(path))
        r = run_cli("inspect", path)
        row = next(line for line in r.out.splitlines() if line.startswith("loads in"))
        assert first in row and (not absent or f"{absent} does not load" in row), row
