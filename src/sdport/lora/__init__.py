"""LoRA adapters: reading the formats people download (``formats``), finding where each module lands in a
base model (``resolve``), merging them into any conversion as per-tensor patches (``merge``), and
writing adapters anew — ``convert`` between formats, ``combine`` several into one (``rewrite``),
``extract`` one from a fine-tune (``extract``).

    >>> from sdport import lora
    >>> lora.convert("style.safetensors", "style-peft.safetensors", to="peft")
    >>> lora.combine(["a.safetensors:0.7", "b.safetensors:0.5"], "ab.safetensors")
    >>> lora.extract("tuned.safetensors", "base.safetensors", "diff.safetensors", rank=32)
"""

from .extract import Extracted, extract
from .merge import AdapterReport, merge_adapters, parse_spec
from .rewrite import FORMATS, Written, combine
from .rewrite import convert_adapter as convert

__all__ = ["FORMATS", "AdapterReport", "Extracted", "Written", "combine", "convert", "extract", "merge_adapters",
           "parse_spec"]
