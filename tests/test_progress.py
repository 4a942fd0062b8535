"""Progress on a terminal: a tiny ONNX export shows a bar while each component is traced, while weights are streamed
and while graphs are written — on a TTY only, once a step has taken ``progress.THRESHOLD``; elsewhere only the
``tracing NAME`` lines it always printed."""

from __future__ import annotations

import io
import re
import sys
import time

import pytest

import sdport
from sdport import progress

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")
import models  # noqa: E402

COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]


class Terminal(io.StringIO):
    """A stderr that says it is a TTY."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
    return models.save_pipeline("sd1", str(tmp_path_factory.mktemp("progress") / "ref"))


def _export(pipeline: str, out: str, stderr: io.StringIO, monkeypatch) -> str:
    monkeypatch.setattr(sys, "stderr", stderr)
    sdport.convert(pipeline, out, to="onnx", progress=True)
    monkeypatch.undo()
    return stderr.getvalue()


def test_a_terminal_sees_a_bar_for_each_component_traced_and_each_file_written(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "THRESHOLD", 0.0)  # every step "has taken long enough"
    text = _export(pipeline, str(tmp_path / "onnx"), Terminal(), monkeypatch)
    shown = [s.strip() for s in re.split(r"[\r\n]|\x1b\[A", text) if s.strip()]
    for number, name in enumerate(COMPONENTS, 1):
        assert any(s.startswith(f"tracing {name} ({number}/{len(COMPONENTS)}) |") for s in shown), (name, shown)
        assert any(s.startswith(f"weights onnx/{name}/model.onnx:") for s in shown), (name, shown)
        assert any(s.startswith(f"graph onnx/{name}/model.onnx:") for s in shown), (name, shown)
        assert f"tracing {name}\n" in text  # the line every run prints, still there above the bar


def test_elsewhere_only_the_tracing_lines(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "THRESHOLD", 0.0)
    text = _export(pipeline, str(tmp_path / "onnx"), io.StringIO(), monkeypatch)
    assert text == "".join(f"tracing {name}\n" for name in COMPONENTS)


def test_a_terminal_sees_no_bar_for_a_quick_step(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "THRESHOLD", 3600.0)
    text = _export(pipeline, str(tmp_path / "onnx"), Terminal(), monkeypatch)
    assert text == "".join(f"tracing {name}\n" for name in COMPONENTS)


def test_a_long_step_without_counts_is_drawn_by_the_ticker(monkeypatch):
    """No update after the threshold passes: the bar still appears, and its elapsed time moves."""
    monkeypatch.setattr(progress, "THRESHOLD", 0.05)
    monkeypatch.setattr(progress, "TICK", 0.05)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress.Stages("tracing") as stages:
        stages.step("unet", 1, 2)
        time.sleep(0.5)
        assert stages.bar is not None
        assert "tracing unet (1/2) |" in terminal.getvalue()
    with progress.Progress(100, "model.safetensors") as bar:
        bar.stage("weights model.safetensors")
        time.sleep(0.5)
        assert "weights model.safetensors:" in terminal.getvalue()
    monkeypatch.undo()
