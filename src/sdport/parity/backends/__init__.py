"""The runtimes a check runs a model in: torch (files and folders), onnxruntime (ONNX exports), MindSpore."""
