"""What a component's name table yields: output tensors as ``op(inputs)``, plus what it leaves out and why."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .names import NameMap


@dataclass(frozen=True)
class Link:
    """Output tensor ``out`` ← ``op(*inputs, args)``; names are relative to their component."""

    out: str
    inputs: tuple[str, ...]
    op: str = "identity"
    args: tuple = ()


@dataclass
class Links:
    """The links of one component, the input names dropped (name → reason) and the names nobody knows."""

    links: list[Link] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def add(self, link: Link) -> None:
        self.links.append(link)


def map_names(table: NameMap, shapes: dict[str, tuple[int, ...]], to_diffusers: bool,
              normalize: Callable[[str], str] = str) -> Links:
    """Apply a two-way prefix table to every name, reshaping 1×1 conv weights ⇄ linear ones.

    ``normalize`` turns a legacy input name into the one the table knows; the link still reads the input's own name.
    """
    out = Links()
    for name, shape in shapes.items():
        key = normalize(name)
        hit = table.to_diffusers(key) if to_diffusers else table.to_ldm(key)
        if hit is None:
            out.unknown.append(name)
            continue
        new, conv1x1 = hit
        if conv1x1 and to_diffusers and len(shape) == 4:
            out.add(Link(new, (name,), "reshape", (shape[:2],)))
        elif conv1x1 and not to_diffusers and len(shape) == 2:
            out.add(Link(new, (name,), "reshape", (shape + (1, 1),)))
        else:
            out.add(Link(new, (name,)))
    return out
