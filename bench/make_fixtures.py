#!/usr/bin/env python3
"""Build the benchmark inputs: full-size SD1.5 (real names and shapes, random fp32 weights).

    python bench/make_fixtures.py DATA_DIR [--safetensors-only]

writes DATA_DIR/sd15-fp32.safetensors (sdport's writer, one tensor at a time) and
DATA_DIR/sd15-fp32.ckpt (torch.save of the same tensors, {"state_dict": …}; needs torch and ~9 GB RAM).
Both are ~4.26 GB, so the .ckpt exercises zip64.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from sdport.demo import sd1_shapes
from sdport.io.base import Slot
from sdport.io.safetensors import SafetensorsWriter


def main(folder: str, ckpt_too: bool = True) -> None:
    os.makedirs(folder, exist_ok=True)
    st = os.path.join(folder, "sd15-fp32.safetensors")
    shapes = sd1_shapes(full_size=True)
    rng = np.random.default_rng(0)
    if not os.path.exists(st):
        with SafetensorsWriter(st) as w:
            w.begin([Slot(k, "F32", s) for k, s in shapes.items()], {"format": "pt"})
            for k, s in shapes.items():
                w.write(k, rng.standard_normal(s, np.float32) * np.float32(0.02))
            w.commit()
    ckpt = os.path.join(folder, "sd15-fp32.ckpt")
    if ckpt_too and not os.path.exists(ckpt):
        import safetensors.torch
        import torch

        torch.save({"state_dict": safetensors.torch.load_file(st), "global_step": 840000}, ckpt)
    for p in (st, ckpt) if ckpt_too else (st,):
        print(p, os.path.getsize(p))


if __name__ == "__main__":
    main(sys.argv[1], "--safetensors-only" not in sys.argv[2:])
