"""`blip2-serve export triton-repo`: a Triton model repository of the BLIP-2 graph.

    REPO/blip2_vision/   pixel_values -> image_embeds; Python backend (project code) or onnxruntime (the ONNX graph)
    REPO/blip2_llm/      image_embeds + PROMPT -> TEXT; Python backend, decoupled (token streaming)
    REPO/blip2/          IMAGE + PROMPT -> TEXT, Ray Serve's public contract; Python backend calling the two by BLS

Every config.pbtxt is a `model_config_pb2.ModelConfig` (tritonclient's) printed with protobuf's text_format,
its tensors named by clients.contract. Python models run the project installed in `env_path` (Triton's
EXECUTION_ENV_PATH), which needs numpy<2 for Triton 2.51's Python backend stub.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from blip2_serve.clients.contract import (
    IMAGE,
    IMAGE_EMBEDS,
    LLM_MODEL,
    MAX_BATCH_SIZE,
    MODEL_NAME,
    PIXEL_VALUES,
    PROMPT,
    TEXT,
    VISION_MODEL,
    TensorSpec,
)
from blip2_serve.deployments.config import ModelConfig
from google.protobuf import json_format, text_format

VISION, LLM, PUBLIC = VISION_MODEL, LLM_MODEL, MODEL_NAME
MODULES = {
    VISION: "blip2_serve.exporters.triton_models.vision",
    LLM: "blip2_serve.exporters.triton_models.llm",
    PUBLIC: "blip2_serve.exporters.triton_models.blip2",
}


def _model_config_pb2():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _tensor(message, spec: TensorSpec, dims: list[int]) -> None:
    """The contract's rendering of a tensor (the one the server's /config answers), into a ModelInput/ModelOutput."""
    described = spec.config(dims)
    if not hasattr(message, "optional"):  # ModelOutput has no such field
        described.pop("optional", None)
    json_format.ParseDict(described, message)


def model_config(
    name: str,
    backend: str,
    max_batch_size: int,
    inputs: list[TensorSpec | tuple[TensorSpec, list[int]]],
    outputs: list[TensorSpec | tuple[TensorSpec, list[int]]],
    instances: int,
    queue_delay_us: int,
    parameters: dict[str, str],
    decoupled: bool = False,
):
    """One model's `ModelConfig` message. A tensor is a contract TensorSpec (its dims), or a spec with the dims this
    checkpoint fixes (the contract's -1s made concrete)."""
    pb = _model_config_pb2()
    config = pb.ModelConfig(name=name, backend=backend, max_batch_size=max_batch_size)
    for entry in inputs:
        _tensor(config.input.add(), *(entry if isinstance(entry, tuple) else (entry, list(entry.dims))))
    for entry in outputs:
        _tensor(config.output.add(), *(entry if isinstance(entry, tuple) else (entry, list(entry.dims))))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    group = config.instance_group.add(count=instances)
    group.kind = pb.ModelInstanceGroup.Kind.Value("KIND_CPU" if backend == "python" else "KIND_AUTO")
    if decoupled:
        config.model_transaction_policy.decoupled = True
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _checkpoint_reference(checkpoint: str) -> str:
    """A local directory as an absolute path (the server may start elsewhere), a hub name as it is."""
    path = Path(checkpoint)
    return str(path.resolve()) if path.exists() else checkpoint


def write_triton_repo(
    checkpoint: str,
    out: str | Path,
    vision: str = "python",
    max_batch: int = MAX_BATCH_SIZE,
    instances: int = 1,
    env_path: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    queue_delay_us: int = 10_000,
) -> Path:
    """Write the repository; returns its path. `vision="onnxruntime"` exports the ONNX graph into it."""
    from blip2_serve.exporters.triton_settings import SETTINGS_PARAMETER, TritonSettings
    from transformers import AutoConfig

    if vision not in ("python", "onnxruntime"):
        raise ValueError(f"vision must be 'python' or 'onnxruntime', not {vision!r}")
    model = ModelConfig(checkpoint=_checkpoint_reference(checkpoint), dtype=dtype, device=device)
    blip2 = AutoConfig.from_pretrained(model.checkpoint)
    size = blip2.vision_config.image_size
    embeds_dims = [blip2.num_query_tokens, blip2.text_config.hidden_size]
    settings = TritonSettings(model=model, max_batch_size=max_batch, vision_model=VISION, llm_model=LLM)
    python = {SETTINGS_PARAMETER: settings.model_dump_json(), "EXECUTION_ENV_PATH": env_path or sys.prefix}

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    configs = {
        VISION: model_config(
            VISION,
            "python" if vision == "python" else "onnxruntime",
            max_batch,
            [(PIXEL_VALUES, [3, size, size])],
            [(IMAGE_EMBEDS, embeds_dims)],
            instances,
            queue_delay_us,
            python if vision == "python" else {},
        ),
        LLM: model_config(
            LLM,
            "python",
            max_batch,
            [(IMAGE_EMBEDS, embeds_dims), PROMPT],
            [TEXT],
            instances,
            queue_delay_us,
            python,
            decoupled=True,
        ),
        PUBLIC: model_config(PUBLIC, "python", max_batch, [IMAGE, PROMPT], [TEXT], instances, queue_delay_us, python),
    }
    for name, config in configs.items():
        version = out / name / "1"
        version.mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(text_format.MessageToString(config))
        if config.backend == "python":
            (version / "model.py").write_text(
                f'"""Triton model {name}: see {MODULES[name].replace(".", "/")}.py in blip2-serve."""\n\n'
                f"from {MODULES[name]} import TritonPythonModel  # noqa: F401\n"
            )
    if vision == "onnxruntime":
        from blip2_serve.exporters.onnx_export import GRAPH, export_vision_onnx

        scratch = out / ".onnx-export"
        export_vision_onnx(model.checkpoint, scratch)
        for produced in scratch.iterdir():
            if produced.name.startswith(GRAPH):  # the graph and its external data, if any
                target = "model.onnx" if produced.name == GRAPH else produced.name
                shutil.move(str(produced), out / VISION / "1" / target)
        shutil.rmtree(scratch)
    return out
