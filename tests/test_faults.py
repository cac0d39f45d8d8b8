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

from tests.conftest import ServedApp, delete_app, deploy_graph
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
    yield deploy_graph(serve_ports, checkpoints["t5"], "t5", "faulty")
    delete_app("faulty")


def _llm_pid(app: ServedApp) -> int:
    """The process of the (one) LLM replica, as it reports itself."""
    return app.deployment("LLM").stats.remote().result(timeout_s=60)["pid"]


def test_killing_the_llm_replica_under_load_loses_nothing(faulty_app):
    from blip2_serve.clients import Blip2Client

    url = f"{faulty_app.http}/v2/models/blip2/infer"
    outcomes: list[tuple[int, float, float, int, str | None]] = []  # (client, sent, answered, status, retry-after)
    sdk_results: list[tuple[float, float, str]] = []  # (sent, answered, caption)
    errors: list[BaseException] = []  # whatever ends a client thread: the test fails on any
    stop = threading.Event()

    def client(index: int) -> None:
        try:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        response = http.post(url, json=_body(index, max_new_tokens=60, min_new_tokens=60))
                        status, retry_after = response.status_code, response.headers.get("retry-after")
                    except httpx.TimeoutException:
                        status, retry_after = -1, None  # a hang: the test fails on it
                    outcomes.append((index, sent, time.monotonic(), status, retry_after))
                    if status == 503:
                        time.sleep(0.1)
        except BaseException as exc:
            errors.append(exc)

    def sdk() -> None:
        try:
            with Blip2Client(faulty_app.url, retries=8, backoff_s=0.25) as blip2:
                while not stop.is_set():
                    sent = time.monotonic()
                    caption = blip2.caption(image_bytes(99), max_new_tokens=60, min_new_tokens=60)
                    sdk_results.append((sent, time.monotonic(), caption))
        except BaseException as exc:
            errors.append(exc)

    clients = 6
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=sdk)]
    pid = _llm_pid(faulty_app)
    for thread in threads:
        thread.start()
    try:
        # kill only once the replica is decoding: the engine reports sequences running (in flight at the kill)
        deadline = time.monotonic() + 60
        running = 0
        while time.monotonic() < deadline and running < 2:
            running = faulty_app.deployment("LLM").stats.remote().result(timeout_s=30)["engine"]["running"]
            time.sleep(0.05)
        assert running >= 2, "the load never reached the LLM replica"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = killed_at + 120
        while time.monotonic() < deadline:  # until every client and the SDK were answered after the kill
            answered = {c for c, _, done, status, _ in list(outcomes) if done > killed_at and status == 200}
            if len(answered) == clients and any(done > killed_at for _, done, _ in list(sdk_results)):
                break
            time.sleep(0.2)
        recovered_s = time.monotonic() - killed_at
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    statuses = [status for *_, status, _ in outcomes]
    in_flight = [status for _, sent, done, status, _ in outcomes if sent < killed_at < done]
    print(
        f"replica killed with {running} sequences decoding: {len(statuses)} requests, {len(in_flight)} in flight "
        f"at the kill, {statuses.count(503)} retriable 503, every client served again within {recovered_s:.1f} s; "
        f"the SDK finished {len(sdk_results)} captions"
    )
    assert not errors, errors  # no client thread died
    assert not any(thread.is_alive() for thread in threads)
    assert set(statuses) <= {200, 503}, statuses  # no 500, no hang
    assert all(retry == "1" for *_, status, retry in outcomes if status == 503)
    # the requests in flight at the kill (the engine was decoding some) each got an answer or a retriable 503
    assert len(in_flight) >= 2 and set(in_flight) <= {200, 503}, in_flight
    for index in range(clients):  # every client was answered by the new replica
        assert any(c == index and done > killed_at and s == 200 for c, _, done, s, _ in outcomes), index
    assert recovered_s < 120
    assert _llm_pid(faulty_app) != pid
    # the SDK rode through: a caption it asked for before the kill or after, answered after the kill
    assert any(done > killed_at and caption for _, done, caption in sdk_results), sdk_results
    assert all(caption for *_, caption in sdk_results)
