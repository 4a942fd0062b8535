"""Hugging Face sources: a Hub served on 127.0.0.1 (``HF_ENDPOINT``) from which only what a conversion reads is
fetched, and Hub caches built by hand (``HF_HUB_CACHE`` + ``HF_HUB_OFFLINE=1``) that convert with no server."""

from __future__ import annotations

import hashlib
import os

import models
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
from conftest import run_cli
from servers import Server

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO, LORA_REPO = "sdport-test/tiny-sd", "sdport-test/tiny-lora"


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> dict:
    """A tiny SD1 pipeline as a Hub repo would hold it: plus a root single file, fp16 variants, a safety checker."""
    root = tmp_path_factory.mktemp("hub")
    folder = models.save_pipeline("sd1", str(root / "pipe"))
    files = _files(folder)
    assert run_cli("convert", folder, root / "single.safetensors").code == 0
    files["v1-5-pruned.safetensors"] = (root / "single.safetensors").read_bytes()
    for comp in ("unet", "vae", "text_encoder"):
        stem = "model" if comp == "text_encoder" else "diffusion_pytorch_model"
        sd = safetensors.torch.load_file(os.path.join(folder, comp, f"{stem}.safetensors"))
        half = root / f"{comp}.fp16.safetensors"
        safetensors.torch.save_file({k: v.half() for k, v in sd.items()}, str(half))
        files[f"{comp}/{stem}.fp16.safetensors"] = half.read_bytes()
    files["safety_checker/model.safetensors"] = b"\0" * 4096
    files["safety_checker/config.json"] = b"{}"
    unet = safetensors.torch.load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    key = next(k for k in unet if k.endswith("attn1.to_q.weight"))
    rng = np.random.default_rng(3)
    up = rng.standard_normal((unet[key].shape[0], 2), np.float32)
    down = rng.standard_normal((2, unet[key].shape[1]), np.float32)
    lora_path = root / "lora.safetensors"
    module = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
    safetensors.numpy.save_file({f"{module}.lora_up.weight": up, f"{module}.lora_down.weight": down},
                                str(lora_path))
    return {"folder": folder, "files": files, "lora": lora_path.read_bytes(), "key": key, "delta": up @ down,
            "single": str(root / "single.safetensors")}


@pytest.fixture()
def hub(repo):
    with Server() as s:
        s.hub[REPO] = (COMMIT, repo["files"])
        s.hub[LORA_REPO] = ("f" * 40, {"pytorch_lora_weights.safetensors": repo["lora"], "README.md": b"# lora"})
        yield s


def _env(tmp_path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf"), SDPORT_CACHE=str(tmp_path / "sdport"),
               HF_HUB_DISABLE_TELEMETRY="1", **more)
    return env


def _tensors(path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(path))


def test_a_diffusers_repo_fetches_only_what_the_conversion_reads(hub, repo, tmp_path) -> None:
    env = _env(tmp_path, HF_ENDPOINT=hub.url)
    out = tmp_path / "out.safetensors"
    r = run_cli("convert", REPO, out, "-q", env=env)
    assert r.code == 0, r.err
    fetched = {p.split("/resolve/")[1].split("/", 1)[1] for p in hub.gets(f"/{REPO}/resolve/")}
    want = {p for p in repo["files"] if p == "model_index.json" or (
        p.split("/")[0] in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") and ".fp16." not in p)}
    assert fetched == want
    ours, direct = _tensors(out), _tensors(repo["single"])
    assert ours.keys() == direct.keys() and all(np.array_equal(ours[k], direct[k]) for k in ours)
    with safetensors.safe_open(str(out), "np") as f:
        assert f.metadata()["sdport.source"] == f"hf://{REPO}"


def test_the_fp16_variant_only_with_variant(hub, repo, tmp_path) -> None:
    env = _env(tmp_path, HF_ENDPOINT=hub.url)
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", f"hf://{REPO}@main", out, "--variant", "fp16", "-q", env=env).code == 0
    fetched = {p.rsplit("/", 1)[-1] for p in hub.gets(f"/{REPO}/resolve/") if p.endswith(".safetensors")}
    assert fetched == {"diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"}
    assert {a.dtype for k, a in _tensors(out).items() if k.endswith(".weight")} == {np.dtype(np.float16)}


def test_a_lora_repo_resolves_to_its_adapter_file(hub, repo, tmp_path) -> None:
    env = _env(tmp_path, HF_ENDPOINT=hub.url)
    out = tmp_path / "merged.safetensors"
    r = run_cli("convert", repo["single"], out, "--lora", f"{LORA_REPO}:0.5", "-q", env=env)
    assert r.code == 0, r.err
    got, base = _tensors(out), _tensors(repo["single"])
    changed = [k for k in base if not np.array_equal(got[k], base[k])]
    assert changed == ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    np.testing.assert_allclose(got[changed[0]], base[changed[0]] + 0.5 * repo["delta"], rtol=1e-5, atol=1e-6)


def _hand_built_cache(root, repo: str, files: dict[str, bytes], commit: str) -> None:
    """The Hub cache layout, without huggingface_hub: blobs by hash, a snapshot of relative symlinks, a ref."""
    base = root / f"models--{repo.replace('/', '--')}"
    for path, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit)


def test_a_hand_built_hub_cache_converts_offline_and_a_tampered_blob_is_refused(repo, tmp_path) -> None:
    wanted = {p: d for p, d in repo["files"].items() if not p.startswith("safety_checker")}
    _hand_built_cache(tmp_path / "hf", REPO, wanted, COMMIT)
    _hand_built_cache(tmp_path / "hf", LORA_REPO, {"pytorch_lora_weights.safetensors": repo["lora"]}, "e" * 40)
    env = _env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    out = tmp_path / "out.safetensors"
    for source in (REPO, f"https://huggingface.co/{REPO}", f"hf://{REPO}@{COMMIT}"):
        r = run_cli("convert", source, out, "--force", "-q", "--lora", LORA_REPO, env=env)
        assert r.code == 0, (source, r.err)
    r = run_cli("inspect", f"hf://{REPO}/unet", "--json", env=env)
    assert r.code == 0 and '"family": "unet"' in r.out
    blob = tmp_path / "hf" / f"models--{REPO.replace('/', '--')}" / "blobs" / hashlib.sha256(
        wanted["vae/diffusion_pytorch_model.safetensors"]).hexdigest()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(data)
    r = run_cli("convert", REPO, tmp_path / "bad.safetensors", env=env)
    assert r.code == 2 and "vae/diffusion_pytorch_model.safetensors: SHA-256" in r.err
    assert not (tmp_path / "bad.safetensors").exists() and not blob.exists()
    r = run_cli("convert", "sdport-test/not-cached", tmp_path / "x.safetensors", env=env)
    assert r.code == 2 and "not in the Hugging Face cache, and sdport is offline" in r.err


def test_a_missing_repo_and_a_repo_with_several_files_are_one_line(hub, repo, tmp_path) -> None:
    env = _env(tmp_path, HF_ENDPOINT=hub.url)
    r = run_cli("inspect", "sdport-test/missing", env=env)
    assert r.code == 2 and "no such Hugging Face repo" in r.err and len(r.err.strip().splitlines()) == 1
    hub.hub["sdport-test/two"] = ("1" * 40, {"a.safetensors": repo["lora"], "b.safetensors": repo["lora"]})
    r = run_cli("inspect", "sdport-test/two", env=env)
    assert r.code == 2 and "holds 2 weight files" in r.err and "hf://sdport-test/two/a.safetensors" in r.err
    assert run_cli("inspect", "hf://sdport-test/two/b.safetensors", env=env).code == 0
