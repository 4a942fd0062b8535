"""sdport's ``--layout optimum`` exports in Optimum's own ORT pipelines, against the torch pipelines.

Optimum (optimum-onnx) pins transformers < 4.58, so ``.ci/run`` runs this file in its own venv
(optimum-onnx, diffusers 0.39, transformers 4.57); in the main venv it skips itself. sdport exports
here too, with that venv's diffusers and transformers — the export does not depend on their versions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("optimum.onnxruntime", reason="Optimum runs in its own venv (.ci/run: .venv-opt)")
import torch  # noqa: E402

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402

PIPES = {"sd1": ("ORTStableDiffusionPipeline", "StableDiffusionPipeline"),
         "sdxl-base": ("ORTStableDiffusionXLPipeline", "StableDiffusionXLPipeline")}


def _export(src: str, out: str, *extra: str) -> None:
    r = subprocess.run([sys.executable, "-m", "sdport", "convert", src, out, "--to", "onnx", "--layout", "optimum",
                        "-q", *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("family", list(PIPES))
def test_optimum_pipeline_gives_the_torch_image(tmp_path, family) -> None:
    import diffusers
    import optimum.onnxruntime as ort_pipes

    ref = models.save_pipeline(family, str(tmp_path / "ref"))
    out = str(tmp_path / "onnx")
    _export(ref, out)
    ort_cls, torch_cls = (getattr(ort_pipes, PIPES[family][0]), getattr(diffusers, PIPES[family][1]))
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", guidance_scale=7.5)
    got = np.asarray(ort_cls.from_pretrained(out)("a photo of a red cat", latents=torch.tensor(latents), **kw).images)
    want = np.asarray(torch_cls.from_pretrained(ref)("a photo of a red cat", latents=torch.tensor(latents),
                                                     **kw).images)
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert np.abs(got - want).max() < 1e-4
    # fp16 graphs with an fp32 VAE, through the same pipeline: bounded, reported
    half = str(tmp_path / "fp16")
    _export(ref, half, "--dtype", "fp16", "--vae-dtype", "fp32")
    latents16 = torch.tensor(latents).half()
    got16 = np.asarray(ort_cls.from_pretrained(half)("a photo of a red cat", latents=latents16, **kw).images)
    err = float(np.abs(got16.astype(np.float32) - want).max())
    print(f"{family}: fp16 export vs torch fp32 image: max abs {err:.2e}")
    assert np.isfinite(got16).all() and err < 0.05
