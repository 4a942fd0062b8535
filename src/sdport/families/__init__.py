"""The model families sdport converts, one module each holding every fact about it; this is their registry.

A ``Family`` (``base``) lists its ``Part``s — the diffusers component folder, the prefix of its
tensors in an original single file, the kind of name table that translates it — its signatures
(how ``detect`` recognises it in each layout), and the facts its weights do not carry: head layout,
the released block structure, pipeline and ONNX Runtime classes, scheduler, VAE scaling, MindOne
rules. Adding a family is adding a module and a row here; ``parts/`` holds the name machinery of
the components (UNet, VAE, CLIP) that families share.
"""

from __future__ import annotations

from . import components, sd1, sd2, sdxl
from .base import UNET, VAE, Fact, Family, MindOneRules, Part, Signature

__all__ = ["FAMILIES", "SIGNATURES", "UNET", "VAE", "Fact", "Family", "MindOneRules", "Part", "Signature"]

FAMILIES: dict[str, Family] = {f.name: f for f in (sd1.FAMILY, sd2.FAMILY, sdxl.BASE, sdxl.REFINER, components.VAE,
                                                    components.UNET_ALONE, components.CONTROLNET)}
#: every family's signatures, in every layout
SIGNATURES: tuple[Signature, ...] = tuple(s for f in FAMILIES.values() for s in f.signatures)
