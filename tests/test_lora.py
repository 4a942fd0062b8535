"""Merging LoRA adapters into a base, in any layout: against diffusers' own ``load_lora_weights`` + ``fuse_lora``.

Adapters are generated here with random factors on the real module names of each tiny pipeline
(tests/models.py). Where diffusers applies a module, sdport's merged weights must equal diffusers'
fused ones bit for bit; where it does not (this diffusers drops kohya text-encoder attention keys
for transformers 5's CLIP), the reference is kohya's formula ``W + ratio · alpha/rank · up @ down``
computed here with torch. The same adapter merged into the original single file must give the
same weights as merged into the folder.
"""

from __future__ import annotations

import os
import warnings

import pytest
import safetensors.torch
import torch
from conftest import leftovers, only, run_cli, sha256

import sdport

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
import models  # noqa: E402

warnings.filterwarnings("ignore")
PIPES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl-base": "StableDiffusionXLPipeline"}
UNET_TARGETS = ("attn1.to_q", "attn2.to_k", "to_out.0", "proj_in", "ff.net.2", "resnets.0.conv1")
TEXT_TARGETS = ("q_proj", "v_proj", "fc1")


def _factors(w: torch.Tensor, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if w.ndim == 4:  # LoCon: 3×3 (or 1×1) down, 1×1 up
        return (torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.1,
                torch.randn(rank, *w.shape[1:], generator=g) * 0.1)
    return torch.randn(w.shape[0], rank, generator=g) * 0.1, torch.randn(rank, w.shape[1], generator=g) * 0.1


def make_lora(pipe, *, sgm_names: dict[str, str] | None = None, seed: int = 0) -> dict[str, dict]:
    """module → {component, path, up, down, alpha} for the UNet and first text encoder of ``pipe``."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for comp, targets, rank, alpha in (("unet", UNET_TARGETS, 4, 2.0), ("text_encoder", TEXT_TARGETS, 2, 1.0),
                                       ("text_encoder_2", TEXT_TARGETS, 3, 6.0)):
        if getattr(pipe, comp, None) is None:
            continue
        for k, w in getattr(pipe, comp).state_dict().items():
            if k.endswith(".weight") and any(t in k for t in targets) and w.ndim in (2, 4):
                path = k[:-len(".weight")]
                if comp != "unet" and not path.startswith("text_model."):
                    path = "text_model." + path
                up, down = _factors(w, rank, g)
                modules[f"{comp}.{path}"] = dict(component=comp, path=path, up=up, down=down, alpha=alpha,
                                                 sgm=(sgm_names or {}).get(path))
    return modules


def kohya_file(modules: dict, path: str, *, te_prefix: str = "lora_te", sgm: bool = False) -> str:
    sd = {}
    for m in modules.values():
        prefix = {"unet": "lora_unet", "text_encoder": te_prefix, "text_encoder_2": "lora_te2"}[m["component"]]
        name = f"{prefix}_{(m['sgm'] if sgm and m['sgm'] else m['path']).replace('.', '_')}"
        sd.update({f"{name}.lora_up.weight": m["up"], f"{name}.lora_down.weight": m["down"],
                   f"{name}.alpha": torch.tensor(m["alpha"])})
    safetensors.torch.save_file(sd, path)
    return path


def peft_file(modules: dict, path: str) -> str:
    """diffusers' current format: lora_A/lora_B under unet./text_encoder., alphas as per-module .alpha tensors."""
    sd = {}
    for m in modules.values():
        name = f"{m['component']}.{m['path']}"
        sd.update({f"{name}.lora_B.weight": m["up"], f"{name}.lora_A.weight": m["down"],
                   f"{name}.alpha": torch.tensor(m["alpha"])})
    safetensors.torch.save_file(sd, path)
    return path


def expected(w: torch.Tensor, m: dict, ratio: float) -> torch.Tensor:
    """kohya's merge: W + ratio · alpha/rank · up @ down, in fp32 (convs by flattening, as A1111 and ComfyUI do)."""
    up, down = m["up"].flatten(1), m["down"].flatten(1)
    return (w.float() + ratio * m["alpha"] / down.shape[0] * (up @ down).reshape(w.shape)).to(w.dtype)


@pytest.fixture(scope="module", params=list(PIPES))
def setup(request, tmp_path_factory) -> dict:
    name = request.param
    root = tmp_path_factory.mktemp("lora-" + name)
    ref = models.save_pipeline(name, str(root / "ref"))
    cls = getattr(diffusers, PIPES[name])
    pipe = cls.from_pretrained(ref)
    modules = make_lora(pipe)
    te = "lora_te1" if name == "sdxl-base" else "lora_te"
    lora = kohya_file(modules, str(root / "kohya.safetensors"), te_prefix=te)
    merged = str(root / "merged")
    r = run_cli("convert", ref, merged, "--lora", f"{lora}:0.7", "--report")
    assert r.code == 0, r.err
    return {"name": name, "root": root, "ref": ref, "cls": cls, "pipe": pipe, "modules": modules, "lora": lora,
            "merged": merged, "report": r.out}


def test_unet_merge_equals_diffusers_fuse_lora_bit_for_bit(setup) -> None:
    oracle = setup["cls"].from_pretrained(setup["ref"])
    oracle.load_lora_weights(setup["lora"])
    oracle.fuse_lora(lora_scale=0.7)
    oracle.unload_lora_weights()
    ours = setup["cls"].from_pretrained(setup["merged"])
    a, b, base = oracle.unet.state_dict(), ours.unet.state_dict(), setup["pipe"].unet.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    changed = [k for k in a if not torch.equal(b[k], base[k])]
    assert len(changed) == sum(m["component"] == "unet" for m in setup["modules"].values()) > 20


def test_every_module_equals_kohyas_formula(setup) -> None:
    ours = setup["cls"].from_pretrained(setup["merged"])
    for m in setup["modules"].values():
        model = getattr(ours, m["component"])
        key = m["path"] + ".weight"
        state, base = model.state_dict(), getattr(setup["pipe"], m["component"]).state_dict()
        key = key if key in state else key.removeprefix("text_model.")
        assert torch.equal(state[key], expected(base[key], m, 0.7)), key


def test_report_counts_modules_by_component_and_kind(setup) -> None:
    n_te = sum(m["component"] == "text_encoder" for m in setup["modules"].values())
    line = next(x for x in setup["report"].splitlines() if x.startswith("lora "))
    assert f"{len(setup['modules'])} modules applied" in line and f"text_encoder lora {n_te}," in line
    assert "unet locon" in line and "unet lora" in line


def test_same_adapter_into_the_original_layout_gives_the_same_weights(setup) -> None:
    root = setup["root"]
    assert run_cli("convert", setup["ref"], root / "single.safetensors").code == 0
    r = run_cli("convert", root / "single.safetensors", root / "merged.safetensors", "--lora", f"{setup['lora']}:0.7")
    assert r.code == 0, r.err
    assert run_cli("convert", root / "merged.safetensors", root / "back").code == 0
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")):
        if not os.path.isdir(os.path.join(setup["merged"], comp)):
            continue
        a = safetensors.torch.load_file(os.path.join(setup["merged"], comp, f"{stem}.safetensors"))
        b = safetensors.torch.load_file(str(root / "back" / comp / f"{stem}.safetensors"))
        if comp != "unet":
            a = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in a.items()}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp


def test_peft_format_merges_like_the_same_factors_in_kohya_format(setup, tmp_path) -> None:
    lora = peft_file(setup["modules"], str(tmp_path / "peft.safetensors"))
    assert sdport.inspect(lora)["adapter_format"] == "peft"
    assert run_cli("convert", setup["ref"], tmp_path / "m", "--lora", f"{lora}:0.7").code == 0
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a = safetensors.torch.load_file(os.path.join(setup["merged"], comp, f"{stem}.safetensors"))
        b = safetensors.torch.load_file(str(tmp_path / "m" / comp / f"{stem}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), comp


def test_several_adapters_add_with_their_ratios(setup, tmp_path) -> None:
    second = make_lora(setup["pipe"], seed=5)
    lora2 = kohya_file(second, str(tmp_path / "b.safetensors"),
                       te_prefix="lora_te1" if setup["name"] == "sdxl-base" else "lora_te")
    r = run_cli("convert", setup["ref"], tmp_path / "m", "--lora", f"{setup['lora']}:0.5", "--lora", f"{lora2}:-0.25")
    assert r.code == 0, r.err
    unet = safetensors.torch.load_file(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = setup["pipe"].unet.state_dict()
    for key, m in setup["modules"].items():
        if m["component"] == "unet":
            w = m["path"] + ".weight"
            m2 = second[key]
            up, down = m["up"].flatten(1), m["down"].flatten(1)
            up2, down2 = m2["up"].flatten(1), m2["down"].flatten(1)
            want = (base[w].float() + 0.5 * 0.5 * (up @ down).reshape(base[w].shape)
                    - 0.25 * 0.5 * (up2 @ down2).reshape(base[w].shape))
            torch.testing.assert_close(unet[w], want, rtol=1e-6, atol=1e-6)


@only("setup", "sdxl-base")  # kohya names SDXL UNet modules after the SGM layout
def test_sdxl_kohya_names_from_sgm_modules_merge_the_same(setup, tmp_path) -> None:
    from sdport.families.parts.unet import layout_from_diffusers, name_map

    table = name_map(layout_from_diffusers(setup["pipe"].unet.state_dict()))
    sgm = {m["path"]: table.to_ldm(m["path"] + ".weight")[0][:-len(".weight")]
           for m in setup["modules"].values() if m["component"] == "unet"}
    modules = {k: {**m, "sgm": sgm.get(m["path"])} for k, m in setup["modules"].items()}
    lora = kohya_file(modules, str(tmp_path / "sgm.safetensors"), te_prefix="lora_te1", sgm=True)
    with safetensors.safe_open(lora, "np") as f:
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_") for k in f.keys())
    assert run_cli("convert", setup["ref"], tmp_path / "m", "--lora", f"{lora}:0.7").code == 0
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        a = safetensors.torch.load_file(os.path.join(setup["merged"], comp, f"{stem}.safetensors"))
        b = safetensors.torch.load_file(str(tmp_path / "m" / comp / f"{stem}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), comp


def _refused(r, src: str, words: str, out) -> None:
    assert r.code == 2 and words in r.err and src in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not os.path.exists(out) and leftovers(os.path.dirname(out)) == []


def test_bad_adapters_are_refused_with_one_line_and_nothing_written(setup, tmp_path) -> None:
    sd = safetensors.torch.load_file(setup["lora"])
    before = sha256(setup["lora"])
    out = str(tmp_path / "out")
    # an adapter on names the base does not have
    renames = (("lora_unet_", "lora_unet_zz_"), ("lora_te_", "lora_te_zz_"), ("lora_te1_", "lora_te_zz1_"),
               ("lora_te2_", "lora_te_zz2_"))
    alien = {}
    for k, v in sd.items():
        for old, new in renames:
            k = k.replace(old, new) if k.startswith(old) else k
        alien[k] = v
    safetensors.torch.save_file(alien, str(tmp_path / "alien.safetensors"))
    _refused(run_cli("convert", setup["ref"], out, "--lora", tmp_path / "alien.safetensors"),
             str(tmp_path / "alien.safetensors"), "modules matches this", out)
    if setup["name"] != "sdxl-base":  # a text encoder 2 makes it an SDXL LoRA, refused on another family
        sdxl = {k.replace("lora_te_", "lora_te2_"): v for k, v in sd.items()}
        safetensors.torch.save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
        _refused(run_cli("convert", setup["ref"], out, "--lora", tmp_path / "sdxl.safetensors"),
                 str(tmp_path / "sdxl.safetensors"), f"is a LoRA for sdxl-base, the base is {setup['name']}", out)
    # a few unknown modules: refused by name, merged with --allow-unmatched
    extra = dict(sd)
    extra.update({"lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2), "lora_unet_nowhere.lora_down.weight":
                  torch.zeros(2, 4)})
    safetensors.torch.save_file(extra, str(tmp_path / "extra.safetensors"))
    _refused(run_cli("convert", setup["ref"], out, "--lora", tmp_path / "extra.safetensors"),
             str(tmp_path / "extra.safetensors"), "unet:nowhere", out)
    r = run_cli("convert", setup["ref"], out, "--lora", tmp_path / "extra.safetensors", "--allow-unmatched", "--report")
    assert r.code == 0 and "1 unmatched" in r.out and "unmatched unet:nowhere" in r.out
    # a factor of the wrong size, a DoRA magnitude of the wrong size, OFT (not merged), an incomplete LoHa, a NaN alpha
    up = next(k for k in sd if k.endswith("lora_up.weight") and sd[k].ndim == 2)
    cases = {"wrong.safetensors": ({**sd, up: torch.zeros(sd[up].shape[0] + 1, sd[up].shape[1])}, "does not fit"),
             "dora.safetensors": ({**sd, up.replace("lora_up.weight", "dora_scale"): torch.zeros(2, 1)},
                                  "does not fit"),
             "oft.safetensors": ({**sd, "lora_unet_x.oft_blocks": torch.zeros(2, 4, 4)}, "uses OFT"),
             "half-loha.safetensors": ({**sd, "lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "lacks some of its"),
             "nan.safetensors": ({**sd, up.replace("lora_up.weight", "alpha"): torch.tensor(float("nan"))}, "nan")}
    for name, (state, words) in cases.items():
        safetensors.torch.save_file(state, str(tmp_path / name))
        _refused(run_cli("convert", setup["ref"], tmp_path / "x", "--lora", tmp_path / name), str(tmp_path / name),
                 words, str(tmp_path / "x"))
    assert sha256(setup["lora"]) == before


def test_old_diffusers_format_and_peft_metadata_alphas_merge_like_kohya(setup, tmp_path) -> None:
    import json

    old, peft = {}, {}
    chosen = {}
    for key, m in setup["modules"].items():
        leaf = m["path"].rsplit(".", 1)[-1] if not m["path"].endswith("to_out.0") else "to_out"
        if m["component"] == "unet" and leaf in ("to_q", "to_k", "to_v", "to_out") and m["up"].ndim == 2:
            head = m["path"].removesuffix(".0").rsplit(".", 1)[0]
            old.update({f"unet.{head}.processor.{leaf}_lora.up.weight": m["up"] * m["alpha"] / m["down"].shape[0],
                        f"unet.{head}.processor.{leaf}_lora.down.weight": m["down"]})
            chosen[key] = m
        if m["component"] == "unet":
            peft.update({f"unet.{m['path']}.lora_B.weight": m["up"], f"unet.{m['path']}.lora_A.weight": m["down"]})
    safetensors.torch.save_file(old, str(tmp_path / "old.safetensors"))
    meta = {"lora_adapter_metadata": json.dumps({"unet": {"r": 4, "lora_alpha": 2.0}})}
    safetensors.torch.save_file(peft, str(tmp_path / "peft.safetensors"), metadata=meta)
    assert sdport.inspect(str(tmp_path / "old.safetensors"))["adapter_format"] == "diffusers-old"
    for name, modules in (("old", chosen), ("peft", {k: m for k, m in setup["modules"].items()
                                                    if m["component"] == "unet"})):
        r = run_cli("convert", setup["ref"], tmp_path / name, "--lora", f"{tmp_path / name}.safetensors:0.7")
        assert r.code == 0, r.err
        unet = safetensors.torch.load_file(str(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
        base = setup["pipe"].unet.state_dict()
        for m in modules.values():
            torch.testing.assert_close(unet[m["path"] + ".weight"], expected(base[m["path"] + ".weight"], m, 0.7),
                                       rtol=1e-6, atol=1e-7)


def test_tucker_locon_module_equals_the_einsum_around_its_core(setup, tmp_path) -> None:
    base = setup["pipe"].unet.state_dict()
    key = next(k for k in base if k.endswith("resnets.0.conv1.weight"))
    w = base[key]
    g = torch.Generator().manual_seed(3)
    up, down, mid = (torch.randn(w.shape[0], 4, 1, 1, generator=g), torch.randn(4, w.shape[1], 1, 1, generator=g),
                     torch.randn(4, 4, 3, 3, generator=g))
    name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
    safetensors.torch.save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                                 f"{name}.lora_mid.weight": mid, f"{name}.alpha": torch.tensor(2.0)},
                                str(tmp_path / "tucker.safetensors"))
    r = run_cli("convert", setup["ref"], tmp_path / "m", "--lora", f"{tmp_path / 'tucker.safetensors'}:0.5", "--report")
    assert r.code == 0 and "unet tucker 1" in r.out, r.err
    got = safetensors.torch.load_file(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"))[key]
    want = w + 0.5 * 2 / 4 * torch.einsum("mnkl,im,nj->ijkl", mid, up[:, :, 0, 0], down[:, :, 0, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inspect_describes_an_adapter_per_component(setup, tmp_path) -> None:
    a = sdport.inspect(setup["lora"])["adapter"]
    assert a["mergeable"] and a["format"] == "kohya" and a["modules"] == len(setup["modules"])
    # tiny widths say nothing; a second text encoder says SDXL (real widths: below)
    assert a["base_family"] == ("sdxl-base" if setup["name"] == "sdxl-base" else "unknown")
    for width, family in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl-base")):
        name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
        safetensors.torch.save_file({f"{name}.lora_down.weight": torch.zeros(4, width),
                                     f"{name}.lora_up.weight": torch.zeros(640, 4)}, str(tmp_path / "w.safetensors"))
        assert sdport.inspect(str(tmp_path / "w.safetensors"))["adapter"]["base_family"] == family
    assert a["components"]["unet"]["ranks"] == [4] and a["components"]["unet"]["alphas"] == [2.0]
    assert a["components"]["text_encoder"]["ranks"] == [2] and set(a["kinds"]) == {"lora", "locon"}
    oft = {"lora_unet_x.oft_blocks": torch.zeros(2, 4, 4), "lora_unet_x.alpha": torch.tensor(1.0)}
    safetensors.torch.save_file(oft, str(tmp_path / "oft.safetensors"))
    oft = sdport.inspect(str(tmp_path / "oft.safetensors"))["adapter"]
    assert not oft["mergeable"] and oft["algorithms"] == ["OFT"]
    r = run_cli("inspect", setup["lora"])
    assert r.code == 0 and f"kohya, {len(setup['modules'])} modules" in r.out


def test_loha_and_lokr_modules_equal_lycoris_own_rebuild(setup, tmp_path) -> None:
    from lycoris.functional import loha, lokr

    base = setup["pipe"].unet.state_dict()
    linear = next(k for k in base if k.endswith("attn1.to_q.weight"))
    ff = next(k for k in base if k.endswith("ff.net.2.weight"))
    conv = next(k for k in base if k.endswith("resnets.0.conv1.weight"))
    conv2 = next(k for k in base if k.endswith("resnets.1.conv1.weight"))
    g = torch.Generator().manual_seed(9)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd, want = {}, {}

    def name(key: str) -> str:
        return "lora_unet_" + key[:-len(".weight")].replace(".", "_")

    (o, i), rank = base[linear].shape, 3  # LoHa on a linear layer
    f = {"hada_w1_a": r(o, rank), "hada_w1_b": r(rank, i), "hada_w2_a": r(o, rank), "hada_w2_b": r(rank, i)}
    want[linear] = loha.diff_weight(f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], None, None,
                                    gamma=4.0 / rank)
    sd.update({f"{name(linear)}.{k}": v for k, v in {**f, "alpha": torch.tensor(4.0)}.items()})
    o, i, kh, kw = base[conv].shape  # LoHa with Tucker cores on a 3×3 conv
    f = {"hada_w1_a": r(rank, o), "hada_w1_b": r(rank, i), "hada_t1": r(rank, rank, kh, kw),
         "hada_w2_a": r(rank, o), "hada_w2_b": r(rank, i), "hada_t2": r(rank, rank, kh, kw)}
    want[conv] = loha.diff_weight(f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], f["hada_t1"],
                                  f["hada_t2"], gamma=1.0)
    sd.update({f"{name(conv)}.{k}": v for k, v in f.items()})
    o, i = base[ff].shape  # LoKr: a full left half, a factorised right half
    f = {"lokr_w1": r(2, 2), "lokr_w2_a": r(o // 2, 2), "lokr_w2_b": r(2, i // 2)}
    want[ff] = lokr.diff_weight(f["lokr_w1"], None, None, None, f["lokr_w2_a"], f["lokr_w2_b"], None, gamma=1.0)
    sd.update({f"{name(ff)}.{k}": v for k, v in {**f, "alpha": torch.tensor(1.0)}.items()})
    o, i, kh, kw = base[conv2].shape  # LoKr on a conv, the right half a Tucker rebuild
    f = {"lokr_w1": r(2, 2), "lokr_w2_a": r(2, o // 2), "lokr_w2_b": r(2, i // 2), "lokr_t2": r(2, 2, kh, kw)}
    # no alpha: scale 1 (alpha = rank); lycoris's functional API divides gamma by w2a.shape[1], so pass that
    want[conv2] = lokr.diff_weight(f["lokr_w1"], None, None, None, f["lokr_w2_a"], f["lokr_w2_b"], f["lokr_t2"],
                                   gamma=float(o // 2))
    sd.update({f"{name(conv2)}.{k}": v for k, v in f.items()})
    path = str(tmp_path / "lycoris.safetensors")
    safetensors.torch.save_file(sd, path)
    r_ = run_cli("convert", setup["ref"], tmp_path / "m", "--lora", f"{path}:0.6", "--report")
    assert r_.code == 0, r_.err
    assert "unet loha 2" in r_.out and "unet lokr 2" in r_.out
    got = safetensors.torch.load_file(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"))
    for key, delta in want.items():
        torch.testing.assert_close(got[key], base[key] + 0.6 * delta.reshape(base[key].shape), rtol=1e-5,
                                   atol=1e-5)
    assert sdport.inspect(path)["adapter"]["kinds"] == {"loha": 2, "lokr": 2}


#: the modules latent-consistency/lcm-lora-sdv1-5 adapts (its adapter_config.json), convs included, r 64 / alpha 8
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora", "lcm"])
@only("setup", "sd1")  # one family is enough for the metadata convention
def test_loras_saved_by_diffusers_itself_merge_at_their_strength(setup, tmp_path, variant) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = setup["cls"].from_pretrained(setup["ref"])
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_v", "proj_in"], init_lora_weights=False,
                        use_rslora=variant == "rslora", use_dora=variant == "dora")
    if variant == "lcm":
        config = LoraConfig(r=8, lora_alpha=1, target_modules=LCM_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(config)
    # PEFT starts DoRA's magnitude at the norm of the merged weight, a no-op: move it, so it must be applied
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    ratio = 1.0 if variant == "dora" else 0.8  # DoRA at other strengths: PEFT rescales ΔW, sdport interpolates
    setup["cls"].save_lora_weights(str(tmp_path / "d"), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                   unet_lora_adapter_metadata=config.to_dict())
    lora = str(tmp_path / "d" / "pytorch_lora_weights.safetensors")
    with safetensors.safe_open(lora, "np") as f:
        assert "unet.lora_alpha" in f.metadata()["lora_adapter_metadata"]  # diffusers' flat, prefixed keys
    oracle = setup["cls"].from_pretrained(setup["ref"])
    oracle.load_lora_weights(lora)
    oracle.fuse_lora(lora_scale=ratio)
    oracle.unload_lora_weights()
    r = run_cli("convert", setup["ref"], tmp_path / "m", "--lora", f"{lora}:{ratio}", "--report")
    assert r.code == 0 and ("unet lora+dora " in r.out) == (variant == "dora"), r.err + r.out
    ours = setup["cls"].from_pretrained(str(tmp_path / "m")).unet.state_dict()
    want, base = oracle.unet.state_dict(), setup["pipe"].unet.state_dict()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) > 10
    for k in changed:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-5, atol=1e-6)


@only("setup", "sd1")  # one family is enough for the folder layout
def test_folders_with_bin_weights_and_symlinked_configs_stay_loadable(setup, tmp_path) -> None:
    linked = tmp_path / "linked"
    for folder, _, names in os.walk(setup["ref"]):  # a Hugging Face cache: every file a symlink to its blob
        rel = os.path.relpath(folder, setup["ref"])
        os.makedirs(linked / rel, exist_ok=True)
        for n in names:
            os.symlink(os.path.join(folder, n), linked / rel / n)
    te = linked / "text_encoder"
    os.unlink(te / "model.safetensors")
    state = {k if k.startswith("text_model.") else "text_model." + k: v.contiguous()
             for k, v in setup["pipe"].text_encoder.state_dict().items()}
    torch.save(state, te / "pytorch_model.bin")  # what transformers 4 wrote before safetensors
    r = run_cli("convert", linked, tmp_path / "m", "--lora", f"{setup['lora']}:0.7")
    assert r.code == 0, r.err
    assert sorted(os.listdir(tmp_path / "m" / "text_encoder")) == ["config.json", "model.safetensors"]
    ours = setup["cls"].from_pretrained(str(tmp_path / "m"), local_files_only=True)
    merged = setup["cls"].from_pretrained(setup["merged"])
    assert all(torch.equal(a, b) for a, b in zip(ours.text_encoder.state_dict().values(),
                                                 merged.text_encoder.state_dict().values(), strict=True))


def test_odd_ratios_and_transposed_factors_are_refused(setup, tmp_path) -> None:
    out = tmp_path / "x"
    _refused(run_cli("convert", setup["ref"], out, "--lora", f"{setup['lora']}:inf"), setup["lora"], "not a finite",
             str(out))
    sd = safetensors.torch.load_file(setup["lora"])
    key = next(k for k in sd if k.endswith("attn2_to_k.lora_up.weight"))  # [width, context]: not square
    down = key.replace("lora_up", "lora_down")
    up_t, down_t = sd[down].T.contiguous(), sd[key].T.contiguous()  # ΔW transposed: same element count
    assert up_t.shape[0] != sd[key].shape[0]
    safetensors.torch.save_file({**sd, key: up_t, down: down_t}, str(tmp_path / "t.safetensors"))
    _refused(run_cli("convert", setup["ref"], out, "--lora", tmp_path / "t.safetensors"),
             str(tmp_path / "t.safetensors"), "does not fit", str(out))
