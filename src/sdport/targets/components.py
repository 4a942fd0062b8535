"""Which of a family's parts a request writes (``--components``), where each is in the input, and the metadata
that travels with them — shared by the targets that translate between layouts."""

from __future__ import annotations

from ..errors import SdportError
from ..families import Family, Part
from ..families.parts import Shapes, part_shapes
from ..io.base import TensorSource
from ..io.diffusers import PREDICTION_SOURCE


def chosen_parts(family: Family, components: tuple[str, ...] | None) -> list[Part]:
    """The family's parts, or those ``--components`` names (each must be one of the family's)."""
    if components is None:
        return list(family.parts)
    unknown = set(components) - {p.component for p in family.parts}
    if unknown:
        raise SdportError(None, f"--components: {', '.join(sorted(unknown))} not in a {family.name} model",
                          "choose from " + ", ".join(p.component for p in family.parts))
    return [p for p in family.parts if p.component in components]


def required_shapes(source: TensorSource, family: Family, part: Part, diffusers_layout: bool, where: str
                    ) -> tuple[str, Shapes]:
    """``part``'s prefix and shapes in ``source``; its absence is an error naming the flag that leaves it out."""
    found = part_shapes(source, family, part, diffusers_layout)
    if found is None:
        raise SdportError(source.path, f"no {part.component} weights in this {where}",
                          f"pass --components without {part.component}")
    return found


def modelspec(source: TensorSource, origin: str) -> dict[str, str]:
    """The ``modelspec.*`` metadata (architecture, prediction type …), carried across layouts, and where the
    prediction type came from (``origin``, ``detect.prediction_origin``): a default sdport wrote out is never read
    back as the file's word, nor written as modelspec's, which other programs read as a fact."""
    guessed = ("modelspec.predict_key", "modelspec.prediction_type") if origin == "default" else ()
    kept = {k: v for k, v in source.metadata.items() if k.startswith("modelspec.") and k not in guessed}
    return {**kept, PREDICTION_SOURCE: origin}
