"""Faults and deadlines: a request's own deadline is honoured (504 / DEADLINE_EXCEEDED, the work cancelled); an LLM
replica killed by its PID under load costs no request a 500 or a hang (each completes or gets a retriable 503 with
Retry-After), the replica is replaced, and the SDK rides through on its retries."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time

import httpx
import pytest
from blip2_serve.clients.transports import bytes_inputs

from tests.conftest import ServedApp, deploy_graph
from tests.helpers import image_bytes

pytestmark = pytest.mark.serve

LONG = {"max_new_tokens": 1000, "min_new_tokens": 1000}  # the tiny T5 has relative positions: any length fits


def _body(index: int, **parameters) -> dict:
    data = [base64.b64encode(image_bytes(index)).decode()]
    image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": data}
    return {"inputs": [image], "parameters": parameters}


def test_deadline_parameter_and_header(apps):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    app = apps["t5"]
    with httpx.Client(timeout=60) as http:
        started = time.monotonic()
        late = http.post(f"{app.http}/v2/models/blip2/infer", json=_body(1, timeout=100_000, **LONG))
        assert late.status_code == 504 and "deadline" in late.json()["error"], late.text
        assert time.monotonic() - started < 1.0  # cut at its deadline, not after 1000 tokens
        header = {"x-request-timeout-ms": "100"}
        body = {"IMAGE": base64.b64encode(image_bytes(2)).decode(), "parameters": LONG}
        late = http.post(f"{app.http}/v2/models/blip2/generate", json=body, headers=header)
        assert late.status_code == 504, late.text
        for bad in (0, -5, "soon", 1.5):
            refused = http.post(f"{app.http}/v2/models/blip2/infer", json=_body(1, timeout=bad))
            assert refused.status_code == 400 and "timeout" in refused.json()["error"], (bad, refused.text)
        refused = http.post(f"{app.http}/v2/models/blip2/infer", json=_body(1), headers={"x-request-timeout-ms": "x"})
        assert refused.status_code == 400
        in_time = http.post(f"{app.http}/v2/models/blip2/infer", json=_body(1, timeout=60_000_000, max_new_tokens=3))
        assert in_time.status_code == 200

    client = grpcclient.InferenceServerClient(app.grpc_url)
    inputs = bytes_inputs(grpcclient, [image_bytes(3)])
    with pytest.raises(InferenceServerException) as late:
        client.infer("blip2", inputs, parameters=LONG, timeout=100_000, headers=app.grpc_headers)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # the cancelled sequences left the engine: it is idle again, and answers
    deadline = time.monotonic() + 30
    while app.handle().stats.remote().result()["llm"]["engine"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert app.handle().stats.remote().result()["llm"]["engine"]["running"] == 0
    assert client.infer("blip2", inputs, parameters={"max_new_tokens": 3}, headers=app.grpc_headers).as_numpy("TEXT")


def test_streams_end_at_their_deadline_with_an_error_event(apps):
    """OpenAI SSE, Triton's generate_stream and the gRPC stream: past the deadline the stream ends with an error
    in its protocol's shape (OpenAI's error object before [DONE]; Triton's error event; an in-band
    DEADLINE_EXCEEDED), well before 1000 tokens, and the engine drops the sequence."""
    import json
    import queue

    import tritonclient.grpc as grpcclient

    app = apps["t5"]
    image = base64.b64encode(image_bytes(4)).decode()
    header = {"x-request-timeout-ms": "1500"}
    chat = {
        "model": "blip2",
        "stream": True,
        "max_tokens": 1000,
        "min_tokens": 1000,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}
        ],
    }
    with httpx.Client(timeout=60) as http:
        for url, body in (
            (f"{app.http}/v1/chat/completions", chat),
            (f"{app.http}/v2/models/blip2/generate_stream", {"IMAGE": image, "parameters": LONG}),
        ):
            started = time.monotonic()
            with http.stream("POST", url, json=body, headers=header) as response:
                assert response.status_code == 200, response.read()
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert time.monotonic() - started < 10, url
            errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
            assert len(errors) == 1, (url, events[-3:])
            message = errors[0]["message"] if isinstance(errors[0], dict) else errors[0]
            assert "deadline" in message, (url, errors)
            if "chat" in url:
                assert errors[0]["type"] == "timeout" and events[-1] == "[DONE]" and events[-2] != "[DONE]"

    client = grpcclient.InferenceServerClient(app.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=app.grpc_headers)
    try:
        inputs = bytes_inputs(grpcclient, [image_bytes(5)])
        client.async_stream_infer("blip2", inputs, parameters=LONG, timeout=1_500_000)  # microseconds
        started = time.monotonic()
        while True:
            result, error = answers.get(timeout=30)
            if error is not None:
                break
        assert "DEADLINE_EXCEEDED" in str(error) and time.monotonic() - started < 10, error
    finally:
        client.stop_stream()
    deadline = time.monotonic() + 30
    while app.handle().stats.remote().result()["llm"]["engine"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert app.handle().stats.remote().result()["llm"]["engine"]["running"] == 0


@pytest.fixture(scope="module")
def faulty_app(serve_ports, checkpoints) -> ServedApp:
    """The T5 graph of its own, to kill replicas of."""
    from ray import serve

    yield deploy_graph(serve_ports, checkpoints["t5"], "t5", "faulty")
    serve.delete("faulty")


def _llm_pid(app: ServedApp) -> int:
    """The process of the (one) LLM replica, as it reports itself."""
    return app.deployment("LLM").stats.remote().result(timeout_s=60)["pid"]


def test_killing_the_llm_replica_under_load_loses_nothing(faulty_app):
    from blip2_serve.clients import Blip2Client

    url = f"{faulty_app.http}/v2/models/blip2/infer"
    outcomes: list[tuple[float, float, int, str | None]] = []  # (sent, answered, status, retry-after)
    sdk_results: list[str] = []
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = http.post(url, json=_body(index, max_new_tokens=60, min_new_tokens=60))
                    status, retry_after = response.status_code, response.headers.get("retry-after")
                except httpx.TimeoutException:
                    status, retry_after = -1, None  # a hang: the test fails on it
                outcomes.append((sent, time.monotonic(), status, retry_after))
                if status == 503:
                    time.sleep(0.1)

    def sdk() -> None:
        with Blip2Client(faulty_app.url, retries=8, backoff_s=0.25) as blip2:
            while not stop.is_set():
                sdk_results.append(blip2.caption(image_bytes(99), max_new_tokens=60, min_new_tokens=60))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)] + [threading.Thread(target=sdk)]
    pid = _llm_pid(faulty_app)
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = killed_at + 120
        while time.monotonic() < deadline:  # until a request sent after the kill is answered by the new replica
            if any(sent > killed_at and status == 200 for sent, _, status, _ in list(outcomes)):
                break
            time.sleep(0.2)
        recovered_s = time.monotonic() - killed_at
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    statuses = [status for _, _, status, _ in outcomes]
    print(
        f"replica killed: {len(statuses)} requests, {statuses.count(503)} retriable 503, served again after "
        f"{recovered_s:.1f} s; the SDK finished {len(sdk_results)} captions"
    )
    assert set(statuses) <= {200, 503}, statuses  # no 500, no hang
    assert all(retry == "1" for _, _, status, retry in outcomes if status == 503)
    assert recovered_s < 120 and any(sent > killed_at and s == 200 for sent, _, s, _ in outcomes)
    assert _llm_pid(faulty_app) != pid
    assert sdk_results and all(sdk_results)
    assert not any(thread.is_alive() for thread in threads)
