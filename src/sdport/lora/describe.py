"""What ``sdport inspect`` says about an adapter: format, algorithms, rank and alpha per component, base family."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..errors import FormatError
from ..io.base import TensorSource
from .formats import UNSUPPORTED, base_family, module_kind, parse, read_alphas

METADATA_PREFIXES = ("ss_", "modelspec.", "sshs_", "lora_adapter_metadata")
#: programs that load an adapter of each format (kohya's names: plain LoRA/LoCon, or LyCORIS algorithms), and
#: what to do for the others
WEBUIS = ["ComfyUI", "A1111", "Forge"]
LOADERS: dict[str, tuple[list[str], str]] = {
    "kohya": ([*WEBUIS, "kohya sd-scripts", "diffusers (load_lora_weights)"], ""),
    "lycoris": ([*WEBUIS, "lycoris-lora"], "diffusers does not load LyCORIS algorithms: `sdport lora convert FILE OUT "
                "--to peft --rank R` approximates them as LoRA"),
    "peft": (["diffusers (load_lora_weights)", "PEFT"], "not for ComfyUI, A1111 or Forge, which want kohya names "
             "(ComfyUI applies only the text-encoder and non-attention modules of a PEFT-named file and ignores "
             "lora_adapter_metadata alphas): `sdport lora convert FILE OUT --to kohya`"),
    "diffusers-old": (["diffusers (its attention-processor loader)"], "for other programs: `sdport lora convert FILE "
                      "OUT --to kohya` (ComfyUI, A1111, Forge) or `--to peft` (current diffusers)"),
    "cloneofsimo": (["cloneofsimo/lora (patch_pipe)"], "for other programs: `sdport lora convert FILE OUT --to kohya` "
                    "(ComfyUI, A1111, Forge) or `--to peft` (diffusers)"),
    "mindone": (["MindOne (MindSpore)"], "for other programs: `sdport lora convert FILE OUT --to kohya` (ComfyUI, "
                "A1111, Forge) or `--to peft` (diffusers)"),
}


def loads_in(fmt: str, kinds: Iterable[str] = ("lora",)) -> tuple[list[str], str]:
    """The programs known to load an adapter in format ``fmt`` with modules of ``kinds`` (``module_kind``), and a
    hint for the others."""
    if fmt in ("kohya", "lycoris"):
        fmt = "kohya" if set(kinds) <= {"lora", "locon"} else "lycoris"
    return LOADERS.get(fmt, ([], ""))


def describe(source: TensorSource, fmt: str) -> dict[str, Any]:
    """The adapter part of the inspect report, for an adapter ``detect`` found in format ``fmt``."""
    found = sorted({algo for name in source.tensors for suffix, algo in UNSUPPORTED.items()
                    if name.endswith("." + suffix)})
    report: dict[str, Any] = {"algorithms": found, "metadata": {k: v for k, v in source.metadata.items()
                                                                if k.startswith(METADATA_PREFIXES)}}
    try:
        adapter = parse(source, read_alphas(source), fmt)
    except FormatError as exc:
        report.update(mergeable=False, reason=exc.problem)
        return report
    components: dict[str, dict[str, Any]] = {}
    kinds: Counter = Counter()
    for m in adapter.modules:
        rank = m.rank(source)
        kinds[module_kind(source, m)] += 1
        entry = components.setdefault(m.component, {"modules": 0, "ranks": set(), "alphas": set()})
        entry["modules"] += 1
        if m.kind in ("lora", "loha", "lokr"):  # (IA)³, diff and norm modules have neither rank nor alpha
            entry["ranks"].add(rank if rank else "full")
            entry["alphas"].add(m.alpha if m.alpha else float(rank or 0))
    programs, note = loads_in(adapter.format, kinds)
    report.update(mergeable=True, format=adapter.format, modules=len(adapter.modules),
                  algorithms=sorted(kinds), kinds=dict(sorted(kinds.items())),
                  base_family=base_family(source, adapter) or "unknown",
                  loads_in=programs, loads_in_note=note,
                  components={c: {"modules": e["modules"], "ranks": sorted(e["ranks"], key=str),
                                  "alphas": sorted(e["alphas"])} for c, e in sorted(components.items())})
    return report

