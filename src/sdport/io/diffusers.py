"""Hugging Face diffusers directories read as one TensorSource named ``<component>.<tensor>``.

Components are the subfolders holding weights (``unet/``, ``vae/``, ``text_encoder/`` …); each may
hold one safetensors file, a sharded set with its ``*.index.json``, or a legacy ``.bin``. Paths
named inside index files must be plain file names in the same folder.
"""

from __future__ import annotations

import json
import os
import re

from ..errors import FormatError, UnsafeFileError
from .base import TensorSource

WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


#: where sdport took the prediction type it wrote from (``ORIGINS``): a weight file's metadata key, and the private
#: scheduler-config key diffusers does not read
PREDICTION_SOURCE = "sdport.prediction_type_source"
SCHEDULER_SOURCE = "_sdport_prediction_type_source"
ORIGINS = ("default", "marker", "metadata", "user")
#: weight-file metadata a folder's source keeps: modelspec facts and where the prediction type came from
KEPT_METADATA = ("modelspec.", PREDICTION_SOURCE)


def _strict_json(path: str) -> object:
    def pairs(items: list) -> dict:
        out: dict = {}
        for k, v in items:
            if k in out:
                raise FormatError(path, f"duplicate key '{k}' in JSON", "the file is damaged or crafted")
            out[k] = v
        return out

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=pairs)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(path, "not valid JSON", None) from None


def contained(folder: str, name: str, where: str) -> str:
    """``folder/name`` after checking that ``name`` is a plain file name that stays in ``folder``."""
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..")
            or "\0" in name):
        raise UnsafeFileError(where, f"path {name!r} escapes its folder", "the index file is crafted")
    full = os.path.join(folder, name)
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([os.path.realpath(full), real_folder]) != real_folder:
        raise UnsafeFileError(where, f"path {name!r} leads outside its folder (symlink)", "the folder is crafted")
    return full


def _component_files(folder: str, variant: str | None) -> tuple[list[str], tuple[str, dict] | None]:
    """The weight files of one component folder, and (index path, weight_map) when sharded.

    Without ``variant``, a folder that holds only one variant (``model.fp16.safetensors``, as
    ``save_pretrained(variant="fp16")`` and MindOne write) is read as that variant.
    """
    names = set(os.listdir(folder))
    plain = {f"{stem}.{ext}{index}" for stem in WEIGHT_STEMS for ext in ("safetensors", "bin")
             for index in ("", ".index.json")}
    if variant is None and not names & plain:
        rx = re.compile(rf"(?:{'|'.join(WEIGHT_STEMS)})\.(\w+)\.(?:safetensors|bin)(?:\.index\.json)?")
        found = {m[1] for n in names if (m := rx.fullmatch(n))}
        if len(found) == 1:
            variant = found.pop()
    for stem in WEIGHT_STEMS:
        for ext in ("safetensors", "bin"):
            base = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
            index = base + ".index.json"
            if index in names:
                return _shards(folder, os.path.join(folder, index))
            if base in names:
                return [os.path.join(folder, base)], None
    return [], None


def _shards(folder: str, index: str) -> tuple[list[str], tuple[str, dict]]:
    doc = _strict_json(index)
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise FormatError(index, "index has no weight_map", None)
    files = []
    for name in wm.values():
        full = contained(folder, name, index)
        if full not in files:
            files.append(full)
    for f in files:
        if not os.path.isfile(f):
            raise FormatError(index, f"shard {os.path.basename(f)} is missing", "download the model again")
    return files, (index, wm)


def _check_index(index: str, wm: dict, files: list[str], parts: list[TensorSource]) -> None:
    found = {}
    for file, part in zip(files, parts, strict=True):
        for key in part.tensors:
            if key in found:
                raise FormatError(index, f"tensor '{key}' is in two shards", None)
            found[key] = os.path.basename(file)
    if found != wm:
        wrong = sorted(set(found.items()) ^ set(wm.items()))[:3]
        raise FormatError(index, f"weight_map disagrees with the shards (e.g. {wrong})", None)


def open_diffusers(path: str, *, variant: str | None = None) -> TensorSource:
    """All weights of a diffusers pipeline folder (or of one component folder)."""
    from . import open_file

    if os.path.isfile(os.path.join(path, "config.json")) and _component_files(path, variant)[0]:
        components = {"": path}
    else:
        components = {d: os.path.join(path, d) for d in sorted(os.listdir(path))
                      if os.path.isdir(os.path.join(path, d)) and _component_files(os.path.join(path, d), variant)[0]}
    if not components:
        raise FormatError(path, "no model weights in this folder", "expected a diffusers folder with "
                          "unet/, vae/ … or a weights file")
    source = TensorSource(path=path, format="diffusers", tensors={})
    for comp, folder in components.items():
        files, index = _component_files(folder, variant)
        parts = [open_file(f) for f in files]
        if index is not None:
            _check_index(*index, files, parts)
        prefix = f"{comp}." if comp else ""
        for part in parts:
            for name, info in part.tensors.items():
                source.tensors[prefix + name] = info.__class__(**{**info.__dict__, "name": prefix + name})
            source.non_tensors.update({prefix + k: v for k, v in part.non_tensors.items()})
            source.metadata.update({k: v for k, v in part.metadata.items() if k.startswith(KEPT_METADATA)})
            part.close()
    scheduler = _scheduler_metadata(path)
    if scheduler:  # the scheduler's prediction type, with its own origin or none: the weights' tag is not about it
        source.metadata.pop(PREDICTION_SOURCE, None)
    source.metadata.update(scheduler)
    return source


def _scheduler_metadata(path: str) -> dict[str, str]:
    """What the pipeline's scheduler says the UNet predicts, in the ``modelspec`` words single files use."""
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config):
        return {}
    doc = _strict_json(config)
    prediction = doc.get("prediction_type") if isinstance(doc, dict) else None
    if prediction not in ("epsilon", "v_prediction"):
        return {}
    origin = doc.get(SCHEDULER_SOURCE)
    return {"modelspec.predict_key": "v" if prediction == "v_prediction" else "epsilon",
            **({PREDICTION_SOURCE: origin} if origin in ORIGINS else {})}


def small_files(path: str, weights: set[str] = frozenset()) -> dict[str, bytes]:
    """A model folder's configs and tokenizers (``.json``/``.txt`` under 16 MiB), by relative path.

    Symlinks are followed (a Hugging Face cache snapshot links every file to its blob); a ``.bin``
    shard index is left out (it would name files that are renamed), as are the files in ``weights``.
    """
    out = {}
    for folder, _, names in os.walk(path):
        for n in sorted(names):
            full = os.path.join(folder, n)
            small = n.endswith((".json", ".txt")) and not n.endswith(".bin.index.json")
            if small and os.path.getsize(full) < 16 << 20 and os.path.realpath(full) not in weights:
                with open(full, "rb") as f:
                    out[os.path.relpath(full, path)] = f.read()
    return out
