#!/usr/bin/env python3
"""Build the single files of the ``layouts`` suite from the full-size diffusers folders.

    python ../shared/anchor-bench/build_fixtures.py sd15 --out DATA_DIR   # real architectures, random fp16
    python ../shared/anchor-bench/build_fixtures.py sdxl --out DATA_DIR
    python bench/make_layout_fixtures.py DATA_DIR

writes DATA_DIR/sd15-ema.safetensors — SD1.5 in the original layout with an EMA copy of the UNet
(``model_ema.*`` plus ``decay``/``num_updates``), as the released ``v1-5-pruned`` files carry one
— and DATA_DIR/sdxl.safetensors. Both are made by sdport from the folders, streamed.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import sdport
from sdport.io import open_tensors
from sdport.io.base import Slot
from sdport.io.safetensors import SafetensorsWriter
from sdport.steps import ema_name


def with_ema(src: str, dst: str) -> None:
    """``src`` plus a ``model_ema.`` copy of every UNet tensor, copied file to file."""
    with open_tensors(src) as source, SafetensorsWriter(dst) as writer:
        unet = [k for k in source.tensors if k.startswith("model.diffusion_model.")]
        names = [(k, k) for k in source.tensors] + [(ema_name(k), k) for k in unet]
        slots = [Slot(new, source.tensors[old].dtype, source.tensors[old].shape) for new, old in names]
        slots += [Slot("model_ema.decay", "F32", ()), Slot("model_ema.num_updates", "I32", ())]
        writer.begin(slots, {"format": "pt"})
        for new, old in names:
            info = source.tensors[old]
            writer.copy(new, source.fd(info.file), info.offset, info.nbytes, info.file)
        writer.write("model_ema.decay", np.float32(0.9999))
        writer.write("model_ema.num_updates", np.int32(840000))
        writer.commit()


def main(data: str) -> None:
    plain = os.path.join(data, "sd15.safetensors")
    if not os.path.exists(plain):
        sdport.convert(os.path.join(data, "sd15-diffusers"), plain)
    if not os.path.exists(os.path.join(data, "sd15-ema.safetensors")):
        with_ema(plain, os.path.join(data, "sd15-ema.safetensors"))
    if not os.path.exists(os.path.join(data, "sdxl.safetensors")):
        sdport.convert(os.path.join(data, "sdxl-diffusers"), os.path.join(data, "sdxl.safetensors"))
    for name in ("sd15-ema.safetensors", "sdxl.safetensors"):
        path = os.path.join(data, name)
        print(path, os.path.getsize(path), sdport.inspect(path)["tensors"], "tensors")


if __name__ == "__main__":
    main(sys.argv[1])
