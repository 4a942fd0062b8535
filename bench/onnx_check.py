#!/usr/bin/env python3
"""A full-size export (weights past 2 GB) checked: onnx.checker by path, onnxruntime against torch on one input.

    python bench/onnx_check.py ONNX_DIR DIFFUSERS_DIR

Loads ``unet/model.onnx`` (with its external data) in onnxruntime and the diffusers UNet in torch
(fp32), runs both on the same small input and prints the max abs difference and the timings.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from diffusers import UNet2DConditionModel


def main() -> None:
    onnx_dir, ref = sys.argv[1:3]
    path = os.path.join(onnx_dir, "unet", "model.onnx")
    t = time.time()
    onnx.checker.check_model(path)
    print(f"onnx.checker.check_model({path}): ok in {time.time() - t:.1f} s")
    print("files:", {f: os.path.getsize(os.path.join(onnx_dir, "unet", f)) for f in os.listdir(os.path.dirname(path))})
    t = time.time()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    print(f"onnxruntime session in {time.time() - t:.1f} s")
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, 32, 32)).astype(np.float32), "timestep": np.array([500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32)}
    t = time.time()
    got = sess.run(None, feed)[0]
    print(f"onnxruntime run in {time.time() - t:.1f} s")
    del sess
    unet = UNet2DConditionModel.from_pretrained(ref, subfolder="unet", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = unet(*(torch.tensor(feed[k]) for k in ("sample", "timestep", "encoder_hidden_states"))).sample.numpy()
    print(f"max abs diff vs torch: {np.abs(got - want).max():.3g} (output max {np.abs(want).max():.3g})")


if __name__ == "__main__":
    main()
