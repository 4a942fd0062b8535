"""The command line: inspect, convert (repackaging and dtypes), errors, and atomic outputs under faults."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import leftovers, run_cli, sha256

import sdport
from sdport.errors import FormatError, OutputError


def test_help_and_inspect_never_import_torch(demo_ckpt) -> None:
    code = ("import sys; from sdport.cli import main; main(['--help']); assert 'numpy' not in sys.modules;"
            f"main(['inspect', {demo_ckpt!r}]); assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "family      sd1" in p.stdout


def test_inspect_json_reports_family_counts_and_dtypes(demo_ckpt, demo_state_dict) -> None:
    r = run_cli("inspect", demo_ckpt, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["format"] == "torch-zip" and report["family"] == "sd1" and report["root"] == "state_dict"
    assert report["tensors"] == len(demo_state_dict) == 1143
    assert report["parameters"] == sum(v.size for v in demo_state_dict.values())
    assert report["dtypes"] == {"F32": 1142, "I64": 1}
    assert report["prefixes"]["model.diffusion_model"] == 686
    assert any("input_blocks.1.1.proj_in.weight is 4-d" in e for e in report["evidence"])


def test_ckpt_to_safetensors_to_ckpt_roundtrip_is_bit_exact(demo_ckpt, tmp_path) -> None:
    st, back = tmp_path / "m.safetensors", tmp_path / "m2.ckpt"
    assert run_cli("convert", demo_ckpt, st, "-q").code == 0
    assert run_cli("convert", st, back, "-q").code == 0
    ref = torch.load(demo_ckpt, weights_only=True)["state_dict"]
    mid = safetensors.torch.load_file(str(st))
    end = torch.load(back, weights_only=True)["state_dict"]
    assert list(mid) == list(ref) == list(end)
    for k in ref:
        assert torch.equal(ref[k], mid[k]) and torch.equal(ref[k], end[k]), k
    with safetensors.safe_open(str(st), "np") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_change_equals_torch_to(demo_ckpt, tmp_path, dtype, torch_dtype) -> None:
    out = tmp_path / f"m.{dtype}.safetensors"
    r = run_cli("convert", demo_ckpt, out, "--dtype", dtype)
    assert r.code == 0, r.err
    ref = torch.load(demo_ckpt, weights_only=True)["state_dict"]
    got = safetensors.torch.load_file(str(out))
    for k, v in ref.items():
        want = v.to(torch_dtype) if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_cast_done_in_pieces_is_bit_identical_to_torch(monkeypatch, tmp_path, dtype, torch_dtype) -> None:
    import sdport.execute

    monkeypatch.setattr(sdport.execute, "CAST_CHUNK", 1000)  # 250 floats a piece: many pieces per tensor
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-45, -0.0, 65520.0, 1e-8])
    big = torch.cat([specials, torch.randn(10_007, generator=torch.Generator().manual_seed(1))]).reshape(1, 10_015)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    safetensors.torch.save_file({"big": big, "small": big[0, :7].clone(), "ids": torch.arange(5)}, str(src))
    sdport.convert(src, out, dtype=dtype)
    got = safetensors.torch.load_file(str(out))
    assert got["ids"].dtype == torch.int64 and torch.equal(got["ids"], torch.arange(5))
    for k in ("big", "small"):
        want = safetensors.torch.load_file(str(src))[k].to(torch_dtype)
        assert got[k].shape == want.shape
        assert torch.equal(got[k].view(torch.int16), want.view(torch.int16)), k  # bits, NaN payloads included


def test_safetensors_to_ckpt_keeps_metadata_out_and_wraps_full_models(demo_ckpt, tmp_path) -> None:
    st, ck = tmp_path / "a.safetensors", tmp_path / "a.pt"
    run_cli("convert", demo_ckpt, st, "-q")
    assert run_cli("convert", st, ck, "--dtype", "fp16", "-q").code == 0
    loaded = torch.load(ck, weights_only=True)
    assert list(loaded) == ["state_dict"] and loaded["state_dict"]["betas"].dtype == torch.float16


def test_non_tensor_entries_are_reported_when_dropped(tmp_path) -> None:
    src, out = tmp_path / "g.ckpt", tmp_path / "g.safetensors"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 5, "epoch": 5, "note": "x"}, src)
    r = run_cli("convert", src, out, "--report", "-q")  # grouped by reason, the largest group first
    assert r.code == 0 and r.out.strip() == ("left out 2: not a tensor (5)\n  global_step\n  epoch\n"
                                             "left out 1: not a tensor ('x')\n  note")


def test_alphas_read_into_a_merge_are_not_counted_as_left_out(demo_ckpt, tmp_path) -> None:
    import numpy as np
    import safetensors.numpy

    loras = []
    for i, module in enumerate(("attn1_to_q", "attn2_to_q")):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_{module}"
        path = tmp_path / f"l{i}.safetensors"
        safetensors.numpy.save_file({f"{name}.lora_down.weight": np.ones((2, 32), np.float32),
                                     f"{name}.lora_up.weight": np.ones((32, 2), np.float32),
                                     f"{name}.alpha": np.array(1.0, np.float32)}, str(path))
        loras += ["--lora", str(path)]
    r = run_cli("convert", demo_ckpt, tmp_path / "m.safetensors", *loras, "--report")
    assert r.code == 0, r.err
    summary = next(line for line in r.err.splitlines() if line.startswith("wrote"))
    # the demo checkpoint leaves nothing out, and the two alphas read into the merge are not "left out"
    assert "left out" not in summary and "left out" not in r.out, (summary, r.out)
    assert "read 2: alpha or flag, read into the merge" in r.out


def test_python_api_mirrors_the_cli(demo_ckpt, tmp_path) -> None:
    result = sdport.convert(demo_ckpt, tmp_path / "api.safetensors", dtype="fp16")
    assert result.tensors == 1143 and sdport.inspect(result.output)["dtypes"] == {"F16": 1142, "I64": 1}


# ------------------------------------------------------------------------------------------- refusals
def _assert_refused(r, path_fragment: str, keyword: str) -> None:
    assert r.code == 2, (r.code, r.err)
    assert r.err.count("\n") == 1 and r.err.startswith("sdport: error: ") and "Traceback" not in r.err
    assert path_fragment in r.err and keyword in r.err


def test_existing_output_is_refused_and_untouched_without_force(demo_ckpt, tmp_path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    _assert_refused(run_cli("convert", demo_ckpt, out), str(out), "output already exists")
    assert out.read_bytes() == b"precious"
    assert run_cli("convert", demo_ckpt, out, "--force", "-q").code == 0
    assert sdport.inspect(out)["tensors"] == 1143


def test_output_that_is_the_input_is_refused(demo_ckpt, tmp_path) -> None:
    link = tmp_path / "link.ckpt"
    link.symlink_to(demo_ckpt)
    before = sha256(demo_ckpt)
    for target in (demo_ckpt, link):
        _assert_refused(run_cli("convert", demo_ckpt, target, "--force"), "", "output would overwrite the input")
    assert sha256(demo_ckpt) == before


def test_missing_source_and_missing_output_folder(tmp_path, demo_ckpt) -> None:
    _assert_refused(run_cli("inspect", tmp_path / "nope.ckpt"), "nope.ckpt", "no such file")
    _assert_refused(run_cli("convert", demo_ckpt, tmp_path / "no" / "x.safetensors"), "x.safetensors",
                    "output folder does not exist")


def test_unknown_tensors_need_allow_unknown_only_in_family_conversions(tmp_path) -> None:
    # repackaging keeps every tensor by name, so nothing is unknown; the flag is accepted
    src = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"whatever": torch.ones(1)}, str(src))
    assert run_cli("convert", src, tmp_path / "o.ckpt", "--allow-unknown", "-q").code == 0


def test_internal_errors_exit_1_with_a_hint(monkeypatch, capsys, demo_ckpt) -> None:
    from sdport import cli
    from sdport import inspection as inspect_mod

    monkeypatch.setattr(inspect_mod, "inspect", lambda s, **options: 1 / 0)
    assert cli.main(["inspect", demo_ckpt]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdport: error: internal error: ZeroDivisionError") and "--debug" in err


# ------------------------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> str:
    """~400 MB of fp32: large enough that a conversion runs for a while."""
    import safetensors.numpy

    path = str(tmp_path_factory.mktemp("big") / "big.safetensors")
    block = np.random.default_rng(0).standard_normal((1024, 4096), np.float32)
    safetensors.numpy.save_file({f"t{i}": block + i for i in range(24)}, path)
    return path


def _start_convert(src: str, out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdport", "convert", src, out, "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _wait_for_temp(folder, proc, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        names = leftovers(folder)
        if names and os.path.getsize(os.path.join(folder, names[0])) > 32 << 20:
            return
        if proc.poll() is not None:
            pytest.fail(f"conversion ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.002)
    pytest.fail("no temp file appeared")


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupt_leaves_no_output_and_no_temp(big_source, tmp_path, sig, code, word) -> None:
    before = sha256(big_source)
    out = tmp_path / "out.safetensors"
    proc = _start_convert(big_source, str(out), "--dtype", "fp16")
    _wait_for_temp(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and err.strip() == f"sdport: {word}", (proc.returncode, err)
    assert not out.exists() and leftovers(tmp_path) == []
    assert sha256(big_source) == before


def test_kill_9_leaves_no_output_and_the_next_run_cleans_the_temp(big_source, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    proc = _start_convert(big_source, str(out), "--dtype", "fp16")
    _wait_for_temp(tmp_path, proc)
    proc.kill()
    proc.wait()
    assert not out.exists() and len(leftovers(tmp_path)) == 1
    assert run_cli("convert", big_source, out, "-q", "--dtype", "fp16").code == 0
    assert leftovers(tmp_path) == [] and sdport.inspect(out)["dtypes"] == {"F16": 24}


def test_disk_full_while_writing_gives_one_line_and_no_output(big_source, tmp_path) -> None:
    out = tmp_path / "out.ckpt"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))

    p = subprocess.run([sys.executable, "-m", "sdport", "convert", big_source, str(out), "-q"],
                       capture_output=True, text=True, preexec_fn=limit)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"sdport: error: {out}: no space left or file too large while writing")
    assert not out.exists() and leftovers(tmp_path) == []


def test_fsync_failure_is_not_ignored(monkeypatch, demo_ckpt, tmp_path) -> None:
    import errno

    def failing(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OutputError, match="no space left"):
        sdport.convert(demo_ckpt, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_read_error_names_the_input(monkeypatch, demo_ckpt, tmp_path) -> None:
    import errno

    def failing(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", failing)
    with pytest.raises(FormatError, match="read error") as info:
        sdport.convert(demo_ckpt, tmp_path / "x.safetensors")
    assert info.value.path == demo_ckpt and os.listdir(tmp_path) == []


def test_not_enough_space_is_refused_before_writing(monkeypatch, demo_ckpt, tmp_path) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match=r"not enough free space \(need 62\.\d MB, free 0\.0 MB\)"):
        sdport.convert(demo_ckpt, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_output_permissions_follow_the_umask(demo_ckpt, tmp_path) -> None:
    old = os.umask(0o027)
    try:
        sdport.convert(demo_ckpt, tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o640


def test_every_option_of_every_verb_is_in_the_readme() -> None:
    """The README and the CLI in step: each ``--option`` that ``--help`` lists is written somewhere in the README."""
    from pathlib import Path

    import click

    from sdport.cli import cli

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")
        missing.extend(f"{path} {o}" for p in cmd.params for o in p.opts if o.startswith("--") and o not in readme)

    walk(cli, "sdport")
    assert not missing, missing
