"""Stock tritonclient.grpc (sync, aio, streaming) against Ray Serve's gRPC proxy serving GRPCInferenceService."""

from __future__ import annotations

import asyncio
import base64
import queue

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from blip2_serve.clients.transports import bytes_inputs
from tritonclient.utils import InferenceServerException

from tests.helpers import image_bytes, truncated_png

pytestmark = pytest.mark.serve

QUESTION = "Question: what is in the picture? Answer:"


def _texts(result) -> list[str]:
    return [t.decode() for t in result.as_numpy("TEXT").reshape(-1)]


def test_health_metadata_and_config(app):
    client = grpcclient.InferenceServerClient(app.grpc_url)
    headers = app.grpc_headers
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
    assert client.is_model_ready("blip2", headers=headers) and not client.is_model_ready("nope", headers=headers)
    server = client.get_server_metadata(headers=headers, as_json=True)
    assert server["name"] == "blip2-serve" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("blip2", headers=headers, as_json=True)
    assert [t["name"] for t in model["inputs"]] == ["IMAGE", "PROMPT"] and model["outputs"][0]["datatype"] == "BYTES"
    config = client.get_model_config("blip2", headers=headers).config  # a real Triton ModelConfig message
    assert config.max_batch_size == 8 and config.input[1].optional and config.HasField("dynamic_batching")
    assert [o.name for o in config.output] == ["TEXT"]


def test_answers_match_the_http_path(app):
    images = [image_bytes(50), image_bytes(51)]
    grpc = grpcclient.InferenceServerClient(app.grpc_url)
    http = httpclient.InferenceServerClient(app.url)
    for prompts, parameters in ((None, {"max_new_tokens": 9}), ([QUESTION] * 2, {"max_new_tokens": 6, "num_beams": 2})):
        over_grpc = _texts(
            grpc.infer(
                "blip2", bytes_inputs(grpcclient, images, prompts), parameters=parameters, headers=app.grpc_headers
            )
        )
        over_http = _texts(http.infer("blip2", bytes_inputs(httpclient, images, prompts), parameters=parameters))
        assert over_grpc == over_http and all(over_grpc)


def test_status_codes(app):
    client = grpcclient.InferenceServerClient(app.grpc_url)
    cases = [
        (lambda: client.get_model_metadata("nope", headers=app.grpc_headers), "StatusCode.NOT_FOUND", "unknown model"),
        (
            lambda: client.infer("nope", bytes_inputs(grpcclient, [image_bytes(1)]), headers=app.grpc_headers),
            "StatusCode.NOT_FOUND",
            "unknown model",
        ),
        (
            lambda: client.infer("blip2", bytes_inputs(grpcclient, [b"not an image"]), headers=app.grpc_headers),
            "StatusCode.INVALID_ARGUMENT",
            "not an image file",
        ),
        (
            lambda: client.infer("blip2", bytes_inputs(grpcclient, [truncated_png()]), headers=app.grpc_headers),
            "StatusCode.INVALID_ARGUMENT",
            "truncated",
        ),
        (
            lambda: client.infer(
                "blip2", bytes_inputs(grpcclient, [image_bytes(1)]), parameters={"top_p": 3.0}, headers=app.grpc_headers
            ),
            "StatusCode.INVALID_ARGUMENT",
            "out of range",
        ),
    ]
    for call, code, words in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == code and words in info.value.message(), (
            info.value.status(),
            info.value.message(),
        )
    assert _texts(client.infer("blip2", bytes_inputs(grpcclient, [image_bytes(2)]), headers=app.grpc_headers))


def test_aio_client(app):
    async def main():
        client = grpcaio.InferenceServerClient(app.grpc_url)
        try:
            live = await client.is_server_live(headers=app.grpc_headers)
            metadata = await client.get_model_metadata("blip2", headers=app.grpc_headers, as_json=True)
            results = await asyncio.gather(
                *(
                    client.infer("blip2", bytes_inputs(grpcaio, [image_bytes(i)]), headers=app.grpc_headers)
                    for i in (52, 53, 54)
                )
            )
            return live, metadata, [_texts(r)[0] for r in results]
        finally:
            await client.close()

    live, metadata, texts = asyncio.run(main())
    assert live and metadata["name"] == "blip2" and len(set(texts)) == 3


def test_model_stream_infer_streams_text_that_joins_to_the_answer(app):
    client = grpcclient.InferenceServerClient(app.grpc_url)
    expected = _texts(
        client.infer(
            "blip2",
            bytes_inputs(grpcclient, [image_bytes(55)], [QUESTION]),
            parameters={"max_new_tokens": 24},
            headers=app.grpc_headers,
        )
    )[0]
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=app.grpc_headers)
    try:
        client.async_stream_infer(
            "blip2", bytes_inputs(grpcclient, [image_bytes(55)], [QUESTION]), parameters={"max_new_tokens": 24}
        )
        client.async_stream_infer("blip2", bytes_inputs(grpcclient, [b"junk"]))  # an error, then the stream goes on
        client.async_stream_infer(
            "blip2", bytes_inputs(grpcclient, [image_bytes(55)], [QUESTION]), parameters={"max_new_tokens": 24}
        )
        pieces: list[list[str]] = [[], [], []]
        errors, index = [], 0
        while index < 3:
            result, error = responses.get(timeout=60)
            if error is not None:
                errors.append(error)
                index += 1
                continue
            pieces[index].append(_texts(result)[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                index += 1
    finally:
        client.stop_stream()
    assert "".join(pieces[0]) == expected and len(pieces[0]) > 3, pieces[0]
    assert "".join(pieces[2]) == expected
    assert len(errors) == 1 and "not an image file" in errors[0].message()


def test_overload_is_unavailable_over_grpc_and_503_over_http(tight_app):
    """A stage with a one-request queue turns a burst away with UNAVAILABLE/503, and serves again after."""

    async def burst():
        client = grpcaio.InferenceServerClient(tight_app.grpc_url)
        try:
            calls = [
                client.infer(
                    "blip2",
                    bytes_inputs(grpcaio, [image_bytes(i)]),
                    parameters={"max_new_tokens": 120},
                    headers=tight_app.grpc_headers,
                )
                for i in range(12)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
    assert refused and all(o.status() == "StatusCode.UNAVAILABLE" for o in refused), [str(o) for o in refused]
    assert any(not isinstance(o, Exception) for o in outcomes)

    async def http_burst():
        async with httpx.AsyncClient(timeout=60) as client:

            def request(i):
                image = {
                    "name": "IMAGE",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(image_bytes(i)).decode()],
                }
                body = {"inputs": [image], "parameters": {"max_new_tokens": 120}}
                return client.post(f"{tight_app.http}/v2/models/blip2/infer", json=body)

            return await asyncio.gather(*(request(i) for i in range(12)))

    responses = asyncio.run(http_burst())
    statuses = [r.status_code for r in responses]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}, statuses
    refused = [(r.headers.get("retry-after"), r.text) for r in responses if r.status_code == 503]
    assert all(retry == "1" for retry, _ in refused), refused
    assert all("error" in r.json() for r in responses if r.status_code == 503)
    client = grpcclient.InferenceServerClient(tight_app.grpc_url)
    assert _texts(client.infer("blip2", bytes_inputs(grpcclient, [image_bytes(3)]), headers=tight_app.grpc_headers))


def _no_internals(message: str) -> None:
    """A client-facing error message: no stack trace, process id, actor id or address."""
    import re

    assert "Traceback" not in message and "pid=" not in message and "actor" not in message.lower(), message
    assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", message), message


def test_every_standard_call_answers_with_a_status_tritonclient_decodes(retrieval_app):
    """The repository index is served (statistics: the next test); the Triton extensions this server does not offer
    answer UNIMPLEMENTED (gRPC)
    or a KServe-shaped 400 (HTTP) with a message and no internals, over stock tritonclient; unknown routes a
    KServe-shaped 404."""
    app = retrieval_app
    clients = {
        "grpc": grpcclient.InferenceServerClient(app.grpc_url),
        "http": httpclient.InferenceServerClient(app.url),
    }
    for protocol, client in clients.items():
        kwargs = {"headers": app.grpc_headers} if protocol == "grpc" else {}
        index = client.get_model_repository_index(**kwargs)
        models = index.models if protocol == "grpc" else index
        states = {
            (m.name if protocol == "grpc" else m["name"]): (m.state if protocol == "grpc" else m["state"])
            for m in models
        }
        assert states == {name: "READY" for name in ("blip2", "blip2_embed_image", "blip2_embed_text", "blip2_itm")}
        calls = [
            lambda: client.load_model("blip2", **kwargs),
            lambda: client.unload_model("blip2", **kwargs),
            lambda: client.get_system_shared_memory_status(**kwargs),
            lambda: client.get_cuda_shared_memory_status(**kwargs),
            lambda: client.get_trace_settings(**kwargs),
            lambda: client.get_log_settings(**kwargs),
        ]
        if protocol == "grpc":
            calls += [
                lambda: client.unregister_system_shared_memory(**kwargs),
                lambda: client.unregister_cuda_shared_memory(**kwargs),
            ]
        for call in calls:
            with pytest.raises(InferenceServerException) as raised:
                call()
            message = raised.value.message()
            assert "does not implement" in message, (protocol, message)
            if protocol == "grpc":
                assert raised.value.status() == "StatusCode.UNIMPLEMENTED", message
            else:
                assert raised.value.status() == "400", message
            _no_internals(message)
    missing = httpx.get(f"{app.http}/v2/no/such/route", timeout=30)
    assert missing.status_code == 404 and "no such route" in missing.json()["error"]


STATISTICS_FIELDS = ["last_inference", "inference_count", "execution_count"] + [
    f"inference_stats.{kind}.{unit}"
    for kind in ("success", "fail", "queue", "compute_infer", "cache_hit", "cache_miss")
    for unit in ("count", "ns")
]


def _statistics(client, protocol: str, headers: dict | None) -> dict[str, dict[str, int]]:
    """name -> {field: int} of Triton's per-model statistics, whichever protocol (gRPC's JSON writes uint64 as text
    and leaves zeros out)."""
    if protocol == "grpc":
        raw = client.get_inference_statistics(headers=headers, as_json=True)["model_stats"]
    else:
        raw = client.get_inference_statistics()["model_stats"]
    out = {}
    for model in raw:
        fields = {}
        for field in STATISTICS_FIELDS:
            value = model
            for key in field.split("."):
                value = value.get(key, {}) if isinstance(value, dict) else {}
            fields[field] = int(value) if value != {} else 0
        out[model["name"]] = fields
    return out


def test_model_statistics_count_what_was_sent(retrieval_app):
    """Triton's statistics extension over stock tritonclient, HTTP and gRPC: per model (blip2, the retrieval models,
    the stages behind them) the requests sent here, as differences inside this test, with their durations."""
    app = retrieval_app
    clients = {
        "grpc": grpcclient.InferenceServerClient(app.grpc_url),
        "http": httpclient.InferenceServerClient(app.url),
    }
    before = _statistics(clients["http"], "http", None)
    assert {"blip2", "blip2_embed_text", "blip2_vision", "blip2_llm", "blip2_retrieval"} <= set(before)
    http = clients["http"]
    http.infer("blip2", bytes_inputs(httpclient, [image_bytes(41), image_bytes(42)]), parameters={"max_new_tokens": 3})
    with pytest.raises(InferenceServerException):
        http.infer("blip2", bytes_inputs(httpclient, [b"not an image"]))
    text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a red square"]], dtype=np.object_))
    http.infer("blip2_embed_text", [text])
    afters = {protocol: _statistics(client, protocol, app.grpc_headers) for protocol, client in clients.items()}
    assert afters["grpc"] == afters["http"]
    after = afters["http"]

    def delta(model: str, *path: str) -> int:
        return after[model][".".join(path)] - before[model][".".join(path)]

    assert delta("blip2", "inference_stats", "success", "count") == 1
    assert delta("blip2", "inference_stats", "fail", "count") == 1
    assert delta("blip2", "inference_count") == 2  # rows
    assert (
        delta("blip2", "inference_stats", "success", "ns") > 0 and delta("blip2", "inference_stats", "fail", "ns") > 0
    )
    assert after["blip2"]["last_inference"] > before["blip2"]["last_inference"]
    assert delta("blip2_embed_text", "inference_stats", "success", "count") == 1
    assert delta("blip2_embed_image", "inference_stats", "success", "count") == 0
    for stage in ("blip2_vision", "blip2_llm"):
        assert delta(stage, "inference_stats", "success", "count") == 2, stage
        assert delta(stage, "execution_count") >= 1 and delta(stage, "inference_stats", "compute_infer", "ns") > 0
    one = clients["grpc"].get_inference_statistics("blip2_llm", headers=app.grpc_headers, as_json=True)
    assert [m["name"] for m in one["model_stats"]] == ["blip2_llm"]
    with pytest.raises(InferenceServerException) as raised:
        http.get_inference_statistics("no_such_model")
    assert raised.value.status() == "404" and "no_such_model" in raised.value.message()
