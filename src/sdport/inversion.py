"""Textual-inversion embeddings blended into a model: new tokens in its tokenizer, their vectors as new rows of its
text encoder's token embedding — what onnx-web does for a manifest's ``inversions``, streamed like any plan.

An embedding file is one of: A1111's ``.pt`` (``string_to_param`` → ``*``) or ``.safetensors`` (``emb_params``),
diffusers' ``learned_embeds`` (one entry, named after its token; cloneofsimo's ``.ti.pt`` too), the token a
cloneofsimo "safeloras" carries beside its LoRA, or an SDXL embedding (``clip_l`` and
``clip_g``, for the two text encoders). Tokens are named as onnx-web names them (``token_rows``); every
vector is multiplied by the entry's weight. The new rows are computed in memory (a few KB) and
joined to the run's source; the embedding matrix becomes ``concat(matrix, rows)``; ``vocab_size`` in the
text encoder's config and the tokenizer's added tokens follow.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .dtypes import BY_CODE
from .errors import SdportError
from .families.configs import json_bytes
from .families.parts.clip import hub_name
from .io import open_file
from .plan import Plan, derive
from .sources import locate

if TYPE_CHECKING:
    from .steps import Run

EMBEDDING = "text_model.embeddings.token_embedding.weight"
#: an SDXL embedding's entries → the text encoder each one goes to
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
#: A1111 stops at 75 vectors (a prompt's length); more is not an embedding
MAX_VECTORS = 75
#: wider than any CLIP text encoder (bigG: 1280)
MAX_WIDTH = 8192
#: A1111's entry in a .pt embedding (``string_to_param`` → ``*``) and in a .safetensors one
A1111_KEYS = {"string_to_param.*", "emb_params"}
#: cloneofsimo's "safeloras" flag the metadata of a token's vector with this
EMBED_FLAG = "<embed>"


def vectors(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """The token a diffusers ``learned_embeds`` file was trained as ("" for other formats) and the file's vectors
    per text encoder, each ``[N, width]`` fp32."""
    with open_file(path) as source:
        names, trained = list(source.tensors), ""
        embeds = [k for k in names if source.metadata.get(k) == EMBED_FLAG]  # cloneofsimo's, beside its LoRA
        if len(embeds) > 1:
            raise SdportError(path, f"carries {len(embeds)} tokens ({', '.join(embeds[:4])})",
                              "sdport adds one token per --inversion; save each with cloneofsimo's tools")
        if embeds:
            picked, trained = {"text_encoder": embeds[0]}, embeds[0]
        elif set(names) & set(SDXL_KEYS):
            picked = {SDXL_KEYS[k]: k for k in names if k in SDXL_KEYS}
        elif A1111_KEYS & set(names):
            picked = {"text_encoder": next(k for k in names if k in A1111_KEYS)}
        elif len(names) == 1:  # diffusers' learned_embeds: {token: vector}
            picked, trained = {"text_encoder": names[0]}, names[0]
        else:
            shown = ", ".join(names[:4]) or "no tensors"
            raise SdportError(path, f"not a textual-inversion embedding ({shown})",
                              "give an A1111 .pt/.safetensors embedding or a diffusers learned_embeds file")
        for k in picked.values():  # checked before a byte is read: a hostile file may claim any shape
            _check_shape(path, k, source.tensors[k].dtype, tuple(source.tensors[k].shape))
        rows = {enc: source.read(k).reshape(-1, source.tensors[k].shape[-1]) for enc, k in picked.items()}
    return trained, {enc: _finite(path, picked[enc], r) for enc, r in rows.items()}


def _check_shape(path: str, name: str, dtype: str, shape: tuple[int, ...]) -> None:
    if not BY_CODE[dtype].is_float or len(shape) not in (1, 2) or 0 in shape or shape[-1] > MAX_WIDTH:
        raise SdportError(path, f"'{name}' is {dtype} {list(shape)}, not embedding vectors", None)
    if len(shape) == 2 and shape[0] > MAX_VECTORS:
        raise SdportError(path, f"'{name}' has {shape[0]} vectors (at most {MAX_VECTORS})", None)


def _finite(path: str, name: str, rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    if not np.isfinite(rows).all():
        raise SdportError(path, f"'{name}' holds NaN or infinite values", "the embedding is damaged")
    return rows


def token_rows(token: str, trained: str, rows: np.ndarray, weight: float) -> tuple[list[str], np.ndarray]:
    """The tokens an embedding adds and their vectors, as onnx-web names them: a learned_embeds vector under
    ``token`` and the token it was trained as; an A1111 or SDXL embedding's N vectors as ``TOKEN-0`` …
    ``TOKEN-{N-1}``, and their sum as ``TOKEN`` and ``TOKEN-all``."""
    scaled = rows * np.float32(weight)
    if trained and len(scaled) == 1:
        names = list(dict.fromkeys([token, trained]))
        return names, np.repeat(scaled, len(names), axis=0)
    total = scaled.sum(axis=0, keepdims=True)
    names = [f"{token}-{i}" for i in range(len(scaled))] + [token, f"{token}-all"]
    return names, np.concatenate([scaled, total, total])


def add_inversions(plan: Plan, run: Run) -> Plan:
    """Each inversion of the request: its tokens in the tokenizers, its vectors as rows of the text encoders."""
    specs = run.request.inversions
    if not specs:
        return plan
    added: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for spec in specs:
        path = locate(spec.source, kind="adapter", progress=run.progress).path
        trained, per_encoder = vectors(path)
        token = spec.token or trained
        if not token:
            raise SdportError(path, "the embedding names no token", "give the inversion a token")
        for encoder, rows in per_encoder.items():
            names, values = token_rows(token, trained, rows, spec.weight)
            tokens, arrays = added.setdefault(encoder, ([], []))
            tokens += names
            arrays.append(values)
    for encoder, (tokens, arrays) in added.items():
        _extend(plan, run, encoder, tokens, np.concatenate(arrays))
    return plan


def _extend(plan: Plan, run: Run, encoder: str, tokens: list[str], rows: np.ndarray) -> None:
    """The encoder's embedding matrix with ``rows`` appended, its config's vocab_size and its tokenizer's tokens."""
    out = next((f for f in plan.files if f.path.startswith(encoder + "/")), None)
    k = next((i for i, t in enumerate(out.tensors) if hub_name(t.name) == EMBEDDING), None) if out else None
    if out is None or k is None:
        raise SdportError(run.model.path, f"an inversion needs the model's {encoder}, which it lacks",
                          "drop the inversion, or convert the whole model")
    old = out.tensors[k]
    if rows.shape[1] != old.shape[1]:
        raise SdportError(run.model.path, f"an inversion's vectors are {rows.shape[1]} wide, {encoder}'s tokens "
                          f"{old.shape[1]}", "the embedding was trained for another model")
    if old.op != "identity" or old.patches:
        raise SdportError(run.model.path, f"{encoder}'s token embedding is computed, not read", None)
    name = run.source.put(f"inversion:{encoder}", rows)
    out.tensors[k] = replace(derive(old.name, None, run.source, (*old.inputs, name), "concat", (0,)), dtype=old.dtype)
    vocab = old.shape[0]
    config = f"{encoder}/config.json"
    if config in plan.extra:
        doc = json.loads(plan.extra[config])
        plan.extra[config] = json_bytes({**doc, "vocab_size": vocab + len(tokens)})
    tokenizer = encoder.replace("text_encoder", "tokenizer")
    plan.extra.update(add_tokens({k: v for k, v in plan.extra.items() if k.startswith(tokenizer + "/")},
                                 tokenizer, tokens, vocab))


TOKENIZER_FILES = ("vocab.json", "added_tokens.json", "tokenizer_config.json", "tokenizer.json")


def _documents(files: dict[str, bytes], folder: str) -> dict[str, dict]:
    """The tokenizer's JSON files that are present, read once and checked (``_well_formed``); anything else is
    refused by name."""
    docs = {}
    for name in TOKENIZER_FILES:
        raw = files.get(f"{folder}/{name}")
        if raw is None:
            continue
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        if not _well_formed(name, doc):
            raise SdportError(f"{folder}/{name}", "is not a tokenizer file sdport can add tokens to",
                              "the model's tokenizer is damaged")
        docs[name] = doc
    return docs


def _well_formed(name: str, doc: object) -> bool:
    """An object whose vocabularies map strings to integers and whose added-token lists hold ``{content, id}``."""
    if not isinstance(doc, dict):
        return False
    if name in ("vocab.json", "added_tokens.json"):
        return _vocabulary(doc)
    if name == "tokenizer_config.json":
        return isinstance(doc.get("added_tokens_decoder", {}), dict)
    model, tokens = doc.get("model", {}), doc.get("added_tokens", [])
    return isinstance(model, dict) and _vocabulary(model.get("vocab", {})) and isinstance(tokens, list) and all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int for t in tokens)


def _vocabulary(vocab: object) -> bool:
    return isinstance(vocab, dict) and all(type(i) is int for i in vocab.values())


def _token_ids(docs: dict[str, dict]) -> dict[str, int]:
    """token → id over the slow tokenizer's ``vocab.json`` and ``added_tokens.json`` and the fast one's
    ``tokenizer.json`` (transformers 5 saves only the latter)."""
    fast = docs.get("tokenizer.json", {})
    return {**docs.get("vocab.json", {}), **docs.get("added_tokens.json", {}), **fast.get("model", {}).get("vocab", {}),
            **{t["content"]: t["id"] for t in fast.get("added_tokens", [])}}


def add_tokens(files: dict[str, bytes], folder: str, tokens: list[str], first: int) -> dict[str, bytes]:
    """A CLIP tokenizer's files with ``tokens`` added as ids ``first``, ``first + 1`` …, as transformers'
    ``add_tokens`` saves them (``added_tokens.json``, ``tokenizer_config.json``, ``tokenizer.json`` if present)."""
    if f"{folder}/tokenizer_config.json" not in files:
        raise SdportError(None, f"an inversion adds tokens to {folder}, which the model lacks",
                          "convert a model that has its tokenizer")
    docs = _documents(files, folder)
    known = _token_ids(docs)
    clash = next((t for t in tokens if t in known or tokens.count(t) > 1), None)
    if clash is not None:
        raise SdportError(None, f"token {clash!r} is already in {folder}", "give the inversion another token")
    size = max(known.values(), default=-1) + 1
    if size != first:
        raise SdportError(None, f"{folder} has {size} tokens, its text encoder {first}",
                          "the tokenizer is not the text encoder's")
    ids = {t: first + i for i, t in enumerate(tokens)}
    entry = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": False}
    config = docs["tokenizer_config.json"]
    decoder = {**config.get("added_tokens_decoder", {}), **{str(i): {"content": t, **entry} for t, i in ids.items()}}
    out = {f"{folder}/added_tokens.json": json_bytes({**docs.get("added_tokens.json", {}), **ids}),
           f"{folder}/tokenizer_config.json": json_bytes({**config, "added_tokens_decoder": decoder})}
    if "tokenizer.json" in docs:
        fast = docs["tokenizer.json"]
        fast["added_tokens"] = fast.get("added_tokens", []) + [{"id": i, "content": t, **entry} for t, i in ids.items()]
        out[f"{folder}/tokenizer.json"] = json_bytes(fast)
    return out
