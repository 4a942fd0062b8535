"""The JSON Schemas a batch manifest is checked against: onnx-web's ``extras.json`` (its ``api/schemas/extras.yaml``,
re-typed here) and sdport's own manifest (a list of models, each with any number of outputs)."""

from __future__ import annotations

_FORMATS = ["bin", "ckpt", "onnx", "pt", "pth", "safetensors", "zip"]
_STR, _NUM, _BOOL = {"type": "string"}, {"type": "number"}, {"type": "boolean"}

#: onnx-web's extras.json, as its converter and server validate it
EXTRAS: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "legacy_tuple": {"type": "array", "items": {"oneOf": [_BOOL, _NUM, _STR]}},
        "tensor_format": {"type": "string", "enum": _FORMATS},
        "embedding_network": {"type": "object", "required": ["name", "source"], "properties": {
            "format": {"$ref": "#/$defs/tensor_format"}, "label": _STR,
            "model": {"type": "string", "enum": ["concept", "embeddings"]}, "name": _STR, "source": _STR,
            "token": _STR, "type": {"type": "string", "const": "inversion"}, "weight": _NUM}},
        "lora_network": {"type": "object", "required": ["name", "source", "type"], "properties": {
            "format": {"$ref": "#/$defs/tensor_format"}, "label": _STR,
            "model": {"type": "string", "enum": ["cloneofsimo", "sd-scripts"]}, "name": _STR, "source": _STR,
            "tokens": {"type": "array", "items": _STR}, "type": {"type": "string", "const": "lora"},
            "weight": _NUM}},
        "base_model": {"type": "object", "required": ["name", "source"], "properties": {
            "format": {"$ref": "#/$defs/tensor_format"}, "half": _BOOL, "label": _STR, "name": _STR,
            "opset": _NUM, "source": _STR}},
        "correction_model": {"allOf": [{"$ref": "#/$defs/base_model"}, {"type": "object", "properties": {
            "model": {"type": "string", "enum": ["codeformer", "gfpgan"]}}}]},
        "diffusion_model": {"allOf": [{"$ref": "#/$defs/base_model"}, {"type": "object", "properties": {
            "config": _STR, "hash": _STR, "image_size": _NUM,
            "inversions": {"type": "array", "items": {"$ref": "#/$defs/embedding_network"}},
            "loras": {"type": "array", "items": {"$ref": "#/$defs/lora_network"}},
            "pipeline": {"type": "string", "enum": ["archive", "controlnet", "img2img", "inpaint", "lpw", "panorama",
                                                    "pix2pix", "txt2img", "txt2img-legacy", "txt2img-sdxl",
                                                    "upscale"]},
            "vae": _STR, "version": {"type": "string", "enum": ["v1", "v2", "v2.1"]}}}]},
        "upscaling_model": {"allOf": [{"$ref": "#/$defs/base_model"}, {"type": "object", "required": ["scale"],
                                                                        "properties": {
            "model": {"type": "string", "enum": ["bsrgan", "resrgan", "swinir"]}, "scale": _NUM}}]},
        "source_model": {"type": "object", "required": ["name", "source"], "properties": {
            "dest": _STR, "format": _STR, "name": _STR, "source": _STR}},
        "translation": {"type": "object", "additionalProperties": False, "patternProperties": {
            r"(\w|\.|-)+": {"oneOf": [_STR, {"$ref": "#/$defs/translation"}]}}},
    },
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{k: {"type": "array", "items": {"oneOf": [{"$ref": "#/$defs/legacy_tuple"}, {"$ref": f"#/$defs/{d}"}]}}
           for k, d in (("diffusion", "diffusion_model"), ("correction", "correction_model"),
                        ("sources", "source_model"), ("upscaling", "upscaling_model"))},
        "networks": {"type": "array", "items": {"oneOf": [{"$ref": "#/$defs/lora_network"},
                                                          {"$ref": "#/$defs/embedding_network"}]}},
        "strings": {"type": "object", "additionalProperties": False,
                    "patternProperties": {r"^\w\w$": {"$ref": "#/$defs/translation"}}},
    },
}

_NAME = {"type": "string", "pattern": r"^[^/\\\x00]+$", "not": {"enum": [".", ".."]}}
_RATIO_SOURCE = {"type": "object", "additionalProperties": False, "required": ["source"],
                 "properties": {"source": _STR, "ratio": _NUM}}

#: sdport's own manifest: ``{"sdport": 1, "models": [...]}``, each model with its outputs (``sdport convert``'s options)
SDPORT: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["sdport", "models"],
    "properties": {
        "sdport": {"const": 1},
        "models": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "source", "outputs"],
            "properties": {
                "name": _NAME, "source": _STR, "hash": {"type": "string", "pattern": "^[0-9a-fA-F]{8,64}$"},
                "variant": _STR, "vae": _STR,
                "loras": {"type": "array", "items": {"oneOf": [_STR, _RATIO_SOURCE]}},
                "inversions": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["source"],
                    "properties": {"source": _STR, "token": _STR, "weight": _NUM}}},
                "outputs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["path"],
                    "properties": {
                        "path": _STR,
                        "to": {"enum": ["single-file", "diffusers", "onnx", "mindspore"]},
                        "dtype": {"enum": ["keep", "fp32", "fp16", "bf16"]},
                        "format": {"enum": ["safetensors", "ckpt", "mindspore"]},
                        "components": {"type": "array", "items": _STR},
                        "ema": _BOOL, "prediction_type": {"enum": ["epsilon", "v_prediction"]},
                        "allow_unknown": _BOOL, "layout": {"enum": ["diffusers", "optimum"]},
                        "vae_dtype": {"enum": ["fp32", "fp16"]}, "opset": {"type": "integer"},
                        "controlnet": _BOOL, "crc": _BOOL}}}}}},
    },
}
