"""Textual inversions and a replaced VAE in a diffusers folder, read back by diffusers and transformers themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

import sdport
from sdport.errors import SdportError
from sdport.request import InversionSpec

diffusers = pytest.importorskip("diffusers")
import models  # noqa: E402


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inv")
    ref = models.save_pipeline("sdxl-base", str(root / "ref"))
    sdport.convert(ref, str(root / "xl.safetensors"))
    g = torch.Generator().manual_seed(7)
    emb = {"clip_l": torch.randn(2, 64, generator=g), "clip_g": torch.randn(2, 128, generator=g)}
    save_file(emb, str(root / "xl-emb.safetensors"))
    models.vae("sdxl-base", seed=11).save_pretrained(str(root / "vae"))
    return {"root": root, "ref": ref, "emb": emb}


def test_sdxl_embedding_goes_to_both_encoders_and_vae_is_replaced(xl) -> None:
    out = xl["root"] / "out"
    sdport.convert(xl["root"] / "xl.safetensors", out, vae=xl["root"] / "vae",
                   inversions=[InversionSpec(str(xl["root"] / "xl-emb.safetensors"), "xlstyle", 0.5)])
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(out))
    for enc, tok, key in (("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g")):
        ids = getattr(pipe, tok)("xlstyle-0 xlstyle-1 xlstyle xlstyle-all").input_ids[1:-1]
        assert ids == [49408, 49409, 49410, 49411]
        rows = getattr(pipe, enc).get_input_embeddings().weight.detach()
        want = xl["emb"][key] * 0.5
        assert torch.equal(rows[49408:49410], want)
        assert torch.allclose(rows[49410], want.sum(0)) and torch.equal(rows[49410], rows[49411])
        assert getattr(pipe, enc).config.vocab_size == 49412
    vae = diffusers.AutoencoderKL.from_pretrained(str(xl["root"] / "vae"))
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), vae.state_dict().values(),
                                                 strict=True))
    original = diffusers.StableDiffusionXLPipeline.from_pretrained(xl["ref"])
    assert torch.equal(pipe.unet.conv_in.weight, original.unet.conv_in.weight)
    assert not torch.equal(pipe.vae.decoder.conv_out.weight, original.vae.decoder.conv_out.weight)


def test_bad_inversions_and_vaes_are_refused_with_one_line(xl, tmp_path) -> None:
    src = xl["root"] / "xl.safetensors"
    save_file({"a": torch.zeros(3, 64), "b": torch.zeros(3, 64)}, str(tmp_path / "two.safetensors"))
    save_file({"emb_params": torch.zeros(2, 32)}, str(tmp_path / "narrow.safetensors"))
    save_file({"emb_params": torch.full((2, 64), float("nan"))}, str(tmp_path / "nan.safetensors"))
    cases = [(dict(inversions=[InversionSpec(str(tmp_path / "two.safetensors"), "t")]), "not a textual-inversion"),
             (dict(inversions=[InversionSpec(str(tmp_path / "narrow.safetensors"), "t")]), "32 wide"),
             (dict(inversions=[InversionSpec(str(tmp_path / "nan.safetensors"), "t")]), "NaN"),
             (dict(inversions=[InversionSpec(str(xl["root"] / "xl-emb.safetensors"), "cat")]), "already in"),
             (dict(vae=src), "not a VAE")]
    for kw, words in cases:
        with pytest.raises(SdportError, match=words):
            sdport.convert(src, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()
    with pytest.raises(SdportError, match="diffusers folder or an ONNX export"):
        sdport.convert(src, tmp_path / "x.safetensors", vae=xl["root"] / "vae")
    with pytest.raises(SdportError, match="spaces"):
        InversionSpec("x", "two words")


def test_tokenizer_files_say_the_tokens_as_transformers_saves_them(xl) -> None:
    from transformers import CLIPTokenizer

    out = xl["root"] / "out"
    tok = CLIPTokenizer.from_pretrained(str(out), subfolder="tokenizer_2")
    assert len(tok) == 49412 and tok.convert_ids_to_tokens(49411) == "xlstyle-all"
    config = json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["49408"]["content"] == "xlstyle-0"
    assert np.array_equal(tok("xlstyle").input_ids, [49406, 49410, 49407])


def test_cli_flags_give_the_api_result(xl, tmp_path) -> None:
    from conftest import run_cli, sha256

    emb = xl["root"] / "xl-emb.safetensors"
    r = run_cli("convert", xl["root"] / "xl.safetensors", tmp_path / "cli", "--vae", xl["root"] / "vae",
                "--inversion", f"xlstyle={emb}:0.5", "-q")
    assert r.code == 0, r.err
    for rel in ("text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "tokenizer_2/added_tokens.json", "text_encoder/config.json"):
        assert sha256(tmp_path / "cli" / rel) == sha256(xl["root"] / "out" / rel), rel
    assert InversionSpec.parse(f"{emb}:0.5") == InversionSpec(str(emb), None, 0.5)
    assert InversionSpec.parse("civitai://7?type=Model") == InversionSpec("civitai://7?type=Model")
    r = run_cli("convert", xl["root"] / "xl.safetensors", tmp_path / "v", "--vae", xl["root"] / "vae", "--verify")
    assert r.code == 2 and "--verify" in r.err and not (tmp_path / "v").exists()


def test_a_damaged_tokenizer_is_refused_in_one_line(demo_ckpt, tmp_path) -> None:
    folder = tmp_path / "folder"
    assert run_cli("convert", demo_ckpt, folder).code == 0
    emb = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat>": torch.ones(32)}, str(emb))
    fast = folder / "tokenizer" / "tokenizer.json"
    fast.write_text(json.dumps({"added_tokens": [{"content": ["x"], "id": 1}]}))
    for damaged in ({"added_tokens": 5}, [1, 2], "[" * 100_000):
        fast.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
        r = run_cli("convert", folder, tmp_path / "out", "--inversion", str(emb))
        assert r.code == 2 and "tokenizer.json" in r.err and len(r.err.strip().splitlines()) == 1, r.err
        assert not (tmp_path / "out").exists()
