"""cloneofsimo/lora adapters — "safeloras" and ``.pt`` lists — placed, merged and rewritten by sdport.

The oracle is cloneofsimo's own procedure rebuilt in a few lines of torch (``lora_diffusion`` is not on
PyPI): its injection visits ``model.modules()`` and, below each module whose class is a target, its
``named_modules()`` in order, numbering every ``nn.Linear`` (and ``nn.Conv2d`` for ``ResnetBlock2D``);
``collapse_lora`` adds ``ratio · up @ down`` (conv factors flattened) to each weight. Models: the tiny
real-structure SD1 pipeline of ``models``, loaded by diffusers and transformers themselves.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import leftovers, run_cli

diffusers = pytest.importorskip("diffusers")
import models  # noqa: E402

import sdport  # noqa: E402
from sdport.io import open_file  # noqa: E402
from sdport.lora.formats import parse, read_alphas  # noqa: E402

UNET = ["CrossAttention", "Attention", "GEGLU"]
EXTENDED = ["ResnetBlock2D", *UNET]
TEXT = ["CLIPAttention"]
RATIO = 0.7


Found = list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]]


def inject(model: torch.nn.Module, targets: list[str], rank: int, seed: int) -> Found:
    """cloneofsimo's ``_find_modules_v2`` walk: (name, module, up, down) in its numbering, fp16 factors as it saves."""
    g = torch.Generator().manual_seed(seed)
    search = (torch.nn.Linear, torch.nn.Conv2d) if "ResnetBlock2D" in targets else (torch.nn.Linear,)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for ancestor in model.modules():
        if ancestor.__class__.__name__ not in targets:
            continue
        for _, module in ancestor.named_modules():
            if isinstance(module, search):
                w = module.weight
                down = torch.randn(rank, *w.shape[1:], generator=g) * 0.2
                up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.2
                out.append((names[id(module)], module, up.half(), down.half()))
    return out


def as_diffusers_0_12(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet with each transformer block's children in the order diffusers 0.9–0.12 registered them (``attn1``,
    ``ff``, ``attn2``, then the norms), which is the order cloneofsimo's walk met them in then."""
    for module in unet.modules():
        if module.__class__.__name__ == "BasicTransformerBlock":
            children = dict(module._modules)
            first = ["attn1", "ff", "attn2"]
            module._modules.clear()
            module._modules.update({k: children[k] for k in first + [k for k in children if k not in first]})
    return unet


def collapse(found: list, ratio: float) -> None:
    """cloneofsimo's ``collapse_lora`` (factors cast to the weight's dtype when loaded, as its monkeypatch does)."""
    with torch.no_grad():
        for _, module, up, down in found:
            w = module.weight
            w += ratio * (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape)


def safeloras(groups: dict[str, tuple[list[str], list]], path: str, embeds: dict | None = None) -> str:
    """cloneofsimo's ``save_safeloras_with_embeds``."""
    tensors, metadata = {}, {}
    for name, (targets, found) in groups.items():
        metadata[name] = json.dumps(targets)
        for i, (_, _, up, down) in enumerate(found):
            metadata[f"{name}:{i}:rank"] = str(down.shape[0])
            tensors[f"{name}:{i}:up"], tensors[f"{name}:{i}:down"] = up, down
    for token, vector in (embeds or {}).items():
        metadata[token], tensors[token] = "<embed>", vector
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return path


def pt_list(found: list, path: str) -> str:
    """cloneofsimo's ``save_lora_weight``: ``torch.save([up, down, up, down …])``."""
    torch.save([t for _, _, up, down in found for t in (up, down)], path)
    return path


def weights(folder: str, component: str) -> dict[str, np.ndarray]:
    loaded = safetensors.torch.load_file(os.path.join(folder, component, "model.safetensors" if component ==
                                                      "text_encoder" else "diffusion_pytorch_model.safetensors"))
    return {k.removeprefix("text_model."): v.numpy() for k, v in loaded.items()}


def expected(pipe, component: str) -> dict[str, np.ndarray]:
    return {k.removeprefix("text_model."): v.numpy() for k, v in getattr(pipe, component).state_dict().items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cloneofsimo")
    ref = models.save_pipeline("sd1", str(root / "ref"))
    load = diffusers.StableDiffusionPipeline.from_pretrained
    plain, extended, old = load(ref), load(ref), load(ref)
    unet, text = inject(plain.unet, UNET, 4, 0), inject(plain.text_encoder, TEXT, 2, 1)
    width = plain.text_encoder.get_input_embeddings().weight.shape[1]
    embed = torch.randn(width, generator=torch.Generator().manual_seed(5))
    files = {"safe": safeloras({"unet": (UNET, unet), "text_encoder": (TEXT, text)}, str(root / "style.safetensors"),
                               {"<s1>": embed})}
    ext_unet, ext_text = inject(extended.unet, EXTENDED, 3, 2), inject(extended.text_encoder, TEXT, 2, 3)
    files["pt"] = pt_list(ext_unet, str(root / "style.pt"))
    files["pt_text"] = pt_list(ext_text, str(root / "style.text_encoder.pt"))
    old_unet = inject(as_diffusers_0_12(old.unet), UNET, 4, 4)
    files["old"] = safeloras({"unet": (UNET, old_unet)}, str(root / "old.safetensors"))
    order = {"unet": [n for n, *_ in unet], "text_encoder": [n for n, *_ in text],
             "extended": [n for n, *_ in ext_unet], "old": [n for n, *_ in old_unet]}
    collapse(unet + text, RATIO)
    collapse(ext_unet + ext_text, RATIO)
    collapse(old_unet, RATIO)
    return {"root": root, "ref": ref, "files": files, "order": order, "plain": plain, "extended": extended,
            "old": old, "embed": embed.numpy()}


def test_modules_are_numbered_in_cloneofsimos_order(setup) -> None:
    assert setup["order"]["old"] != setup["order"]["unet"]  # ff before attn2: another numbering
    for key, components in (("safe", ("unet", "text_encoder")), ("pt", ("extended",)), ("old", ("old",))):
        with open_file(setup["files"][key]) as source:
            adapter = parse(source, read_alphas(source), "cloneofsimo")
        for component in components:
            want = [n.removeprefix("text_model.") for n in setup["order"][component]]
            got = [m.name.removeprefix("text_model.") for m in adapter.modules
                   if m.component == ("unet" if component in ("extended", "old") else component)]
            assert got == want, component
    assert any(n.endswith("conv_shortcut") for n in setup["order"]["extended"])  # the optional 1×1s were placed


@pytest.mark.parametrize("kind", ["safe", "pt", "old"])
def test_merge_equals_collapse_lora(setup, tmp_path, kind) -> None:
    out = str(tmp_path / "merged")
    loras = [f"{setup['files'][kind]}:{RATIO}"] + ([f"{setup['files']['pt_text']}:{RATIO}"] if kind == "pt" else [])
    r = run_cli("convert", setup["ref"], out, *[a for spec in loras for a in ("--lora", spec)], "--report")
    assert r.code == 0, r.err
    pipe = setup[{"safe": "plain", "pt": "extended", "old": "old"}[kind]]
    for component in ("unet", "text_encoder"):
        got, want = weights(out, component), expected(pipe, component)
        assert set(got) == set(want)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=0, atol=2e-6, err_msg=k)
    summary = r.out + r.err
    assert "cloneofsimo" in summary and "unmatched" not in summary
    if kind == "safe":  # its textual-inversion token is no LoRA module: left out, by name and reason
        assert "<s1>" in summary and "--inversion" in summary


def test_inspect_and_convert_to_peft_for_diffusers(setup, tmp_path) -> None:
    report = sdport.inspect(setup["files"]["safe"])
    adapter = report["adapter"]
    assert report["adapter_format"] == "cloneofsimo" and adapter["mergeable"]
    layers = setup["plain"].text_encoder.config.num_hidden_layers
    assert adapter["components"]["unet"]["modules"] == 16 * 9 and adapter["components"]["text_encoder"]["modules"] \
        == 4 * layers
    out = str(tmp_path / "style-peft.safetensors")
    r = run_cli("lora", "convert", setup["files"]["safe"], out, "--to", "peft")
    assert r.code == 0 and "<embed>" not in r.out and "left out 1" in r.out, r.out + r.err
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(setup["ref"])
    pipe.load_lora_weights(out)
    pipe.fuse_lora(lora_scale=RATIO)
    pipe.unload_lora_weights()
    for component in ("unet", "text_encoder"):
        got, want = expected(pipe, component), expected(setup["plain"], component)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=0, atol=2e-6, err_msg=k)


def test_its_token_goes_in_by_inversion(setup, tmp_path) -> None:
    out = str(tmp_path / "with-token")
    r = run_cli("convert", setup["ref"], out, "--inversion", setup["files"]["safe"])
    assert r.code == 0, r.err
    embedding = weights(out, "text_encoder")["embeddings.token_embedding.weight"]
    np.testing.assert_array_equal(embedding[-1], setup["embed"])
    with open(os.path.join(out, "tokenizer", "added_tokens.json")) as f:
        assert json.load(f)["<s1>"] == embedding.shape[0] - 1


def test_damaged_files_are_refused(setup, tmp_path) -> None:
    src = safetensors.torch.load_file(setup["files"]["safe"])
    cases = {"gap": {k: v for k, v in src.items() if not k.startswith("unet:3:")},
             "half": {k: v for k, v in src.items() if k != "unet:5:down"},
             "short": {k: v for k, v in src.items() if not k.startswith("unet:143:")},
             "zero-padded": {("unet:01:up" if k == "unet:1:up" else k): v for k, v in src.items()},
             "0-d": {**src, "unet:7:down": torch.tensor(1.0, dtype=torch.float16)},
             "3-d": {**src, "unet:7:down": src["unet:7:down"][None]},
             "transposed": {**src, "unet:7:up": src["unet:7:down"], "unet:7:down": src["unet:7:up"]}}
    meta = {"unet": json.dumps(UNET), "text_encoder": json.dumps(TEXT), "<s1>": "<embed>"}
    for name, tensors in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        safetensors.torch.save_file(tensors, path, metadata=meta)
        out = str(tmp_path / "o")
        r = run_cli("convert", setup["ref"], out, "--lora", path)
        assert r.code == 2 and path in r.err and len(r.err.strip().splitlines()) == 1, (name, r.err)
        assert not os.path.exists(out) and leftovers(tmp_path) == []
    for name, targets, words in (("targets", '["Transformer2DModel"]', "Transformer2DModel"),
                                 ("nested", "[" * 100_000, "does not list the target classes")):
        path = str(tmp_path / f"{name}.safetensors")
        safetensors.torch.save_file(src, path, metadata={**meta, "unet": targets})
        r = run_cli("inspect", path)
        assert r.code == 0 and words in r.out, r.out + r.err
    pt = str(tmp_path / "odd.pt")
    torch.save([torch.zeros(4, 2, 2), torch.zeros(2, 4, 4)], pt)
    r = run_cli("convert", setup["ref"], str(tmp_path / "o"), "--lora", pt)
    assert r.code == 2 and "not a LoRA's up and down" in r.err and len(r.err.strip().splitlines()) == 1, r.err
