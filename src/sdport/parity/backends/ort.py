"""onnxruntime on the CPU: an ONNX export's graphs, one session per component, fed under their own names."""

from __future__ import annotations

import os

import numpy as np

from ...errors import MissingExtraError

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtBackend:
    """The components of an ONNX export folder (diffusers or Optimum layout), each a CPU session opened on first use."""

    def __init__(self, folder: str):
        try:
            import onnxruntime
        except ImportError:
            raise MissingExtraError("verify of an ONNX export", "verify", ["onnxruntime"]) from None
        self.ort, self.folder = onnxruntime, folder
        self.components = {c for c in COMPONENTS if os.path.isfile(os.path.join(folder, c, "model.onnx"))}
        self._sessions: dict[str, object] = {}

    def run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._sessions.get(component) or self._open(component)
        feeds = {i.name: inputs[i.name].astype(_TYPES.get(i.type, np.float32)) for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        out = {n: np.asarray(v).astype(np.float32) for n, v in zip(names, session.run(None, feeds), strict=True)}
        if "latent_parameters" in out:  # Optimum's encoder gives the posterior's mean and log-variance
            moments = out.pop("latent_parameters")
            out["latent_sample"] = moments[:, : moments.shape[1] // 2]
        return out

    def release(self, component: str) -> None:
        self._sessions.pop(component, None)

    def _open(self, component: str):
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # the arena keeps every activation's peak: a UNet's is gigabytes
        session = self.ort.InferenceSession(os.path.join(self.folder, component, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self._sessions[component] = session
        return session
