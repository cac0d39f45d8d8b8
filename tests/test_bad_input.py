"""Bad input gets a clear 4xx, the server keeps serving, and a bad request never fails its batch neighbours."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import FAULT_MARKER
from tests.helpers import image_bytes, png_header_only, truncated_png

pytestmark = pytest.mark.serve


def _infer(app, image: bytes, prompt: bytes | None = None, **parameters) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(app.url)
    tensor = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
    inputs = [tensor]
    if prompt is not None:
        prompt_tensor = httpclient.InferInput("PROMPT", [1, 1], "BYTES")
        prompt_tensor.set_data_from_numpy(np.array([[prompt]], dtype=np.object_))
        inputs.append(prompt_tensor)
    return client.infer("blip2", inputs, parameters={"max_new_tokens": 4, **parameters})


def _still_serving(app) -> None:
    assert _infer(app, image_bytes(1)).as_numpy("TEXT").shape == (1, 1)


BAD_IMAGES = {
    "not an image": (b"this is not an image file at all", "not an image file"),
    "empty": (b"", "empty"),
    "truncated": (truncated_png(), "truncated or corrupt"),
    "zero size": (png_header_only(0, 10), "IMAGE"),
    "decompression bomb": (png_header_only(60_000, 60_000), "decompression bomb"),
    "over the pixel limit": (png_header_only(3000, 2000), "over the limit of 4000000 pixels"),
    "over the image byte limit": (image_bytes(0)[:8] + b"\0" * (1024 * 1024 + 10), "over the limit"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_are_400(app, case):
    data, words = BAD_IMAGES[case]
    with pytest.raises(InferenceServerException) as info:
        _infer(app, data)
    assert info.value.status() == "400", info.value.message()
    assert words in info.value.message()
    _still_serving(app)


BAD_PARAMETERS = {
    "max_new_tokens zero": ({"max_new_tokens": 0}, "out of range"),
    "max_new_tokens not a number": ({"max_new_tokens": "many"}, "must be a number"),
    "max_new_tokens fractional": ({"max_new_tokens": 2.5}, "integer"),
    "temperature zero": ({"temperature": 0.0}, "out of range"),
    "top_p above one": ({"top_p": 1.5}, "out of range"),
    "num_beams huge": ({"num_beams": 1000}, "out of range"),
    "do_sample not a bool": ({"do_sample": 3}, "boolean"),
    "min over max": ({"min_new_tokens": 9, "max_new_tokens": 3}, "must not exceed"),
    "unknown name": ({"max_tokens": 3}, "unknown generation parameter 'max_tokens'"),
    "answer longer than the model": ({"max_new_tokens": 1024}, "positions"),
}


@pytest.mark.parametrize("case", BAD_PARAMETERS)
def test_out_of_range_parameters_are_400(apps, case):
    app = apps["opt"] if case == "answer longer than the model" else apps["t5"]
    parameters, words = BAD_PARAMETERS[case]
    with pytest.raises(InferenceServerException) as info:
        _infer(app, image_bytes(2), **parameters)
    assert info.value.status() == "400" and words in info.value.message(), info.value.message()
    _still_serving(app)


def _post(app, body: bytes | dict, **headers) -> httpx.Response:
    url = f"{app.http}/v2/models/blip2/infer"
    if isinstance(body, dict):
        return httpx.post(url, json=body, headers=headers, timeout=60)
    return httpx.post(url, content=body, headers=headers, timeout=60)


def _image_json(data: bytes, datatype: str = "BYTES", shape=None) -> dict:
    return {"name": "IMAGE", "datatype": datatype, "shape": shape or [1, 1], "data": [base64.b64encode(data).decode()]}


BAD_REQUESTS = {
    "body not JSON": (b"{not json", "not valid JSON"),
    "no inputs": ({"inputs": []}, "non-empty 'inputs'"),
    "missing IMAGE": (
        {"inputs": [{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
        "'IMAGE' is required",
    ),
    "wrong datatype": ({"inputs": [_image_json(image_bytes(3), "FP32")]}, "datatype BYTES"),
    "wrong shape": ({"inputs": [_image_json(image_bytes(3), shape=[1, 2])]}, "shape [N] or [N, 1]"),
    "shape and data disagree": ({"inputs": [_image_json(image_bytes(3), shape=[2, 1])]}, "needs 2 elements"),
    "IMAGE not base64": ({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["@@@"]}]}, "base64"),
    "unknown input": (
        {"inputs": [_image_json(image_bytes(3)), {"name": "X", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        "unknown input 'X'",
    ),
    "too many images": (
        {"inputs": [{**_image_json(image_bytes(3)), "shape": [9], "data": ["aGk="] * 9}]},
        "must be 1..8",
    ),
    "PROMPT rows mismatch": (
        {
            "inputs": [
                {**_image_json(image_bytes(3)), "shape": [2], "data": ["aGk="] * 2},
                {"name": "PROMPT", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]},
            ]
        },
        "IMAGE has 2 rows and PROMPT 3",
    ),
    "PROMPT with <image>": (
        {
            "inputs": [
                _image_json(image_bytes(3)),
                {"name": "PROMPT", "datatype": "BYTES", "shape": [1, 1], "data": ["look <image> here"]},
            ]
        },
        "image placeholder",
    ),
    "PROMPT too long": (
        {
            "inputs": [
                _image_json(image_bytes(3)),
                {"name": "PROMPT", "datatype": "BYTES", "shape": [1, 1], "data": ["word " * 700]},
            ]
        },
        "over the limit",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_requests_are_400(app, case):
    body, words = BAD_REQUESTS[case]
    response = _post(app, body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]
    _still_serving(app)


def test_binary_framing_errors_are_400(app):
    header = json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": 100}}]}
    ).encode()
    cases = {
        "binary shorter than declared": (header + b"\x05\x00\x00\x00abc", str(len(header)), "does not fit"),
        "header length past the body": (header, str(len(header) + 50), "does not fit"),
        "header length not a number": (header, "abc", "must be an integer"),
    }
    for name, (body, length, words) in cases.items():
        response = _post(app, body, **{"Inference-Header-Content-Length": length})
        assert response.status_code == 400, (name, response.text)
        assert words in response.json()["error"], name
    element = b"\xff\xff\x00\x00" + b"x"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(element)},
                }
            ]
        }
    ).encode()
    response = _post(app, header + element, **{"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400 and "runs past the data" in response.json()["error"]
    _still_serving(app)


def test_oversize_body_is_413(app):
    body = {"inputs": [_image_json(b"x" * (3 * 1024 * 1024))]}  # over the test server's 2 MiB
    response = _post(app, json.dumps(body).encode())
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    bomb = __import__("gzip").compress(b" " * (8 * 1024 * 1024))  # 8 KiB on the wire, 8 MiB inflated
    response = _post(app, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    _still_serving(app)


def test_one_bad_request_fails_alone_among_concurrent_good_ones(app):
    """Good and bad requests sent together: the good ones are answered (in shared batches), the bad ones 400."""
    good = [image_bytes(60 + i) for i in range(6)]
    expected = [_infer(app, image, b"a").as_numpy("TEXT")[0, 0] for image in good]
    before = app.deployment("LLM").stats.remote().result(timeout_s=30)["engine"]

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:

            async def send(image: bytes, prompt: str = "a") -> httpx.Response:
                body = {
                    "inputs": [
                        _image_json(image),
                        {"name": "PROMPT", "datatype": "BYTES", "shape": [1, 1], "data": [prompt]},
                    ],
                    "parameters": {"max_new_tokens": 4},
                }
                return await client.post(f"{app.http}/v2/models/blip2/infer", json=body)

            sends = [send(image) for image in good[:3]]
            sends += [send(truncated_png(1)), send(image_bytes(99), "<image>")]  # fails in vision / in LLM prepare
            sends += [send(image) for image in good[3:]]
            return await asyncio.gather(*sends)

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 200, 400, 400, 200, 200, 200], [r.text for r in responses]
    texts = [r.json()["outputs"][0]["data"][0].encode() for r in responses if r.status_code == 200]
    assert texts == list(expected)
    after = app.deployment("LLM").stats.remote().result(timeout_s=30)["engine"]
    # the good requests shared decode steps: more sequence-steps than steps (each alone would make them equal)
    steps, stepped = after["steps"] - before["steps"], after["stepped"] - before["stepped"]
    assert steps > 0 and stepped > steps, (steps, stepped)


@pytest.mark.parametrize("decoding", ["greedy", "beam2"])
def test_a_model_failure_fails_only_its_request_in_a_shared_batch(app, decoding):
    """A model error on one input inside a real batch (injected: deployments/faults.py): that request gets a 500
    without internals, its neighbours in the same batch (the engine's prefill for greedy, a generate batch for beam
    search) their own answers; the batch was split, as the LLM stage's counters show."""
    parameters = {"max_new_tokens": 4, "num_beams": 1 if decoding == "greedy" else 2}
    good = [image_bytes(80 + i) for i in range(5)]
    expected = [_infer(app, image, b"a", **parameters).as_numpy("TEXT")[0, 0].decode() for image in good]

    def splits() -> int:
        stats = app.deployment("LLM").stats.remote().result(timeout_s=30)
        return stats["engine"]["split_prefills"] if decoding == "greedy" else stats["split_batches"]

    async def send(client: httpx.AsyncClient, image: bytes, prompt: str) -> httpx.Response:
        body = {
            "inputs": [
                _image_json(image),
                {"name": "PROMPT", "datatype": "BYTES", "shape": [1, 1], "data": [prompt]},
            ],
            "parameters": parameters,
        }
        return await client.post(f"{app.http}/v2/models/blip2/infer", json=body)

    async def round_() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            sends = [send(client, image, "a") for image in good[:2]]
            sends += [send(client, image_bytes(90), f"a {FAULT_MARKER}")]
            sends += [send(client, image, "a") for image in good[2:]]
            return await asyncio.gather(*sends)

    before = splits()
    for _ in range(5):  # until the failing request shared its batch with others (arrivals are not scheduled)
        responses = asyncio.run(round_())
        statuses = [r.status_code for r in responses]
        assert statuses == [200, 200, 500, 200, 200, 200], [r.text for r in responses]
        assert responses[2].json()["error"] == "internal server error"
        texts = [r.json()["outputs"][0]["data"][0] for r in responses if r.status_code == 200]
        assert texts == expected
        if splits() > before:
            break
    assert splits() > before, "the failing request never shared a batch"
    _still_serving(app)


PATHOLOGICAL_JSON = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "nesting past the bound": b'{"inputs": [], "parameters": {"x": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}}",
    "a 5000-digit integer": b'{"inputs": [], "parameters": {"max_new_tokens": ' + b"9" * 5000 + b"}}",
    "NaN": b'{"inputs": [], "parameters": {"temperature": NaN}}',
    "a million tiny values": b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ['
    + b",".join([b"0"] * 1_000_000)
    + b"]}]}",
    "many keys": json.dumps({"inputs": [], "parameters": {f"k{i}": i for i in range(200_000)}}).encode(),
}
JSON_ROUTES = ["/v2/models/blip2/infer", "/v2/models/blip2/generate", "/v1/chat/completions", "/v1/embeddings"]


@pytest.mark.parametrize("case", PATHOLOGICAL_JSON)
def test_pathological_json_is_4xx_on_every_json_route(retrieval_app, case):
    """Valid or nearly valid JSON built to break a parser: every JSON route answers 4xx with a message (never a
    5xx), and the server answers the next request."""
    body = PATHOLOGICAL_JSON[case]
    with httpx.Client(timeout=120) as http:
        for route in JSON_ROUTES:
            headers = {"content-type": "application/json"}
            response = http.post(f"{retrieval_app.http}{route}", content=body, headers=headers)
            assert 400 <= response.status_code < 500, (route, response.status_code, response.text[:300])
            assert response.text and "Traceback" not in response.text, route
    _still_serving(retrieval_app)
