"""``sdport lora convert``, ``combine`` and ``extract`` on tiny real-structure SD1 and SDXL pipelines.

Oracles: diffusers' ``load_lora_weights`` + ``fuse_lora`` reads the PEFT files sdport writes (and
the kohya files it extracts); torch's SVD gives the best error any rank-r factorisation can reach;
round trips are compared byte for byte. Merges of the rewritten adapters are compared with merges
of the originals (both checked against diffusers and kohya's formula in test_lora.py).
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import leftovers, run_cli, sha256

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
import models  # noqa: E402
from test_lora import kohya_file, make_lora  # noqa: E402

import sdport  # noqa: E402

warnings.filterwarnings("ignore")
REPORT = re.compile(r"\s+(\w+):(\S+): rank (\d+), energy ([\d.]+)")
PIPES = {"sd1": "StableDiffusionPipeline", "sdxl-base": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module", params=list(PIPES))
def setup(request, tmp_path_factory) -> dict:
    name = request.param
    root = tmp_path_factory.mktemp("tools-" + name)
    ref = models.save_pipeline(name, str(root / "ref"))
    cls = getattr(diffusers, PIPES[name])
    pipe = cls.from_pretrained(ref)
    from sdport.families.parts.unet import layout_from_diffusers, name_map

    table = name_map(layout_from_diffusers(pipe.unet.state_dict()))
    sgm = {k[: -len(".weight")]: table.to_ldm(k)[0][: -len(".weight")] for k in pipe.unet.state_dict()
           if k.endswith(".weight")}
    te = "lora_te1" if name == "sdxl-base" else "lora_te"
    xl = name == "sdxl-base"  # kohya names SDXL's UNet modules after the SGM layout, SD1's after diffusers'
    modules = make_lora(pipe, sgm_names=sgm, seed=0)
    a = kohya_file(modules, str(root / "a.safetensors"), te_prefix=te, sgm=xl)
    b = kohya_file(make_lora(pipe, sgm_names=sgm, seed=1), str(root / "b.safetensors"), te_prefix=te, sgm=xl)
    return {"name": name, "root": root, "ref": ref, "cls": cls, "a": a, "b": b, "modules": modules, "te": te}


def _load(path: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def _state(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        stem = "diffusion_pytorch_model" if comp == "unet" else "model"
        path = os.path.join(folder, comp, f"{stem}.safetensors")
        if os.path.exists(path):
            out.update({f"{comp}.{k}": v for k, v in _load(path).items()})
    return out


def _merge(setup, out, *specs: str) -> dict[str, torch.Tensor]:
    args = [a for s in specs for a in ("--lora", s)]
    r = run_cli("convert", setup["ref"], out, "--dtype", "fp32", *args, "--report", timeout=300)
    assert r.code == 0, r.err
    return _state(str(out))


def _close(a: dict, b: dict, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_kohya_to_peft_and_back_is_bit_exact_and_diffusers_loads_the_peft_file(setup, tmp_path) -> None:
    peft, back = str(tmp_path / "p.safetensors"), str(tmp_path / "k.safetensors")
    r = run_cli("lora", "convert", setup["a"], peft, "--to", "peft")
    assert r.code == 0 and "peft" in r.out, r.err
    with safetensors.safe_open(peft, "np") as f:
        assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in f.keys())
        assert any(".attn1.to_q.lora_A.weight" in k and "down_blocks" in k for k in f.keys())  # diffusers names
    assert run_cli("lora", "convert", peft, back, "--to", "kohya").code == 0
    a, k = _load(setup["a"]), _load(back)
    assert a.keys() == k.keys() and all(a[n].dtype == k[n].dtype and torch.equal(a[n], k[n]) for n in a)
    # diffusers reads sdport's PEFT file (alphas from lora_adapter_metadata) and fuses it like sdport merges kohya's
    oracle = setup["cls"].from_pretrained(setup["ref"])
    oracle.load_lora_weights(peft)
    oracle.fuse_lora(lora_scale=0.7)
    oracle.unload_lora_weights()
    ours = _merge(setup, tmp_path / "m", f"{setup['a']}:0.7")
    base = setup["cls"].from_pretrained(setup["ref"])
    changed = 0
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(oracle, comp, None) is None:
            continue
        want, before = getattr(oracle, comp).state_dict(), getattr(base, comp).state_dict()
        for n in want:
            if not torch.equal(want[n], before[n]):
                changed += 1
                key = f"{comp}.{n}" if f"{comp}.{n}" in ours else f"{comp}.{n.removeprefix('text_model.')}"
                torch.testing.assert_close(ours[key], want[n], rtol=1e-5, atol=1e-6)
    assert changed > 20
    # metadata: training facts kept, hashes of the old file's bytes dropped; an alpha of 0 means alpha = rank
    sd = _load(setup["a"])
    sd.update({k: torch.tensor(0.0) for k in sd if k.startswith("lora_unet_") and k.endswith(".alpha")})
    zero = str(tmp_path / "zero.safetensors")
    safetensors.torch.save_file(sd, zero, metadata={"ss_output_name": "style", "sshs_model_hash": "dead"})
    assert run_cli("lora", "convert", zero, str(tmp_path / "z.safetensors"), "--to", "peft").code == 0
    with safetensors.safe_open(str(tmp_path / "z.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "style" and "sshs_model_hash" not in meta
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 4.0  # the UNet modules' rank


def test_every_unet_naming_reads_as_the_same_modules(setup, tmp_path) -> None:
    """kohya names from diffusers paths and from SGM paths (kohya's SD1 extraction writes those too), and MindOne's
    ``model.diffusion_model.<SGM path>.lora_A`` names: one canonical module each, merged alike."""
    modules = setup["modules"]
    files = {sgm: kohya_file(modules, str(tmp_path / f"{sgm}.safetensors"), te_prefix=setup["te"], sgm=sgm)
             for sgm in (False, True)}
    peft = {}
    for sgm, path in files.items():
        assert run_cli("lora", "convert", path, str(tmp_path / f"p{sgm}.safetensors"), "--to", "peft").code == 0
        peft[sgm] = _load(str(tmp_path / f"p{sgm}.safetensors"))
    assert peft[False].keys() == peft[True].keys() and all(torch.equal(peft[False][k], peft[True][k])
                                                           for k in peft[False])
    # MindOne stores no alpha (its merge script takes one for the whole file): scale 1, as alpha = rank
    mindone = {}
    for m in modules.values():
        if m["component"] == "unet":
            name = f"model.diffusion_model.{m['sgm']}"
            mindone[f"{name}.lora_A.weight"], mindone[f"{name}.lora_B.weight"] = m["down"], m["up"]
    safetensors.torch.save_file(mindone, str(tmp_path / "mindone.safetensors"))
    plain = {k: v for k, v in _load(files[True]).items() if k.startswith("lora_unet_") and not k.endswith(".alpha")}
    safetensors.torch.save_file(plain, str(tmp_path / "plain.safetensors"))
    _close(_merge(setup, tmp_path / "m1", str(tmp_path / "mindone.safetensors")),
           _merge(setup, tmp_path / "m2", str(tmp_path / "plain.safetensors")), rtol=0, atol=0)


def test_old_diffusers_format_holds_attention_only_and_folds_alpha(setup, tmp_path) -> None:
    out = str(tmp_path / "old.safetensors")
    r = run_cli("lora", "convert", setup["a"], out, "--to", "diffusers-old")
    assert r.code == 2 and "not attention-projection LoRAs" in r.err and len(r.err.strip().splitlines()) == 1
    assert not os.path.exists(out) and leftovers(tmp_path) == []
    sd = _load(setup["a"])
    attn = {k: v for k, v in sd.items() if any(p in k for p in ("attn1_to_q", "attn2_to_k", "to_out_0", "q_proj",
                                                                 "v_proj"))}
    only = str(tmp_path / "attn.safetensors")
    safetensors.torch.save_file(attn, only)
    r = run_cli("lora", "convert", only, out, "--to", "diffusers-old")
    assert r.code == 0 and "folded" in r.out, r.err
    with safetensors.safe_open(out, "np") as f:
        assert any(".processor.to_q_lora.down.weight" in k for k in f.keys())
    _close(_merge(setup, tmp_path / "m1", only), _merge(setup, tmp_path / "m2", out))


def test_combine_equals_merging_both_at_their_ratios(setup, tmp_path) -> None:
    out = str(tmp_path / "ab.safetensors")
    r = run_cli("lora", "combine", f"{setup['a']}:0.7", f"{setup['b']}:-0.4", out)
    assert r.code == 0, r.err
    combined = _load(out)
    a = _load(setup["a"])
    down = next(k for k in a if k.endswith("lora_down.weight"))
    assert combined[down].shape[0] == 2 * a[down].shape[0]  # ranks concatenated
    both = _merge(setup, tmp_path / "m1", f"{setup['a']}:0.7", f"{setup['b']}:-0.4")
    _close(both, _merge(setup, tmp_path / "m2", out))
    # and as PEFT, read and fused by diffusers
    peft = str(tmp_path / "p.safetensors")
    assert run_cli("lora", "combine", f"{setup['a']}:0.7", f"{setup['b']}:-0.4", peft, "--to", "peft").code == 0
    pipe = setup["cls"].from_pretrained(setup["ref"])
    pipe.load_lora_weights(peft)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(both[f"unet.{k}"], v, rtol=1e-5, atol=1e-6)


def test_extract_recovers_a_merged_lora_and_reports_energy(setup, tmp_path) -> None:
    tuned = str(tmp_path / "tuned")
    _merge(setup, tuned, setup["a"])
    out = str(tmp_path / "x.safetensors")
    r = run_cli("lora", "extract", tuned, setup["ref"], out, "--rank", "8", "--dtype", "fp32", timeout=300)
    assert r.code == 0, r.err
    assert "retained energy mean 1.0000" in r.out and "modules unchanged" in r.out
    _close(_merge(setup, tmp_path / "again", out), _state(tuned), rtol=1e-4, atol=2e-5)
    # from the single file against the folder: the same modules, the same factors up to sign
    single = str(tmp_path / "tuned.safetensors")
    assert run_cli("convert", tuned, single).code == 0
    out2 = str(tmp_path / "x2.safetensors")
    assert run_cli("lora", "extract", single, setup["ref"], out2, "--rank", "8", "--dtype", "fp32").code == 0
    x, x2 = _load(out), _load(out2)
    assert x.keys() == x2.keys()
    # rank 1 keeps exactly the share of Σσ² torch's SVD says the first singular value has
    r = run_cli("lora", "extract", tuned, setup["ref"], str(tmp_path / "r1.safetensors"), "--rank", "1", "--report")
    assert r.code == 0, r.err
    found = [m.groups() for ln in r.out.splitlines() if (m := REPORT.fullmatch(ln))]
    comp, path, rank, got = next(f for f in found if f[1].endswith("attn2.to_k"))
    assert rank == "1" and len(found) > 20
    key = f"{comp}.{path}.weight"
    d = _state(tuned)[key].double() - _state(setup["ref"])[key].double()
    s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
    want = float(s[0] ** 2 / (s ** 2).sum())
    assert abs(float(got) - want) < 1e-4


def test_energy_picks_the_smallest_rank_that_keeps_it(setup, tmp_path) -> None:
    tuned = str(tmp_path / "tuned")
    _merge(setup, tuned, setup["a"])
    out = str(tmp_path / "e.safetensors")
    r = run_cli("lora", "extract", tuned, setup["ref"], out, "--energy", "0.5", "--rank", "8", "--report")
    assert r.code == 0, r.err
    found = [m.groups() for ln in r.out.splitlines() if (m := REPORT.fullmatch(ln))]
    assert len(found) > 20
    for _, _, rank, energy in found:  # the factors here have rank 2, 3 or 4: at most that, at least the share
        assert float(energy) >= 0.5 - 1e-6 and 1 <= int(rank) <= 4


def test_loha_becomes_lora_only_with_a_rank_and_says_how_close(tmp_path) -> None:
    pytest.importorskip("lycoris")
    from test_lycoris import _network  # importing it registers the lycoris preset the network uses

    ref = models.save_pipeline("sd1", str(tmp_path / "ref"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(ref)
    net, _ = _network(pipe, "loha", {}, seed=4)
    loha = str(tmp_path / "loha.safetensors")
    net.save_weights(loha, torch.float32, {})
    r = run_cli("lora", "convert", loha, str(tmp_path / "p.safetensors"), "--to", "peft")
    assert r.code == 2 and "not plain LoRA" in r.err and "--rank" in r.err
    # LoHa's ΔW has rank ≤ r² = 16: rank 16 is (numerically) exact
    exact = str(tmp_path / "exact.safetensors")
    r = run_cli("lora", "convert", loha, exact, "--to", "kohya", "--rank", "16", "--dtype", "fp32")
    assert r.code == 0 and "re-factorised" in r.out, r.err
    assert float(r.out.split("max ")[1].split()[0]) < 1e-4
    setup = {"ref": ref}
    _close(_merge(setup, tmp_path / "m1", loha), _merge(setup, tmp_path / "m2", exact), rtol=1e-4, atol=1e-5)
    # rank 2: the error reported is the best any rank-2 factorisation reaches (Eckart–Young, torch's SVD)
    r = run_cli("lora", "convert", loha, str(tmp_path / "r2.safetensors"), "--to", "peft", "--rank", "2")
    assert r.code == 0, r.err
    # diffusers loads the PEFT file (1×1 conv factors with their kernel dims) and fuses it like sdport merges it
    oracle = diffusers.StableDiffusionPipeline.from_pretrained(ref)
    oracle.load_lora_weights(str(tmp_path / "r2.safetensors"))
    oracle.fuse_lora()
    oracle.unload_lora_weights()
    ours = _merge(setup, tmp_path / "m3", str(tmp_path / "r2.safetensors"))
    for k, v in oracle.unet.state_dict().items():
        torch.testing.assert_close(ours[f"unet.{k}"], v, rtol=1e-5, atol=1e-6)
    result = sdport.lora.convert(loha, str(tmp_path / "r2b.safetensors"), to="kohya", rank=2)
    lm = next(m for m in net.unet_loras if m.lora_name.endswith("attn1_to_q"))
    with torch.no_grad():
        d = lm.get_diff_weight(multiplier=1.0)[0].double()
    d = d / lm.scale if lm.scale != 1 else d  # lycoris 4.1.3 scales LoHa twice here (see test_lycoris)
    s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
    best = float(torch.sqrt((s[2:] ** 2).sum() / (s ** 2).sum()))
    label = next(k for k in result.errors if k.endswith("attn1.to_q") and "down_blocks.0" in k)
    assert abs(result.errors[label] - best) < 1e-4


def test_bad_inputs_are_refused_in_one_line(setup, tmp_path) -> None:
    before = sha256(setup["a"])
    out = str(tmp_path / "o.safetensors")
    model = os.path.join(setup["ref"], "unet", "diffusion_pytorch_model.safetensors")
    for args, words in ((("convert", model, out, "--to", "peft"), "not a LoRA adapter"),
                        (("convert", setup["a"], out, "--to", "peft", "--rank", "0"), "not a positive"),
                        (("combine", setup["a"], out), "at least two"),
                        (("extract", setup["a"], setup["ref"], out), "not a full model")):
        r = run_cli("lora", *args)
        assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) <= 2, (args, r.err)
        assert not os.path.exists(out) and leftovers(tmp_path) == []
    # a cloneofsimo safeloras whose modules do not fit its injection order into an SD1/SD2 UNet: refused, not guessed
    clone = str(tmp_path / "clone.safetensors")
    safetensors.torch.save_file({"unet:0:up": torch.zeros(320, 4), "unet:0:down": torch.zeros(4, 320)}, clone,
                                metadata={"unet": '["CrossAttention", "Attention", "GEGLU"]', "unet:0:rank": "4"})
    r = run_cli("convert", setup["ref"], str(tmp_path / "m"), "--lora", clone)
    assert r.code == 2 and "cloneofsimo" in r.err and len(r.err.strip().splitlines()) == 1
    report = sdport.inspect(clone)
    assert report["adapter_format"] == "cloneofsimo" and not report["adapter"]["mergeable"]
    open(out, "wb").close()
    r = run_cli("lora", "convert", setup["a"], out, "--to", "peft")
    assert r.code == 2 and "already exists" in r.err and os.path.getsize(out) == 0
    assert sha256(setup["a"]) == before
    np.testing.assert_equal(len(leftovers(tmp_path)), 0)
