"""An opened input model: its lazy tensors under the names plans use, what ``detect`` found, and its kind.

The kind is what the route table keys on: ``original`` (a single file in the original LDM/SGM names —
MindOne checkpoints are seen under those names — or anything else that is repackaged as it is),
``diffusers`` (a diffusers folder, or a file in diffusers names) or ``onnx`` (an ONNX export's folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .detect import Detection, detect
from .errors import SdportError
from .families import FAMILIES, Family
from .io import open_tensors
from .io.base import TensorSource

KINDS = ("original", "diffusers", "onnx")


@dataclass
class Model:
    """An input opened for a conversion.

    Attributes:
        source: its tensors under the names the plans read (a MindOne checkpoint under the original names).
        found: what it is, and why.
        raw: the tensors as stored (differs from ``source`` only for MindOne checkpoints).
    """

    source: TensorSource
    found: Detection
    raw: TensorSource

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def kind(self) -> str:
        if self.source.format == "onnx":
            return "onnx"
        return "diffusers" if self.source.format == "diffusers" or self.found.layout == "diffusers" else "original"

    def family(self) -> Family:
        """The model's family, which every conversion between layouts needs; an adapter or unknown model is refused."""
        name = self.found.family
        if name == "lora":
            raise SdportError(self.path, "is a LoRA adapter, not a model",
                              "merge it into a model with --lora, or rewrite it with `sdport lora convert`")
        if name not in FAMILIES:
            raise SdportError(self.path, f"cannot convert a model of family '{name}' between layouts",
                              "sdport converts sd1, sd2, sdxl-base, sdxl-refiner, vae, unet and controlnet models"
                              + _near_miss(self.found))
        return FAMILIES[name]


def _near_miss(found: Detection) -> str:
    return f"; {found.evidence[-1]}" if found.evidence and found.evidence[-1].startswith("closest") else ""


@contextmanager
def open_model(path: str | os.PathLike[str], *, variant: str | None = None) -> Iterator[Model]:
    """Open and detect a model (a MindOne checkpoint seen under the original names); its files close on exit.

    ``path`` is local (``sources.locate`` gives one for any source); ``variant`` picks a diffusers folder's weights.
    """
    from .families.parts.mindone import view

    with open_tensors(path, variant=variant) as raw:
        found = detect(raw.tensors, raw.metadata, path=raw.path)
        rules = FAMILIES[found.family].mindone if found.layout == "mindone" else None
        if rules is None:
            yield Model(raw, found, raw)
            return
        found.evidence.append(f"MindOne names, read as the original layout by the {found.family} rules")
        with view(raw, rules) as source:
            yield Model(source, found, raw)
