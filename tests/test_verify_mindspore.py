"""``sdport verify`` of a MindOne checkpoint runs it in MindSpore — in the interpreter of MindSpore's own venv.

``.ci/run`` sets ``SDPORT_MINDSPORE_PYTHON`` to ``.venv-ms/bin/python``; without it (a developer's machine
without that venv) the MindSpore test skips, except under CI, where it must run.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli

pytest.importorskip("torch")
pytest.importorskip("diffusers")
import models  # noqa: E402

PYTHON = os.environ.get("SDPORT_MINDSPORE_PYTHON")
if not PYTHON and os.environ.get("CI"):
    raise RuntimeError("CI runs these with SDPORT_MINDSPORE_PYTHON set to MindSpore's venv (.ci/run)")


@pytest.mark.skipif(not PYTHON, reason="SDPORT_MINDSPORE_PYTHON names no MindSpore interpreter")
def test_a_mindone_checkpoint_runs_in_mindspore_and_matches_its_source(tmp_path) -> None:
    folder = models.save_pipeline("sd1", str(tmp_path / "sd1"))
    ckpt = str(tmp_path / "sd1-mindone.ckpt")
    assert run_cli("convert", folder, ckpt, "--to", "mindspore", "-q").code == 0
    r = run_cli("verify", folder, ckpt, "--size", "64x64", "--steps", "2", "--json", "--report", tmp_path / "rep",
                timeout=600)
    assert r.code == 0, r.out + r.err
    report = json.loads(r.out)
    (c,) = report["comparisons"]
    assert c["outputs"]["runtimes"] == ["torch", "mindspore"] and not report["notes"]
    diffs = {d["name"]: d for d in c["outputs"]["diffs"]}
    assert set(diffs) == {"text_encoder.last_hidden_state", "text_encoder.pooler_output", "unet.out_sample",
                          "vae_decoder.sample", "vae_encoder.latent_sample", "image"}
    assert all(d["cosine"] > 0.99999 for n, d in diffs.items() if n != "image")
    assert 0 < diffs["unet.out_sample"]["max_abs"] < 1e-4  # two runtimes: close, not bit-equal
    assert diffs["image"]["mean_abs"] < 0.5 and c["tensors"]["identical"] == c["tensors"]["compared"]


def test_without_mindspore_the_report_says_torch_ran_it(tmp_path) -> None:
    folder = models.save_pipeline("sd1", str(tmp_path / "sd1"))
    ckpt = str(tmp_path / "sd1-mindone.ckpt")
    assert run_cli("convert", folder, ckpt, "--to", "mindspore", "-q").code == 0
    env = {k: v for k, v in os.environ.items() if k != "SDPORT_MINDSPORE_PYTHON"}
    r = run_cli("verify", folder, ckpt, "--size", "64x64", "--steps", "1", "--outputs", "--json", env=env)
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["comparisons"][0]["outputs"]["runtimes"] == ["torch", "torch"]
    assert "run in torch: MindSpore is not installed here" in report["notes"][0]
