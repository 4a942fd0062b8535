"""Two-way name tables: original (LDM/SGM) tensor names ⇄ diffusers names, as prefix pairs plus inner renames.

A ``NameMap`` is data: a list of ``(ldm_prefix, diffusers_prefix, inner)`` rows, where ``inner``
names a table of renames applied to the rest of the name (the first one or two dotted parts).
Translating in either direction is a lookup of the longest matching prefix, so the same table
serves both directions and a round trip is the identity by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rename:
    """``ldm`` ⇄ ``diffusers`` for the leading part of a name; ``conv1x1`` marks 1×1 conv (LDM) ⇄ linear weights."""

    ldm: str
    diffusers: str
    conv1x1: bool = False


@dataclass
class NameMap:
    """Prefix rows and the inner rename tables they refer to.

    Attributes:
        rows: ``(ldm_prefix, diffusers_prefix, inner table name or "")``; prefixes without the trailing dot.
        inner: table name → renames of the leading dotted part(s) below a prefix.
    """

    rows: list[tuple[str, str, str]]
    inner: dict[str, tuple[Rename, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_side = ({r[0]: r for r in self.rows}, {r[1]: r for r in self.rows})

    def to_diffusers(self, name: str) -> tuple[str, bool] | None:
        """The diffusers name of an LDM name, and whether its weight is a 1×1 conv to flatten; None if unknown."""
        return self._translate(name, 0)

    def to_ldm(self, name: str) -> tuple[str, bool] | None:
        """The LDM name of a diffusers name, and whether its weight becomes a 1×1 conv; None if unknown."""
        return self._translate(name, 1)

    def _translate(self, name: str, side: int) -> tuple[str, bool] | None:
        parts = name.split(".")
        table = self._by_side[side]
        for cut in range(len(parts) - 1, 0, -1):
            row = table.get(".".join(parts[:cut]))
            if row is None:
                continue
            rest = ".".join(parts[cut:])
            new_rest, conv = rest, False
            if row[2]:
                hit = _rename(self.inner[row[2]], rest, side)
                if hit is None:
                    return None
                new_rest, conv = hit
            return f"{row[1 - side]}.{new_rest}", conv and name.endswith(".weight")
        return None


def _rename(table: tuple[Rename, ...], rest: str, side: int) -> tuple[str, bool] | None:
    for r in table:
        src, dst = (r.ldm, r.diffusers) if side == 0 else (r.diffusers, r.ldm)
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):], r.conv1x1
    return None


_FIELDS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


@dataclass(frozen=True)
class Pattern:
    """One row of a ``PatternMap``: templates with ``{i}``/``{j}`` (numbers), ``{p}`` (weight/bias), ``{rest}``."""

    ldm: str
    diffusers: str

    def match(self, name: str, side: int) -> dict[str, str] | None:
        template = self.ldm if side == 0 else self.diffusers
        rx = "".join(_FIELDS.get(part, re.escape(part)) if k % 2 else re.escape(part)
                     for k, part in enumerate(re.split(r"\{(\w+)\}", template)))
        m = re.fullmatch(rx, name)
        return m.groupdict() if m else None

    def fill(self, fields: dict[str, str], side: int) -> str:
        return (self.diffusers if side == 0 else self.ldm).format(**fields)


def translate(patterns: tuple[Pattern, ...], name: str, side: int) -> tuple[Pattern, str] | None:
    """The first pattern matching ``name`` on ``side`` (0 = LDM, 1 = diffusers) and the name on the other side."""
    for pat in patterns:
        fields = pat.match(name, side)
        if fields is not None:
            return pat, pat.fill(fields, side)
    return None
