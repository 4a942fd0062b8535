"""torch on the CPU: each component's diffusers/transformers module, its weights computed from the side's plan.

The modules are the ones an ONNX export traces (``trace.onnx``), built empty from the plan's configs and
given the plan's tensors — so a single file, a diffusers folder or a MindOne checkpoint runs without a
temporary copy — and they are called through the export's own forward, under the export's names.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import numpy as np

from ...dtypes import BY_CODE
from ...errors import MissingExtraError, SdportError
from ...families.parts.clip import hub_name
from ...plan import OutputTensor, compute
from ...trace.onnx import Spec, _empty_module, _forward, _torch


class TorchBackend:
    """A model's components as torch modules, loaded on first use and computing in ``dtype``."""

    def __init__(self, tensors: dict[str, dict[str, OutputTensor]], read: Callable[[str], np.ndarray],
                 configs: dict[str, dict], specs: list[Spec], *, dtype: str = "F32", label: str = ""):
        missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingExtraError("verify of a model's outputs", "verify", missing)
        self.torch = _torch()
        self.tensors, self.read, self.configs, self.label = tensors, read, configs, label
        self.specs = {s.name: s for s in specs if s.name not in ("cnet", "controlnet")}
        self.components = set(self.specs)
        self.dtype = getattr(self.torch, BY_CODE[dtype].torch_name)
        self._modules: dict[str, object] = {}
        self._calls: dict[str, Callable] = {}
        self._released: set[str] = set()

    def run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, spec = self.torch, self.specs[component]
        call = self._calls.get(component) or self._load(spec)
        args = [self._input(n, inputs[n]) for n in spec.inputs]
        with torch.inference_mode():
            out = call(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().numpy() for n, o in zip(spec.outputs, out, strict=True)}

    def release(self, component: str) -> None:
        """Drop the component's call, and its module once no component still to run shares it (the VAE's)."""
        self._released.add(component)
        self._calls.pop(component, None)
        weights = self.specs[component].weights
        if all(s.name in self._released for s in self.specs.values() if s.weights == weights):
            self._modules.pop(weights, None)

    def _input(self, name: str, array: np.ndarray):
        """An input as the module takes it: floats in the module's dtype, except the timestep (diffusers embeds it in
        fp32 whatever the model's dtype)."""
        tensor = self.torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(self.dtype) if tensor.is_floating_point() and name != "timestep" else tensor

    def _load(self, spec: Spec) -> Callable:
        module = self._modules.get(spec.weights)
        if module is None:
            module = self._modules[spec.weights] = self._module(spec)
        call = self._calls[spec.name] = _forward(spec, module)
        return call

    def _tensor(self, array: np.ndarray):
        """A torch tensor of the array's values (bfloat16, which numpy knows only through ml_dtypes, by its bits).

        A tensor read unchanged is a read-only view of the input's mapping; the module keeps it as it is (inference
        never writes a weight), so the weights are in memory once, as the file's pages.
        """
        bf16 = array.dtype == BY_CODE["BF16"].numpy
        if bf16:
            array = array.view(np.int16)
        with warnings.catch_warnings():  # torch warns that a read-only array stays read-only: that is the point
            warnings.simplefilter("ignore", UserWarning)
            tensor = self.torch.from_numpy(array)
        return tensor.view(self.torch.bfloat16) if bf16 else tensor

    def _module(self, spec: Spec):
        module = _empty_module(spec, self.configs[spec.weights])
        # a text encoder's names with or without transformers' ``text_model.`` (the module's and the plan's may differ)
        norm = hub_name if spec.weights.startswith("text_encoder") else (lambda n: n)
        wanted = {norm(k): k for k in module.state_dict()}
        state = {wanted.get(norm(name), name): self._tensor(compute(t, self.read))
                 for name, t in self.tensors[spec.weights].items()}
        # assign: the module takes these tensors as they are (its own empty storage was never touched, so never
        # resident): one copy of the weights in memory, not two
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            names = ", ".join((missing or unexpected)[:3])
            raise SdportError(self.label, f"{spec.weights}: the weights do not fit diffusers' module "
                              f"({'missing' if missing else 'unexpected'}: {names})", "report a bug")
        # torch's own .to: diffusers' override warns about from_pretrained's torch_dtype, which has no place here
        return self.torch.nn.Module.to(module, self.dtype).eval()
