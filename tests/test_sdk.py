"""The SDK (clients/) over HTTP and gRPC, sync and async, against the served graph."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from blip2_serve.clients import (
    AsyncBlip2Client,
    Blip2Client,
    ConnectionFailedError,
    InvalidRequestError,
    ModelNotFoundError,
)
from PIL import Image

from tests.helpers import image_bytes, truncated_png

pytestmark = pytest.mark.serve


@pytest.fixture(params=["http", "grpc"])
def client(request, apps):
    app = apps["opt"]
    if request.param == "http":
        sdk = Blip2Client(app.url)
    else:
        sdk = Blip2Client(app.grpc_url, protocol="grpc", headers=app.grpc_headers)
    yield sdk
    sdk.close()


def test_caption_ask_and_many(client, apps, references):
    reference, image = references["opt"], image_bytes(90)
    assert client.caption(image, max_new_tokens=9) == reference.text(
        reference.generate([image], None, max_new_tokens=9)[0]
    )
    questions = ["what is it?", "what colour is the block?", "where is it?"]
    answers = client.ask_many(image, questions, max_new_tokens=7)
    for question, answer in zip(questions, answers):
        prompt = f"Question: {question} Answer:"
        assert answer == reference.text(reference.generate([image], [prompt], max_new_tokens=7)[0])
    assert client.ask(image, questions[1], max_new_tokens=7) == answers[1]
    images = [image_bytes(91 + i) for i in range(10)]
    assert client.caption_many(images, concurrency=3, max_new_tokens=5) == [
        client.caption(i, max_new_tokens=5) for i in images
    ]


def test_images_as_path_bytes_pil_and_numpy(client, tmp_path):
    data = image_bytes(92)
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    captions = {client.caption(form, max_new_tokens=6) for form in (data, path, str(path), pil, np.asarray(pil))}
    assert len(captions) == 1
    with pytest.raises(TypeError):
        client.caption(3.5)


def test_chat_stream_health_and_metadata(client, apps):
    image = image_bytes(93)
    turns = ["what is it?", "a block", "what colour is it?"]
    answer = client.chat(image, turns, max_new_tokens=8)
    prompt = "Question: what is it? Answer: a block. Question: what colour is it? Answer:"
    assert answer == client.generate(image, prompt, max_new_tokens=8)
    pieces = list(client.stream(image, prompt, max_new_tokens=20))
    assert len(pieces) > 3 and "".join(pieces) == client.generate(image, prompt, max_new_tokens=20)
    assert client.health() == {"live": True, "ready": True, "model_ready": True}
    assert client.metadata()["name"] == "blip2"


def test_samples_scores_and_extract(apps, references):
    """samples(): n seeded answers, reproducible, each scored as its tokens' mean log-probability (the greedy one's
    tokens and log-probabilities as transformers computes them); extract(): fields that validate against a schema.
    Over gRPC (no OpenAI route) both say so."""
    import jsonschema

    reference, image = references["opt"], image_bytes(94)
    with Blip2Client(apps["opt"].url) as sdk:
        first = sdk.samples(image, n=3, temperature=1.0, seed=5, max_new_tokens=8)
        assert [s.text for s in first] == [
            s.text for s in sdk.samples(image, n=3, temperature=1.0, seed=5, max_new_tokens=8)
        ]
        assert [s.text for s in first] == [
            sdk.samples(image, temperature=1.0, seed=5 + i, max_new_tokens=8)[0].text for i in range(3)
        ]
        assert all(s.score is not None and s.score < 0 and s.tokens is None for s in first)
        (greedy,) = sdk.samples(image, "what is it?", logprobs=True, max_new_tokens=6)
        tokens, expected = reference.logprobs([image], ["Question: what is it? Answer:"], max_new_tokens=6)[0]
        assert [p for _, p in greedy.tokens] == pytest.approx(expected, abs=1e-4)
        assert greedy.score == pytest.approx(sum(expected) / len(expected), abs=1e-4)
        schema = {
            "type": "object",
            "properties": {"animal": {"enum": ["cat", "dog"]}, "count": {"type": "integer"}},
            "required": ["animal", "count"],
            "additionalProperties": False,
        }
        fields = sdk.extract(image, schema, "what animal is it?", max_new_tokens=40)
        jsonschema.validate(fields, schema)
        with pytest.raises(ValueError, match="cut at max_new_tokens"):
            sdk.extract(image, schema, max_new_tokens=2)
        # outlines-core's expressions do not enforce numeric bounds: such a schema is refused, not half-kept
        bounded = {**schema, "properties": {**schema["properties"], "count": {"type": "integer", "maximum": 9}}}
        with pytest.raises(InvalidRequestError, match="cannot enforce 'maximum' at properties.count"):
            sdk.extract(image, bounded)
    with Blip2Client(apps["opt"].grpc_url, protocol="grpc", headers=apps["opt"].grpc_headers) as sdk:
        with pytest.raises(TypeError, match="OpenAI route"):
            sdk.samples(image, n=2)


def test_server_errors_are_typed(client, apps):
    with pytest.raises(InvalidRequestError, match="truncated"):
        client.caption(truncated_png())
    with pytest.raises(InvalidRequestError, match="out of range"):
        client.caption(image_bytes(1), num_beams=99)
    with pytest.raises(InvalidRequestError):
        list(client.stream(b"not an image"))
    assert client.caption(image_bytes(1), max_new_tokens=3)


def test_unknown_model_and_no_server(apps):
    app = apps["opt"]
    with Blip2Client(app.url, model="nope") as client:
        with pytest.raises(ModelNotFoundError, match="unknown model"):
            client.caption(image_bytes(1))
    with Blip2Client("127.0.0.1:9") as client:
        with pytest.raises(ConnectionFailedError):
            client.caption(image_bytes(1))


def test_async_client(apps):
    app = apps["opt"]

    async def main():
        async with (
            AsyncBlip2Client(app.url) as http,
            AsyncBlip2Client(app.grpc_url, "grpc", headers=app.grpc_headers) as grpc,
        ):
            image = image_bytes(94)
            captions = await asyncio.gather(
                http.caption(image, max_new_tokens=6), grpc.caption(image, max_new_tokens=6)
            )
            streamed = [p async for p in grpc.stream(image, "a photo of", max_new_tokens=10)]
            whole = await http.generate(image, "a photo of", max_new_tokens=10)
            return captions, "".join(streamed), whole

    captions, streamed, whole = asyncio.run(main())
    assert captions[0] == captions[1] and streamed == whole


def test_sdk_imports_no_server_stack_even_after_a_call(apps):
    app = apps["opt"]
    code = (
        "import sys\n"
        "from blip2_serve import Blip2Client\n"
        f"client = Blip2Client({app.url!r})\n"
        f"assert isinstance(client.caption({image_bytes(1)!r}, max_new_tokens=2), str)\n"
        "client.close()\n"
        "server = ('torch', 'ray', 'fastapi', 'transformers', 'blip2_serve.serve', 'blip2_serve.deployments')\n"
        "heavy = [m for m in server if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_client_only_install_pulls_neither_torch_nor_ray(tmp_path):
    """pip resolves the base install (PyPI, as CI reaches it) without installing: no torch, no ray in the plan."""
    report = tmp_path / "report.json"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "blip2-serve" in names and "tritonclient" in names
    assert not names & {"torch", "ray", "transformers", "fastapi"}, sorted(names)
