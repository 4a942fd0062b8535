#!/usr/bin/env python3
"""Time sdport against cp+sync (and the torch/safetensors route users would otherwise take), interleaved.

    python bench/run.py DATA_DIR [--suite repackage|layouts|lora|mindone|onnx|verify|batch|cpu] [--reps 3] [--only NAME]
                                 [--tools DIR] [--compare SRC]

Suites: ``repackage`` (issue 3: .ckpt ⇄ safetensors, fp32 → fp16 on a full-size SD1.5 file, built by
make_fixtures.py) and ``layouts`` (issue 4: single file ⇄ diffusers for full-size SD1.5 with EMA and
SDXL, built by make_layout_fixtures.py, against diffusers' ``from_single_file`` + ``save_pretrained``
and, with ``--tools``, the diffusers repository's diffusers → original scripts, run by hand from a
checkout outside this repository).

Every operation is its own process under GNU time (wall, peak RSS). Repetition i runs every
operation once, in order, so that cp+sync of the same bytes is measured beside each of them on a
shared, noisy machine; ratios are paired per repetition, then the median is taken. ``--compare SRC``
runs every sdport operation a second time right after, with another sdport's ``src`` folder first on
``PYTHONPATH`` (a checkout of an earlier commit: ``git worktree add /tmp/before HEAD~1``), so that a change
is measured before and after in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

PY = sys.executable
SDPORT = [PY, "-m", "sdport"]
REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_ops.py")


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path) if path and os.path.exists(path) else 0


def _cp(src: str, dst: str) -> list[str]:
    """cp, then flush what it wrote (every file of a folder: ``sync DIR`` would flush only the folder itself)."""
    flush = f"find {dst} -type f -exec sync {{}} +" if os.path.isdir(src) else f"sync {dst}"
    return ["sh", "-c", f"cp -r {src} {dst} && {flush}"]


def layouts(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """Single file ⇄ diffusers, SD1.5 (fp16, EMA) and SDXL (fp16), with the tools users have today beside."""
    fsf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "anchor-bench", "ops.py")
    o = lambda name: os.path.join(out, name)  # noqa: E731
    ops = []
    for model, single, folder, script in (("sd15", "sd15-ema.safetensors", "sd15-diffusers",
                                           "convert_diffusers_to_original_stable_diffusion.py"),
                                          ("sdxl", "sdxl.safetensors", "sdxl-diffusers",
                                           "convert_diffusers_to_original_sdxl.py")):
        st, d = os.path.join(data, single), os.path.join(data, folder)
        xl = ["--sdxl"] if model == "sdxl" else []
        ops += [
            (f"{model} cp+sync file", "", _cp(st, o("cp.st")), o("cp.st")),
            (f"{model} sdport file->diffusers", f"{model} cp+sync file", SDPORT + ["convert", st, o("d"), "-q"],
             o("d")),
            (f"{model} diffusers from_single_file+save_pretrained", f"{model} cp+sync file",
             [PY, fsf, "fsf", st, d, o("f")] + xl, o("f")),
            (f"{model} cp+sync folder", "", _cp(d, o("cp.d")), o("cp.d")),
            (f"{model} sdport diffusers->file", f"{model} cp+sync folder",
             SDPORT + ["convert", d, o("s.safetensors"), "-q"], o("s.safetensors")),
        ]
        if tools:
            ops.append((f"{model} diffusers script diffusers->original --half", f"{model} cp+sync folder",
                        [PY, os.path.join(tools, script), "--model_path", d, "--checkpoint_path",
                         o("t.safetensors"), "--half", "--use_safetensors"], o("t.safetensors")))
    return ops


def lora(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """Merging one and two rank-32 kohya LoRAs (../shared/anchor-bench/make_lora.py) into SD1.5 and SDXL, beside
    diffusers."""
    ops_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "anchor-bench", "ops.py")
    o = lambda name: os.path.join(out, name)  # noqa: E731
    ops = []
    for model in ("sd15", "sdxl"):
        st, d = os.path.join(data, f"{model}.safetensors"), os.path.join(data, f"{model}-diffusers")
        adapter = os.path.join(data, f"lora-{model}-r32.safetensors")
        second = os.path.join(data, f"lora-{model}-r32-b.safetensors")  # make_lora.py --seed 1
        xl = ["--sdxl"] if model == "sdxl" else []
        ops += [
            (f"{model} cp+sync file", "", _cp(st, o("cp.st")), o("cp.st")),
            (f"{model} sdport merge into file", f"{model} cp+sync file",
             SDPORT + ["convert", st, o("m.safetensors"), "--lora", adapter, "-q"], o("m.safetensors")),
            (f"{model} sdport merge two into file", f"{model} cp+sync file",
             SDPORT + ["convert", st, o("m2.safetensors"), "--lora", adapter, "--lora", f"{second}:0.5", "-q"],
             o("m2.safetensors")),
            (f"{model} sdport merge into folder", f"{model} cp+sync file",
             SDPORT + ["convert", d, o("md"), "--lora", adapter, "-q"], o("md")),
            (f"{model} diffusers load_lora_weights+fuse_lora+save_pretrained", f"{model} cp+sync file",
             [PY, ops_py, "lora_fuse", d, adapter, o("f")] + xl, o("f")),
        ]
    return ops


def mindone(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """Full-size SDXL fp16 single file → MindOne fp32 .ckpt and back, each against cp of its output's bytes.

    ``sdxl-mindone.ckpt`` (the floor's input, 13.9 GB) is made once with
    ``sdport convert sdxl.safetensors sdxl-mindone.ckpt --to mindspore``.
    """
    st, ms = os.path.join(data, "sdxl.safetensors"), os.path.join(data, "sdxl-mindone.ckpt")
    o = lambda name: os.path.join(out, name)  # noqa: E731
    return [
        ("sdxl cp+sync mindone", "", _cp(ms, o("cp.ckpt")), o("cp.ckpt")),
        ("sdxl sdport file -> mindone fp32", "sdxl cp+sync mindone",
         SDPORT + ["convert", st, o("m.ckpt"), "--to", "mindspore", "-q"], o("m.ckpt")),
        ("sdxl cp+sync file", "", _cp(st, o("cp.st")), o("cp.st")),
        ("sdxl sdport mindone -> file fp16", "sdxl cp+sync file",
         SDPORT + ["convert", ms, o("b.safetensors"), "--dtype", "fp16", "-q"], o("b.safetensors")),
    ]


def onnx(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """Full-size SD1.5 diffusers folder → ONNX (fp32, fp16) beside the diffusers repository's script and Optimum.

    The floor of the fp32 export is cp of an fp32 export's bytes (``sd15-onnx``, made once with
    ``sdport convert sd15-diffusers sd15-onnx --to onnx``); of the fp16 one, cp of the fp16 input folder
    (the same size). ``--tools`` holds ``convert_stable_diffusion_checkpoint_to_onnx.py``; ``OPTIMUM_CLI``
    names optimum-cli in its own venv (optimum-onnx pins transformers < 4.58).
    """
    d, ref = os.path.join(data, "sd15-diffusers"), os.path.join(data, "sd15-onnx")
    o = lambda name: os.path.join(out, name)  # noqa: E731
    optimum = os.environ.get("OPTIMUM_CLI", "optimum-cli")
    script = [PY, os.path.join(os.path.dirname(os.path.abspath(__file__)), "legacy_onnx_export.py"),
              os.path.join(tools, "convert_stable_diffusion_checkpoint_to_onnx.py")]
    return [
        ("sd15 cp+sync fp32 export", "", _cp(ref, o("cp")), o("cp")),
        ("sd15 sdport -> onnx fp32", "sd15 cp+sync fp32 export", SDPORT + ["convert", d, o("s"), "--to", "onnx", "-q"],
         o("s")),
        ("sd15 diffusers script -> onnx fp32", "sd15 cp+sync fp32 export",
         script + ["--model_path", d, "--output_path", o("ds"), "--opset", "17"], o("ds")),
        ("sd15 optimum-cli -> onnx fp32", "sd15 cp+sync fp32 export",
         ["env", "HF_HUB_OFFLINE=1", optimum, "export", "onnx", "--model", d, "--task", "text-to-image", o("op")],
         o("op")),
        ("sd15 cp+sync folder", "", _cp(d, o("cpd")), o("cpd")),
        ("sd15 sdport -> onnx fp16", "sd15 cp+sync folder",
         SDPORT + ["convert", d, o("h"), "--to", "onnx", "--dtype", "fp16", "-q"], o("h")),
        ("sd15 diffusers script -> onnx fp16", "sd15 cp+sync folder",
         script + ["--model_path", d, "--output_path", o("dh"), "--opset", "17", "--fp16"], o("dh")),
        ("sd15 optimum-cli -> onnx fp16", "sd15 cp+sync folder",
         ["env", "HF_HUB_OFFLINE=1", optimum, "export", "onnx", "--model", d, "--task", "text-to-image",
          "--dtype", "fp16", o("oh")], o("oh")),
    ]


def verify(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """``sdport verify`` of full-size SD1.5 (random weights) against its fp32 ONNX export (``sd15-onnx``, made once
    with ``sdport convert sd15-fp32.safetensors sd15-onnx --to onnx``): the tensor check beside cp of the file, the
    output check at 512×512 and 4 steps (torch and onnxruntime on the CPU). No other tool does either end to end:
    the guides sdport replaces compare by hand."""
    st, ox = os.path.join(data, "sd15-fp32.safetensors"), os.path.join(data, "sd15-onnx")
    o = lambda name: os.path.join(out, name)  # noqa: E731
    return [
        ("cp+sync st", "", _cp(st, o("cp.st")), o("cp.st")),
        ("sd15 verify --tensors st vs onnx", "cp+sync st", SDPORT + ["verify", st, ox, "--tensors"], ""),
        ("sd15 verify --outputs 512 4 steps", "", SDPORT + ["verify", st, ox, "--outputs", "--size", "512x512",
                                                            "--steps", "4", "--report", o("rep")], o("rep")),
    ]


def batch(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """``sdport batch`` of an onnx-web extras.json naming three full-size SD1.5 models (``sd15-fp32.safetensors``
    under three names, ``half``: ONNX fp16) beside cp+sync of the three inputs, and the diffusers repository's
    ONNX script on one of them as a diffusers folder (``sd15-fp32-diffusers``; fp32: its fp16 needs CUDA).
    The last repetition's per-entry walls and peaks are kept in ``DATA/batch-result.json``."""
    st = os.path.join(data, "sd15-fp32.safetensors")
    manifest = os.path.join(data, "batch-extras.json")
    with open(manifest, "w") as f:
        json.dump({"diffusion": [{"name": f"diffusion-sd15-{k}", "source": st, "half": True} for k in "abc"]}, f)
    o = lambda name: os.path.join(out, name)  # noqa: E731
    script = [PY, os.path.join(os.path.dirname(os.path.abspath(__file__)), "legacy_onnx_export.py"),
              os.path.join(tools, "convert_stable_diffusion_checkpoint_to_onnx.py")]
    cp3 = f"for k in a b c; do cp {st} {o('cp')}-$k; done && sync {o('cp')}-*"
    result = os.path.join(data, "batch-result.json")
    return [
        ("cp+sync 3 sources", "", ["sh", "-c", cp3], ""),
        ("sdport batch 3x sd15 -> onnx fp16", "cp+sync 3 sources",
         ["sh", "-c", " ".join(SDPORT + ["batch", manifest, "--out", o("b"), "--json", ">", result])], o("b")),
        ("sdport batch 3x sd15 -> onnx fp16 --jobs 2", "cp+sync 3 sources",
         ["sh", "-c", " ".join(SDPORT + ["batch", manifest, "--out", o("b"), "--jobs", "2", "--json", ">",
                                         result + ".jobs2"])], o("b")),
        ("diffusers script 1x sd15 -> onnx fp32", "",
         script + ["--model_path", os.path.join(data, "sd15-fp32-diffusers"), "--output_path", o("ds"),
                   "--opset", "17"], o("ds")),
    ]


def cpu(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """The paths that were CPU-bound (issue 19), each beside cp+sync of its input and the tool users would use:
    fp32 → fp16 of full-size SD1.5 (torch load+half+save beside), one and two rank-32 LoRAs into full-size SDXL
    (diffusers' load_lora_weights+fuse_lora beside), and SD1.5 (fp16 folder) → ONNX fp16 with the graph cache
    emptied first ("cold": traced and stored) and then kept ("warm"). Run with ``--compare`` for the code before."""
    st, xl, d = (os.path.join(data, n) for n in ("sd15-fp32.safetensors", "sdxl.safetensors", "sd15-diffusers"))
    a, b = os.path.join(data, "lora-sdxl-r32.safetensors"), os.path.join(data, "lora-sdxl-r32-b.safetensors")
    cold, warm = os.path.join(data, "graphs-cold"), os.path.join(data, "graphs-warm")
    if not os.path.isdir(warm):  # the warm cache: filled once by an untimed export
        subprocess.run(["env", f"SDPORT_GRAPH_CACHE={warm}", *SDPORT, "convert", d, os.path.join(data, "warm-up"),
                        "--to", "onnx", "--dtype", "fp16", "-q", "--force"], check=True)
        shutil.rmtree(os.path.join(data, "warm-up"))
    ops_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "anchor-bench", "ops.py")
    o = lambda name: os.path.join(out, name)  # noqa: E731
    onnx16 = ["convert", d, o("h"), "--to", "onnx", "--dtype", "fp16", "-q"]
    return [
        ("sd15 cp+sync fp32 file", "", _cp(st, o("cp.st")), o("cp.st")),
        ("sd15 sdport fp32->fp16", "sd15 cp+sync fp32 file",
         SDPORT + ["convert", st, o("h.safetensors"), "--dtype", "fp16", "-q"], o("h.safetensors")),
        ("sd15 torch load+half+save", "sd15 cp+sync fp32 file", [PY, REF, "st_half", st, o("r.safetensors")],
         o("r.safetensors")),
        ("sdxl cp+sync file", "", _cp(xl, o("cp.st")), o("cp.st")),
        ("sdxl sdport merge one LoRA", "sdxl cp+sync file",
         SDPORT + ["convert", xl, o("m.safetensors"), "--lora", a, "-q"], o("m.safetensors")),
        ("sdxl sdport merge two LoRAs", "sdxl cp+sync file",
         SDPORT + ["convert", xl, o("m2.safetensors"), "--lora", a, "--lora", f"{b}:0.5", "-q"], o("m2.safetensors")),
        ("sdxl diffusers load_lora_weights+fuse_lora+save", "sdxl cp+sync file",
         [PY, ops_py, "lora_fuse", os.path.join(data, "sdxl-diffusers"), a, o("f"), "--sdxl"], o("f")),
        ("sd15 cp+sync fp16 folder", "", _cp(d, o("cpd")), o("cpd")),
        ("sd15 sdport -> onnx fp16, graph cache cold", "sd15 cp+sync fp16 folder",
         ["env", f"SDPORT_GRAPH_CACHE={cold}", "sh", "-c", f'rm -rf {cold} && exec "$@"', "sh", *SDPORT, *onnx16],
         o("h")),
        ("sd15 sdport -> onnx fp16, graph cache warm", "sd15 cp+sync fp16 folder",
         ["env", f"SDPORT_GRAPH_CACHE={warm}", *SDPORT, *onnx16], o("h")),
    ]


def repackage(data: str, out: str, tools: str) -> list[tuple[str, str, list[str], str]]:
    """(name, floor name, command, output path): each op is compared with the cp of its input."""
    st, ck = os.path.join(data, "sd15-fp32.safetensors"), os.path.join(data, "sd15-fp32.ckpt")
    o = lambda name: os.path.join(out, name)  # noqa: E731
    return [
        ("cp+sync st", "", ["sh", "-c", f"cp {st} {o('cp.st')} && sync {o('cp.st')}"], o("cp.st")),
        ("sdport repackage st->st", "cp+sync st", SDPORT + ["convert", st, o("re.safetensors"), "-q"],
         o("re.safetensors")),
        ("safetensors load+save (torch)", "cp+sync st", [PY, REF, "st_rewrite", st, o("ref.safetensors")],
         o("ref.safetensors")),
        ("sdport fp32->fp16", "cp+sync st", SDPORT + ["convert", st, o("h.safetensors"), "--dtype", "fp16", "-q"],
         o("h.safetensors")),
        ("torch load+half+save", "cp+sync st", [PY, REF, "st_half", st, o("refh.safetensors")],
         o("refh.safetensors")),
        ("cp+sync ckpt", "", ["sh", "-c", f"cp {ck} {o('cp.ckpt')} && sync {o('cp.ckpt')}"], o("cp.ckpt")),
        ("sdport ckpt->st", "cp+sync ckpt", SDPORT + ["convert", ck, o("c.safetensors"), "-q"], o("c.safetensors")),
        ("torch.load+save_file", "cp+sync ckpt", [PY, REF, "ckpt_to_st", ck, o("refc.safetensors")],
         o("refc.safetensors")),
        ("sdport st->ckpt", "cp+sync st", SDPORT + ["convert", st, o("s.ckpt"), "-q"], o("s.ckpt")),
        ("sdport --help", "", SDPORT + ["--help"], ""),
    ]


SUITES = {"repackage": (repackage, ("sd15-fp32.safetensors", "sd15-fp32.ckpt")),
          "layouts": (layouts, ("sd15-ema.safetensors", "sdxl.safetensors", "sd15-diffusers", "sdxl-diffusers")),
          "mindone": (mindone, ("sdxl.safetensors", "sdxl-mindone.ckpt")),
          "onnx": (onnx, ("sd15-diffusers", "sd15-onnx")),
          "verify": (verify, ("sd15-fp32.safetensors", "sd15-onnx")),
          "batch": (batch, ("sd15-fp32.safetensors", "sd15-fp32-diffusers")),
          "cpu": (cpu, ("sd15-fp32.safetensors", "sdxl.safetensors", "sd15-diffusers", "lora-sdxl-r32.safetensors",
                        "lora-sdxl-r32-b.safetensors")),
          "lora": (lora, ("sd15.safetensors", "sdxl.safetensors", "sd15-diffusers", "sdxl-diffusers",
                          "lora-sd15-r32.safetensors", "lora-sdxl-r32.safetensors", "lora-sd15-r32-b.safetensors",
                          "lora-sdxl-r32-b.safetensors"))}


def _with_twin(op: tuple[str, str, list[str], str], src: str) -> list[tuple[str, str, list[str], str]]:
    """The op, and for sdport's own ops (after any ``env VAR=…`` and ``sh -c … sh``) the same command run with the
    sdport in ``src``."""
    name, floor, cmd, target = op
    if not any(cmd[i:i + len(SDPORT)] == SDPORT for i in range(len(cmd))):
        return [op]
    return [op, (f"{name} [before]", floor, ["env", f"PYTHONPATH={os.path.abspath(src)}", *cmd], target)]


def timed(cmd: list[str]) -> tuple[float, float, int, float]:
    """Wall seconds, peak RSS in MB, exit status, CPU seconds (user + system) — from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        p = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", "-o", t.name, *cmd], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        wall, rss_kb, user, system = t.read().split()[-4:]
    if p.returncode:
        print(f"  FAILED ({p.returncode}): {p.stderr.strip()[-300:]}", file=sys.stderr)
    return float(wall), int(rss_kb) / 1024, p.returncode, float(user) + float(system)


def settle(data: str, inputs: tuple[str, ...], compare: str = "") -> None:
    """Start each repetition alike: dirty pages written, page cache dropped (when root), inputs read back in.

    On this machine the kernel's reclaim makes cp's own time swing 2-3x once the cache is full of
    earlier outputs; dropping it between repetitions keeps every operation on cached inputs and a
    clean cache.
    """
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        print("  (cannot drop the page cache: not root)", file=sys.stderr)
    for name in inputs:
        path = os.path.join(data, name)
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    # the programs too: after the drop, the first tool of a repetition would otherwise read its interpreter, numpy
    # (and torch) from disk, a cost none of the others pays
    warm = ("import numpy, sdport.api, sdport.execute, sdport.cli\n"
            "try:\n import torch, diffusers\nexcept ImportError: pass")
    subprocess.run([PY, "-c", warm], check=True)
    if compare:
        subprocess.run(["env", f"PYTHONPATH={os.path.abspath(compare)}", PY, "-c", warm], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--suite", default="repackage", choices=sorted(SUITES))
    ap.add_argument("--tools", default="", help="folder holding the diffusers repository's conversion scripts")
    ap.add_argument("--compare", default="", help="another sdport's src folder: each sdport op runs with it too")
    args = ap.parse_args()
    out = os.path.join(args.data, "out")
    build, inputs = SUITES[args.suite]
    ops = [op for op in build(args.data, out, args.tools) if args.only in op[0] or "cp+sync" in op[0]]
    if args.compare:
        ops = [twin for op in ops for twin in _with_twin(op, args.compare)]
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, *_ in ops}
    ratios: dict[str, list[float]] = {name: [] for name, *_ in ops}
    for rep in range(args.reps):
        settle(args.data, inputs, args.compare)
        last: dict[str, float] = {}
        for name, floor, cmd, target in ops:
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            wall, rss, code, cpu_s = timed(cmd)
            size = _size(target)
            print(f"rep {rep} {name:32s} {wall:7.2f} s {rss:8.0f} MB  cpu {cpu_s:6.2f} s  out {size:,} B rc={code}",
                  flush=True)
            runs[name].append((wall, rss, cpu_s))
            last[name] = wall
            if floor:
                ratios[name].append(wall / last[floor])
    shutil.rmtree(out, ignore_errors=True)
    table = ["| operation | wall median (s) | × cp+sync (paired median) | peak RSS median (MB) | CPU median (s) |",
             "|---|---:|---:|---:|---:|"]
    for name, *_ in ops:
        walls, rss, cpus = ([r[k] for r in runs[name]] for k in range(3))
        ratio = f"{statistics.median(ratios[name]):.2f}" if ratios[name] else "—"
        table.append(f"| {name} | {statistics.median(walls):.2f} | {ratio} | {statistics.median(rss):.0f} | "
                     f"{statistics.median(cpus):.1f} |")
    print("\n".join(table))
    with open(os.path.join(args.data, f"results-{args.suite}.json"), "w") as f:
        json.dump({"runs": runs, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
