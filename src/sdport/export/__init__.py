"""ONNX export (``onnx``: traces with torch, imported only when used), its plan (``onnx_plan``) and the plans
that start from an export (``onnx_back``: back to diffusers, LoRAs blended in; no torch)."""
