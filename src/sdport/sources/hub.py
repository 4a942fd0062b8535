"""Hugging Face Hub repositories: ``owner/repo[@revision]``, ``hf://owner/repo[@revision][/path]`` and Hub URLs, fetched
through ``huggingface_hub`` into its own cache (``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN``) — only what a
conversion reads — and every LFS file checked against the SHA-256 the Hub publishes.

What a repo resolves to (``choose``): a named file or folder; else a diffusers repo's snapshot folder with
only ``model_index.json`` and the components sdport reads (configs, tokenizers, scheduler, one set of
weights each: safetensors over ``.bin``, the ``--variant`` only when asked) — never the single-file
duplicates at its root; else a LoRA's ``pytorch_lora_weights`` file; else a component repo (a VAE);
else the one weights file at its root. Offline, the same choice is made from the cached snapshot.
"""

from __future__ import annotations

import os
import re

from ..errors import HashMismatchError, SourceError
from .cache import Cache
from .http import sha256_of

#: the diffusers components sdport reads (a pipeline's safety checker and feature extractor are left on the Hub)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "controlnet")
_WEIGHTS = re.compile(r"(?P<stem>diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>\w+))?(?:-\d+-of-\d+)?"
                      r"\.(?P<ext>safetensors|bin)(?:\.index\.json)?")
SINGLE = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LORAS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_SHA = re.compile(r"[0-9a-f]{64}")


def choose(paths: list[str], path: str, variant: str | None, shown: str, index: dict | None = None,
           kind: str = "model") -> tuple[list[str], str]:
    """The files to fetch and what the source names inside the snapshot ("" for the snapshot itself); an
    ``adapter`` asked of a repo holding a LoRA beside a pipeline is the LoRA."""
    lora = next((p for p in LORAS if p in paths), None)
    if lora and (kind == "adapter" or "model_index.json" not in paths) and not path:
        return [lora], lora
    if path:
        if path in paths:
            return [path], path
        under = [p for p in paths if p.startswith(path.rstrip("/") + "/")]
        if not under:
            raise SourceError(shown, f"the repo has no {path!r}", "check the path inside the repo")
        return _component(under, variant, shown, path.rstrip("/")), path.rstrip("/")
    if "model_index.json" in paths:
        wanted = [c for c in COMPONENTS if index is None or (isinstance(index.get(c), list) and index[c][0])]
        files = ["model_index.json"]
        for comp in wanted:
            under = [p for p in paths if p.startswith(comp + "/")]
            files += _component(under, variant, shown, comp) if under else []
        return files, ""
    if "config.json" in paths and any(_WEIGHTS.fullmatch(p) for p in paths):
        return _component(paths, variant, shown, ""), ""
    weights = [p for p in paths if "/" not in p and p.endswith(SINGLE)]
    weights = [p for p in weights if p.endswith(".safetensors")] or weights
    if len(weights) == 1:
        return weights, weights[0]
    if not weights:
        raise SourceError(shown, "the repo holds no model sdport reads", "name a file: hf://owner/repo/FILE")
    raise SourceError(shown, f"the repo holds {len(weights)} weight files ({', '.join(sorted(weights)[:4])})",
                      f"name one: hf://{shown.removeprefix('hf://').split('@')[0]}/{sorted(weights)[0]}")


def _component(paths: list[str], variant: str | None, shown: str, comp: str) -> list[str]:
    """A component folder's configs and one set of its weights: the variant asked for, safetensors first."""
    prefix = comp + "/" if comp else ""
    local = [p[len(prefix):] for p in paths if "/" not in p[len(prefix):]]
    configs = [prefix + p for p in local if p.endswith((".json", ".txt")) and not _WEIGHTS.fullmatch(p)]
    groups: dict[tuple[str | None, str], list[str]] = {}
    for p in local:
        m = _WEIGHTS.fullmatch(p)
        if m:
            groups.setdefault((m["variant"], m["ext"]), []).append(prefix + p)
    variants = {v for v, _ in groups}
    if variant and groups and variant not in variants:
        raise SourceError(shown, f"{comp or 'the repo'} has no {variant} variant", "convert without --variant")
    if variant or None in variants or len(variants) <= 1:  # a lone variant (MindOne writes fp16 only) is read as is
        pick = variant if variant else (None if None in variants else next(iter(variants), None))
    else:
        raise SourceError(shown, f"{comp} has only variants ({', '.join(sorted(variants))})", "pass --variant")
    return configs + (groups.get((pick, "safetensors")) or groups.get((pick, "bin")) or [])


def snapshot(repo: str, commit: str) -> str:
    from huggingface_hub import constants

    return os.path.join(constants.HF_HUB_CACHE, f"models--{repo.replace('/', '--')}", "snapshots", commit)


def cached_commit(repo: str, revision: str | None, shown: str) -> str:
    """The commit a cached revision points at (offline)."""
    from huggingface_hub import constants

    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = os.path.join(constants.HF_HUB_CACHE, f"models--{repo.replace('/', '--')}", "refs", revision)
    try:
        with open(ref, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        raise SourceError(shown, "not in the Hugging Face cache, and sdport is offline",
                          "run once without --offline (or HF_HUB_OFFLINE) to fetch it") from None


def fetch_repo(repo: str, revision: str | None, path: str, variant: str | None, *, offline: bool, shown: str,
               kind: str = "model") -> str:
    """The local path of what the source names, fetched into the Hub cache and verified."""
    import huggingface_hub as hub  # a core dependency, imported when a Hub source is used

    if offline:
        commit = cached_commit(repo, revision, shown)
        root = snapshot(repo, commit)
        paths = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
        files, named = choose(paths, path, variant, shown, _read_index(root), kind)
        _verify(root, files, {}, shown)
        return os.path.join(root, named)
    try:
        info = hub.HfApi().model_info(repo, revision=revision, files_metadata=True)
        sha = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
        paths = [s.rfilename for s in info.siblings or []]
        index = None
        if "model_index.json" in paths and not path:
            index = _read_json(hub.hf_hub_download(repo, "model_index.json", revision=info.sha))
        files, named = choose(paths, path, variant, shown, index, kind)
        for name in files:
            hub.hf_hub_download(repo, name, revision=info.sha)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's errors and its HTTP client's, told apart below
        raise _hub_error(exc, shown) from None
    root = snapshot(repo, info.sha)
    _verify(root, files, sha, shown)
    return os.path.join(root, named)


def _read_json(path: str) -> dict | None:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _read_index(root: str) -> dict | None:
    return _read_json(os.path.join(root, "model_index.json"))


def _verify(root: str, files: list[str], published: dict[str, str], shown: str) -> None:
    """Every LFS file's bytes against its SHA-256 (the Hub's, or its blob's name, which is that hash)."""
    cache = Cache()
    for name in files:
        link = os.path.join(root, name)
        blob = os.path.realpath(link)
        want = published.get(name) or (os.path.basename(blob) if _SHA.fullmatch(os.path.basename(blob)) else None)
        if want is None or not os.path.exists(blob) or cache.verified(blob) == want:
            continue
        got = sha256_of(blob)
        if got != want:
            for p in (link, blob):
                os.remove(p)
            raise HashMismatchError(shown, f"{name}: SHA-256 {got[:16]}…, the Hub publishes {want[:16]}…",
                                    "the cached copy was removed; fetch it again")
        cache.mark_verified(blob, got)


def _hub_error(exc: Exception, shown: str) -> SourceError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return SourceError(shown, "the repo is gated", "accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return SourceError(shown, "no such Hugging Face repo (nor a local path), or it is private",
                           "check the name, or set HF_TOKEN")
    if isinstance(exc, errors.RevisionNotFoundError):
        return SourceError(shown, "no such revision in the repo", "check the @revision")
    if isinstance(exc, errors.EntryNotFoundError):
        return SourceError(shown, "a file of the repo is missing on the Hub", None)
    if isinstance(exc, errors.HfHubHTTPError):
        code = getattr(getattr(exc, "response", None), "status_code", "?")
        return SourceError(shown, f"the Hub answered HTTP {code}", "set HF_TOKEN if the repo needs a login")
    return SourceError(shown, f"cannot reach the Hub ({type(exc).__name__})", "check HF_ENDPOINT and the network, "
                       "or run with --offline to use what is cached")
