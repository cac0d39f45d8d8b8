"""Property-based fuzzing of every way in: KServe v2 HTTP (JSON and the binary extension), OpenAI chat, KServe v2
gRPC (raw ModelInferRequest messages), and schemathesis over the served OpenAPI schema. Properties: never a 5xx or
an INTERNAL/UNKNOWN status, every refusal carries a message, and after each test the server answers a fixed request
with the same text as before and reports ready (no replica died). Examples are random per run (BLIP2_FUZZ_EXAMPLES
each, 120 by default; a failure prints the example and how to reproduce it)."""

from __future__ import annotations

import base64
import json
import os
import struct

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import image_bytes, png_header_only, truncated_png

pytestmark = pytest.mark.serve

FUZZ = settings(
    max_examples=int(os.environ.get("BLIP2_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    print_blob=True,
)

IMAGES = [image_bytes(1), image_bytes(2, (8, 8)), truncated_png(), png_header_only(50_000, 50_000), b"", b"GIF89a"]
image_data = st.one_of(st.sampled_from(IMAGES), st.binary(max_size=64))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
PARAMETER_NAMES = ["max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k",
                   "repetition_penalty", "seed", "stop", "timeout", "binary_data_output", "junk"]  # fmt: skip


def _cheap(values: dict) -> dict:
    """Valid lengths stay short (a valid 1000-token request would only be slow); invalid ones are kept."""
    out = {"max_new_tokens": 3, **values}
    for name in ("max_new_tokens", "min_new_tokens"):
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 4 < value <= 1024:
            out[name] = 3 if name == "max_new_tokens" else 0
    return out


parameters = st.dictionaries(
    st.sampled_from(PARAMETER_NAMES), st.one_of(scalars, st.integers(min_value=0, max_value=4)), max_size=4
).map(_cheap)


@st.composite
def kserve_tensor(draw, name: str):
    datatype = draw(st.sampled_from(["BYTES", "BYTES", "FP32", "INT64", "BOOL", "BF16", "nonsense"]))
    rows = draw(st.integers(min_value=0, max_value=3))
    shape = draw(st.sampled_from([[rows], [rows, 1], [rows, 2], [-1], [], [1, 1, 1]]))
    if name == "IMAGE":
        data = [base64.b64encode(draw(image_data)).decode() for _ in range(rows)]
    else:
        data = [draw(st.text(max_size=20)) for _ in range(rows)]
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": draw(st.one_of(st.just(data), json_values))}
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.dictionaries(st.text(max_size=8), scalars, max_size=2))
    return tensor


@st.composite
def nearly_valid_body(draw):
    """A well-formed request with a real image, fuzzed where it matters: prompt text, rows, parameters."""
    rows = draw(st.integers(min_value=1, max_value=2))
    image = {"name": "IMAGE", "datatype": "BYTES", "shape": [rows, 1]}
    image["data"] = [base64.b64encode(draw(st.sampled_from(IMAGES[:2]))).decode() for _ in range(rows)]
    inputs = [image]
    if draw(st.booleans()):
        prompts = [draw(st.text(max_size=30)) for _ in range(rows)]
        inputs.append({"name": "PROMPT", "datatype": "BYTES", "shape": [rows, 1], "data": prompts})
    chosen = draw(st.dictionaries(st.sampled_from(["num_beams", "do_sample", "top_k", "seed"]), st.integers(1, 3)))
    return {"inputs": inputs, "parameters": {**chosen, "max_new_tokens": 3}}


@st.composite
def kserve_body(draw):
    if draw(st.integers(min_value=0, max_value=2)) == 0:
        return draw(nearly_valid_body())
    names = draw(st.lists(st.sampled_from(["IMAGE", "PROMPT", "TEXT", "OTHER"]), max_size=3))
    body = {"inputs": [draw(kserve_tensor(n)) for n in names], "parameters": draw(parameters)}
    if draw(st.booleans()):
        body["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["TEXT", "X"])}), max_size=2))
    if draw(st.booleans()):
        body["id"] = draw(st.one_of(st.text(max_size=8), st.integers()))
    return body


def _json(body) -> bytes:
    """As Python writes it: NaN and Infinity included (what a sloppy client sends)."""
    return json.dumps(body).encode()


def _refusal_has_message(response: httpx.Response, seen: set | None = None) -> None:
    if seen is not None:
        seen.add(response.status_code)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert isinstance(message, str) and message, response.text


@pytest.fixture(scope="module")
def before(apps):
    """The answer to a fixed request before any fuzzing, per app."""
    return {llm: _fixed(app) for llm, app in apps.items()}


def _unharmed(app, before: dict) -> None:
    """After one test's fuzzing: the same answer to the fixed request, and ready (each test checks its own)."""
    assert _fixed(app) == before[app.llm]
    assert httpx.get(f"{app.http}/v2/health/ready", timeout=30).status_code == 200


def _fixed(app) -> str:
    image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [base64.b64encode(image_bytes(3)).decode()]}
    body = {"inputs": [image], "parameters": {"max_new_tokens": 6}}
    response = httpx.post(f"{app.http}/v2/models/blip2/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"][0]


def test_kserve_http_json(apps, before):
    app = apps["opt"]
    seen: set[int] = set()
    with httpx.Client(timeout=60) as http:

        @FUZZ
        @given(kserve_body())
        def one(body):
            _refusal_has_message(http.post(f"{app.http}/v2/models/blip2/infer", content=_json(body)), seen)

        one()
        assert 400 in seen and 200 in seen, seen  # both the refusals and the model were reached

        @FUZZ
        @given(st.binary(max_size=200), st.sampled_from(["application/json", "application/octet-stream", "text/plain"]))
        def raw(body, content_type):
            response = http.post(
                f"{app.http}/v2/models/blip2/infer", content=body, headers={"content-type": content_type}
            )
            _refusal_has_message(response)

        raw()
    _unharmed(app, before)


@st.composite
def binary_body(draw):
    """The binary tensor extension: a JSON header whose tensors point into the bytes after it, fuzzed sizes."""
    images = [draw(image_data) for _ in range(draw(st.integers(min_value=0, max_value=2)))]
    payload = b"".join(struct.pack("<I", len(i)) + i for i in images)
    declared = draw(st.one_of(st.just(len(payload)), st.integers(min_value=-5, max_value=len(payload) + 10)))
    inputs = [
        {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images), 1], "parameters": {"binary_data_size": declared}}
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"max_new_tokens": 3}}).encode()
    length = draw(st.one_of(st.just(len(header)), st.integers(min_value=-3, max_value=len(header) + 20)))
    noise = draw(st.binary(max_size=8))
    return header + payload + noise, str(length)


def test_kserve_http_binary_extension(apps, before):
    app = apps["t5"]
    seen: set[int] = set()
    with httpx.Client(timeout=60) as http:

        @FUZZ
        @given(binary_body())
        def one(case):
            body, length = case
            headers = {"inference-header-content-length": length, "content-type": "application/octet-stream"}
            _refusal_has_message(http.post(f"{app.http}/v2/models/blip2/infer", content=body, headers=headers), seen)

        one()
        assert 400 in seen and 200 in seen, seen
    _unharmed(app, before)


@st.composite
def chat_body(draw):
    def part():
        return st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=30), scalars)}),
            st.fixed_dictionaries(
                {
                    "type": st.just("image_url"),
                    "image_url": st.one_of(
                        st.fixed_dictionaries(
                            {"url": image_data.map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode())}
                        ),
                        st.fixed_dictionaries(
                            {"url": st.sampled_from(["http://10.0.0.1/x.png", "file:///etc/passwd", "data:,x"])}
                        ),
                        json_values,
                    ),
                }
            ),
            json_values,
        )

    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", "nobody"]),
            "content": st.one_of(st.text(max_size=20), st.lists(part(), max_size=3), scalars),
        }
    )
    body = {"model": draw(st.sampled_from(["blip2", "other", ""])), "messages": draw(st.lists(message, max_size=3))}
    for name, values in {
        "max_tokens": st.one_of(st.integers(min_value=-2, max_value=4), scalars),
        "temperature": scalars,
        "stream": st.booleans(),
        "n": st.one_of(st.integers(min_value=-1, max_value=18), scalars),
        "logprobs": st.one_of(st.booleans(), scalars),
        "top_logprobs": st.one_of(st.integers(min_value=-1, max_value=22), scalars),
        "response_format": st.one_of(
            st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}, {"type": "json_schema"}]),
            st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": json_values}),
            json_values,
        ),
        "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=6), scalars),
        "seed": scalars,
        "stream_options": json_values,
    }.items():
        if draw(st.booleans()):
            body[name] = draw(values)
    body.setdefault("max_tokens", 3)
    return body


def test_openai_chat(apps, before):
    app = apps["opt"]
    seen: set[int] = set()
    with httpx.Client(timeout=60) as http:

        @FUZZ
        @given(chat_body())
        def one(body):
            response = http.post(f"{app.http}/v1/chat/completions", content=_json(body))
            seen.add(response.status_code)
            assert response.status_code < 500, (response.status_code, response.text[:500])
            if response.status_code >= 400:
                assert response.json()["error"]["message"]

        one()
        assert 400 in seen, seen
    _unharmed(app, before)


@st.composite
def grpc_request(draw):
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["blip2", "blip2", "nope"])), id=draw(st.text(max_size=6))
    )
    request.model_version = draw(st.sampled_from(["", "1", "2"]))
    raw = draw(st.booleans())
    for name in draw(st.lists(st.sampled_from(["IMAGE", "PROMPT", "X"]), max_size=3)):
        tensor = request.inputs.add(name=name, datatype=draw(st.sampled_from(["BYTES", "FP32", "?"])))
        rows = draw(st.integers(min_value=0, max_value=2))
        tensor.shape.extend(draw(st.sampled_from([[rows, 1], [rows], [], [-1, 3]])))
        elements = [draw(image_data) if name == "IMAGE" else draw(st.text(max_size=10)).encode() for _ in range(rows)]
        if raw:
            blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
            request.raw_input_contents.append(draw(st.one_of(st.just(blob), st.binary(max_size=12))))
        else:
            tensor.contents.bytes_contents.extend(elements)
    for name, value in draw(parameters).items():
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            request.parameters[name].int64_param = value
        elif isinstance(value, float):
            request.parameters[name].double_param = value
        elif isinstance(value, str):
            request.parameters[name].string_param = value
    if draw(st.booleans()):
        request.outputs.add(name=draw(st.sampled_from(["TEXT", "Y"])))
    return request


def test_kserve_grpc(apps, before):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    app = apps["t5"]
    channel = grpc.insecure_channel(app.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    metadata = tuple(app.grpc_headers.items())

    seen: set = set()

    @FUZZ
    @given(grpc_request())
    def one(request):
        try:
            stub.ModelInfer(request, metadata=metadata, timeout=60)
            seen.add("OK")
        except grpc.RpcError as exc:
            seen.add(exc.code())
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
                exc.code(),
                exc.details(),
            )
            assert exc.details()

    one()
    channel.close()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen, seen
    _unharmed(app, before)


def test_schemathesis_over_the_openapi_schema(apps, before):
    """Every route in the served OpenAPI document, with what schemathesis generates for its path, query and body."""
    import schemathesis
    from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: F401  (the module exists)

    app = apps["opt"]
    document = httpx.get(f"{app.http}/openapi.json", timeout=30).json()
    for route in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/generate", "/v1/chat/completions",
                  "/v1/embeddings"):  # fmt: skip
        content = document["paths"][route]["post"]["requestBody"]["content"]  # real body schemas to generate from
        assert content["application/json"]["schema"]["properties"], route
    assert (
        "application/octet-stream"
        in document["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]
    )  # the binary tensor extension stays declared
    schema = schemathesis.openapi.from_url(f"{app.http}/openapi.json")
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(operation.as_strategy())
        def one(case):
            response = case.call(base_url=app.http, timeout=60)
            assert response.status_code < 500, (
                case.method,
                case.formatted_path,
                response.status_code,
                response.text[:300],
            )

        one()
        checked += 1
    assert checked >= 10  # the KServe v2, OpenAI and metrics routes
    _unharmed(app, before)


def _sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, read to its end."""
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@st.composite
def generate_body(draw):
    """Triton's generate extension: IMAGE (base64 of fuzzed bytes, or any JSON), PROMPT and parameters."""
    body = {}
    if draw(st.booleans()):
        body["IMAGE"] = draw(
            st.one_of(image_data.map(lambda b: base64.b64encode(b).decode()), st.text(max_size=8), json_values)
        )
    if draw(st.booleans()):
        body["PROMPT"] = draw(st.one_of(st.text(max_size=20), json_values))
    parameters = draw(st.one_of(_cheap_parameters, json_values))
    if draw(st.booleans()):
        body["parameters"] = parameters
    return body


_cheap_parameters = st.fixed_dictionaries(
    {"max_new_tokens": st.one_of(st.integers(min_value=-2, max_value=4), scalars)},
    optional={name: st.one_of(scalars, json_values) for name in PARAMETER_NAMES if name != "max_new_tokens"},
)


def test_streams(apps, before):
    """Triton's generate_stream and OpenAI's streamed chat: a refusal before the stream is a 4xx with a message; a
    stream that started is well formed to its end (every event JSON, errors with a message, OpenAI's ends [DONE])."""
    app = apps["t5"]
    seen: set[int] = set()
    with httpx.Client(timeout=60) as http:

        @FUZZ
        @given(generate_body())
        def triton(body):
            with http.stream("POST", f"{app.http}/v2/models/blip2/generate_stream", content=_json(body)) as response:
                seen.add(response.status_code)
                if response.status_code != 200:
                    response.read()
                    _refusal_has_message(response)
                    return
                events = [json.loads(event) for event in _sse_events(response)]
            assert events, "a stream without events"
            for event in events:
                assert "error" not in event or (isinstance(event["error"], str) and event["error"]), event

        triton()
        assert 200 in seen and 400 in seen, seen

        @FUZZ
        @given(chat_body())
        def chat(body):
            body["stream"] = True
            with http.stream("POST", f"{app.http}/v1/chat/completions", content=_json(body)) as response:
                if response.status_code != 200:
                    response.read()
                    _refusal_has_message(response)
                    return
                events = _sse_events(response)
            assert events[-1] == "[DONE]", events[-3:]
            for event in map(json.loads, events[:-1]):
                assert "error" not in event or event["error"]["message"], event

        chat()
    _unharmed(app, before)


def test_grpc_stream(apps, before):
    """ModelStreamInfer with the fuzzed requests of test_kserve_grpc, on one stream: each gets responses or an
    in-band error with a message; the stream itself never fails."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    app = apps["t5"]
    channel = grpc.insecure_channel(app.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    metadata = tuple(app.grpc_headers.items())
    seen: set[str] = set()

    @FUZZ
    @given(grpc_request())
    def one(request):
        request.id = "fuzz"
        responses = list(stub.ModelStreamInfer(iter([request]), metadata=metadata, timeout=60))
        assert responses, "no response on the stream"
        for response in responses:
            if response.error_message:
                seen.add("error")
            else:
                seen.add("answer")
                assert response.infer_response.model_name == "blip2"

    one()
    assert "error" in seen, seen
    # and the stream still answers a valid request
    valid = pb.ModelInferRequest(model_name="blip2", id="valid")
    valid.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(image_bytes(3))
    valid.parameters["max_new_tokens"].int64_param = 3
    answers = list(stub.ModelStreamInfer(iter([valid]), metadata=metadata, timeout=60))
    assert answers and not any(a.error_message for a in answers), answers
    assert all(a.infer_response.model_name == "blip2" and a.infer_response.id == "valid" for a in answers)
    channel.close()
    _unharmed(app, before)


@st.composite
def embeddings_body(draw):
    body = {"model": draw(st.sampled_from(["blip2_embed_text", "blip2_embed_text", "blip2", ""]))}
    texts = st.text(max_size=16)
    body["input"] = draw(st.one_of(texts, st.lists(texts, max_size=4), st.lists(st.just("x"), max_size=40), scalars,
                                   json_values))  # fmt: skip
    for name, values in {
        "encoding_format": st.one_of(st.sampled_from(["float", "base64", "binary"]), scalars),
        "dimensions": scalars,
        "user": scalars,
    }.items():
        if draw(st.booleans()):
            body[name] = draw(values)
    return body


def test_openai_embeddings(retrieval_app):
    app = retrieval_app
    fixed = {"model": "blip2_embed_text", "input": "a photo of a cat"}
    with httpx.Client(timeout=60) as http:
        first = http.post(f"{app.http}/v1/embeddings", json=fixed)
        assert first.status_code == 200, first.text
        seen: set[int] = set()

        @FUZZ
        @given(embeddings_body())
        def one(body):
            response = http.post(f"{app.http}/v1/embeddings", content=_json(body))
            _refusal_has_message(response, seen)
            if response.status_code < 400:
                data = response.json()["data"]
                expected = len(body["input"]) if isinstance(body["input"], list) else 1
                assert [item["index"] for item in data] == list(range(expected))

        one()
        assert 200 in seen and 400 in seen, seen
        assert http.post(f"{app.http}/v1/embeddings", json=fixed).json()["data"] == first.json()["data"]
