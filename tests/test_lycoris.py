"""LyCORIS networks built by the ``lycoris-lora`` package on tiny real-structure pipelines, merged by sdport.

The oracle is lycoris itself: its kohya network (``lycoris.kohya.create_network``) is applied to
the pipeline's UNet and text encoders, every trainable tensor is perturbed, the file is saved with
lycoris' ``save_weights``, and each module's ``get_merged_weight`` gives the weight sdport must
write. Two known differences are accounted for, not copied:

- lycoris 4.1.3 scales LoHa and LoKr by alpha/rank twice in ``get_merged_weight`` while its forward
  pass scales once, so those networks are built with alpha = rank, where both agree;
- at a ratio m ≠ 1, DoRA is applied as A1111 and ComfyUI do — ``W + m·(W_dora − W)`` — while
  lycoris rescales its norm term; the DoRA cases check ``W_dora`` at ratio 1 against lycoris and
  the interpolation at 0.6.

SDXL goes through the original single-file layout, so updates to OpenCLIP-bigG's q, k and v land
in thirds of its fused ``in_proj`` (DoRA norms and (IA)³ scales included), and the result is read
back through sdport's own layout conversion.
"""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from conftest import run_cli

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("lycoris")
import models  # noqa: E402
from lycoris.config import PRESET  # noqa: E402
from lycoris.kohya import create_network  # noqa: E402
from lycoris.modules.ia3 import _ia3_weight  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)
# lycoris' "full" preset also names time_embedding.linear_1 directly, which its TimestepEmbedding target already
# covers (a duplicate-name assertion on diffusers UNets); the same targets without that name
PRESET["sdport-test"] = {**PRESET["full"], "unet_target_name": ["conv_in", "conv_out"]}

#: case → (lycoris algo, create_network kwargs, ratio)
CASES = {
    "dora": ("lora", {"dora_wd": True}, 1.0),
    "dora-input-axis": ("lora", {"dora_wd": True, "wd_on_output": False}, 1.0),
    "dora-ratio": ("lora", {"dora_wd": True}, 0.6),
    "loha-dora": ("loha", {"dora_wd": True}, 1.0),
    "lokr": ("lokr", {"factor": 4}, 0.8),
    "ia3": ("ia3", {}, 0.7),
    "full": ("full", {}, 0.5),
    "locon-norm": ("lora", {"train_norm": True}, 0.9),
}
PIPES = {"sd1": "StableDiffusionPipeline", "sdxl-base": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module", params=list(PIPES))
def base(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lycoris-" + request.param)
    ref = models.save_pipeline(request.param, str(root / "ref"))
    out = {"name": request.param, "root": root, "ref": ref, "cls": getattr(diffusers, PIPES[request.param])}
    if request.param == "sdxl-base":
        single = str(root / "sdxl.safetensors")
        assert run_cli("convert", ref, single).code == 0
        out["single"] = single
    return out


def _network(pipe, algo: str, kwargs: dict, seed: int):
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    rank = 4
    alpha = rank if algo in ("loha", "lokr") else 2  # lycoris double-scales LoHa/LoKr when alpha ≠ rank
    net = create_network(1.0, rank, alpha, pipe.vae, encoders if len(encoders) > 1 else encoders[0], pipe.unet,
                         algo=algo, conv_dim=rank, conv_alpha=alpha, preset="sdport-test", **kwargs)
    net.apply_to(encoders if len(encoders) > 1 else encoders[0], pipe.unet, True, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net, encoders


def _expected(pipe, net, encoders, algo: str, kwargs: dict, ratio: float) -> dict[str, torch.Tensor]:
    """Module path in the pipeline (``unet.…``, ``text_encoder.…``) + ``.weight``/``.bias`` → merged tensor."""
    paths = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, comp, None) is not None:
            paths.update({id(m): f"{comp}.{name}" for name, m in getattr(pipe, comp).named_modules()})
    expected = {}
    for lm in net.unet_loras + net.text_encoder_loras:
        org = lm.org_module[0]
        shape = tuple(org.weight.shape) if getattr(org, "weight", None) is not None and org.weight.ndim > 1 else None
        with torch.no_grad():
            if kwargs.get("dora_wd") and ratio != 1.0:
                dora, _ = lm.get_merged_weight(multiplier=1.0, shape=shape)
                weight = lm.org_weight + ratio * (dora - lm.org_weight)
                bias = None
            else:
                weight, bias = lm.get_merged_weight(multiplier=ratio, shape=shape)
        if weight is None:
            continue
        path = paths[id(org)]
        expected[path + ".weight"] = weight.float()
        if bias is not None:
            expected[path + ".bias"] = bias.float()
    assert len(expected) > 20
    return expected


def _merged(base: dict, lora: str, ratio: float, out: str):
    if base["name"] == "sdxl-base":  # single file in, single file out, read back as a folder
        merged = out + ".safetensors"
        r = run_cli("convert", base["single"], merged, "--lora", f"{lora}:{ratio}", "--report", timeout=300)
        assert r.code == 0, r.err
        assert run_cli("convert", merged, out).code == 0
    else:
        r = run_cli("convert", base["ref"], out, "--lora", f"{lora}:{ratio}", "--report", timeout=300)
        assert r.code == 0, r.err
    return r.out, base["cls"].from_pretrained(out)


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_network_merges_like_lycoris(base, case, tmp_path) -> None:
    algo, kwargs, ratio = CASES[case]
    pipe = base["cls"].from_pretrained(base["ref"])
    before = {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "text_encoder_2")
              if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}
    net, encoders = _network(pipe, algo, kwargs, seed=len(case))
    lora = str(tmp_path / f"{case}.safetensors")
    net.save_weights(lora, torch.float32, {"ss_network_module": "lycoris.kohya"})
    expected = _expected(pipe, net, encoders, algo, kwargs, ratio)
    report, got = _merged(base, lora, ratio, str(tmp_path / "out"))
    assert f"{len(net.unet_loras) + len(net.text_encoder_loras)} modules applied" in report
    state = {f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2")
             if getattr(got, c, None) is not None for k, v in getattr(got, c).state_dict().items()}
    for name, want in expected.items():
        key = name if name in state else name.replace(".text_model.", ".", 1)
        torch.testing.assert_close(state[key].float(), want.reshape(state[key].shape), rtol=1e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # everything no module touches is the base, bit for bit
    touched = {n if n in state else n.replace(".text_model.", ".", 1) for n in expected}
    untouched = [k for k in state if k not in touched and k in before]
    assert untouched and all(torch.equal(state[k], before[k]) for k in untouched)


def test_ia3_on_input_scales_columns_like_lycoris(tmp_path) -> None:
    """lycoris' kohya factory never trains on input; a file that does is merged with lycoris' own weight rule."""
    ref = models.save_pipeline("sd1", str(tmp_path / "ref"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(ref)
    g = torch.Generator().manual_seed(3)
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    targets = {f"{attn}.to_k": "lora_unet_" + f"{attn}.to_k".replace(".", "_"),
               f"{attn}.to_out.0": "lora_unet_" + f"{attn}.to_out.0".replace(".", "_"),
               "down_blocks.0.resnets.0.conv1": "lora_unet_down_blocks_0_resnets_0_conv1"}
    sd, expected = {}, {}
    for path, name in targets.items():
        w = pipe.unet.get_submodule(path).weight.detach()
        scale = torch.randn(w.shape[1], generator=g) * 0.3
        if w.ndim == 4:
            scale = scale.reshape(1, -1, 1, 1)
        sd[f"{name}.weight"], sd[f"{name}.on_input"] = scale, torch.tensor(1)
        expected[path] = _ia3_weight(w, scale, True, 0.5, False)
    import safetensors.torch

    safetensors.torch.save_file(sd, str(tmp_path / "ia3.safetensors"))
    out = str(tmp_path / "out")
    r = run_cli("convert", ref, out, "--lora", f"{tmp_path / 'ia3.safetensors'}:0.5", "--report")
    assert r.code == 0 and "unet ia3 3" in r.out, r.err + r.out
    got = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    for path, want in expected.items():
        torch.testing.assert_close(got.get_submodule(path).weight.detach(), want, rtol=1e-6, atol=1e-7)
