"""The exported Triton repository on the real tritonserver (nvidia-pytriton's), with stock tritonclient."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from blip2_serve.clients.transports import bytes_inputs
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port
from tests.helpers import image_bytes

pytestmark = pytest.mark.triton

BLIP2_SERVE = str(Path(sys.executable).parent / "blip2-serve")
PROMPTS_3 = ["Question: what is in the picture? Answer:", "a", "describe the colour of the small block near the top"]


class Triton:
    def __init__(self, llm: str, repo: Path, http: int, grpc: int):
        self.llm, self.repo, self.http_url, self.grpc_url = llm, repo, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"


@pytest.fixture(scope="module", params=["opt", "t5"])
def triton(request, checkpoints, tmp_path_factory):
    """`blip2-serve export triton-repo`, then `blip2-serve triton` on free ports, until the module ends."""
    llm = request.param
    repo = tmp_path_factory.mktemp(f"repo-{llm}") / "repo"
    subprocess.run(
        [BLIP2_SERVE, "export", "triton-repo", "--model", str(checkpoints[llm]), "--out", str(repo)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(repo.parent / "tritonserver.log", "w")
    command = [BLIP2_SERVE, "triton", "--repo", str(repo), "--http-port", str(http), "--grpc-port", str(grpc)]
    server = subprocess.Popen(command + ["--metrics-port", str(metrics)], stdout=log, stderr=subprocess.STDOUT)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    deadline = time.monotonic() + 240
    while True:
        assert server.poll() is None, (repo.parent / "tritonserver.log").read_text()[-3000:]
        try:
            if client.is_server_ready():
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "tritonserver did not become ready"
        time.sleep(1)
    yield Triton(llm, repo, http, grpc)
    server.terminate()
    server.wait(timeout=90)
    log.close()
    # `blip2-serve triton` takes tritonserver (and its Python backend stubs) down with it
    deadline = time.monotonic() + 30
    while _serving(http) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _serving(http), "tritonserver outlived `blip2-serve triton`"


def _serving(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _texts(result) -> list[str]:
    return [t.decode() for t in result.as_numpy("TEXT").reshape(-1)]


CASES = {"batch1-caption": ([0], None), "batch3-prompts": ([2, 3, 4], PROMPTS_3), "batch3-caption": ([5, 6, 7], None)}


@pytest.mark.parametrize("decoding", [{"num_beams": 1}, {"num_beams": 3}], ids=["greedy", "beam3"])
@pytest.mark.parametrize("case", CASES)
def test_same_text_as_transformers_and_ray_serve(triton, references, apps, case, decoding):
    indices, prompts = CASES[case]
    images = [image_bytes(i) for i in indices]
    settings = {"max_new_tokens": 12, **decoding}
    reference = references[triton.llm]
    expected = [reference.text(t) for t in reference.generate(images, prompts, **settings)]

    over_http = httpclient.InferenceServerClient(triton.http_url).infer(
        "blip2", bytes_inputs(httpclient, images, prompts), parameters=settings
    )
    over_grpc = grpcclient.InferenceServerClient(triton.grpc_url).infer(
        "blip2", bytes_inputs(grpcclient, images, prompts), parameters=settings
    )
    ray_serve = httpclient.InferenceServerClient(apps[triton.llm].url).infer(
        "blip2", bytes_inputs(httpclient, images, prompts), parameters=settings
    )
    assert _texts(over_http) == _texts(over_grpc) == _texts(ray_serve) == expected


def test_every_config_parses_and_names_the_contract(triton):
    names = {}
    for path in sorted(triton.repo.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        names[config.name] = ([i.name for i in config.input], [o.name for o in config.output])
        assert config.HasField("dynamic_batching") and config.max_batch_size == 8
    assert names == {
        "blip2": (["IMAGE", "PROMPT"], ["TEXT"]),
        "blip2_vision": (["pixel_values"], ["image_embeds"]),
        "blip2_llm": (["image_embeds", "PROMPT"], ["TEXT"]),
    }
    llm = text_format.Parse((triton.repo / "blip2_llm" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert llm.model_transaction_policy.decoupled


def test_dynamic_batching_inside_triton(triton):
    client = httpclient.InferenceServerClient(triton.http_url)

    def counts() -> dict[str, tuple[int, int]]:
        stats = client.get_inference_statistics()["model_stats"]
        return {m["name"]: (m["inference_count"], m["execution_count"]) for m in stats}

    before = counts()

    async def burst():
        aio = grpcaio.InferenceServerClient(triton.grpc_url)
        try:
            calls = [
                aio.infer(
                    "blip2", bytes_inputs(grpcaio, [image_bytes(300 + i)], ["a"]), parameters={"max_new_tokens": 8}
                )
                for i in range(12)
            ]
            return await asyncio.gather(*calls)
        finally:
            await aio.close()

    results = asyncio.run(burst())
    assert len(results) == 12
    # Triton counts a request when the model's execute returns; blip2_llm is decoupled and sends its last response
    # before that, so the client can hold every answer while the last batch is not yet in the statistics.
    deadline = time.monotonic() + 10
    while True:
        after = counts()
        settled = all(after[m][0] - before.get(m, (0, 0))[0] >= 12 for m in ("blip2_vision", "blip2_llm"))
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for model in ("blip2_vision", "blip2_llm"):
        inferences = after[model][0] - before.get(model, (0, 0))[0]
        executions = after[model][1] - before.get(model, (0, 0))[1]
        assert inferences == 12 and executions < inferences, (model, inferences, executions)


def test_streaming_from_blip2_llm(triton, references):
    """Image embeddings from blip2_vision, then blip2_llm streams the answer one response per piece."""
    reference = references[triton.llm]
    import io

    from PIL import Image

    pixel_values = reference.processor.image_processor(
        Image.open(io.BytesIO(image_bytes(40))).convert("RGB"), return_tensors="np"
    )["pixel_values"]
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    vision_input = grpcclient.InferInput("pixel_values", list(pixel_values.shape), "FP32")
    vision_input.set_data_from_numpy(pixel_values.astype(np.float32))
    embeds = client.infer("blip2_vision", [vision_input]).as_numpy("image_embeds")

    def llm_inputs():
        embeds_input = grpcclient.InferInput("image_embeds", list(embeds.shape), "FP32")
        embeds_input.set_data_from_numpy(embeds)
        prompt = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[PROMPTS_3[0].encode()]], dtype=np.object_))
        return [embeds_input, prompt]

    whole = _texts(
        client.infer(
            "blip2", bytes_inputs(grpcclient, [image_bytes(40)], [PROMPTS_3[0]]), parameters={"max_new_tokens": 24}
        )
    )[0]
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(
            "blip2_llm",
            llm_inputs(),
            parameters={"max_new_tokens": 24, "stream": True},
            enable_empty_final_response=True,
        )
        pieces = []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            output = result.as_numpy("TEXT")
            if output is not None and output.size:
                pieces.append(output.reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 3, pieces


def test_bad_input_gets_an_error_and_the_server_keeps_serving(triton):
    http = httpclient.InferenceServerClient(triton.http_url)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    cases = [
        (lambda c, m: c.infer("blip2", bytes_inputs(m, [b"not an image"], None)), "not an image file"),
        (
            lambda c, m: c.infer("blip2", bytes_inputs(m, [image_bytes(1)], None), parameters={"num_beams": 99}),
            "out of range",
        ),
        (lambda c, m: c.infer("blip2", bytes_inputs(m, [image_bytes(1)], ["look <image>"])), "image placeholder"),
    ]
    for call, words in cases:
        with pytest.raises(InferenceServerException) as over_http:
            call(http, httpclient)
        assert words in over_http.value.message() and over_http.value.status() == "400", over_http.value
        with pytest.raises(InferenceServerException) as over_grpc:
            call(grpc, grpcclient)
        assert words in over_grpc.value.message() and over_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert _texts(http.infer("blip2", bytes_inputs(httpclient, [image_bytes(1)], None)))

    async def mixed():  # a bad request among good ones: only it fails
        aio = grpcaio.InferenceServerClient(triton.grpc_url)
        try:
            calls = [aio.infer("blip2", bytes_inputs(grpcaio, [image_bytes(310 + i)], ["a"])) for i in range(4)]
            calls.insert(2, aio.infer("blip2", bytes_inputs(grpcaio, [image_bytes(320)], ["look <image>"])))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await aio.close()

    outcomes = asyncio.run(mixed())
    assert [isinstance(o, Exception) for o in outcomes] == [False, False, True, False, False]
