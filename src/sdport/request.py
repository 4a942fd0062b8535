"""What a conversion is asked to do, built and checked once: ``ConvertRequest`` and each target's options.

A request is frozen and picklable — it is what a batch entry ships to a worker. ``ConvertRequest.build``
turns CLI flags or API keywords into one, and is the only place user words become sdport's: dtype
names (``parse_dtype``, for every verb), targets, prediction types, ``FILE[:RATIO]`` adapter specs. An
option that belongs to another target, or that would do nothing, is refused here with one line,
before any file is opened; what depends on the input (its family, whether it has EMA weights) is
checked by the target's planner.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import SdportError

#: where a conversion can go; ``mindspore`` writes a MindOne-named MindSpore checkpoint
TARGETS = ("single-file", "diffusers", "mindspore", "onnx")
#: single-file formats by the name users type, and the writer each uses
FILE_FORMATS = {"safetensors": "safetensors", "ckpt": "torch-zip", "mindspore": "mindspore"}
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: the suffixes a single-file output may have without --format
SINGLE_FILE_SUFFIXES = (".safetensors", *CKPT_SUFFIXES)
#: what users type for a dtype → its safetensors code (codes themselves are accepted too)
DTYPE_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
               "half": "F16", "f32": "F32", "f16": "F16"}
PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                    "v-prediction": "v_prediction"}
ONNX_LAYOUTS = ("diffusers", "optimum")
OPSETS = range(14, 21)  # scaled_dot_product_attention needs 14; torch's TorchScript exporter stops at 20
OPSET = 17


def parse_dtype(name: str | None, *, what: str = "--dtype", allowed: tuple[str, ...] = ("F32", "F16", "BF16")
                ) -> str | None:
    """A dtype name (``fp16``, ``bf16``, ``F32`` …) → its code; ``keep`` or None → None (keep the input's)."""
    if name is None or name == "keep":
        return None
    code = DTYPE_NAMES.get(name.lower(), name.upper())
    if code not in allowed:
        names = ", ".join(n for n, c in DTYPE_NAMES.items() if c in allowed and n.startswith(("fp", "bf")))
        raise SdportError(None, f"unknown {what} {name!r}", f"use keep, {names}")
    return code


@dataclass(frozen=True)
class LoraSpec:
    """One adapter to merge: where it is and how strongly (``ratio``)."""

    source: str
    ratio: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.ratio):
            raise SdportError(self.source, f"ratio {self.ratio} is not a finite number", "write FILE:0.8")

    @classmethod
    def parse(cls, spec: str | LoraSpec) -> LoraSpec:
        """``FILE[:RATIO]``; a colon that is part of an existing file's name, or a Windows drive, is not a ratio."""
        if isinstance(spec, LoraSpec):
            return spec
        path, sep, ratio = spec.rpartition(":")
        if not sep or not path or os.path.exists(spec) or "/" in ratio or "\\" in ratio:
            return cls(spec)
        try:
            value = float(ratio)
        except ValueError:
            raise SdportError(spec, f"ratio {ratio!r} is not a number", "write FILE:0.8") from None
        if not math.isfinite(value):
            raise SdportError(path, f"ratio {ratio!r} is not a finite number", "write FILE:0.8")
        return cls(path, value)


@dataclass(frozen=True)
class InversionSpec:
    """A textual-inversion embedding to blend in: where it is, the token it adds (default: the one it was trained
    as), and the weight its vectors are multiplied by."""

    source: str
    token: str | None = None
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> InversionSpec:
        """``[TOKEN=]FILE[:WEIGHT]`` (``--inversion``): the token before an ``=``, the weight as ``--lora``'s ratio."""
        token, sep, rest = spec.partition("=")
        if not sep or "/" in token or "\\" in token or os.path.exists(spec):
            token, rest = "", spec
        file = LoraSpec.parse(rest)
        return cls(file.source, token or None, file.ratio)

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise SdportError(self.source, f"inversion weight {self.weight} is not a finite number", None)
        if self.token is not None and (not self.token.strip() or any(c.isspace() for c in self.token)):
            raise SdportError(self.source, f"inversion token {self.token!r} is empty or has spaces",
                              "give a token like <my-style>")


@dataclass(frozen=True)
class SingleFileOptions:
    """``--to single-file``: the file's format (``safetensors``, ``ckpt`` — PyTorch's zip — or ``mindspore``)."""

    format: str = "safetensors"
    crc: bool = False  # mindspore only: MindSpore's crc_num trailer, checked by load_checkpoint(crc_check=True)


@dataclass(frozen=True)
class MindOneOptions:
    """``--to mindspore`` (MindOne names): whether to append MindSpore's ``crc_num`` trailer."""

    crc: bool = False


@dataclass(frozen=True)
class OnnxOptions:
    """``--to onnx``: the folder layout, the VAE's dtype when it differs, the opset, onnx-web's ControlNet UNet."""

    layout: str = "diffusers"
    vae_dtype: str | None = None
    opset: int = OPSET
    controlnet: bool = False


TargetOptions = SingleFileOptions | MindOneOptions | OnnxOptions | None


@dataclass(frozen=True)
class ConvertRequest:
    """One conversion: input, output, target and everything that shapes the plan.

    ``target`` is None when it follows from the output (a name with a suffix is a single file, else a
    diffusers folder — or, from an ONNX export, the export re-written). ``dtype`` is a safetensors code
    (None keeps the input's). ``options`` is the target's own options object.
    """

    source: str
    output: str
    target: str | None = None
    dtype: str | None = None
    components: tuple[str, ...] | None = None
    ema: bool = False
    prediction_type: str | None = None
    loras: tuple[LoraSpec, ...] = ()
    allow_unmatched: bool = False
    lora_alpha: float | None = None
    base: str | None = None
    allow_unknown: bool = False
    force: bool = False
    options: TargetOptions = None
    variant: str | None = None  # the diffusers weight variant to read (fp16), of a folder or a Hub repo
    in_memory: bool = False  # the plan is computed in memory (verify), never written: a no-op plan is fine
    vae: str | None = None  # a VAE (any source form) in place of the model's own
    inversions: tuple[InversionSpec, ...] = ()

    @property
    def single_file(self) -> bool:
        """Whether the output is one file (else a folder)."""
        return self.target in ("single-file", "mindspore") or (self.target is None and _has_suffix(self.output))

    @classmethod
    def build(cls, src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str | None = None,
              dtype: str | None = "keep", format: str | None = None, ema: bool = False,
              components: str | list[str] | tuple[str, ...] | None = None, prediction_type: str | None = None,
              loras: list[str | LoraSpec] | tuple[str | LoraSpec, ...] = (), allow_unmatched: bool = False,
              lora_alpha: float | None = None, base: str | os.PathLike[str] | None = None,
              allow_unknown: bool = False, force: bool = False, onnx_layout: str | None = None,
              vae_dtype: str | None = None, opset: int | None = None, controlnet: bool = False,
              crc: bool = False, variant: str | None = None, vae: str | os.PathLike[str] | None = None,
              inversions: list[InversionSpec] | tuple[InversionSpec, ...] = ()) -> ConvertRequest:
        """A checked request from the options ``sdport convert`` and ``sdport.convert`` take."""
        src, dst = os.fspath(src), os.fspath(dst)
        if to is not None and to not in TARGETS:
            raise SdportError(None, f"unknown --to {to!r}", "use " + ", ".join(TARGETS))
        target = to or ("single-file" if _has_suffix(dst) else None)
        onnx = OnnxOptions(onnx_layout or "diffusers", parse_dtype(vae_dtype, what="--vae-dtype",
                                                                     allowed=("F32", "F16")),
                           opset if opset is not None else OPSET, controlnet)
        _check_onnx(src, to, onnx, given=bool(onnx_layout or vae_dtype or opset is not None or controlnet))
        options = _options(src, dst, target, format, crc, onnx)
        specs = tuple(LoraSpec.parse(s) for s in loras)
        _check_lora_options(specs, allow_unmatched, lora_alpha)
        if base is not None and (target not in ("single-file", "mindspore") or specs or ema):
            raise SdportError(src, "--base takes the input into a single file or MindOne checkpoint, without --lora "
                              "or --ema", "merge LoRAs in a second step")
        if prediction_type is not None and target in ("single-file", "mindspore"):
            raise SdportError(None, "--prediction-type is written into a diffusers or ONNX folder's scheduler",
                              "drop it, or convert to a folder")
        if (vae is not None or inversions) and target in ("single-file", "mindspore"):
            raise SdportError(src, "--vae and inversions go into a diffusers folder or an ONNX export (the "
                              "tokenizer is a file of its own)", "convert to a folder")
        return cls(src, dst, target, parse_dtype(dtype), _components(components), ema,
                   _prediction_type(prediction_type), specs, allow_unmatched, lora_alpha,
                   None if base is None else os.fspath(base), allow_unknown, force, options, variant or None,
                   vae=None if vae is None else os.fspath(vae), inversions=tuple(inversions))


def _has_suffix(path: str) -> bool:
    return bool(os.path.splitext(path.rstrip("/" + os.sep))[1]) and not path.endswith(("/", os.sep))


def _check_onnx(src: str, to: str | None, onnx: OnnxOptions, *, given: bool) -> None:
    if given and to != "onnx":
        raise SdportError(src, "--layout, --vae-dtype, --opset and --controlnet shape an ONNX export",
                          "add --to onnx (an existing export is re-written as it is)")
    if onnx.layout not in ONNX_LAYOUTS:
        raise SdportError(None, f"unknown --layout {onnx.layout!r}", "use diffusers or optimum")
    if onnx.opset not in OPSETS:
        raise SdportError(None, f"opset {onnx.opset}", f"use {OPSETS.start} to {OPSETS.stop - 1}")


def _options(src: str, dst: str, target: str | None, fmt: str | None, crc: bool, onnx: OnnxOptions
             ) -> TargetOptions:
    """The target's options; a single-file format or a CRC asked of a target that has none is refused."""
    if fmt is not None and fmt not in FILE_FORMATS:
        raise SdportError(None, f"unknown --format {fmt!r}", "use " + ", ".join(FILE_FORMATS))
    if target == "onnx":
        if fmt is not None or crc:
            raise SdportError(src, "--format and --crc choose a single file's format", "drop them with --to onnx")
        return onnx
    if target == "mindspore":
        if fmt not in (None, "mindspore"):
            raise SdportError(src, f"--to mindspore writes a MindSpore checkpoint, not {fmt}", "drop --format")
        return MindOneOptions(crc)
    if target == "single-file":
        suffix = os.path.splitext(dst.rstrip("/" + os.sep))[1].lower()
        if fmt is None and suffix and suffix not in SINGLE_FILE_SUFFIXES:
            raise SdportError(dst, f"unknown output suffix {suffix!r}", "name it " + ", ".join(SINGLE_FILE_SUFFIXES)
                              + " (or choose the format with --format " + "|".join(FILE_FORMATS) + ")")
        fmt = fmt or ("ckpt" if suffix in CKPT_SUFFIXES else "safetensors")
        if crc and fmt != "mindspore":
            raise SdportError(src, "--crc is MindSpore's checkpoint trailer", "add --format mindspore or drop --crc")
        return SingleFileOptions(fmt, crc)
    if fmt is not None or crc:
        raise SdportError(src, "--format and --crc choose a single file's format, and the output is a folder",
                          "give the output a suffix or --to single-file")
    return None


def _check_lora_options(specs: tuple[LoraSpec, ...], allow_unmatched: bool, lora_alpha: float | None) -> None:
    if not specs and (allow_unmatched or lora_alpha is not None):
        raise SdportError(None, "--allow-unmatched and --lora-alpha apply to the adapters of --lora", "add --lora")
    if lora_alpha is not None and (not math.isfinite(lora_alpha) or lora_alpha < 0):
        raise SdportError(None, f"--lora-alpha {lora_alpha} is not a finite number ≥ 0", None)


def _components(components: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if not components:
        return None
    items = components.split(",") if isinstance(components, str) else list(components)
    return tuple(c.strip() for c in items if c.strip()) or None


def _prediction_type(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in PREDICTION_TYPES:
        raise SdportError(None, f"unknown --prediction-type {value!r}", "use epsilon or v_prediction")
    return PREDICTION_TYPES[value]
