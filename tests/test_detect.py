"""Detection: each family's signature matches its own key set, with evidence, and no other."""

from __future__ import annotations

import pytest

from sdport.demo import clip_l, sd1_unet, sd_vae
from sdport.detect import TABLE, detect, score
from sdport.errors import FormatError
from sdport.io.base import TensorInfo


def _infos(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, "F16", s, "x", 0, 0) for k, s in shapes.items()}


def _sd1() -> dict[str, tuple[int, ...]]:
    s: dict = {}
    sd1_unet(s, "model.diffusion_model.", 32, 32)
    sd_vae(s, "first_stage_model.", 32)
    clip_l(s, "cond_stage_model.transformer.", 32, layers=2)
    return s


def _sd2() -> dict:
    # SD2's transformers project with linear layers: proj_in/proj_out weights are 2-d
    s = {k: (v[:2] if k.endswith(("proj_in.weight", "proj_out.weight")) else v) for k, v in _sd1().items()
         if not k.startswith("cond_stage_model")}
    s["cond_stage_model.model.ln_final.weight"] = (32,)
    s["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = (96, 32)
    return s


def _sdxl(refiner: bool) -> dict:
    s = {k: v for k, v in _sd1().items() if not k.startswith("cond_stage_model")}
    s["model.diffusion_model.label_emb.0.0.weight"] = (128, 2560 if refiner else 2816)
    s["conditioner.embedders.0.model.ln_final.weight" if refiner else
      "conditioner.embedders.1.model.ln_final.weight"] = (32,)
    if not refiner:
        s["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = (32,)
    return s


def _vae_only() -> dict:
    s: dict = {}
    sd_vae(s, "", 32)
    return s


CASES = {
    "sd1": _sd1,
    "sd2": _sd2,
    "sdxl-base": lambda: _sdxl(False),
    "sdxl-refiner": lambda: _sdxl(True),
    "vae": _vae_only,
    "controlnet": lambda: {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
                           "control_model.zero_convs.0.0.weight": (32, 32, 1, 1)},
    "controlnet-diffusers": lambda: {"conv_in.weight": (32, 4, 3, 3), "time_embedding.linear_1.weight": (128, 32),
                                     "down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3),
                                     "controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)},
    "unet-diffusers": lambda: {"conv_in.weight": (32, 4, 3, 3), "time_embedding.linear_1.weight": (128, 32),
                               "down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3)},
    "lora": lambda: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32),
                     "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (32, 4),
                     "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_family_is_detected_with_evidence(case: str) -> None:
    found = detect(_infos(CASES[case]()))
    assert found.family == case.removesuffix("-diffusers") and found.evidence


@pytest.mark.parametrize("case", sorted(CASES))
def test_exactly_one_signature_of_the_right_family_matches(case: str) -> None:
    family = case.removesuffix("-diffusers")
    infos = _infos(CASES[case]())
    full = [s.signature for s in (score(sig, infos) for sig in TABLE) if s.full]
    best = max(sig.size for sig in full)
    # a full checkpoint also contains a VAE and a UNet, but those signatures exclude full models
    assert {sig.family for sig in full if sig.size == best} == {family}


def test_inpainting_variant_is_read_from_input_channels() -> None:
    shapes = _sd1()
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (32, 9, 3, 3)
    found = detect(_infos(shapes))
    assert (found.family, found.variant) == ("sd1", "inpaint")
    assert "model.diffusion_model.input_blocks.0.0.weight takes 9 input channels" in found.evidence


def test_adapter_formats_are_named() -> None:
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (32, 4)}
    assert detect(_infos(peft)).adapter_format == "peft"
    assert detect(_infos(CASES["lora"]())).adapter_format == "kohya"
    loha = {"lora_unet_x.hada_w1_a": (4, 32), "lora_unet_x.hada_w1_b": (4, 32)}
    assert detect(_infos(loha)).adapter_format == "lycoris"


def test_unknown_tensors_say_so() -> None:
    found = detect(_infos({"foo.bar": (1,)}))
    assert found.family == "unknown" and found.evidence == ["no known signature matched"]


def test_a_near_miss_names_the_closest_signature_and_what_it_lacked(tmp_path) -> None:
    shapes = _sd1()
    del shapes["model.diffusion_model.input_blocks.0.0.weight"]
    found = detect(_infos(shapes))
    assert found.family == "unknown"
    assert found.evidence == ["no known signature matched", "closest: sd1 (ldm), which needs a tensor named like "
                              "model.diffusion_model.input_blocks.0.0.weight"]


def test_two_signatures_matching_equally_is_an_error_naming_both() -> None:
    shapes = {**_sd1(), **_sdxl(False)}
    with pytest.raises(FormatError, match=r"x\.safetensors: matches sd1 \(ldm\) and sdxl-base \(ldm\) equally"):
        detect(_infos(shapes), path="x.safetensors")


def test_mindone_and_adapter_formats_come_from_the_same_table() -> None:
    assert {s.layout for s in TABLE} == {"ldm", "diffusers", "mindone", "adapter"}
    tags = {s.tag for s in TABLE if s.layout == "adapter"}
    assert tags == {"kohya", "lycoris", "peft", "diffusers-old", "mindone", "cloneofsimo", "unknown"}
    renamed = {"model.diffusion_model.input_blocks.1.0.in_layers.0.weight":
               "model.diffusion_model.input_blocks.1.0.in_layers_norm.gamma",
               "model.diffusion_model.input_blocks.0.0.weight": "model.diffusion_model.input_blocks.0.0.conv.weight"}
    mindone = {renamed.get(k, k): v for k, v in _sd1().items()}
    found = detect(_infos(mindone))
    assert (found.family, found.layout) == ("sd1", "mindone")
