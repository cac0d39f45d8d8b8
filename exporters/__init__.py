"""Offline tools that write artifacts: tiny random checkpoints (tiny.py), the vision stage's ONNX graph and its int8
report (onnx_export.py, int8_report.py), and a Triton model repository (triton_repo.py, with the Python-backend
models in triton_models/ and the tritonserver launcher). They import nothing from serve/."""
