"""Offline tools that write artifacts: tiny checkpoints (and, later, ONNX graphs and Triton repositories)."""
