"""What ``sdport inspect`` says about an adapter: format, algorithms, rank and alpha per component, base family."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import FormatError
from ..io.base import TensorSource
from .formats import UNSUPPORTED, base_family, module_kind, parse, read_alphas

METADATA_PREFIXES = ("ss_", "modelspec.", "sshs_", "lora_adapter_metadata")


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
    report.update(mergeable=True, format=adapter.format, modules=len(adapter.modules),
                  algorithms=sorted(kinds), kinds=dict(sorted(kinds.items())),
                  base_family=base_family(source, adapter) or "unknown",
                  components={c: {"modules": e["modules"], "ranks": sorted(e["ranks"], key=str),
                                  "alphas": sorted(e["alphas"])} for c, e in sorted(components.items())})
    return report

