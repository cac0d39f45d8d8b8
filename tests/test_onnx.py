"""ONNX export of the vision stage, the ONNX Runtime backend, and the onnxruntime variant of the Triton repo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from blip2_serve.deployments.config import ModelConfig, VisionBackendConfig
from blip2_serve.deployments.generator import LanguageGenerator
from blip2_serve.deployments.images import check_image
from blip2_serve.deployments.types import GenerateRequest, GenerationParams
from blip2_serve.deployments.vision_encoder import VisionEncoder
from blip2_serve.exporters import onnx_export
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.helpers import image_bytes

BLIP2_SERVE = str(Path(sys.executable).parent / "blip2-serve")


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """`blip2-serve export onnx --int8` for both checkpoints."""
    graphs = {}
    for llm, checkpoint in checkpoints.items():
        out = tmp_path_factory.mktemp(f"onnx-{llm}")
        result = subprocess.run(
            [BLIP2_SERVE, "export", "onnx", "--model", str(checkpoint), "--out", str(out), "--int8"],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        # the exporter's own check; test_onnxruntime_backend_gives_torch_embeddings_and_greedy_tokens checks it
        assert "max abs diff batch 1" in result.stdout and "greedy answers identical" in result.stdout
        graphs[llm] = out
    return graphs


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_export_writes_a_checked_graph_and_reports(checkpoints, exported, llm):
    from transformers import Blip2Config

    out = exported[llm]
    onnx.checker.check_model(str(out / "vision.onnx"))
    report = json.loads((out / "export_report.json").read_text())
    assert report["dtype"] == "fp32" and max(report["max_abs_diff"].values()) <= 1e-4
    graph = onnx.load(str(out / "vision.onnx"))
    assert [i.name for i in graph.graph.input] == ["pixel_values"] and [o.name for o in graph.graph.output] == [
        "image_embeds"
    ]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # the int8 graph is quantized (integer matmuls, int8 weights: a smaller file) and computes nearly what fp32 does
    quantized = onnx.load(str(out / "vision_int8.onnx"))
    ops = {node.op_type for node in quantized.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops, sorted(ops)
    assert not {"MatMulInteger", "DynamicQuantizeLinear"} & {node.op_type for node in graph.graph.node}
    assert (out / "vision_int8.onnx").stat().st_size < (out / "vision.onnx").stat().st_size
    size = Blip2Config.from_pretrained(checkpoints[llm]).vision_config.image_size
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)}
    by_fp32, by_int8 = (
        ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for name in ("vision.onnx", "vision_int8.onnx")
    )
    cosine = (by_fp32 * by_int8).sum(-1) / np.linalg.norm(by_fp32, axis=-1) / np.linalg.norm(by_int8, axis=-1)
    assert not np.array_equal(by_fp32, by_int8) and cosine.min() > 0.9, cosine.min()
    # the report is the export's measurement: its figures agree with each other
    int8 = json.loads((out / "int8_report.json").read_text())
    assert int8["answers"] == 32 and int8["identical_share"] == int8["identical_greedy_answers"] / 32
    times = int8["vision_median_ms"]
    assert times["fp32"] > 0 and abs(int8["speed_ratio_fp32_over_int8"] - times["fp32"] / times["int8"]) < 0.01


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_onnxruntime_backend_gives_torch_embeddings_and_greedy_tokens(checkpoints, exported, llm):
    model = ModelConfig(checkpoint=str(checkpoints[llm]), device="cpu")
    torch_encoder = VisionEncoder(model)
    ort_encoder = VisionEncoder(
        model, backend=VisionBackendConfig(backend="onnxruntime", onnx_path=str(exported[llm] / "vision.onnx"))
    )
    generator = LanguageGenerator(model)
    pixel_values = [torch_encoder.preprocess(check_image(image_bytes(500 + i))) for i in range(6)]
    by_torch, by_ort = torch_encoder.encode(pixel_values), ort_encoder.encode(pixel_values)
    assert max(float((a - b).abs().max()) for a, b in zip(by_torch, by_ort)) <= 1e-4
    params = GenerationParams(max_new_tokens=16)
    for prompt in ("", "Question: what is it? Answer:"):
        requests = [GenerateRequest(f"r{i}", None, prompt, params) for i in range(6)]
        tokens = [
            [r.token_ids for r in generator.run([generator.prepare(q, e) for q, e in zip(requests, embeds)])]
            for embeds in (by_torch, by_ort)
        ]
        assert tokens[0] == tokens[1]


def test_fp16_export_and_external_data(checkpoints, tmp_path):
    report = onnx_export.export_vision_onnx(str(checkpoints["opt"]), tmp_path / "fp16", fp16=True)
    assert report.dtype == "fp16" and max(report.max_abs_diff.values()) <= report.tolerance
    session = ort.InferenceSession(str(tmp_path / "fp16" / "vision.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    # Past the size limit the graph is saved with its weights in a .data file beside it, and still loads.
    shutil.copytree(tmp_path / "fp16", tmp_path / "big")
    assert onnx_export.save_graph(tmp_path / "big" / "vision.onnx", limit=1)
    assert (tmp_path / "big" / "vision.onnx.data").exists()
    onnx.checker.check_model(str(tmp_path / "big" / "vision.onnx"))
    big = ort.InferenceSession(str(tmp_path / "big" / "vision.onnx"), providers=["CPUExecutionProvider"])
    feed = {"pixel_values": np.zeros((1, 3, 32, 32), np.float16)}
    assert np.array_equal(big.run(None, feed)[0], session.run(None, feed)[0])


def test_a_graph_that_fails_its_check_is_not_written(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", 0.0)  # nothing passes an exact comparison
    with pytest.raises(onnx_export.ExportError, match="not written"):
        onnx_export.export_vision_onnx(str(checkpoints["opt"]), tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def test_triton_repo_with_the_onnxruntime_vision(checkpoints, tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(
        [
            BLIP2_SERVE,
            "export",
            "triton-repo",
            "--model",
            str(checkpoints["t5"]),
            "--out",
            str(repo),
            "--vision",
            "onnxruntime",
        ],
        capture_output=True,
        timeout=600,
        check=True,
    )
    config = text_format.Parse((repo / "blip2_vision" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (
        config.backend == "onnxruntime"
        and config.input[0].name == "pixel_values"
        and config.HasField("dynamic_batching")
    )
    session = ort.InferenceSession(str(repo / "blip2_vision" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    encoder = VisionEncoder(ModelConfig(checkpoint=str(checkpoints["t5"]), device="cpu"))
    pixel_values = torch.stack([encoder.preprocess(check_image(image_bytes(i))) for i in range(3)])
    expected = torch.stack(encoder.encode(list(pixel_values))).numpy()
    (got,) = session.run(["image_embeds"], {"pixel_values": pixel_values.numpy()})
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.serve
def test_ray_serve_vision_stage_on_onnxruntime(serve_ports, apps, checkpoints, exported):
    """The same graph with `vision_backend: onnxruntime` answers as the torch one does."""
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import AppConfig
    from ray import serve

    from tests.conftest import TEST_MODEL, TEST_STAGE

    config = AppConfig.model_validate(
        {
            "model": {"checkpoint": str(checkpoints["opt"]), **TEST_MODEL},
            "vision": TEST_STAGE,
            "vision_backend": {"backend": "onnxruntime", "onnx_path": str(exported["opt"] / "vision.onnx")},
            "llm": TEST_STAGE,
            "app_name": "ort",
            "route_prefix": "/ort",
        }
    )
    serve.run(build_app(config), name="ort", route_prefix="/ort")
    try:
        requests = [
            GenerateRequest(f"o{i}", check_image(image_bytes(600 + i)), "a", GenerationParams(max_new_tokens=10))
            for i in range(4)
        ]
        on_ort = [r.token_ids for r in serve.get_app_handle("ort").generate_many.remote(requests).result(timeout_s=120)]
        on_torch = [r.token_ids for r in apps["opt"].handle().generate_many.remote(requests).result(timeout_s=120)]
        assert on_ort == on_torch
    finally:
        serve.delete("ort")
