"""MindOne checkpoints (MindSpore ``.ckpt``, MindOne names) ⇄ original single files and diffusers folders.

Tiny real-structure pipelines (tests/models.py) of each family: original → MindOne → original must
give back every tensor bit for bit (SD2 loses only OpenCLIP's projection and logit scale, which
MindOne files never hold); a diffusers folder goes to the same MindOne bytes as its single file and
comes back equal to the reference folder; a LoRA merged in MindOne space equals
``W0 + ratio · alpha/rank · up @ down`` computed here. MindSpore itself checks these files in
test_mindspore_oracle.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import only, run_cli

import sdport
from sdport.io import open_tensors

pytest.importorskip("diffusers")
import models  # noqa: E402

FAMILIES = ("sd1", "sd2", "sdxl-base", "sdxl-refiner")
ONLY_ORIGINAL = {"sd2": {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}}


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mindone-" + request.param)
    ref = models.save_pipeline(request.param, str(root / "ref"))
    single = str(root / "model.safetensors")
    assert run_cli("convert", ref, single).code == 0
    ms = str(root / "model-mindone.ckpt")
    r = run_cli("convert", single, ms, "--to", "mindspore", "--report")
    assert r.code == 0, r.err
    return {"name": request.param, "root": root, "ref": ref, "single": single, "ms": ms, "report": r.out}


def _read(path: str) -> dict[str, np.ndarray]:
    with open_tensors(path) as src:
        return {k: src.read(k) for k in src.tensors}


def test_original_to_mindone_and_back_is_bit_exact(fam, tmp_path) -> None:
    back = str(tmp_path / "back.safetensors")
    assert run_cli("convert", fam["ms"], back).code == 0
    original, again = _read(fam["single"]), _read(back)
    dropped = ONLY_ORIGINAL.get(fam["name"], set()) & set(original)
    model_keys = {k for k in original if not k.startswith(("alphas", "betas", "sqrt_", "log_one", "posterior",
                                                            "model_ema"))}
    assert set(again) == model_keys - dropped - {k for k in original if k.endswith("position_ids")}
    for k, v in again.items():
        want = original[k].astype(np.float32) if original[k].dtype == np.float16 else original[k]
        assert v.dtype == want.dtype and v.shape == want.shape and v.tobytes() == want.tobytes(), k


def test_mindone_files_carry_mindone_names_in_fp32(fam) -> None:
    report = sdport.inspect(fam["ms"])
    assert report["format"] == "mindspore" and report["layout"] == "mindone" and report["family"] == fam["name"]
    with open_tensors(fam["ms"]) as src:
        names = list(src.tensors)
        assert {i.dtype for i in src.tensors.values()} <= {"F32", "I64"}
    assert not any(n.endswith(".weight") and n.rsplit(".", 2)[-2].startswith(("norm", "ln_", "layer_norm"))
                   for n in names)
    if fam["name"] in ("sd1", "sd2"):
        assert "model.diffusion_model.input_blocks.0.0.conv.weight" in names
        assert "cond_stage_model.transformer.embedding_table" in names
        assert any(n.endswith(".attn.attn.in_proj.weight") for n in names)
    else:
        assert "model.diffusion_model.input_blocks.0.0.weight" in names
        assert any(n.endswith("token_embedding.embedding_table") for n in names)


@only("fam", "sd1")  # SD1's text encoder is the one MindOne fuses
def test_sd1_in_proj_rows_are_q_k_v(fam) -> None:
    original, ms = _read(fam["single"]), _read(fam["ms"])
    layer = "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn."
    fused = ms["cond_stage_model.transformer.transformer_layer.resblocks.1.attn.attn.in_proj.weight"]
    want = np.concatenate([original[layer + f"{x}_proj.weight"] for x in "qkv"]).astype(np.float32)
    np.testing.assert_array_equal(fused, want)


def test_diffusers_folder_to_mindone_and_back(fam, tmp_path) -> None:
    direct = str(tmp_path / "direct.ckpt")
    assert run_cli("convert", fam["ref"], direct, "--to", "mindspore").code == 0
    with open(direct, "rb") as a, open(fam["ms"], "rb") as b:
        assert a.read() == b.read()
    folder = str(tmp_path / "folder")
    r = run_cli("convert", fam["ms"], folder, "--dtype", "fp32")
    assert r.code == 0, r.err
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        stem = "model" if comp.startswith("text") else "diffusion_pytorch_model"
        ref = os.path.join(fam["ref"], comp, f"{stem}.safetensors")
        if not os.path.exists(ref):
            continue
        flat = lambda sd: {k.removeprefix("text_model."): v for k, v in sd.items()}  # noqa: E731 - transformers 5
        want = flat(safetensors.torch.load_file(ref))
        got = flat(safetensors.torch.load_file(os.path.join(folder, comp, f"{stem}.safetensors")))
        assert set(got) == {k for k in want if not k.endswith("position_ids")}
        for k, v in got.items():
            assert torch.equal(v, want[k].float()), (comp, k)


@only("fam", "sd1")  # one family is enough for the merge path
def test_lora_merged_into_a_mindone_base(fam, tmp_path) -> None:
    original = _read(fam["single"])
    g = np.random.default_rng(0)
    target = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
    lora, expected = {}, {}
    for name, key in ((target, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
                      (te, "lora_te_text_model_encoder_layers_0_self_attn_k_proj")):
        w = original[name].astype(np.float32)
        up, down = g.standard_normal((w.shape[0], 2)).astype(np.float32), g.standard_normal((2, w.shape[1]))
        down = down.astype(np.float32)
        lora.update({f"{key}.lora_up.weight": torch.from_numpy(up), f"{key}.lora_down.weight": torch.from_numpy(down),
                     f"{key}.alpha": torch.tensor(1.0)})
        expected[name] = w + np.float32(0.5) * np.float32(1.0 / 2) * (up @ down)
    path = str(tmp_path / "lora.safetensors")
    safetensors.torch.save_file(lora, path)
    out = str(tmp_path / "merged.ckpt")
    r = run_cli("convert", fam["ms"], out, "--to", "mindspore", "--lora", f"{path}:0.5", "--report")
    assert r.code == 0 and "2 modules applied" in r.out, r.err
    merged = _read(out)
    ms_target = target  # attention weights keep their names in MindOne
    np.testing.assert_allclose(merged[ms_target], expected[target], rtol=1e-6, atol=1e-6)
    fused = merged["cond_stage_model.transformer.transformer_layer.resblocks.0.attn.attn.in_proj.weight"]
    k_rows = fused[original[te].shape[0]: 2 * original[te].shape[0]]
    np.testing.assert_allclose(k_rows, expected[te], rtol=1e-6, atol=1e-6)


def _mindone_lora(path: str, base: dict[str, np.ndarray], targets: list[str], sdxl: bool) -> dict[str, tuple]:
    """A MindOne LoRA checkpoint (SD1/2: lora_down/lora_up; SDXL: lora_A/lora_B), written as MindSpore does."""
    from sdport.io.base import Slot
    from sdport.io.mindspore import MindSporeWriter

    g = np.random.default_rng(7)
    tensors, factors = {}, {}
    for name in targets:
        w = base[name]
        up = g.standard_normal((w.shape[0], 2)).astype(np.float32)
        down = g.standard_normal((2, int(np.prod(w.shape[1:])))).astype(np.float32)
        stem = name[: -len(".weight")]
        tensors[f"{stem}.{'lora_A' if sdxl else 'lora_down'}.weight"] = down
        tensors[f"{stem}.{'lora_B' if sdxl else 'lora_up'}.weight"] = up
        factors[name] = (up, down)
    with MindSporeWriter(path) as w:
        w.begin([Slot(n, "F32", a.shape) for n, a in tensors.items()])
        for n, a in tensors.items():
            w.write(n, a)
        w.commit()
    return factors


@only("fam", "sd1", "sdxl-base")  # MindOne publishes LoRA training for SD1/SD2 and SDXL; one of each
def test_mindone_loras_merge_with_the_alpha_the_user_gives_and_convert_to_kohya(fam, tmp_path) -> None:
    base = _read(fam["ms"])
    attn = "model.diffusion_model.{}.1.transformer_blocks.0.{}.weight"
    blocks = ("input_blocks.1", "output_blocks.3") if fam["name"] == "sd1" else ("input_blocks.4", "output_blocks.1")
    targets = [attn.format(b, p) for b in blocks for p in ("attn1.to_q", "attn2.to_k", "attn1.to_out.0")]
    lora = str(tmp_path / "mindone-lora.ckpt")
    factors = _mindone_lora(lora, base, targets, fam["name"] == "sdxl-base")
    out = str(tmp_path / "merged.ckpt")
    r = run_cli("convert", fam["ms"], out, "--to", "mindspore", "--lora", f"{lora}:0.5", "--lora-alpha", "4",
                "--report")
    assert r.code == 0 and "6 modules applied" in r.out, r.err
    merged = _read(out)
    for name, (up, down) in factors.items():  # W0 + ratio · alpha/rank · B @ A
        want = base[name] + np.float32(0.5 * 4 / 2) * (up @ down).reshape(base[name].shape)
        np.testing.assert_allclose(merged[name], want, rtol=1e-6, atol=1e-6)
    untouched = [k for k in base if k not in factors]
    assert all(np.array_equal(merged[k], base[k]) for k in untouched)
    # lossless to kohya: the same factors under kohya's names, which merge to the same weights
    kohya = str(tmp_path / "kohya.safetensors")
    assert run_cli("lora", "convert", lora, kohya, "--to", "kohya").code == 0
    converted = safetensors.torch.load_file(kohya)
    assert len(converted) == 12 and all(k.startswith("lora_unet_") for k in converted)
    a, b = str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")
    assert run_cli("convert", fam["ms"], a, "--to", "mindspore", "--lora", lora).code == 0
    assert run_cli("convert", fam["ms"], b, "--to", "mindspore", "--lora", kohya).code == 0
    with open(a, "rb") as x, open(b, "rb") as y:
        assert x.read() == y.read()


@only("fam", "sd1", "sdxl-base")  # one SD1-style and one SDXL-style base
def test_a_fine_tuned_unet_folder_goes_into_a_full_mindone_base(fam, tmp_path) -> None:
    """Like MindOne's convert_diffusers_to_mindone_sdxl.py --sdxl_base_ckpt, by name and shape."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(fam["ref"], "unet"))
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.5)
    tuned = str(tmp_path / "unet")
    unet.save_pretrained(tuned)
    out = str(tmp_path / "full.ckpt")
    r = run_cli("convert", tuned, out, "--to", "mindspore", "--base", fam["ms"])
    assert r.code == 0, r.err
    base, full = _read(fam["ms"]), _read(out)
    assert full.keys() == base.keys()
    changed = [k for k in full if not np.array_equal(full[k], base[k])]
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    for k in changed:  # exactly 1.5 × the base's UNet weights
        np.testing.assert_allclose(full[k], base[k] * np.float32(1.5), rtol=1e-6)
    # a UNet of another family has no place in this base
    other = models.save_pipeline("sd2" if fam["name"] == "sdxl-base" else "sdxl-base", str(tmp_path / "other"))
    r = run_cli("convert", os.path.join(other, "unet"), str(tmp_path / "bad.ckpt"), "--to", "mindspore",
                "--base", fam["ms"])
    assert r.code == 2 and "base" in r.err and len(r.err.strip().splitlines()) == 1
    assert not os.path.exists(str(tmp_path / "bad.ckpt"))
