"""Says what a set of tensors is — family, layout, variant, adapter format — and why, from one table of signatures.

Every signature of ``TABLE`` is scored against the names and shapes: each family's in every layout
(original, diffusers, MindOne), each adapter format's (``lora.formats.ADAPTERS``). Of those that match
in full, the one that asks the most wins (a kohya file with LyCORIS tensors is LyCORIS, not only
kohya); two that match equally are an error naming both. When none matches, the one that came
closest is named with what it lacked. Variants (``VARIANTS``: inpainting, instruct-pix2pix, the
v-prediction marker) are scored on their own, each with its evidence. Signatures are data
(``families.base.Signature``); nothing here guesses from tensor values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import FormatError
from .families import FAMILIES, SIGNATURES, Fact, Signature
from .io.base import TensorInfo
from .io.diffusers import PREDICTION_SOURCE
from .lora.formats import ADAPTERS

#: the signatures a model is told apart by
TABLE: tuple[Signature, ...] = SIGNATURES + ADAPTERS
_CONV_IN = r"model\.diffusion_model\.input_blocks\.0\.0\.(conv\.)?weight|unet\.conv_in\.weight"
VARIANTS: tuple[Signature, ...] = (
    Signature("", "variant", facts=(Fact(_CONV_IN, 1, 9),), tag="inpaint"),
    Signature("", "variant", facts=(Fact(_CONV_IN, 1, 8),), tag="instruct-pix2pix"),
)


#: how a report words each recorded origin of a prediction type (``io.diffusers.ORIGINS``; ``default`` is no fact)
ORIGIN_WORDS = {"marker": "a v_pred marker", "metadata": "the source's metadata", "user": "--prediction-type"}


@dataclass
class Detection:
    """What a file is: family (``unknown`` when nothing matched), its layout, variant and why."""

    family: str = "unknown"
    layout: str = ""
    variant: str = ""
    adapter_format: str = ""
    evidence: list[str] = field(default_factory=list)
    prediction: tuple[str, str] = ("", "")  # what the file says the model predicts, and where it says so
    prediction_source: str = ""  # marker, metadata or user ("" = nothing said: the family's default applies)


@dataclass
class Score:
    """How a signature fares: the evidence for what holds, what is missing, what should not be there."""

    signature: Signature
    evidence: list[str] = field(default_factory=list)
    lacks: list[str] = field(default_factory=list)
    unwanted: list[str] = field(default_factory=list)
    held: int = 0  # tensors found and facts that hold (absences are not counted: they are cheap)

    @property
    def full(self) -> bool:
        return not self.lacks and not self.unwanted

    @property
    def closeness(self) -> tuple[bool, float, int]:
        """How near a miss is: nothing unwanted first, then the share of what it asks for that is there."""
        sig = self.signature
        return not self.unwanted, self.held / max(1, len(sig.all_of) + len(sig.facts)), sig.size


@lru_cache(maxsize=512)
def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _first(pattern: str, tensors: dict[str, TensorInfo]) -> str | None:
    rx = _rx(pattern)
    return next((k for k in tensors if rx.fullmatch(k)), None)


def _named_like(pattern: str) -> str:
    return "a tensor named like " + pattern.replace("\\.", ".")


def _fact(fact: Fact, tensors: dict[str, TensorInfo]) -> tuple[bool, str]:
    key = _first(fact.pattern, tensors)
    if key is None:
        return False, _named_like(fact.pattern)
    shape = tensors[key].shape
    got = len(shape) if fact.dim == "ndim" else (shape[fact.dim] if len(shape) > int(fact.dim) else None)
    what = (f"is {got}-d" if fact.dim == "ndim" else f"has size {got} in dim {fact.dim}")
    want = (f"{fact.value}-d" if fact.dim == "ndim" else f"size {fact.value} in dim {fact.dim}")
    return got == fact.value, f"{key} {what}" if got == fact.value else f"{key} {want} (it {what})"


def score(sig: Signature, tensors: dict[str, TensorInfo]) -> Score:
    """Every requirement of ``sig`` checked against the tensors."""
    out = Score(sig)
    for pattern in sig.all_of:
        key = _first(pattern, tensors)
        (out.evidence.append(f"has {key}") if key else out.lacks.append(_named_like(pattern)))
        out.held += key is not None
    for pattern in sig.none_of:
        key = _first(pattern, tensors)
        (out.unwanted.append(f"has {key}") if key else out.evidence.append(f"no {pattern}"))
    for fact in sig.facts:
        ok, text = _fact(fact, tensors)
        (out.evidence.append(text) if ok else out.lacks.append(text))
        out.held += ok
    return out


def detect(tensors: dict[str, TensorInfo], metadata: dict[str, str] | None = None, *, path: str | None = None
           ) -> Detection:
    """Family, layout, variant and adapter format of a set of tensors, each with the evidence that decided.

    Raises:
        FormatError: two signatures of different families match equally well.
    """
    scores = [score(sig, tensors) for sig in TABLE]
    full = [s for s in scores if s.full]
    if not full:
        return Detection(evidence=["no known signature matched", *_closest(scores)])
    best = max(s.signature.size for s in full)
    top = [s for s in full if s.signature.size == best]
    if len({(s.signature.family, s.signature.tag) for s in top}) > 1:
        raise FormatError(path, "matches " + " and ".join(s.signature.label for s in top) + " equally",
                          "the file mixes models; report it with its tensor names")
    win = top[0]
    sig = win.signature
    found = Detection(sig.family, sig.layout, adapter_format=sig.tag, evidence=[e for e in win.evidence
                                                                               if not e.startswith("no ")])
    _variants(found, tensors)
    _prediction(found, tensors, metadata or {})
    return found


def _closest(scores: list[Score]) -> list[str]:
    near = max((s for s in scores if s.held), key=lambda s: s.closeness, default=None)
    if near is None:
        return []
    missing = near.lacks + [f"not {u}" for u in near.unwanted]
    return [f"closest: {near.signature.label}, which needs {'; '.join(missing)}"]


def _variants(found: Detection, tensors: dict[str, TensorInfo]) -> None:
    for sig in VARIANTS:
        if score(sig, tensors).full:
            found.variant = (found.variant + "+" + sig.tag).lstrip("+")
            key = _first(sig.facts[0].pattern, tensors)
            found.evidence.append(f"{key} takes {sig.facts[0].value} input channels")


def _prediction(found: Detection, tensors: dict[str, TensorInfo], metadata: dict[str, str]) -> None:
    """What the file says the UNet predicts: the ``v_pred`` marker of SD2 checkpoints, or modelspec metadata —
    unless sdport wrote that metadata itself from a family default (``sdport.prediction_type_source``)."""
    said = metadata.get("modelspec.predict_key") or metadata.get("modelspec.prediction_type", "")
    origin = metadata.get(PREDICTION_SOURCE, "")
    if "v_pred" in tensors:
        found.prediction, found.prediction_source = ("v_prediction", "v_pred marker present"), "marker"
    elif said.startswith(("v", "eps")) and not (origin == "default" and _family_default(found) == _value(said)):
        value = _value(said)
        origin = "" if origin == "default" else origin  # a default edited since sdport wrote it: the file's word now
        how = f"modelspec metadata says {said}" + (f", recorded from {ORIGIN_WORDS[origin]}"
                                                   if origin in ORIGIN_WORDS else "")
        found.prediction, found.prediction_source = (value, how), "user" if origin == "user" else "metadata"
    if found.prediction[0] == "v_prediction":
        found.variant = (found.variant + "+v-prediction").lstrip("+")
        found.evidence.append(found.prediction[1])


def _value(said: str) -> str:
    return "v_prediction" if said.startswith("v") else "epsilon"


def _family_default(found: Detection) -> str:
    family = FAMILIES.get(found.family)
    return family.default_prediction()[0] if family else "epsilon"


def prediction_type(found: Detection) -> tuple[str, str]:
    """``epsilon`` or ``v_prediction`` for a detected model, and how it was decided."""
    if found.prediction_source == "user":
        return found.prediction[0], f"the user said so when it was converted ({found.prediction[1]})"
    if found.prediction[0]:
        return found.prediction[0], f"the file says so ({found.prediction[1]})"
    family = FAMILIES.get(found.family)
    return family.default_prediction() if family else ("epsilon", f"{found.family}'s default")


def prediction_origin(found: Detection, asked: str | None = None) -> str:
    """Where an output's prediction type comes from, as ``sdport.prediction_type_source`` records it: ``user``
    (``--prediction-type``), ``marker``, ``metadata``, or ``default`` (the family's; never read back as a fact)."""
    return "user" if asked else found.prediction_source or "default"
