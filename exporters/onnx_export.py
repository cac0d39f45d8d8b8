"""`blip2-serve export onnx`: vision tower + Q-Former + language projection as one ONNX graph.

`pixel_values [N,3,H,W] -> image_embeds [N,num_query_tokens,llm_hidden]`, dynamic batch axis, names from
clients.contract. The graph is checked with onnx.checker and against torch in ONNX Runtime at batch 1 and 4;
one that differs by more than the tolerance is not written. `--int8` adds ONNX Runtime dynamic quantization
and a report of its measured effect (exporters/int8_report.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from blip2_serve.clients.contract import IMAGE_EMBEDS, PIXEL_VALUES
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.loading import load_vision

logger = logging.getLogger(__name__)

GRAPH = "vision.onnx"
INT8_GRAPH = "vision_int8.onnx"
REPORT = "export_report.json"
FP32_TOLERANCE = 1e-4  # max abs difference from torch, fp32
FP16_TOLERANCE = 2e-2  # relative to the largest |value|, fp16
_TWO_GB = 2**31


class ExportError(RuntimeError):
    """The exported graph failed its check: nothing was written."""


@dataclass(frozen=True)
class ExportReport:
    graph: str
    dtype: str
    opset: int
    image_size: int
    num_query_tokens: int
    llm_hidden: int
    max_abs_diff: dict[str, float]  # "batch1", "batch4" -> max |ORT - torch|
    tolerance: float
    external_data: bool


def save_graph(graph_path: Path, limit: int = _TWO_GB) -> bool:
    """Re-save with external data when the graph is over `limit` (protobuf's 2 GB); True if it was."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=True)
    if model.ByteSize() < limit and not any(p.name.endswith(".data") for p in graph_path.parent.iterdir()):
        return False
    for stale in graph_path.parent.glob("*.data"):
        stale.unlink()
    onnx.save_model(model, str(graph_path), save_as_external_data=True, location=graph_path.name + ".data")
    return True


def max_abs_diffs(
    session, model: torch.nn.Module, image_size: int, dtype: torch.dtype
) -> tuple[dict[str, float], float]:
    """Max |ORT - torch| on seeded random pixel_values at batch 1 and 4, and the largest |torch value|."""
    generator = torch.Generator().manual_seed(0)
    diffs, scale = {}, 0.0
    for batch in (1, 4):
        pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.inference_mode():
            expected = model(pixel_values.to(dtype)).float().numpy()
        feed = {PIXEL_VALUES.name: pixel_values.numpy().astype(np.float16 if dtype == torch.float16 else np.float32)}
        (got,) = session.run([IMAGE_EMBEDS.name], feed)
        diffs[f"batch{batch}"] = float(np.abs(got.astype(np.float32) - expected).max())
        scale = max(scale, float(np.abs(expected).max()))
    return diffs, scale


def export_vision_onnx(checkpoint: str, out: str | Path, opset: int = 17, fp16: bool = False) -> ExportReport:
    """Export, check and verify; write `vision.onnx` (+ `.data` when over 2 GB) and `export_report.json` to `out`."""
    import onnx
    import onnxruntime as ort

    dtype_name = "fp16" if fp16 else "fp32"
    # PyTorch's own linear layers: the graph is traced from them (packed oneDNN weights do not export)
    settings = ModelConfig(checkpoint=checkpoint, dtype=dtype_name, device="cpu", cpu_linear="torch")
    model, _, dtype = load_vision(settings)
    config = model.config
    image_size = config.vision_config.image_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        graph = Path(scratch) / GRAPH
        example = torch.zeros(2, 3, image_size, image_size, dtype=dtype)
        torch.onnx.export(
            model,
            (example,),
            str(graph),
            input_names=[PIXEL_VALUES.name],
            output_names=[IMAGE_EMBEDS.name],
            dynamic_axes={PIXEL_VALUES.name: {0: "batch"}, IMAGE_EMBEDS.name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        external = save_graph(graph)
        onnx.checker.check_model(str(graph))  # by path: works past 2 GB
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        diffs, scale = max_abs_diffs(session, model, image_size, dtype)
        tolerance = FP16_TOLERANCE * max(1.0, scale) if fp16 else FP32_TOLERANCE
        report = ExportReport(
            str(out / GRAPH),
            dtype_name,
            opset,
            image_size,
            config.num_query_tokens,
            config.text_config.hidden_size,
            diffs,
            tolerance,
            external,
        )
        print(
            f"ONNX vs torch ({dtype_name}): max abs diff batch 1 {diffs['batch1']:.3g}, batch 4 {diffs['batch4']:.3g}"
        )
        if max(diffs.values()) > tolerance:
            raise ExportError(
                f"ONNX output differs from torch by {max(diffs.values()):.3g} > {tolerance:.3g}: not written"
            )
        for produced in Path(scratch).iterdir():
            shutil.move(str(produced), out / produced.name)
    (out / REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
    logger.info("wrote %s", out / GRAPH)
    return report


def quantize_int8(out: str | Path) -> Path:
    """ONNX Runtime dynamic quantization (int8 weights, int8 activations computed on the fly) of out/vision.onnx."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    target = out / INT8_GRAPH
    # reduce_range: 7-bit weights. CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) multiply uint8 activations by
    # int8 weights in pairs summed into int16, which saturates with 8-bit weights: measured on an AVX2 EPYC, the tiny
    # OPT's int8 image embeddings had a cosine of 0.74 to fp32's at worst; with 7-bit weights they keep it on every CPU
    quantize_dynamic(str(out / GRAPH), str(target), weight_type=QuantType.QInt8, reduce_range=True)
    return target
