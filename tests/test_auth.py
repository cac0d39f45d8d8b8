"""The optional API key: every route but KServe health refuses without it, over HTTP (KServe v2, OpenAI, metrics)
and gRPC (unary and streaming), with stock clients; the SDK and CLI send it."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from blip2_serve.clients.transports import bytes_inputs
from blip2_serve.serve.auth import ApiKey, is_public_path

from tests.conftest import API_KEY
from tests.helpers import image_bytes

pytestmark = pytest.mark.serve

GOOD = {"authorization": f"Bearer {API_KEY}"}
WRONG = {"authorization": "Bearer not-the-key"}


def test_api_key_compare():
    key = ApiKey("abc")
    assert key.accepts("Bearer abc") and key.accepts("bearer abc ")
    for offered in (None, "", "abc", "Basic abc", "Bearer ab", "Bearer abcd", "Bearer", "Bearer \u00e9"):
        assert not key.accepts(offered), offered
    with pytest.raises(ValueError, match="empty"):
        ApiKey("")
    with pytest.raises(ValueError, match="NO_SUCH_VARIABLE"):
        ApiKey.from_env("NO_SUCH_VARIABLE")
    assert is_public_path("/v2/health/ready") and is_public_path("/v2/models/blip2/versions/1/ready")
    assert not is_public_path("/v2/models/blip2/infer") and not is_public_path("/v2/health/ready/x")


def _infer_body() -> dict:
    import base64

    image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [base64.b64encode(image_bytes(1)).decode()]}
    return {"inputs": [image], "parameters": {"max_new_tokens": 3}}


def test_http_routes_want_the_key_but_health(secured_app):
    base = secured_app.http
    with httpx.Client(timeout=60) as http:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/blip2/ready"):
            assert http.get(base + path).status_code == 200, path
        for method, path in [
            ("GET", "/v2"),
            ("GET", "/v2/models/blip2"),
            ("GET", "/v2/models/blip2/config"),
            ("POST", "/v2/models/blip2/infer"),
            ("POST", "/v2/models/blip2/generate"),
            ("GET", "/metrics"),
        ]:
            for headers in ({}, WRONG):
                response = http.request(method, base + path, headers=headers, json=_infer_body())
                assert response.status_code == 401, (path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert "API key" in response.json()["error"]
        for method, path in [
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/batches"),
            ("GET", "/v1/batches/batch_x"),
            ("POST", "/v1/files"),
            ("GET", "/v1/files/file-x/content"),
        ]:
            refused = http.request(method, base + path, json={"model": "blip2", "messages": []})
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error", path
        answered = http.post(base + "/v2/models/blip2/infer", headers=GOOD, json=_infer_body())
        assert answered.status_code == 200 and answered.json()["outputs"][0]["data"][0]
        assert http.get(base + "/metrics", headers=GOOD).status_code == 200


def test_stock_clients_with_the_key(secured_app):
    import openai
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    over_http = httpclient.InferenceServerClient(secured_app.url)
    inputs = bytes_inputs(httpclient, [image_bytes(2)])
    assert over_http.is_server_ready()  # health needs no key
    with pytest.raises(InferenceServerException, match="API key"):
        over_http.infer("blip2", inputs)
    # a copy: tritonclient.http adds Inference-Header-Content-Length (an int) to the dict it is given
    assert over_http.infer("blip2", inputs, headers=dict(GOOD)).as_numpy("TEXT")[0, 0]

    over_grpc = grpcclient.InferenceServerClient(secured_app.grpc_url)
    app_only = secured_app.grpc_headers
    assert over_grpc.is_server_live(headers=app_only) and over_grpc.is_model_ready("blip2", headers=app_only)
    inputs = bytes_inputs(grpcclient, [image_bytes(2)])
    for headers in (app_only, {**app_only, **WRONG}):
        with pytest.raises(InferenceServerException) as refused:
            over_grpc.infer("blip2", inputs, headers=headers)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED" and "API key" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        over_grpc.get_model_metadata("blip2", headers=app_only)
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    assert over_grpc.infer("blip2", inputs, headers={**app_only, **GOOD}).as_numpy("TEXT")[0, 0]

    chat = openai.OpenAI(base_url=f"{secured_app.http}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat.models.list()
    chat = openai.OpenAI(base_url=f"{secured_app.http}/v1", api_key=API_KEY)
    assert [m.id for m in chat.models.list().data] == ["blip2"]


def test_grpc_stream_wants_the_key(secured_app):
    import grpc
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.utils import InferenceServerException

    async def stream(headers: dict) -> list:
        client = grpcaio.InferenceServerClient(secured_app.grpc_url)

        async def requests():
            yield {"model_name": "blip2", "inputs": bytes_inputs(grpcaio, [image_bytes(4)], ["a"])}

        outcomes = []
        try:
            async for result, error in client.stream_infer(requests(), headers=headers, stream_timeout=60):
                outcomes.append(error or result)
                if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
                    break
        except (InferenceServerException, grpc.RpcError) as exc:  # tritonclient's aio stream raises the RpcError
            outcomes.append(exc)
        finally:
            await client.close()
        return outcomes

    refused = asyncio.run(stream(secured_app.grpc_headers))
    assert len(refused) == 1 and isinstance(refused[0], grpc.RpcError), refused
    assert refused[0].code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in refused[0].details()
    answered = asyncio.run(stream({**secured_app.grpc_headers, **GOOD}))
    assert answered and not any(isinstance(o, Exception) for o in answered)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sdk_and_cli_send_the_key(secured_app, protocol, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from blip2_serve.clients import Blip2Client
    from blip2_serve.clients.errors import AuthenticationError

    url = secured_app.url if protocol == "http" else secured_app.grpc_url
    headers = secured_app.grpc_headers if protocol == "grpc" else None
    with Blip2Client(url, protocol, headers=headers) as client:
        with pytest.raises(AuthenticationError):
            client.caption(image_bytes(3), max_new_tokens=3)
        with pytest.raises(AuthenticationError):
            list(client.stream(image_bytes(3), "a", max_new_tokens=3))
    with Blip2Client(url, protocol, headers=headers, api_key=API_KEY) as client:
        assert client.caption(image_bytes(3), max_new_tokens=3)
    if protocol == "http":
        image = tmp_path / "cat.png"
        image.write_bytes(image_bytes(3))
        cli = str(Path(sys.executable).parent / "blip2-serve")
        command = [cli, "ask", str(image), "what is it?", "--url", url, "--max-new-tokens", "3"]
        refused = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert refused.returncode != 0 and "API key" in refused.stderr
        env = {"PATH": "/usr/bin:/bin", "MY_KEY": API_KEY}
        answered = subprocess.run([*command, "--api-key-env", "MY_KEY"], capture_output=True, text=True, env=env)
        assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr


def test_configured_generation_limits(secured_app):
    """server.max_new_tokens_limit / max_num_beams: a clear 400 before any model work, in every protocol."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with httpx.Client(timeout=60) as http:
        for parameters, word in (({"max_new_tokens": 17}, "max_new_tokens"), ({"num_beams": 3}, "num_beams")):
            body = {**_infer_body(), "parameters": parameters}
            refused = http.post(f"{secured_app.http}/v2/models/blip2/infer", headers=GOOD, json=body)
            assert refused.status_code == 400 and word in refused.json()["error"] and "limit" in refused.json()["error"]
        chat = {
            "model": "blip2",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, _data_uri_part()]}],
        }
        refused = http.post(f"{secured_app.http}/v1/chat/completions", headers=GOOD, json=chat)
        assert refused.status_code == 400 and "limit" in refused.json()["error"]["message"]
        body = {**_infer_body(), "parameters": {"max_new_tokens": 16, "num_beams": 2}}
        assert http.post(f"{secured_app.http}/v2/models/blip2/infer", headers=GOOD, json=body).status_code == 200
    client = grpcclient.InferenceServerClient(secured_app.grpc_url)
    with pytest.raises(InferenceServerException) as refused:
        inputs = bytes_inputs(grpcclient, [image_bytes(2)])
        client.infer("blip2", inputs, parameters={"num_beams": 3}, headers={**secured_app.grpc_headers, **GOOD})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "limit" in refused.value.message()


def _data_uri_part() -> dict:
    import base64

    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image_bytes(1)).decode()},
    }
