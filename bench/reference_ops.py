#!/usr/bin/env python3
"""What users do without sdport (torch + safetensors), as one process per operation for bench/run.py."""

import sys

import safetensors.torch
import torch


def main(op: str, src: str, dst: str) -> None:
    if op == "st_rewrite":
        with safetensors.safe_open(src, "pt") as f:
            meta = f.metadata()
        safetensors.torch.save_file(safetensors.torch.load_file(src), dst, meta)
    elif op == "st_half":
        sd = safetensors.torch.load_file(src)
        safetensors.torch.save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, dst)
    elif op == "ckpt_to_st":
        sd = torch.load(src, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, dst)
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(*sys.argv[1:])
