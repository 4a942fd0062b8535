"""LoRA adapters: reading the formats people download (``formats``), finding where each module lands in a
base model (``resolve``), and merging them into any conversion as per-tensor patches (``merge``)."""

from .merge import AdapterReport, merge_adapters, parse_spec

__all__ = ["AdapterReport", "merge_adapters", "parse_spec"]
