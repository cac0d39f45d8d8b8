"""The KServe v2 codec against the stock client's own request builder and response parser (no server)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from blip2_serve.deployments import kserve
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.images import ImageLimits
from blip2_serve.deployments.types import GenerateResult, GenerationParams

from tests.helpers import image_bytes


def _client_body(inputs, outputs=None, parameters=None) -> tuple[bytes, int | None]:
    return httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="r1", parameters=parameters
    )


def _image_input(images: list[bytes]) -> httpclient.InferInput:
    tensor = httpclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[i] for i in images], dtype=np.object_))
    return tensor


def test_binary_request_from_stock_client_decodes():
    images = [image_bytes(1), image_bytes(2)]
    prompt = httpclient.InferInput("PROMPT", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([["ask me".encode()]], dtype=np.object_))
    body, header_length = _client_body([_image_input(images), prompt], parameters={"max_new_tokens": 3, "seed": 5})

    infer = kserve.decode_infer_request(body, header_length)
    assert infer.id == "r1" and infer.binary_output
    requests = kserve.to_generate_requests(infer, ImageLimits(), 8, GenerationParams())
    assert [r.image.data for r in requests] == images
    assert [r.prompt for r in requests] == ["ask me", "ask me"]
    assert requests[0].params == GenerationParams(max_new_tokens=3, seed=5)
    assert [r.request_id for r in requests] == ["r1/0", "r1/1"]


@pytest.mark.parametrize("binary", [True, False])
def test_response_parses_with_stock_client(binary):
    body, header_length = _client_body(
        [_image_input([image_bytes(1)] * 2)], outputs=[httpclient.InferRequestedOutput("TEXT", binary_data=binary)]
    )
    infer = kserve.decode_infer_request(body, header_length)
    results = [
        GenerateResult("r1/0", "a cat", (5, 6), 3, "stop"),
        GenerateResult("r1/1", "ünïcode ✓", (7,), 3, "length"),
    ]
    content, headers = kserve.encode_infer_response("blip2", infer, results)

    length = headers.get("inference-header-content-length")
    parsed = httpclient.InferenceServerClient.parse_response_body(
        content, header_length=int(length) if length else None
    )
    texts = parsed.as_numpy("TEXT").reshape(-1)
    assert [t.decode() if isinstance(t, bytes) else t for t in texts] == ["a cat", "ünïcode ✓"]
    assert parsed.get_response()["id"] == "r1"
    assert ("data" in parsed.get_output("TEXT")) is (not binary)


def test_split_bytes_tensor_rejects_broken_framing():
    assert kserve.split_bytes_tensor(b"\x02\x00\x00\x00hi\x00\x00\x00\x00", "X") == [b"hi", b""]
    with pytest.raises(InvalidInput, match="ends inside an element length"):
        kserve.split_bytes_tensor(b"\x02\x00", "X")
    with pytest.raises(InvalidInput, match="runs past the data"):
        kserve.split_bytes_tensor(b"\x09\x00\x00\x00hi", "X")


def test_transport_parameters_are_not_generation_parameters():
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [_image_input([image_bytes(1)])], priority=2, timeout=1000
    )
    infer = kserve.decode_infer_request(body, header_length)
    (request,) = kserve.to_generate_requests(infer, ImageLimits(), 8, GenerationParams(max_new_tokens=9))
    assert request.params == GenerationParams(max_new_tokens=9)


def test_json_bodies_are_parsed_with_bounds():
    from blip2_serve.deployments import jsonbody
    from blip2_serve.deployments.errors import InvalidInput

    assert jsonbody.loads_object(b'{"a": [1, 2.5, {"b": -3e2}], "c": "d"}', "body") == {
        "a": [1, 2.5, {"b": -300.0}],
        "c": "d",
    }
    nested = b"[" * (jsonbody.MAX_DEPTH - 1) + b"{}" + b"]" * (jsonbody.MAX_DEPTH - 1)
    assert jsonbody.loads(nested, "body")  # at the bound
    for bad, words in (
        (b"[" * jsonbody.MAX_DEPTH + b"{}" + b"]" * jsonbody.MAX_DEPTH, "nests deeper"),
        (b"[" * 200_000 + b"]" * 200_000, "nests deeper"),
        (b"1" * 5000, "a number of 5000 characters"),
        (b'{"t": Infinity}', "not a JSON number"),
        (b"[1, 2", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" + b"0," * jsonbody.MAX_ITEMS + b"0]", "more than"),
        (b"[1]", "must be a JSON object"),
    ):
        with pytest.raises(InvalidInput, match=words):
            jsonbody.loads_object(bad, "body")
