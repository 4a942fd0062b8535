"""The inputs of an output check, built once from the models' configs: token ids, probes, initial latent."""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import MissingExtraError, SdportError
from ..families.configs import tokenizer_files
from .outputs import TEXT_ENCODERS, Job
from .sampling import Schedule
from .sides import Side

#: SDXL refiner's aesthetic scores (its pipeline's defaults), negative then positive
AESTHETIC = (2.5, 6.0)


def build_job(a: Side, b: Side, *, seed: int, latents, steps: int, size: str | None, prompt: str,
              prompt_embeds: str | None, scheduler: str, notes: list[str], scratch: str) -> Job:
    """One job both sides run: shapes from ``a``'s configs (``b``'s where ``a`` lacks a part)."""
    configs = {**b.configs, **a.configs}
    unet, vae = configs.get("unet", {}), configs.get("vae", {})
    if not unet and not vae and not any(c in configs for c in TEXT_ENCODERS):
        raise SdportError(a.shown, "has no component verify can run", None)
    scale = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    height, width = _size(size, int(unet.get("sample_size") or vae.get("sample_size", 512) // scale) * scale, scale)
    rng = np.random.default_rng(seed)
    init = _latents(latents, (1, 4, height // scale, width // scale), rng)
    probe = np.random.default_rng(seed + 1)
    cross = int(unet.get("cross_attention_dim") or 768)
    xl = unet.get("addition_embed_type") == "text_time"
    pooled_dim, time_ids = _time_ids(unet, configs, a.family, height, width) if xl else (0, None)
    probes = {"sample": probe.standard_normal(init.shape, np.float32),
              "encoder_hidden_states": probe.standard_normal((1, 77, cross), np.float32),
              "latent": probe.standard_normal(init.shape, np.float32),
              "image": probe.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)}
    if xl:
        probes["text_embeds"] = probe.standard_normal((1, pooled_dim), np.float32)
    encoders = [c for c in TEXT_ENCODERS if c in configs]
    embeds = None
    if prompt_embeds is None and "unet" in configs and not encoders:
        prompt_embeds = "random"
        notes.append("no text encoder on either side: the image is conditioned on random prompt embeddings")
    if prompt_embeds is not None:
        make = (lambda shape: np.zeros(shape, np.float32)) if prompt_embeds == "zeros" else \
            (lambda shape: np.random.default_rng(seed + 2).standard_normal(shape, np.float32))
        embeds = (make((2, 77, cross)), make((2, pooled_dim)) if xl else None)
    ids = {} if prompt_embeds is not None and not encoders else _ids(a, b, encoders, configs, prompt, scratch)
    schedule = _schedule(a if "unet" in a.configs else b)
    return Job(ids, embeds, init, probes, schedule, steps, scheduler, float(vae.get("scaling_factor", 0.18215)),
               int(unet.get("in_channels", 4)), time_ids, xl and _zero_negative(a, b, a.family))


def _size(size: str | None, default: int, scale: int) -> tuple[int, int]:
    if size is None:
        return default, default
    w, sep, h = size.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()) or int(w) % (scale * 8) or int(h) % (scale * 8) or not int(w):
        raise SdportError(None, f"--size {size!r}", f"write WxH, each a multiple of {scale * 8}")
    return int(h), int(w)


def _latents(path, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if path is None:
        return rng.standard_normal(shape, np.float32)
    path = os.fspath(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SdportError(path, f"is not a .npy array ({exc})", None) from None
    if array.ndim != 4 or array.shape[0] != 1 or array.shape[1] != 4 or array.dtype.kind != "f":
        raise SdportError(path, f"latents of shape {array.shape} ({array.dtype})",
                          f"save a float array of shape {shape} (or pass --size to match it)")
    if not np.isfinite(array).all():
        raise SdportError(path, "latents hold NaN or infinity", None)
    return array.astype(np.float32)


def _time_ids(unet: dict, configs: dict, family: str, height: int, width: int) -> tuple[int, np.ndarray]:
    """SDXL's pooled width and added time ids: (size, crop, target size), or a refiner's (size, crop, score)."""
    td = int(unet.get("addition_time_embed_dim") or 256)
    total = int(unet["projection_class_embeddings_input_dim"])
    te2 = configs.get("text_encoder_2", {})
    refiner = family == "sdxl-refiner" or (te2 and total - int(te2["projection_dim"]) == 5 * td)
    pooled = total - (5 if refiner else 6) * td
    if refiner:
        rows = [[height, width, 0, 0, score] for score in AESTHETIC]
    else:
        rows = [[height, width, 0, 0, height, width]] * 2
    return pooled, np.array(rows, np.float32)


def _ids(a: Side, b: Side, encoders: list[str], configs: dict, prompt: str, scratch: str) -> dict[str, np.ndarray]:
    """Each text encoder's (2, 77) token ids of the empty prompt and the prompt, by the model's own tokenizer."""
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise MissingExtraError("verify of outputs", "verify", ["transformers"]) from None
    out = {}
    for c in encoders:
        folder = os.path.join(scratch, c.replace("text_encoder", "tokenizer"))
        os.makedirs(folder, exist_ok=True)
        for name, data in _tokenizer(a, b, c, configs[c]).items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        tok = CLIPTokenizer.from_pretrained(folder)
        out[c] = np.asarray(tok(["", prompt], padding="max_length", max_length=77, truncation=True,
                                return_tensors="np").input_ids, np.int64)
    return out


def _tokenizer(a: Side, b: Side, encoder: str, config: dict) -> dict[str, bytes]:
    """A side's own tokenizer files; else the CLIP BPE sdport ships, padded as the encoder's kind is."""
    prefix = encoder.replace("text_encoder", "tokenizer") + "/"
    for side in (a, b):
        files = {k[len(prefix):]: v for k, v in side.plan.extra.items() if k.startswith(prefix) and "/" not in
                 k[len(prefix):]}
        if "vocab.json" in files and "merges.txt" in files:
            return files
    return tokenizer_files("<|endoftext|>" if config.get("hidden_act") == "quick_gelu" else "!")


def _zero_negative(a: Side, b: Side, family: str) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` from a side's model_index.json; else the pipeline's default (base:
    on, refiner: off)."""
    for side in (a, b):
        raw = side.plan.extra.get("model_index.json")
        if raw and "force_zeros_for_empty_prompt" in (index := json.loads(raw)):
            return bool(index["force_zeros_for_empty_prompt"])
    return family != "sdxl-refiner"


def _schedule(side: Side) -> Schedule:
    raw = side.plan.extra.get("scheduler/scheduler_config.json")
    return Schedule.from_config(json.loads(raw) if raw else None, side.plan.prediction_type)
