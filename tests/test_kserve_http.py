"""Stock tritonclient (sync and aio) and plain HTTP against the KServe v2 routes."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.helpers import image_bytes

pytestmark = pytest.mark.serve


def _bytes_input(module, name: str, values: list[bytes]):
    tensor = module.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=np.object_))
    return tensor


def _texts(result) -> list[str]:
    # tritonclient gives bytes for binary outputs and str for JSON outputs
    return [t.decode("utf-8") if isinstance(t, bytes) else t for t in result.as_numpy("TEXT").reshape(-1)]


def test_health_and_metadata(app):
    client = httpclient.InferenceServerClient(app.url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("blip2")
    assert client.is_model_ready("blip2", "1")
    server = client.get_server_metadata()
    assert server["name"] == "blip2-serve" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("blip2")
    assert model["name"] == "blip2" and model["versions"] == ["1"]
    assert {t["name"]: t["datatype"] for t in model["inputs"]} == {"IMAGE": "BYTES", "PROMPT": "BYTES"}
    assert model["outputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
    config = client.get_model_config("blip2")
    assert config["max_batch_size"] == 8
    assert [i["name"] for i in config["input"]] == ["IMAGE", "PROMPT"] and config["input"][1]["optional"]
    assert "dynamic_batching" in config


def test_caption_and_answer_sync(app, references):
    client = httpclient.InferenceServerClient(app.url)
    image = image_bytes(11)
    caption = _texts(client.infer("blip2", [_bytes_input(httpclient, "IMAGE", [image])]))
    reference = references[app.llm]
    assert caption == [reference.text(reference.generate([image], None, max_new_tokens=30)[0])]

    question = "Question: what is in the picture? Answer:"
    inputs = [_bytes_input(httpclient, "IMAGE", [image]), _bytes_input(httpclient, "PROMPT", [question.encode()])]
    answer = _texts(client.infer("blip2", inputs, model_version="1", parameters={"max_new_tokens": 6}))
    assert answer == [reference.text(reference.generate([image], [question], max_new_tokens=6)[0])]
    assert answer != caption


def test_aio_client(app):
    async def main() -> tuple[bool, dict, list[str]]:
        client = aioclient.InferenceServerClient(app.url)
        try:
            live = await client.is_server_live() and await client.is_model_ready("blip2")
            metadata = await client.get_model_metadata("blip2")
            images = [image_bytes(20), image_bytes(21)]
            result = await client.infer(
                "blip2", [_bytes_input(aioclient, "IMAGE", images)], parameters={"max_new_tokens": 5}
            )
            return live, metadata, _texts(result)
        finally:
            await client.close()

    live, metadata, texts = asyncio.run(main())
    assert live and metadata["name"] == "blip2"
    assert len(texts) == 2 and texts[0] != texts[1] and all(texts)


def test_unknown_model_is_404(app):
    client = httpclient.InferenceServerClient(app.url)
    for call in (
        lambda: client.get_model_metadata("nope"),
        lambda: client.get_model_config("nope"),
        lambda: client.infer("nope", [_bytes_input(httpclient, "IMAGE", [image_bytes(0)])]),
        lambda: client.get_model_metadata("blip2", "7"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "404" and "unknown model" in info.value.message()
    assert not client.is_model_ready("nope")


def test_json_tensors_and_prompt_broadcast(app, references):
    """Plain JSON (no binary extension): IMAGE as base64 strings, one PROMPT for every row."""
    images = [image_bytes(30), image_bytes(31)]
    body = {
        "id": "json-1",
        "inputs": [
            {
                "name": "IMAGE",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(i).decode() for i in images],
            },
            {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a photo of"]},
        ],
        "parameters": {"max_new_tokens": 7, "num_beams": 2},
    }
    response = httpx.post(f"{app.http}/v2/models/blip2/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["id"] == "json-1" and payload["model_name"] == "blip2"
    (output,) = payload["outputs"]
    assert output["name"] == "TEXT" and output["shape"] == [2]
    reference = references[app.llm]
    expected = reference.generate(images, ["a photo of"] * 2, max_new_tokens=7, num_beams=2)
    assert output["data"] == [reference.text(t) for t in expected]


def test_json_output_requested_and_gzip_request(app):
    """tritonclient asking for a JSON TEXT output, with a gzip-compressed request body."""
    client = httpclient.InferenceServerClient(app.url)
    image = _bytes_input(httpclient, "IMAGE", [image_bytes(40)])
    binary = _texts(client.infer("blip2", [image], parameters={"max_new_tokens": 5}))
    output = httpclient.InferRequestedOutput("TEXT", binary_data=False)
    result = client.infer(
        "blip2", [image], outputs=[output], parameters={"max_new_tokens": 5}, request_compression_algorithm="gzip"
    )
    assert _texts(result) == binary
    assert "data" in result.get_response()["outputs"][0]
