"""``sdport batch``: onnx-web's extras.json run end to end on tiny real-structure models, against diffusers' own
pipelines with the same LoRA and embeddings loaded by diffusers; sdport's manifest, validation, idempotence,
interruption, and the Ray executor on a local cluster (a worker killed mid-entry).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import run_cli, sha256
from servers import Server, civitai_version

import sdport

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("jsonschema")
ort = pytest.importorskip("onnxruntime")
import models  # noqa: E402
from test_lora import kohya_file, make_lora  # noqa: E402

warnings.filterwarnings("ignore")
PROMPT = "a <cat-toy> riding foo-style-0 foo-style-1"
ORACLE_PROMPT = "a <cat-toy> riding foo-style foo-style_1"  # diffusers names an A1111 embedding's vectors so


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("batch")
    ref = models.save_pipeline("sd1", str(root / "ref"))
    sdport.convert(ref, str(root / "sd1.safetensors"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(ref, safety_checker=None)
    kohya_file(make_lora(pipe), str(root / "style.safetensors"))
    g = torch.Generator().manual_seed(5)
    torch.save({"<cat-toy>": torch.randn(64, generator=g)}, root / "learned_embeds.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 64, generator=g)},
                "name": "foo", "step": 100}, root / "foo.pt")
    xl = models.save_pipeline("sdxl-base", str(root / "xl-ref"))
    sdport.convert(xl, str(root / "xl.safetensors"))
    (root / "esrgan.pth").write_bytes(b"an upscaler sdport does not convert")
    return {"root": root, "ref": ref, "pipe": pipe, "xl": xl}


def _extras(files: dict, civitai_hash: str) -> dict:
    return {
        "diffusion": [
            {"name": "diffusion-styled", "source": "sd1.safetensors", "format": "safetensors", "version": "v1",
             "loras": [{"name": "style", "source": "style.safetensors", "weight": 0.8, "type": "lora",
                        "model": "sd-scripts"}],
             "inversions": [{"name": "cat", "source": "learned_embeds.bin", "token": "<cat-toy>", "model": "concept"},
                            {"name": "foo", "source": "foo.pt", "token": "foo-style", "model": "embeddings"}],
             "hash": sha256(files["root"] / "sd1.safetensors")},
            {"name": "civitai-sd1", "source": "civitai://6266", "hash": civitai_hash, "half": True},
            {"name": "diffusion-xl", "source": "xl.safetensors", "pipeline": "txt2img-sdxl", "version": "v1"},
            {"name": "diffusion-badhash", "source": "sd1.safetensors", "hash": "ab" * 32},
            ["diffusion-legacy", "./sd1.safetensors", False, False, 16],
        ],
        "networks": [{"name": "style", "source": "style.safetensors", "type": "lora", "model": "sd-scripts"},
                     {"name": "foo", "source": "foo.pt", "model": "embeddings"}],
        "upscaling": [{"name": "upscaling-esrgan", "source": "esrgan.pth", "scale": 4}],
    }


@pytest.fixture(scope="module")
def run(files, tmp_path_factory) -> dict:
    root = files["root"]
    data = (root / "sd1.safetensors").read_bytes()
    with Server() as server:
        server.files["sd1.safetensors"] = data
        server.civitai["6266"] = civitai_version("6266", {"sd1.safetensors": (data, {"type": "Model"})}, server.url)
        env = {**os.environ, "SDPORT_CACHE": str(root / "cache"), "SDPORT_CIVITAI_ENDPOINT": server.url}
        (root / "extras.json").write_text(json.dumps(_extras(files, sha256(root / "sd1.safetensors")[:10])))
        out = tmp_path_factory.mktemp("models")
        first = run_cli("batch", root / "extras.json", "--out", out, "--jobs", "2", env=env, timeout=600)
        second = run_cli("batch", root / "extras.json", "--out", out, "--json", env=env, timeout=600)
    return {"out": out, "first": first, "second": second, "env": env}


def test_every_entry_is_done_or_fails_by_name(run, files) -> None:
    first = run["first"]
    assert first.code == 2, first.err
    record = json.loads((run["out"] / "sdport-batch.json").read_text())
    status = {e["name"]: e["status"] for e in record["entries"]}
    assert status == {"diffusion-styled": "ok", "diffusion-civitai-sd1": "ok", "diffusion-xl": "ok",
                      "diffusion-badhash": "failed", "diffusion-legacy": "ok", "style": "ok", "foo": "ok",
                      "upscaling-esrgan": "ok"}
    bad = next(e for e in record["entries"] if e["name"] == "diffusion-badhash")
    assert "is not the manifest's hash" in bad["error"] and 'diffusion[3] "diffusion-badhash"' in first.out
    assert not (run["out"] / "diffusion-badhash").exists() and not (run["out"] / ".sdport-batch").exists()
    assert sha256(run["out"] / "lora" / "style.safetensors") == sha256(files["root"] / "style.safetensors")
    assert (run["out"] / "inversion" / "foo.pt").exists() and (run["out"] / ".cache" / "upscaling-esrgan.pth").exists()
    assert "kept, not converted" in first.out
    xl = next(e for e in record["entries"] if e["name"] == "diffusion-xl")
    assert xl["notes"] == ["version v1 says sd1, the file is sdxl-base: converted as sdxl-base"]
    hashed = (run["out"] / "diffusion-styled" / "hash.txt").read_text().strip()
    assert hashed == sha256(files["root"] / "sd1.safetensors")
    for e in record["entries"]:
        assert e["peak_rss"] > 0 and e["seconds"] > 0


def test_second_run_skips_what_succeeded(run) -> None:
    second = json.loads(run["second"].out)
    assert run["second"].code == 2
    status = {e["name"]: e["status"] for e in second["entries"]}
    assert status.pop("diffusion-badhash") == "failed"
    assert set(status.values()) == {"skipped"}


def test_export_gives_the_image_of_diffusers_with_the_same_lora_and_embeddings(run, files) -> None:
    onnx_pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(run["out"] / "diffusion-styled"),
                                                                       provider="CPUExecutionProvider")
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(files["ref"], safety_checker=None)
    torch_pipe.load_lora_weights(str(files["root"] / "style.safetensors"))
    torch_pipe.fuse_lora(lora_scale=0.8)
    torch_pipe.load_textual_inversion(str(files["root"] / "learned_embeds.bin"))
    torch_pipe.load_textual_inversion(str(files["root"] / "foo.pt"), token="foo-style")
    ids = onnx_pipe.tokenizer(PROMPT).input_ids
    assert ids[2] == 49408 and ids[4:6] == [49409, 49410]  # one token each: the prompt uses the new tokens
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", guidance_scale=7.5)
    got = onnx_pipe(PROMPT, latents=latents, **kw).images
    want = torch_pipe(ORACLE_PROMPT, latents=torch.tensor(latents), **kw).images
    plain = diffusers.StableDiffusionPipeline.from_pretrained(files["ref"], safety_checker=None)
    without = plain("a riding", latents=torch.tensor(latents), **kw).images
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - without).max() > 1e-2  # the LoRA and the embeddings changed the image


@pytest.mark.parametrize("name, tol", [("diffusion-legacy", 1e-4), ("diffusion-civitai-sd1", 0.05)])
def test_plain_entries_give_the_torch_image(run, files, name, tol) -> None:
    onnx_pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(run["out"] / name),
                                                                       provider="CPUExecutionProvider")
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", guidance_scale=7.5)
    dtype = onnx_pipe.unet.model.get_inputs()[0].type
    got = onnx_pipe("a photo of a red cat", latents=latents.astype(np.float16 if "16" in dtype else np.float32),
                    **kw).images
    want = files["pipe"]("a photo of a red cat", latents=torch.tensor(latents), **kw).images
    assert got.shape == want.shape and np.abs(got.astype(np.float32) - want).max() < tol


def test_onnx_web_token_names(run) -> None:
    tok = json.loads((run["out"] / "diffusion-styled" / "tokenizer" / "added_tokens.json").read_text())
    assert tok == {"<cat-toy>": 49408, "foo-style-0": 49409, "foo-style-1": 49410, "foo-style": 49411,
                   "foo-style-all": 49412}
    sess = ort.InferenceSession(str(run["out"] / "diffusion-styled" / "text_encoder" / "model.onnx"))
    ids = np.array([[49406, 49411, 49412, 49409, 49410] + [49407] * 72], dtype=np.int32)
    hidden = sess.run(None, {"input_ids": ids})[0]
    assert hidden.shape == (1, 77, 64) and np.isfinite(hidden).all()


def test_civitai_entry_is_fp16_and_sdxl_is_optimum_layout(run, files) -> None:
    civitai = run["out"] / "diffusion-civitai-sd1"
    sess = ort.InferenceSession(str(civitai / "unet" / "model.onnx"))
    assert sess.get_inputs()[0].type == "tensor(float16)"
    index = json.loads((run["out"] / "diffusion-xl" / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusionXLPipeline"
    sess = ort.InferenceSession(str(run["out"] / "diffusion-xl" / "text_encoder_2" / "model.onnx"))
    ids = np.array([[49406, 320, 1125, 49407] + [0] * 73], dtype=np.int64)
    xl = diffusers.StableDiffusionXLPipeline.from_pretrained(files["xl"])
    want = xl.text_encoder_2(torch.tensor(ids), output_hidden_states=True).text_embeds.detach().numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: ids.astype(np.int32 if "int32" in sess.get_inputs()[0].type
                                                                    else np.int64)})[0]
    assert np.abs(got - want).max() < 1e-4


def test_legacy_tuple_takes_its_opset(run) -> None:
    import onnx

    model = onnx.load(str(run["out"] / "diffusion-legacy" / "text_encoder" / "model.onnx"), load_external_data=False)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {16}


def test_invalid_manifest_names_every_entry_and_runs_nothing(tmp_path) -> None:
    doc = {"diffusion": [{"name": "diffusion-a", "source": "x.safetensors", "half": "yes"},
                         {"name": "diffusion-b"}],
           "networks": [{"name": "l", "source": "x", "type": "lora", "weight": "strong"}], "extra": 1}
    (tmp_path / "extras.json").write_text(json.dumps(doc))
    r = run_cli("batch", tmp_path / "extras.json", "--out", tmp_path / "out")
    assert r.code == 2 and not (tmp_path / "out").exists()
    lines = r.err.strip().splitlines()
    assert any('diffusion[0] "diffusion-a".half' in x for x in lines)
    assert any('diffusion[1] "diffusion-b"' in x and "source" in x for x in lines)
    assert any('networks[0] "l".weight' in x for x in lines)
    assert any("extra" in x for x in lines)
    (tmp_path / "bad.json").write_text('{"diffusion": [{"name": "../x", "source": "s"}]}')
    r = run_cli("batch", tmp_path / "bad.json", "--out", tmp_path / "out")
    assert r.code == 2 and "not a plain file name" in r.err


@pytest.mark.parametrize("doc, words", [
    ({"diffusion": [["a", 5]]}, "source is not a string"),
    ({"diffusion": [["a"]]}, "no source"),
    ({"diffusion": [["a", "b.safetensors", True, True, "x"]]}, "opset 'x'"),
    ({"diffusion": [{"name": "a", "source": "s", "opset": 99}]}, "opset 99"),
    ({"diffusion": [["a", "s"], {"name": "diffusion-a", "source": "t"}]}, "the name is"),
    ({"sources": [{"name": "x", "source": "s", "dest": ".sdport-batch"}]}, "not a place inside"),
    ({"sources": [{"name": "x", "source": "s", "dest": "diffusion-a"}], "diffusion": [["a", "s"]]}, "is inside"),
    ({"sdport": 1, "models": [{"name": "a", "source": "s", "outputs": [{"path": "."}]}]}, "not a place inside"),
])
def test_manifests_that_would_misbehave_are_refused(tmp_path, doc, words) -> None:
    (tmp_path / "m.json").write_text(json.dumps(doc))
    r = run_cli("batch", tmp_path / "m.json", "--out", tmp_path / "out", "--dry-run")
    assert r.code == 2 and words in r.err, r.err
    assert all(line.startswith("sdport: error: ") for line in r.err.strip().splitlines())


def test_hostile_yaml_and_json_constants_are_refused(tmp_path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\ndiffusion: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    r = run_cli("batch", tmp_path / "bomb.yaml", "--dry-run", "--out", tmp_path, timeout=30)
    assert r.code == 2 and "aliases" in r.err
    (tmp_path / "nan.json").write_text('{"diffusion": [{"name": "a", "source": "s", "opset": NaN}]}')
    r = run_cli("batch", tmp_path / "nan.json", "--dry-run", "--out", tmp_path)
    assert r.code == 2 and "NaN is not a JSON number" in r.err
    (tmp_path / "file").write_text("")
    r = run_cli("batch", tmp_path / "nan.json", "--out", tmp_path / "file" / "sub")
    assert r.code == 2


def test_an_output_onto_its_own_input_is_refused(files, tmp_path) -> None:
    shutil.copy(files["root"] / "sd1.safetensors", tmp_path / "m.safetensors")
    before = sha256(tmp_path / "m.safetensors")
    doc = {"sdport": 1, "models": [{"name": "a", "source": str(tmp_path / "m.safetensors"),
                                    "outputs": [{"path": "m.safetensors", "dtype": "fp16"}]}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    result = sdport.batch(tmp_path / "m.json", tmp_path)
    assert not result.ok and "would replace the entry's input" in result.entries[0].error
    assert sha256(tmp_path / "m.safetensors") == before


def test_dry_run_and_only(files, tmp_path) -> None:
    two = {"diffusion": [["a", "sd1.safetensors"], ["b", "sd1.safetensors"]]}
    (files["root"] / "two.json").write_text(json.dumps(two))
    r = run_cli("batch", files["root"] / "two.json", "--out", tmp_path, "--dry-run")
    assert r.code == 0 and "diffusion-a" in r.out and "diffusion-b" in r.out and not os.listdir(tmp_path)
    r = run_cli("batch", files["root"] / "two.json", "--out", tmp_path, "--only", "b", "--json")
    assert r.code == 0, r.err
    assert [e["name"] for e in json.loads(r.out)["entries"]] == ["diffusion-b"]
    assert (tmp_path / "diffusion-b" / "unet" / "model.onnx").exists() and not (tmp_path / "diffusion-a").exists()
    r = run_cli("batch", files["root"] / "two.json", "--out", tmp_path, "--only", "zzz")
    assert r.code == 2 and "no such entry" in r.err


def _own_manifest(files: dict) -> dict:
    return {"sdport": 1, "models": [
        {"name": "a", "source": "sd1.safetensors", "loras": ["style.safetensors:0.5"],
         "outputs": [{"path": "a/model-fp16.safetensors", "dtype": "fp16"},
                     {"path": "a/diffusers", "to": "diffusers"}]},
        {"name": "b", "source": files["ref"], "outputs": [{"path": "b.ckpt"}]},
        {"name": "c", "source": "sd1.safetensors", "outputs": [{"path": "c-onnx", "to": "onnx"}]}]}


def test_sdports_own_manifest_equals_the_same_conversions(files, tmp_path) -> None:
    import yaml

    (files["root"] / "own.yaml").write_text(yaml.safe_dump(_own_manifest(files)))
    result = sdport.batch(files["root"] / "own.yaml", tmp_path / "out")
    assert result.ok and [e.status for e in result.entries] == ["ok"] * 3
    sdport.convert(files["root"] / "sd1.safetensors", tmp_path / "want.safetensors", dtype="fp16",
                   loras=[f"{files['root']}/style.safetensors:0.5"])
    assert sha256(tmp_path / "out" / "a" / "model-fp16.safetensors") == sha256(tmp_path / "want.safetensors")
    assert (tmp_path / "out" / "a" / "diffusers" / "model_index.json").exists()
    again = sdport.batch(files["root"] / "own.yaml", tmp_path / "out", force=True, only=["b"])
    assert [e.status for e in again.entries] == ["ok"]


def test_hashes_as_manifests_carry_them(files, tmp_path) -> None:
    import hashlib

    st = files["root"] / "sd1.safetensors"
    with open(st, "rb") as f:
        f.seek(0x100000)
        old = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]  # A1111's first model hash
    models = [{"name": n, "source": str(st), "hash": h, "outputs": [{"path": n, "to": "diffusers"}]}
              for n, h in (("full", sha256(st)), ("autov2", sha256(st)[:10]), ("old", old), ("wrong", "0" * 10))]
    (tmp_path / "m.json").write_text(json.dumps({"sdport": 1, "models": models}))
    result = sdport.batch(tmp_path / "m.json", tmp_path / "out")
    assert [e.status for e in result.entries] == ["ok", "ok", "ok", "failed"]
    assert "is not the manifest's hash" in result.entries[3].error and not (tmp_path / "out" / "wrong").exists()


def test_jobs_are_bounded_by_memory_as_well_as_count(files, tmp_path, monkeypatch) -> None:
    from sdport.batching import local

    models = [{"name": n, "source": str(files["root"] / "sd1.safetensors"),
               "outputs": [{"path": n, "to": "diffusers"}]} for n in "abc"]
    (tmp_path / "m.json").write_text(json.dumps({"sdport": 1, "models": models}))

    def overlaps(result) -> bool:
        spans = sorted((e.started, e.started + e.seconds) for e in result.entries)
        return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))

    assert overlaps(sdport.batch(tmp_path / "m.json", tmp_path / "wide", jobs=3))
    monkeypatch.setattr(local, "available_memory", lambda: int(local.STREAM_PEAK * 1.5 / 0.8))
    assert not overlaps(sdport.batch(tmp_path / "m.json", tmp_path / "narrow", jobs=3))


def test_ctrl_c_removes_the_running_entry_and_a_rerun_continues(files, tmp_path) -> None:
    three = {"diffusion": [["a", "sd1.safetensors"], ["b", "xl.safetensors"], ["c", "sd1.safetensors"]]}
    (files["root"] / "three.json").write_text(json.dumps(three))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sdport", "batch", str(files["root"] / "three.json"), "--out", str(out)]
    p = subprocess.Popen(argv,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the first entry is done and the second is under way
        staged = list((out / ".sdport-batch").glob("diffusion-b.*")) if (out / ".sdport-batch").exists() else []
        if staged and (out / "diffusion-a").exists():
            break
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert not (out / ".sdport-batch").exists() and not (out / "diffusion-b").exists()
    record = json.loads((out / "sdport-batch.json").read_text())
    assert [e["name"] for e in record["entries"] if e["status"] == "ok"] == ["diffusion-a"]
    r = run_cli("batch", files["root"] / "three.json", "--out", out, "--json", timeout=600)
    assert r.code == 0, r.err
    assert [e["status"] for e in json.loads(r.out)["entries"]] == ["skipped", "ok", "ok"]


def test_a_killed_local_worker_fails_its_entry_and_the_batch_goes_on(files, tmp_path) -> None:
    import threading

    (files["root"] / "own.json").write_text(json.dumps(_own_manifest(files)))
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(r=sdport.batch(files["root"] / "own.json", tmp_path)))
    thread.start()
    staging, killed = tmp_path / ".sdport-batch", None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        for d in (staging.glob("c.*") if staging.exists() else []):
            killed = int(d.name.rsplit(".", 1)[1])
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.02)
    thread.join(300)
    assert killed is not None
    assert [e.status for e in box["r"].entries] == ["ok", "ok", "failed"]
    assert "worker process died" in box["r"].entries[2].error and not (tmp_path / "c-onnx").exists()
    again = sdport.batch(files["root"] / "own.json", tmp_path)
    assert [e.status for e in again.entries] == ["skipped", "skipped", "ok"]


def _zip_members(path) -> dict[str, bytes]:
    """A torch zip's members but its random serialization id (torch.save writes a new one each time too)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}


def test_ray_executor_survives_a_killed_worker_and_equals_local(files, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    (files["root"] / "own.json").write_text(json.dumps(_own_manifest(files)))
    local = sdport.batch(files["root"] / "own.json", tmp_path / "local")
    assert local.ok
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        import threading

        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(r=sdport.batch(
            files["root"] / "own.json", tmp_path / "ray", executor="ray")))
        thread.start()
        staging, killed = tmp_path / "ray" / ".sdport-batch", None
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and thread.is_alive():
            for d in (staging.glob("c.*") if staging.exists() else []):
                killed = int(d.name.rsplit(".", 1)[1])
                os.kill(killed, signal.SIGKILL)  # the worker running entry c dies mid-export
                break
            time.sleep(0.02)
        thread.join(600)
    finally:
        ray.shutdown()
    assert killed is not None
    result = box["r"]
    assert result.ok and [e.status for e in result.entries] == ["ok"] * 3
    for rel in ("a/model-fp16.safetensors", "a/diffusers/unet/diffusion_pytorch_model.safetensors",
                "c-onnx/unet/model.onnx", "c-onnx/text_encoder/model.onnx"):
        assert sha256(tmp_path / "ray" / rel) == sha256(tmp_path / "local" / rel), rel
    assert _zip_members(tmp_path / "ray" / "b.ckpt") == _zip_members(tmp_path / "local" / "b.ckpt")
    assert not staging.exists()
    shutil.rmtree(tmp_path)
