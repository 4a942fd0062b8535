"""Model sources: URLs, civitai:// and Hugging Face repos resolved against servers this test starts on 127.0.0.1 —
resumed, retried, refused in one line, verified by SHA-256, cached, shared between processes, usable offline, and
never showing a token."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from conftest import run_cli
from servers import Server, civitai_version

import sdport
from sdport.errors import HashMismatchError, SourceError

TOKEN = "sk-civitai-5ecret-7oken"
BLOB = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory, demo_ckpt) -> bytes:
    out = tmp_path_factory.mktemp("src") / "demo.safetensors"
    sdport.convert(demo_ckpt, out)
    return out.read_bytes()


@pytest.fixture()
def server(model_bytes):
    with Server() as s:
        s.files.update({"blob.bin": BLOB, "model.safetensors": model_bytes, "pruned.safetensors": model_bytes,
                        "full.ckpt": BLOB, "vae.safetensors": BLOB[:5000]})
        s.civitai["6266"] = civitai_version("6266", {
            "full.ckpt": (BLOB, {"type": "Model", "format": "PickleTensor", "size": "full", "fp": "fp32"}),
            "pruned.safetensors": (model_bytes, {"type": "Pruned Model", "format": "SafeTensor", "size": "pruned",
                                                 "fp": "fp16"}),
            "vae.safetensors": (BLOB[:5000], {"type": "VAE", "format": "SafeTensor"})}, s.url)
        s.civitai["7"] = civitai_version("7", {"model.safetensors": (model_bytes, {"type": "Model"})}, s.url,
                                         sha={"model.safetensors": "0" * 64})
        yield s


@pytest.fixture()
def env(tmp_path, server, monkeypatch) -> dict[str, str]:
    values = {"SDPORT_CACHE": str(tmp_path / "cache"), "SDPORT_CIVITAI_ENDPOINT": server.url,
              "CIVITAI_TOKEN": TOKEN, "SDPORT_HTTP_TIMEOUT": "5"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SDPORT_OFFLINE", raising=False)
    return {**os.environ, **values}


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_dropped_connection_resumes_from_the_right_byte_and_verifies(server, env) -> None:
    path = sdport.resolve(f"{server.url}/drop/blob.bin")
    assert _read(path) == BLOB and path.name == "blob.bin"
    gets = [r for r in server.log if r["method"] == "GET"]
    assert [r["start"] for r in gets] == [0, len(BLOB) // 2]
    assert gets[1]["headers"]["Range"] == f"bytes={len(BLOB) // 2}-" and "If-Range" in gets[1]["headers"]


def test_a_partial_left_by_a_crash_resumes_and_restarts_when_range_is_ignored(server, env, tmp_path) -> None:
    from sdport.sources.cache import Cache
    from sdport.sources.http import redact

    for mode, starts in (("plain", [1000]), ("norange", [0]), ("changed", [0])):
        url = f"{server.url}/{mode}/blob.bin"
        part = Cache().partial(redact(url))
        with open(part, "wb") as f:
            f.write(BLOB[:1000])
        with open(part[:-5] + ".json", "w") as f:
            etag = f'"{hashlib.sha256(BLOB).hexdigest()[:16]}"'
            json.dump({"url": redact(url), "validator": etag, "etag": etag}, f)
        server.log.clear()
        assert _read(sdport.resolve(url)) == BLOB, mode
        assert [r["start"] for r in server.log if r["method"] == "GET"] == starts, mode
        assert not os.path.exists(part)


def test_retries_honour_retry_after_and_survive_a_500(server, env) -> None:
    for code in (429, 500):
        assert _read(sdport.resolve(f"{server.url}/status/{code}/blob.bin")) == BLOB
        assert len([r for r in server.log if f"/status/{code}/" in r["path"]]) == 2


@pytest.mark.parametrize("code,words", [(401, "access refused (HTTP 401)"), (403, "access refused (HTTP 403)"),
                                        (404, "not found (HTTP 404)")])
def test_refusals_are_one_line_at_once(server, env, code, words, tmp_path) -> None:
    r = run_cli("inspect", f"{server.url}/status/{code}/blob.bin", env=env)
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert len([x for x in server.log if f"/status/{code}/" in x["path"]]) == 1


def test_a_body_always_cut_short_fails_after_the_retries(server, env) -> None:
    with pytest.raises(SourceError, match=r"download failed 5 times \(the server sent 150,000 of 300,000 bytes\)"):
        sdport.resolve(f"{server.url}/short/blob.bin")


def test_only_loopback_may_use_plain_http_and_other_schemes_are_refused(env) -> None:
    for url, words in (("http://example.com/x.safetensors", "plain http is only allowed to this machine"),
                       ("ftp://127.0.0.1/x", "unsupported URL scheme 'ftp'"),
                       ("file:///etc/passwd", "unsupported URL scheme 'file'"),
                       ("civitai://abc", "invalid Civitai model version id"),
                       ("civitai://1?type=../../x&evil=1", "unknown Civitai query field 'evil'")):
        with pytest.raises(SourceError, match=words.replace("(", r"\(")):
            sdport.resolve(url)


def test_civitai_picks_the_file_the_query_names_and_checks_its_hash(server, env, model_bytes) -> None:
    pruned = sdport.resolve("civitai://6266?type=Pruned%20Model&format=SafeTensor")
    assert _read(pruned) == model_bytes and pruned.name == "pruned.safetensors"
    api = [r for r in server.log if r["path"].startswith("/api/v1/model-versions/6266")]
    assert api and api[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    # the download redirects to another host (localhost): the token is not sent there
    moved = [r for r in server.log if r["path"] == "/plain/pruned.safetensors"]
    assert moved and "Authorization" not in moved[0]["headers"]
    assert _read(sdport.resolve("civitai://6266")) == BLOB  # the primary file
    assert _read(sdport.resolve("civitai://6266?type=VAE")) == BLOB[:5000]
    with pytest.raises(SourceError, match="no file of this version matches the query .*type=VAE, format=SafeTensor"):
        sdport.resolve("civitai://6266?format=Diffusers")


def test_a_wrong_hash_leaves_nothing_in_the_cache(server, env, tmp_path) -> None:
    with pytest.raises(HashMismatchError, match=r"civitai://7: the download does not match its source"):
        sdport.resolve("civitai://7")
    cache = tmp_path / "cache"
    assert not os.listdir(cache / "partial") and not (cache / "files").exists()
    r = run_cli("convert", "civitai://7", tmp_path / "out.safetensors", env=env)
    assert r.code == 2 and "does not match its source" in r.err and not (tmp_path / "out.safetensors").exists()


def test_a_cached_source_needs_no_server_and_offline_names_what_is_missing(server, env, tmp_path,
                                                                           model_bytes) -> None:
    first = sdport.resolve("civitai://6266?format=SafeTensor&type=Pruned%20Model")
    calls = len(server.log)
    offline = {**env, "SDPORT_CIVITAI_ENDPOINT": "http://127.0.0.1:9", "SDPORT_OFFLINE": "1"}
    r = run_cli("inspect", "civitai://6266?type=Pruned%20Model&format=SafeTensor", "--json", env=offline)
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["family"] == "sd1" and report["location"] == str(first)
    assert report["sha256"] == hashlib.sha256(model_bytes).hexdigest() and len(server.log) == calls
    r = run_cli("--offline", "inspect", "civitai://6266?type=VAE", env={**env, "SDPORT_CIVITAI_ENDPOINT": "x"})
    assert r.code == 2 and "not in sdport's cache, and sdport is offline" in r.err


def test_two_processes_fetching_one_source_download_it_once(server, env, tmp_path) -> None:
    server.files["slow.bin"] = BLOB
    code = "import sdport, sys; print(sdport.resolve(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{server.url}/slow/slow.bin"], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1] and _read(outs[0]) == BLOB
    assert len(server.gets("/slow/")) == 1


def test_a_downloaded_model_converts_and_records_where_it_came_from(server, env, tmp_path, model_bytes) -> None:
    out = tmp_path / "out.safetensors"
    r = run_cli("convert", "civitai://6266?type=Pruned%20Model&format=SafeTensor", out, "--dtype", "fp16",
                "--lora", f"{server.url}/plain/blob.bin:0.5", env=env)
    assert r.code == 2 and "blob.bin" in r.err  # not an adapter: the downloaded file is read, by content
    r = run_cli("convert", "civitai://6266?type=Pruned%20Model&format=SafeTensor", out, "--dtype", "fp16", env=env)
    assert r.code == 0, r.err
    with safetensors.safe_open(str(out), "np") as f:
        meta = f.metadata()
    assert meta["sdport.source"] == "civitai://6266?format=SafeTensor&type=Pruned+Model"
    assert meta["sdport.source_sha256"] == hashlib.sha256(model_bytes).hexdigest()


def test_tokens_are_never_shown_stored_or_written(server, env, tmp_path) -> None:
    url = f"{server.url}/plain/model.safetensors?token={TOKEN}&X-Amz-Signature={TOKEN}"
    outs = [run_cli("convert", url, tmp_path / "a.safetensors", env=env),
            run_cli("convert", "civitai://6266?type=Pruned%20Model", tmp_path / "b", env=env),
            run_cli("inspect", f"{server.url}/status/401/blob.bin?token={TOKEN}", env=env),
            run_cli("cache", "list", env=env)]
    assert [r.code for r in outs] == [0, 0, 2, 0]
    assert all(TOKEN not in r.out + r.err for r in outs)
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), os.path.join(folder, name)


def test_cache_list_info_and_prune(server, env, tmp_path) -> None:
    sdport.resolve(f"{server.url}/plain/blob.bin")
    r = run_cli("cache", "list", env=env)
    assert r.code == 0 and f"{server.url}/plain/blob.bin" in r.out and "300,000 B" in r.out
    r = run_cli("cache", "info", f"{server.url}/plain/blob.bin", env=env)
    assert r.code == 0 and hashlib.sha256(BLOB).hexdigest() in r.out
    stale = tmp_path / "cache" / "partial" / "dead.part"
    stale.write_bytes(b"x" * 10)
    r = run_cli("cache", "prune", env=env)
    assert r.code == 0 and "removed 0 sources, freed 10 bytes" in r.out and not stale.exists()
    r = run_cli("cache", "prune", "--older-than", "0", env=env)
    assert r.code == 0 and "removed 1 sources, freed 300,000 bytes" in r.out
    assert run_cli("cache", "list", env=env).out.strip() == "the cache is empty"


def test_a_full_disk_is_an_error_not_a_retry(server, env) -> None:
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = subprocess.run([sys.executable, "-m", "sdport", "inspect", f"{server.url}/plain/blob.bin"], env=env,
                       capture_output=True, text=True, preexec_fn=small_files, timeout=60)
    assert p.returncode == 2 and "file too large" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert len(server.gets("/plain/")) == 1
