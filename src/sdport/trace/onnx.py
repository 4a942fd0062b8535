"""ONNX graphs of a pipeline's components, traced from weightless modules; the weights are streamed in later.

Each component's torch module is built from its diffusers config on the ``meta`` device and given
uninitialised storage (nothing is computed or copied into it), then traced by torch's TorchScript
exporter with ``export_params=False`` and no constant folding, so every parameter stays a graph
input under its own diffusers name. ``trace`` removes those inputs and returns the graph without
weights plus the list of parameters it needs; ``io.onnx.OnnxWriter`` later streams each one from the
conversion plan into an initializer of the same name. One module exists at a time.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from ..errors import MissingExtraError, SdportError
from ..io.onnx import ONNX_TYPES
from ..request import OPSET

#: ops an fp16 graph still computes in fp32 (casts around them): normalisations, whose sums of squares overflow
#: fp16's 65504, softmax and the pieces of decomposed norms
FP32_OPS = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "ReduceMean", "Pow", "Sqrt",
            "Softmax", "Exp", "Erf", "Sin", "Cos"]
#: modules an fp16 graph still runs in fp32 whole: the sinusoidal embeddings of the timestep and of SDXL's time ids
#: (diffusers computes them in fp32 in fp16 models too; in fp16 a timestep of 999 is off by up to 0.25 rad)
FP32_MODULES = ("/time_proj/", "/add_time_proj/")


@dataclass
class Spec:
    """One ONNX component: its folder, the diffusers component its weights come from, its graph's names."""

    name: str
    weights: str
    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    pooled: int = 0  # SDXL UNets: the width of text_embeds (the rest of the added embedding is time_ids)


@dataclass
class Traced:
    """A traced component: the model and graph serialized without weights, and the weights it takes."""

    spec: Spec
    model: bytes
    graph: bytes
    params: list[tuple[str, str, tuple[int, ...]]]  # (name, dtype code, shape) in graph order


def _torch():
    """torch, after checking that everything an export imports is installed."""
    import importlib.util

    missing = [m for m in ("torch", "onnx", "onnxruntime", "diffusers", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError("ONNX export", "onnx", missing)
    import torch

    return torch


def residuals(config: dict) -> list[tuple[int, int]]:
    """(channels, downscale) of each residual a ControlNet gives a UNet: the down blocks' outputs, then the mid."""
    boc, layers = config["block_out_channels"], config["layers_per_block"]
    out = [(boc[0], 1)]
    for i, ch in enumerate(boc):
        out += [(ch, 2 ** i)] * layers + ([(ch, 2 ** (i + 1))] if i < len(boc) - 1 else [])
    return out + [(boc[-1], 2 ** (len(boc) - 1))]


def _residual_names(config: dict) -> list[str]:
    n = len(residuals(config))
    return [f"down_block_{i}" for i in range(n - 1)] + ["mid_block_additional_residual"]


def _residual_axes(config: dict) -> dict[str, dict[int, str]]:
    return {name: {0: "batch_size", 2: f"height_{scale}", 3: f"width_{scale}"}
            for name, (_, scale) in zip(_residual_names(config), residuals(config), strict=True)}


def specs(components: list[str], config: dict[str, dict], *, controlnet: bool = False) -> list[Spec]:
    """The ONNX components of a pipeline, given its diffusers components and their configs.

    ``controlnet``: also ``cnet``, the UNet taking a ControlNet's residuals (onnx-web's layout). A
    lone ControlNet (component ``""``) is one graph, ``controlnet``, giving the residuals by those names.
    """
    out = []
    xl = "text_encoder_2" in config or config.get("unet", {}).get("addition_embed_type") == "text_time"
    pooled = config.get("text_encoder_2", {}).get("projection_dim", 0)
    image = {0: "batch_size", 2: "height", 3: "width"}
    for c in components:
        cfg = config[c]
        extra = ["text_embeds", "time_ids"] if cfg.get("addition_embed_type") == "text_time" else []
        unet_axes = {"sample": image, "timestep": {0: "steps"}, "text_embeds": {0: "batch_size"},
                     "time_ids": {0: "batch_size"}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}}
        unet_inputs = ["sample", "timestep", "encoder_hidden_states", *extra]
        if c.startswith("text_encoder"):
            hidden = [f"hidden_states.{i}" for i in range(cfg["num_hidden_layers"] + 1)] if xl else []
            projected = cfg["architectures"][0].endswith("WithProjection")
            outs = ["text_embeds", "last_hidden_state"] if projected else ["last_hidden_state", "pooler_output"]
            out.append(Spec(c, c, ["input_ids"], outs + hidden, {"input_ids": {0: "batch_size", 1: "sequence_length"}}))
        elif c == "unet":
            axes = {k: v for k, v in unet_axes.items() if k in unet_inputs}
            out.append(Spec("unet", "unet", unet_inputs, ["out_sample"], {**axes, "out_sample": image}, pooled))
            if controlnet:
                names = _residual_names(cfg)
                out.append(Spec("cnet", "unet", unet_inputs + names, ["out_sample"],
                                {**axes, **_residual_axes(cfg), "out_sample": image}, pooled))
        elif c == "" and cfg.get("_class_name") == "ControlNetModel":
            cond = {0: "batch_size", 2: "image_height", 3: "image_width"}
            axes = {k: v for k, v in unet_axes.items() if k in unet_inputs}
            out.append(Spec("controlnet", "", unet_inputs[:3] + ["controlnet_cond"] + extra, _residual_names(cfg),
                            {**axes, "controlnet_cond": cond, **_residual_axes(cfg)}, pooled))
        elif c == "vae":
            latent = {0: "batch_size", 2: "height_latent", 3: "width_latent"}
            out.append(Spec("vae_encoder", "vae", ["sample"], ["latent_sample"],
                            {"sample": image, "latent_sample": latent}))
            out.append(Spec("vae_decoder", "vae", ["latent_sample"], ["sample"],
                            {"latent_sample": latent, "sample": image}))
    return out


def _empty_module(spec: Spec, config: dict):
    """The component's torch module with real shapes and uninitialised storage, in eval mode."""
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.weights == "unet":
            from diffusers import UNet2DConditionModel as cls
        elif spec.weights == "vae":
            from diffusers import AutoencoderKL as cls
        elif spec.name == "controlnet":
            from diffusers import ControlNetModel as cls
        else:
            import transformers

            cls = getattr(transformers, config["architectures"][0])
            config = transformers.CLIPTextConfig.from_dict(config)
        with torch.device("meta"):
            module = cls(config) if spec.weights.startswith("text_encoder") else cls.from_config(config)
    module = module.to_empty(device="cpu").eval()
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
        else:
            raise SdportError(None, f"{spec.name}: buffer '{name}' has no known value", "report a bug")
    return module


def _forward(spec: Spec, module):
    """The function the exporter traces: the pipeline's inputs in, a tuple of tensors out."""
    torch = _torch()
    call = module.forward  # the module's own forward, before the traced one replaces it on the instance
    xl = "text_embeds" in spec.inputs

    def added(rest):
        return {"text_embeds": rest[0], "time_ids": rest[1]} if xl else None

    if spec.name in ("unet", "cnet"):
        def forward(sample, timestep, encoder_hidden_states, *rest):
            more = {}
            if spec.name == "cnet":
                res = rest[2:] if xl else rest
                more = {"down_block_additional_residuals": tuple(res[:-1]), "mid_block_additional_residual": res[-1]}
            return call(sample, timestep, encoder_hidden_states, added_cond_kwargs=added(rest), return_dict=False,
                        **more)[0]
    elif spec.name == "controlnet":
        def forward(sample, timestep, encoder_hidden_states, controlnet_cond, *rest):
            down, mid = call(sample, timestep, encoder_hidden_states, controlnet_cond, added_cond_kwargs=added(rest),
                             return_dict=False)
            return (*down, mid)
    elif spec.name == "vae_encoder":
        def forward(sample):  # the posterior's mean (deterministic)
            moments = module.quant_conv(module.encoder(sample))
            return torch.chunk(moments, 2, dim=1)[0]
    elif spec.name == "vae_decoder":
        def forward(latent_sample):
            return module.decoder(module.post_quant_conv(latent_sample))
    else:
        hidden = any(o.startswith("hidden_states.") for o in spec.outputs)

        def forward(input_ids):
            out = call(input_ids=input_ids, output_hidden_states=hidden, return_dict=True)
            first = out.text_embeds if spec.outputs[0] == "text_embeds" else out.last_hidden_state
            second = out.last_hidden_state if spec.outputs[0] == "text_embeds" else out.pooler_output
            return (first, second, *(out.hidden_states if hidden else ()))
    return forward


def _examples(spec: Spec, config: dict):
    torch = _torch()
    if spec.name in ("unet", "cnet", "controlnet"):
        side = 16
        examples = [torch.randn(2, config["in_channels"], side, side), torch.tensor([10.0]),
                    torch.randn(2, 77, config["cross_attention_dim"])]
        xl = []
        if "text_embeds" in spec.inputs:  # time_ids: 6 for a base (sizes, crop), 5 for a refiner (aesthetic score)
            width, per_id = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
            pooled = spec.pooled or width - 6 * per_id
            xl = [torch.randn(2, pooled), torch.randn(2, (width - pooled) // per_id)]
        if spec.name == "controlnet":
            return tuple(examples + [torch.randn(2, config.get("conditioning_channels", 3), side * 8, side * 8)] + xl)
        res = [torch.randn(2, ch, side // scale, side // scale) for ch, scale in residuals(config)] \
            if spec.name == "cnet" else []
        return tuple(examples + xl + res)
    if spec.name == "vae_encoder":
        return (torch.randn(1, config["in_channels"], 64, 64),)
    if spec.name == "vae_decoder":
        return (torch.randn(1, config["latent_channels"], 8, 8),)
    return (torch.zeros(1, 77, dtype=torch.int32),)


def trace(spec: Spec, config: dict, *, opset: int = OPSET, fp16: bool = False, fp16_io: bool = False) -> Traced:
    """Trace one component; its module is freed when this returns.

    ``fp16``: the graph computes in fp16 with fp16 weights, except the ops of ``FP32_OPS`` and the
    modules of ``FP32_MODULES``, which get casts to fp32 and back. ``fp16_io``: its float inputs and
    outputs are fp16 (what the pipelines pass in an fp16 export), whatever it computes in.
    """
    torch = _torch()
    import onnx

    module = _empty_module(spec, config)
    forward = _forward(spec, module)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # the traced module: forward replaced on the instance, so parameter names stay the diffusers names
        module.forward = forward
        torch.onnx.export(module, _examples(spec, config), buffer, dynamo=False, opset_version=opset,
                          export_params=False, do_constant_folding=False, keep_initializers_as_inputs=True,
                          input_names=spec.inputs,
                          output_names=spec.outputs, dynamic_axes=spec.dynamic)
    shapes = {n: tuple(p.shape) for n, p in module.state_dict(keep_vars=True).items()}
    del module, forward
    model = onnx.load_from_string(buffer.getvalue())
    if fp16:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        keep = [n.name for n in model.graph.node if n.name.startswith(FP32_MODULES)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert_float_to_float16(model, keep_io_types=False, node_block_list=keep,
                                             op_block_list=DEFAULT_OP_BLOCK_LIST + FP32_OPS)
    # (the weights are graph inputs until below: keep_io_types would keep them fp32 too)
    if fp16 != fp16_io:
        half, full = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
        _retype_io(model.graph, spec, *((half, full) if fp16 else (full, half)))
    graph = model.graph
    params = []
    for value in list(graph.input):
        if value.name in spec.inputs:
            continue
        if value.name not in shapes:
            raise SdportError(None, f"{spec.name}: the traced graph takes '{value.name}', which is no parameter",
                              "report a bug (diffusers/transformers version)")
        params.append((value.name, ONNX_TYPES[value.type.tensor_type.elem_type], shapes[value.name]))
        graph.input.remove(value)
    model.producer_name, model.producer_version = "sdport", _version()
    graph_bytes = graph.SerializeToString()
    model.ClearField("graph")
    return Traced(spec, model.SerializeToString(), graph_bytes, params)


def _retype_io(graph, spec: Spec, have: int, want: int) -> None:
    """Declare the graph's float inputs and outputs of type ``have`` as ``want``, with a cast beside each."""
    import onnx

    for value in graph.input:
        if value.name in spec.inputs and value.type.tensor_type.elem_type == have:
            inner = value.name + "_cast"
            for node in graph.node:
                node.input[:] = [inner if i == value.name else i for i in node.input]
            graph.node.insert(0, onnx.helper.make_node("Cast", [value.name], [inner], to=have))
            value.type.tensor_type.elem_type = want
    for value in graph.output:
        if value.type.tensor_type.elem_type == have:
            inner = value.name + "_cast"
            for node in graph.node:  # its producer and any node inside that reads it use the inner value
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            graph.node.append(onnx.helper.make_node("Cast", [inner], [value.name], to=want))
            value.type.tensor_type.elem_type = want


def _version() -> str:
    from importlib.metadata import version

    return version("sdport")
