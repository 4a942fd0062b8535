"""MindSpore on the CPU: the components of ``graph`` over MindSpore's operators, in this interpreter or another.

MindSpore pins numpy < 2 and so usually lives in its own environment. A check names that
environment's interpreter in ``SDPORT_MINDSPORE_PYTHON``; the side is then run there as
``python -m sdport.parity.backends.mindspore SOURCE JOB OUT``: the worker opens the model with sdport,
runs the job saved by ``outputs.Job.save`` and saves every output as ``.npz`` (no pickles either way).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np

from ...errors import SdportError
from ...families.parts.clip import hub_name
from ...plan import OutputTensor, compute
from ..outputs import Job, run_job
from . import graph

ENV = "SDPORT_MINDSPORE_PYTHON"


class MindSporeOps:
    """``graph.Ops`` over MindSpore's classic operators (those with CPU kernels), in PyNative mode, fp32."""

    def __init__(self) -> None:
        import mindspore
        from mindspore import ops

        mindspore.set_context(mode=mindspore.PYNATIVE_MODE)
        self.ms, self.ops = mindspore, ops

    def tensor(self, array: np.ndarray):
        return self.ms.Tensor(np.ascontiguousarray(array, np.float32))

    def numpy(self, x) -> np.ndarray:
        return x.asnumpy()

    def conv2d(self, x, w, b, stride, padding):
        if isinstance(padding, tuple):
            x, padding = self.ops.pad(x, padding), 0
        y = self.ops.conv2d(x, w, pad_mode="pad", padding=padding, stride=stride)
        return y if b is None else y + self.ops.reshape(b, (1, -1, 1, 1))

    def matmul(self, a, b):
        return self.ops.matmul(a, b)

    def transpose(self, x, perm):
        return self.ops.transpose(x, perm)

    def reshape(self, x, shape):
        return self.ops.reshape(x, shape)

    def concat(self, xs, axis):
        return self.ops.concat(tuple(xs), axis)

    def mean(self, x, axes):
        return x.mean(axis=axes, keep_dims=True)

    def rsqrt(self, x):
        return self.ops.rsqrt(x)

    def softmax(self, x):
        return self.ops.softmax(x, axis=-1)

    def sigmoid(self, x):
        return self.ops.sigmoid(x)

    def erf(self, x):
        return self.ops.erf(x)

    def upsample2x(self, x):
        h, w = x.shape[2:]
        return self.ops.ResizeNearestNeighbor((2 * h, 2 * w))(x)

    def shape(self, x):
        return tuple(x.shape)


class GraphBackend:
    """``outputs.Backend`` running ``graph``'s components over any ``graph.Ops``."""

    def __init__(self, ops: graph.Ops, tensors: dict[str, dict[str, OutputTensor]],
                 read: Callable[[str], np.ndarray], configs: dict[str, dict]):
        from ...trace.onnx import specs

        names = [c for c in ("text_encoder", "text_encoder_2", "unet", "vae") if c in tensors]
        self.specs = {s.name: s for s in specs(names, configs) if s.name not in ("cnet", "controlnet")}
        self.components = set(self.specs)
        self.ops, self.tensors, self.read, self.configs = ops, tensors, read, configs
        self._weights: dict[str, graph.Weights] = {}

    def run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        w, cfg = self._load(spec.weights), self.configs[spec.weights]
        if component.startswith("text_encoder"):
            hidden = any(o.startswith("hidden_states.") for o in spec.outputs)
            return graph.text_encoder(self.ops, w, cfg, inputs, hidden=hidden)
        return graph.COMPONENTS[component](self.ops, w, cfg, inputs)

    def release(self, component: str) -> None:
        weights = self.specs[component].weights
        if component != "vae_encoder":  # the decoder, still to run, shares the VAE's weights
            self._weights.pop(weights, None)

    def _load(self, component: str) -> graph.Weights:
        if component not in self._weights:
            norm = hub_name if component.startswith("text_encoder") else (lambda n: n)
            arrays = {norm(k): compute(t, self.read) for k, t in self.tensors[component].items()}
            self._weights[component] = graph.Weights(self.ops, arrays)
        return self._weights[component]


def available() -> bool:
    """Whether MindSpore imports in this interpreter."""
    import importlib.util

    return importlib.util.find_spec("mindspore") is not None


def worker_python() -> str | None:
    """The interpreter of MindSpore's environment, when ``SDPORT_MINDSPORE_PYTHON`` names one."""
    python = os.environ.get(ENV)
    if python and not os.access(python, os.X_OK):
        raise SdportError(python, f"{ENV} is not an executable", "point it at the python of MindSpore's venv")
    return python or None


def run_elsewhere(python: str, source: str, job: Job, folder: str, *, loras: tuple = (),
                  variant: str | None = None) -> dict[str, np.ndarray]:
    """Run ``job`` on ``source`` in the MindSpore interpreter ``python``; its outputs."""
    job_path, out_path = os.path.join(folder, "job.npz"), os.path.join(folder, "mindspore-out.npz")
    job.save(job_path)
    args = [python, "-m", "sdport.parity.backends.mindspore", source, job_path, out_path]
    args += [a for spec in loras for a in ("--lora", f"{spec.source}:{spec.ratio}")]
    args += ["--variant", variant] if variant else []
    done = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SdportError(source, f"the MindSpore run failed: {last}", f"check {ENV}={python}")
    with np.load(out_path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def main(argv: list[str] | None = None) -> int:
    """The worker: open SOURCE, run JOB, save the outputs at OUT."""
    parser = argparse.ArgumentParser(prog="sdport.parity.backends.mindspore")
    parser.add_argument("source")
    parser.add_argument("job")
    parser.add_argument("out")
    parser.add_argument("--lora", action="append", default=[])
    parser.add_argument("--variant")
    args = parser.parse_args(argv)
    from ...targets.onnx import component_configs, component_tensors
    from ..sides import open_side

    try:
        with ExitStack() as stack:
            side = open_side(stack, args.source, "MindSpore", loras=args.lora, variant=args.variant)
            tensors = component_tensors(side.plan)
            backend = GraphBackend(MindSporeOps(), tensors, side.read, component_configs(side.plan, list(tensors)))
            out = run_job(backend, Job.load(args.job))
    except SdportError as exc:
        print(f"sdport: error: {exc.message()}", file=sys.stderr)
        return 2
    np.savez(args.out, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
