"""Full-size key sets without memory: the released models' configs instantiated on torch's meta device.

For SD1.5, SD2.1, SDXL base and refiner (and the VAE, CLIP-L, OpenCLIP-H and bigG text encoders
they carry), diffusers → original → diffusers plans validate with no unknown and no missing key,
give back exactly the names and shapes they started from, and the configs sdport derives from the
shapes alone equal the released ones.
"""

from __future__ import annotations

import json

import pytest
import torch

from sdport.detect import detect
from sdport.families import FAMILIES
from sdport.io.base import TensorInfo, TensorSource
from sdport.model import Model
from sdport.plan import validate
from sdport.request import ConvertRequest
from sdport.targets import diffusers as to_folder
from sdport.targets import single_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
#: the released UNet configs (the values that differ between families)
UNETS = {
    "sd1": dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                down_block_types=list(SD_DOWN), up_block_types=list(SD_UP), use_linear_projection=False,
                transformer_layers_per_block=1, sample_size=64),
    "sd2": dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                down_block_types=list(SD_DOWN), up_block_types=list(SD_UP), use_linear_projection=True,
                transformer_layers_per_block=1, sample_size=96),
    "sdxl-base": dict(block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      use_linear_projection=True, transformer_layers_per_block=[1, 2, 10], sample_size=128,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816),
    "sdxl-refiner": dict(block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
                         attention_head_dim=[6, 12, 24, 24],
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                         use_linear_projection=True, transformer_layers_per_block=4, sample_size=128,
                         addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2560),
}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
# (SD2's released text_encoder config also says projection_dim 512, which CLIPTextModel never uses)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu")
BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
            projection_dim=1280)
TEXT = {"sd1": {"text_encoder": CLIP_L}, "sd2": {"text_encoder": OPENCLIP_H},
        "sdxl-base": {"text_encoder": CLIP_L, "text_encoder_2": BIGG}, "sdxl-refiner": {"text_encoder_2": BIGG}}
VAE = dict(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _source(shapes: dict[str, tuple[int, ...]], fmt: str) -> TensorSource:
    return TensorSource("full-size", fmt, {k: TensorInfo(k, "F16", s, "none", 0, 0) for k, s in shapes.items()})


def _model(source: TensorSource) -> Model:
    return Model(source, detect(source.tensors), source)


def to_single_file(source: TensorSource):
    return single_file.from_diffusers(_model(source), ConvertRequest.build("in", "out.safetensors"))


def to_diffusers(source: TensorSource):
    return to_folder.from_original(_model(source), ConvertRequest.build("in", "out", prediction_type="epsilon"))


@pytest.fixture(scope="module", params=list(UNETS))
def released(request) -> tuple[str, dict[str, dict[str, tuple[int, ...]]]]:
    """Names and shapes of each component of a released pipeline, from meta-device models."""
    name = request.param
    with torch.device("meta"):
        parts = {"unet": diffusers.UNet2DConditionModel(**UNETS[name]),
                 "vae": diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4,
                                                up_block_types=["UpDecoderBlock2D"] * 4, **VAE)}
        for comp, cfg in TEXT[name].items():
            cls = transformers.CLIPTextModelWithProjection if comp == "text_encoder_2" else transformers.CLIPTextModel
            config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg)
            parts[comp] = cls(config)
    return name, {comp: _shapes(m) for comp, m in parts.items()}


def test_full_size_plans_validate_and_give_back_every_name_and_shape(released) -> None:
    name, comps = released
    folder = _source({f"{c}.{k}": s for c, shapes in comps.items() for k, s in shapes.items()}, "diffusers")
    found = detect(folder.tensors)
    assert (found.family, found.layout) == (name, "diffusers")
    single = to_single_file(folder)
    validate(single, folder)
    assert sum(len(f.tensors) for f in single.files) > 1000
    original = _source({t.name: t.shape for t in single.files[0].tensors}, "safetensors")
    assert detect(original.tensors).family == name
    back = to_diffusers(original)
    validate(back, original)
    got = {f.path.split("/")[0]: {t.name: t.shape for t in f.tensors} for f in back.files}
    flat = {c: {k if k.startswith(("text_model.", "text_projection")) or not c.startswith("text")
                else "text_model." + k: s for k, s in shapes.items()} for c, shapes in comps.items()}
    assert got == flat


def test_configs_derived_from_full_size_shapes_equal_the_released_ones(released) -> None:
    name, comps = released
    original = to_single_file(_source({f"{c}.{k}": s for c, shp in comps.items() for k, s in shp.items()},
                                      "diffusers"))
    plan = to_diffusers(_source({t.name: t.shape for t in original.files[0].tensors}, "safetensors"))
    unet = json.loads(plan.extra["unet/config.json"])
    for key, value in UNETS[name].items():
        assert unet[key] == value, key
    vae = json.loads(plan.extra["vae/config.json"])
    assert {k: vae[k] for k in VAE} == VAE
    for comp, cfg in TEXT[name].items():
        text = json.loads(plan.extra[f"{comp}/config.json"])
        assert {k: text[k] for k in cfg} == cfg, comp


def test_full_size_mindone_names_map_every_tensor_and_read_back(released) -> None:
    """Original single file → MindOne: every tensor renamed by rule (or left out, SD2's last text layer and its
    projection), the names MindOne's key lists use, and read back to the same names and shapes."""
    from sdport.families.parts.mindone import view
    from sdport.targets.mindone import to_mindone
    from sdport.targets.single_file import repackage_plan

    name, comps = released
    folder = _source({f"{c}.{k}": s for c, shapes in comps.items() for k, s in shapes.items()}, "diffusers")
    original = _source({t.name: t.shape for t in to_single_file(folder).files[0].tensors}, "safetensors")
    plan = to_mindone(repackage_plan(original, ConvertRequest.build("in", "out.ckpt", to="mindspore"), whole=True),
                      FAMILIES[name])
    ms = {t.name: t.shape for t in plan.files[0].tensors}
    validate(plan, original)
    assert all(not n.endswith((".weight", ".bias")) or "norm" not in n.rsplit(".", 2)[-2] for n in ms)
    known = {"sd1": "cond_stage_model.transformer.transformer_layer.resblocks.11.attn.attn.in_proj.weight",
             "sd2": "cond_stage_model.transformer.transformer_layer.resblocks.22.attn.attn.in_proj.weight",
             "sdxl-base": "conditioner.embedders.1.model.token_embedding.embedding_table",
             "sdxl-refiner": "conditioner.embedders.0.model.ln_final.gamma"}
    assert known[name] in ms
    if name in ("sd1", "sd2"):
        assert "model.diffusion_model.input_blocks.1.0.in_layers_conv.conv.weight" in ms
    back = view(_source(ms, "mindspore"), FAMILIES[name].mindone)
    dropped = set(original.tensors) - set(back.tensors)
    assert set(back.tensors) <= set(original.tensors)
    assert all(back.tensors[k].shape == original.tensors[k].shape for k in back.tensors)
    # SD2: diffusers keeps the 23 layers MindOne keeps; what goes is OpenCLIP's projection and logit scale
    assert dropped == ({"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
                       & set(original.tensors) if name == "sd2" else set())
