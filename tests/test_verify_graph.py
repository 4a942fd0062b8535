"""The plain-function components MindSpore runs (``verify.backends.graph``), checked against diffusers' modules.

Run over torch's primitives (``graph_ops.TorchOps``), each component of every family must give what
diffusers' and transformers' own modules give on the same inputs, and the sampled image must match;
MindSpore then only has to supply the primitives (tests/test_verify_mindspore.py).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import models  # noqa: E402
from graph_ops import TorchOps  # noqa: E402

from sdport.parity.backends.mindspore import GraphBackend  # noqa: E402
from sdport.parity.jobs import build_job  # noqa: E402
from sdport.parity.outputs import Tolerance, compare_outputs, run_job  # noqa: E402
from sdport.parity.sides import open_side  # noqa: E402
from sdport.targets.onnx import component_configs, component_tensors  # noqa: E402


@pytest.mark.parametrize("family, in_channels", [("sd1", 4), ("sd1", 9), ("sd2", 4), ("sdxl-base", 4),
                                                 ("sdxl-refiner", 4)])
def test_graph_components_equal_diffusers_modules(tmp_path, family, in_channels) -> None:
    folder = models.save_pipeline(family, str(tmp_path / family), in_channels=in_channels)
    with ExitStack() as stack:
        side = open_side(stack, folder, "A", runtime=True, scratch=str(tmp_path))
        tensors = component_tensors(side.plan)
        plain = GraphBackend(TorchOps(), tensors, side.read, component_configs(side.plan, list(tensors)))
        assert plain.components == side.backend.components
        job = build_job(side, side, seed=0, latents=None, steps=2, size="64x64", prompt="a red cube",
                        prompt_embeds=None, scheduler="euler", notes=[], scratch=str(tmp_path))
        with torch.inference_mode():
            ref, got = run_job(side.backend, job), run_job(plain, job)
    report = compare_outputs(ref, got, Tolerance(cosine=0.999999, pixel=0.01))
    assert len(report.diffs) >= 5 and not report.skipped
    for d in report.diffs:
        assert d.passed and (d.name == "image" or d.max_abs < 1e-4), d
