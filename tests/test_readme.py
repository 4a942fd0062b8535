"""README.md's command blocks run as written after ``sdport demo``, and the demo's files are what they say.

Every ```sh block after the quick start is run line by line (``\\`` continuations joined) by bash in a temp dir
holding ``sdport-demo/``, with this venv's ``sdport`` first on PATH and, for the Sources block, a Hub and
Civitai served on 127.0.0.1 (``HF_ENDPOINT``, ``SDPORT_CIVITAI_ENDPOINT``) with the demo's files under the
names the README uses. A command must exit 0, or with the status its comment names (``# exit status N``), in
which case its stderr is a line of the plain block that follows it. A block is skipped only when an HTML comment
``<!-- readme-test: skip (why) -->`` stands right before it; the skipped blocks are listed exactly below.
What each command writes is inspected where it names a family or format.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import Server, civitai_version

from sdport.api import inspect

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+?)\) -->\n\n?$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
#: the blocks the README marks as not runnable here (their first command → why)
SKIPPED = {"sdport batch manifest.yaml --out /shared/models --executor ray --address ray://head:10001":
           "needs a Ray cluster at ray://head:10001 and a manifest.yaml of your models"}
#: what an output of the README's commands is, by `sdport inspect`: path → (format, family, layout or adapter format)
EXPECTED = {
    "model.safetensors": ("safetensors", "sd1", "ldm"), "model.ckpt": ("torch-zip", "sd1", "ldm"),
    "sd1-diffusers": ("diffusers", "sd1", "diffusers"), "sd1-ema": ("diffusers", "sd1", "diffusers"),
    "sdxl-parts": ("diffusers", "sdxl-base", "diffusers"), "merged.safetensors": ("safetensors", "sd1", "ldm"),
    "merged-diffusers": ("diffusers", "sd1", "diffusers"), "sdxl-onnx": ("onnx", "sdxl-base", "diffusers"),
    "style-peft.safetensors": ("safetensors", "lora", "peft"), "style.safetensors": ("safetensors", "lora", "kohya"),
    "lora.safetensors": ("safetensors", "lora", "kohya"), "ab.safetensors": ("safetensors", "lora", "kohya"),
    "diff.safetensors": ("safetensors", "lora", "kohya"), "sd1-mindone.ckpt": ("mindspore", "sd1", "mindone"),
    "sdxl-mindone.ckpt": ("mindspore", "sdxl-base", "mindone"), "sdxl.safetensors": ("safetensors", "sdxl-base", "ldm"),
    "sdxl-diffusers": ("diffusers", "sdxl-base", "diffusers"),
    "full-mindone.ckpt": ("mindspore", "sdxl-base", "mindone"),
    "mindone-lora.safetensors": ("safetensors", "lora", "kohya"), "sd1-onnx": ("onnx", "sd1", "diffusers"),
    "canny-onnx": ("onnx", "controlnet", "diffusers"), "sd1-back.safetensors": ("safetensors", "sd1", "ldm"),
    "sd15.safetensors": ("safetensors", "sd1", "ldm"), "lcm.safetensors": ("safetensors", "sd1", "ldm"),
    "out": ("onnx", "sd1", "diffusers"), "again.safetensors": ("safetensors", "sd1", "ldm"),
}


@dataclass
class Block:
    line: int  # README line of the opening fence
    lang: str
    commands: list[str]
    skip: str  # why it is not run, from its HTML comment ("" when it is)
    after: str  # the text of the plain block right after it (expected error lines), or ""


def readme_blocks(text: str) -> list[Block]:
    """The code blocks after the quick start section, each with its commands (comment-only lines dropped)."""
    start = text.index("\n## ", text.index("## Quick start"))
    found = list(FENCE.finditer(text, start))
    out = []
    for k, m in enumerate(found):
        before = text[:m.start()]
        skip = SKIP.search(before)
        nxt = found[k + 1] if k + 1 < len(found) else None
        after = nxt[2] if nxt and not nxt[1] and not text[m.end():nxt.start()].strip() else ""
        joined = m[2].replace("\\\n", " ")
        commands = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        out.append(Block(text.count("\n", 0, m.start()) + 1, m[1], commands, skip[1] if skip else "", after))
    return out


def _sh_blocks() -> list[Block]:
    return [b for b in readme_blocks(README.read_text()) if b.lang == "sh"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    p = subprocess.run([sys.executable, "-m", "sdport", "demo"], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    (root / "demo-output.txt").write_text(p.stdout)
    return root


def _serve(server: Server, folder: Path) -> None:
    """The README's remote sources, served from the demo's files under the names the README gives them."""
    fp16 = (folder / "demo-sd1.fp16.safetensors").read_bytes()
    server.civitai["6266"] = civitai_version("6266", {
        "demo-sd1.fp16.safetensors": (fp16, {"type": "Model", "format": "SafeTensor", "fp": "fp16"}),
        "demo-sd1-pruned.safetensors": ((folder / "demo-sd1-ema.safetensors").read_bytes(),
                                        {"type": "Pruned Model", "format": "SafeTensor", "fp": "fp16"})}, server.url)
    server.files["demo-sd1.fp16.safetensors"] = fp16
    server.files["demo-sd1-pruned.safetensors"] = (folder / "demo-sd1-ema.safetensors").read_bytes()
    pipe = folder / "demo-sd1-diffusers"
    server.hub["runwayml/stable-diffusion-v1-5"] = ("a" * 40, {
        str(p.relative_to(pipe)): p.read_bytes() for p in sorted(pipe.rglob("*")) if p.is_file()})
    server.hub["latent-consistency/lcm-lora-sdv1-5"] = ("b" * 40, {
        "pytorch_lora_weights.safetensors": (folder / "demo-lcm-lora.safetensors").read_bytes(),
        "README.md": b"# a stand-in"})


def _env(root: Path, server: Server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SDPORT_CIVITAI", "CIVITAI"))}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               SDPORT_CACHE=str(root / "cache"), HF_HUB_CACHE=str(root / "hf"), HF_ENDPOINT=server.url,
               SDPORT_CIVITAI_ENDPOINT=server.url, HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="120")
    return env


def _written(command: str) -> str:
    """What a convert / lora command writes: its last positional argument (DST), else ""."""
    words = shlex.split(command, comments=True)
    verbs = [w for w in words[1:] if not w.startswith("-")][:2]
    if not verbs or verbs[0] not in ("convert", "lora") or verbs[0] == "lora" and verbs[1] not in (
            "convert", "combine", "extract"):
        return ""
    args, k = [], words.index(verbs[-1]) + 1
    while k < len(words):
        if words[k].startswith("-"):
            k += 1 if words[k] in ("--report", "--force", "--ema", "--controlnet", "--verify", "--json") else 2
            continue
        args.append(words[k])
        k += 1
    return args[-1].rstrip("/") if args else ""


def _run(command: str, root: Path, env: dict[str, str], after: str) -> None:
    p = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    expected = re.search(r"#.*exit status (\d+)", command)
    if expected:
        assert p.returncode == int(expected[1]), (command, p.stdout, p.stderr)
        assert p.stderr.strip() in after.splitlines(), (command, p.stderr)
        return
    assert p.returncode == 0, (command, p.stdout[-2000:], p.stderr[-2000:])
    dst = _written(command)
    if dst:
        assert (root / dst).exists(), command
    if dst in EXPECTED:
        report = inspect(str(root / dst))
        shown = (report["format"], report["family"], report["adapter_format"] or report["layout"])
        assert shown == EXPECTED[dst], (command, shown)


def test_the_readme_marks_exactly_the_blocks_it_does_not_run() -> None:
    skipped = {b.commands[0]: b.skip for b in _sh_blocks() if b.skip}
    assert skipped == SKIPPED


@pytest.mark.slow
def test_every_readme_command_runs_as_written_after_sdport_demo(demo) -> None:
    blocks = [b for b in _sh_blocks() if not b.skip]
    assert len(blocks) >= 12 and all(b.commands for b in blocks)
    with Server() as server:
        _serve(server, demo / "sdport-demo")
        env = _env(demo, server)
        for block in blocks:
            for command in block.commands:
                _run(command, demo, env, block.after)
    assert (demo / "parity" / "compare.png").exists() and (demo / "models" / "diffusion-knollingcase").is_dir()


def test_demo_writes_the_files_the_readme_reads_and_says_what_each_is(demo) -> None:
    folder = demo / "sdport-demo"
    kinds = {
        "demo-style.safetensors": ("lora", "adapter", "kohya"), "demo-detail.safetensors": ("lora", "adapter", "kohya"),
        "demo-loha.safetensors": ("lora", "adapter", "lycoris"),
        "demo-lcm-lora.safetensors": ("lora", "adapter", "peft"),
        "demo-mindone-lora.ckpt": ("lora", "adapter", "mindone"), "demo-sdxl.safetensors": ("sdxl-base", "ldm", ""),
        "demo-sdxl-vae.safetensors": ("vae", "ldm", ""), "demo-controlnet.safetensors": ("controlnet", "ldm", ""),
        "demo-controlnet": ("controlnet", "diffusers", ""), "demo-sd1-ema.safetensors": ("sd1", "ldm", ""),
    }
    for name, kind in kinds.items():
        r = inspect(str(folder / name))
        assert (r["family"], r["layout"], r["adapter_format"]) == kind, name
    for name in ("demo-style.safetensors", "demo-detail.safetensors", "demo-loha.safetensors",
                 "demo-lcm-lora.safetensors"):
        assert inspect(str(folder / name))["adapter"]["base_family"] == "sd1", name
    style = inspect(str(folder / "demo-style.safetensors"))["adapter"]
    assert style["modules"] == 176 and style["metadata"]["ss_base_model_version"] == "sd_v1"
    assert {c: v["modules"] for c, v in style["components"].items()} == {"text_encoder": 48, "unet": 128}
    for name in ("demo-embedding.safetensors", "demo-cat.safetensors", "demo-latents.npy", "extras.json"):
        assert (folder / name).is_file()
    printed = (demo / "demo-output.txt").read_text()
    for name in sorted(os.listdir(folder)):
        if name.startswith("demo-") and name.endswith((".safetensors", ".ckpt", ".npy")) or name == "extras.json":
            assert printed.count(f"{os.path.join('sdport-demo', name)}") >= 1, name


def test_the_demo_sdxl_has_the_names_and_shapes_of_a_real_pipeline_saved_by_diffusers(tmp_path) -> None:
    """The numpy-built SDXL equals, name for name and shape for shape, the tests' tiny SDXL built by diffusers and
    transformers and converted to a single file (less the logit scale, which OpenCLIP files carry and
    transformers does not)."""
    pytest.importorskip("diffusers")
    import models
    from safetensors import safe_open

    from sdport.api import convert
    from sdport.demo_models import sdxl_shapes

    folder = models.save_pipeline("sdxl-base", str(tmp_path / "xl"))
    convert(folder, str(tmp_path / "xl.safetensors"))
    with safe_open(str(tmp_path / "xl.safetensors"), "np") as f:
        theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ours = sdxl_shapes()
    assert ours.pop("conditioner.embedders.1.model.logit_scale") == ()
    assert ours == theirs
