#!/usr/bin/env python3
"""Run a script with ``torch.onnx.export`` defaulting to the TorchScript exporter (``dynamo=False``).

    python bench/legacy_onnx_export.py SCRIPT [ARGS…]

torch 2.9+ exports with dynamo by default, which refuses the dynamic channel axis diffusers'
``convert_stable_diffusion_checkpoint_to_onnx.py`` asks for; with the exporter it was written for
(the default until then) it runs as its users run it.
"""

import functools
import runpy
import sys

import torch

torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
