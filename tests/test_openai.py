"""The official `openai` package (sync, async, streaming) and curl against /v1/chat/completions."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.helpers import image_bytes, truncated_png

pytestmark = pytest.mark.serve


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def user(text: str | None, image: bytes | None = None) -> dict:
    parts = ([image_part(image)] if image is not None else []) + ([{"type": "text", "text": text}] if text else [])
    return {"role": "user", "content": parts}


def client_for(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.http}/v1", api_key="unused", max_retries=0)


def test_models_list(app):
    assert [m.id for m in client_for(app).models.list().data] == ["blip2"]


def test_caption_and_question_match_transformers(app, references):
    client, reference, image = client_for(app), references[app.llm], image_bytes(70)
    caption = client.chat.completions.create(model="blip2", messages=[user(None, image)], max_tokens=10)
    expected = reference.generate([image], None, max_new_tokens=10)[0]
    assert caption.choices[0].message.content == reference.text(expected)
    assert caption.usage.completion_tokens == len(expected)

    question = "what is in the picture?"
    answer = client.chat.completions.create(
        model="blip2", messages=[user(question, image)], max_completion_tokens=8, temperature=0
    )
    prompt = f"Question: {question} Answer:"
    expected = reference.generate([image], [prompt], max_new_tokens=8)[0]
    assert answer.choices[0].message.content == reference.text(expected)
    prompt_ids = reference.processor.tokenizer(prompt)["input_ids"]
    assert answer.usage.prompt_tokens == reference.model.config.num_query_tokens + len(prompt_ids)
    assert answer.usage.completion_tokens == len(
        expected
    ) and answer.usage.total_tokens == answer.usage.prompt_tokens + len(expected)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.object == "chat.completion"


def test_multi_turn_uses_the_blip2_dialogue_prompt(app, references):
    image, reference = image_bytes(71), references[app.llm]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        user("what is it?", image),
        {"role": "assistant", "content": "a block"},
        user("what colour is it?"),
    ]
    reply = client_for(app).chat.completions.create(model="blip2", messages=messages, max_tokens=8)
    prompt = "Answer briefly. Question: what is it? Answer: a block. Question: what colour is it? Answer:"
    assert reply.choices[0].message.content == reference.text(
        reference.generate([image], [prompt], max_new_tokens=8)[0]
    )


def test_greedy_text_is_the_same_over_every_protocol(app, references):
    image, reference = image_bytes(72), references[app.llm]
    question = "what is this?"
    prompt = f"Question: {question} Answer:"
    expected = reference.text(reference.generate([image], [prompt], max_new_tokens=12)[0])

    chat = client_for(app).chat.completions.create(model="blip2", messages=[user(question, image)], max_tokens=12)
    tensors = {}
    for module in (httpclient, grpcclient):
        image_input = module.InferInput("IMAGE", [1, 1], "BYTES")
        image_input.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        prompt_input = module.InferInput("PROMPT", [1, 1], "BYTES")
        prompt_input.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        tensors[module] = [image_input, prompt_input]
    over_http = httpclient.InferenceServerClient(app.url).infer(
        "blip2", tensors[httpclient], parameters={"max_new_tokens": 12}
    )
    over_grpc = grpcclient.InferenceServerClient(app.grpc_url).infer(
        "blip2", tensors[grpcclient], parameters={"max_new_tokens": 12}, headers=app.grpc_headers
    )
    texts = {
        chat.choices[0].message.content,
        over_http.as_numpy("TEXT")[0, 0].decode(),
        over_grpc.as_numpy("TEXT")[0, 0].decode(),
    }
    assert texts == {expected}


def test_streaming_is_real_and_joins_to_the_answer(apps):
    app = apps["opt"]
    client, image = client_for(app), image_bytes(73)
    messages = [user("describe the picture", image)]
    full = client.chat.completions.create(model="blip2", messages=messages, max_tokens=32)
    assert full.usage.completion_tokens == 32, "the tiny model should not stop early here"

    list(client.chat.completions.create(model="blip2", messages=messages, max_tokens=4, stream=True))  # warm path
    started = time.perf_counter()
    arrivals, pieces, usage, finish = [], [], None, None
    stream = client.chat.completions.create(
        model="blip2", messages=messages, max_tokens=32, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        arrivals.append(time.perf_counter() - started)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == 32 and usage.prompt_tokens == full.usage.prompt_tokens
    content_chunks = sum(1 for p in pieces if p)
    assert content_chunks >= 10, pieces
    # A finished answer cut into pieces arrives within a millisecond; real chunks spread over the generation.
    # Measured here (2 cores): first text chunk ~55 ms, last ~120 ms after the request.
    first, last = arrivals[1], arrivals[-1]  # arrivals[0] is the role chunk
    assert first < 0.7 * last and last - first > 0.02, f"first text chunk at {first:.3f}s, last at {last:.3f}s"


def test_async_client_plain_and_stream(app):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{app.http}/v1", api_key="unused", max_retries=0)
        messages = [user("what is it?", image_bytes(74))]
        full = await client.chat.completions.create(model="blip2", messages=messages, max_tokens=10)
        pieces = []
        async for chunk in await client.chat.completions.create(
            model="blip2", messages=messages, max_tokens=10, stream=True
        ):
            pieces += [c.delta.content or "" for c in chunk.choices]
        await client.close()
        return full.choices[0].message.content, "".join(pieces)

    full, streamed = asyncio.run(main())
    assert full == streamed and full


def test_stop_and_seeded_sampling(apps):
    app = apps["opt"]
    client, messages = client_for(app), [user("what is it?", image_bytes(75))]
    full = client.chat.completions.create(model="blip2", messages=messages, max_tokens=20).choices[0].message.content
    words = full.split()
    assert len(words) >= 2, full
    stop = words[1]
    cut = client.chat.completions.create(model="blip2", messages=messages, max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)].strip() and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="blip2", messages=messages, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.delta.content or "" for chunk in streamed for c in chunk.choices) == cut.choices[0].message.content
    sampled = [
        client.chat.completions.create(model="blip2", messages=messages, max_tokens=12, temperature=0.9, seed=11)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_logprobs_equal_transformers_transition_scores(app, references):
    """`logprobs` + `top_logprobs` over the openai package: each token's log-probability is the one transformers'
    compute_transition_scores gives greedy generate's tokens (raw logits, normalized), the alternatives come most
    likely first with the chosen token at their head, and `score` is the mean (what ranks captions)."""
    client, reference, image = client_for(app), references[app.llm], image_bytes(72)
    reply = client.chat.completions.create(
        model="blip2", messages=[user(None, image)], max_tokens=8, logprobs=True, top_logprobs=3
    )
    tokens, expected = reference.logprobs([image], None, max_new_tokens=8)[0]
    choice = reply.choices[0]
    assert choice.message.content == reference.text(tokens)
    content = choice.logprobs.content
    assert len(content) == len(tokens) == len(expected)
    tokenizer = reference.processor.tokenizer
    for entry, token, logprob in zip(content, tokens, expected):
        assert entry.token == tokenizer.decode([token]) and bytes(entry.bytes) == entry.token.encode()
        assert abs(entry.logprob - logprob) < 1e-4, (entry, logprob)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert abs(choice.model_extra["score"] - sum(expected) / len(expected)) < 1e-4
    plain = client.chat.completions.create(model="blip2", messages=[user(None, image)], max_tokens=8)
    assert plain.choices[0].logprobs is None and "score" not in plain.choices[0].model_extra


def test_n_choices_are_seeded_scored_and_share_one_batch(app):
    """`n=3` with a seed: three choices, the same three again for the same seed, choice i the answer of the request
    seeded seed + i alone; each choice has its score; greedy `n` repeats its one answer. Unconstrained requests run
    in the same batch meanwhile and keep their answers."""
    client, messages = client_for(app), [user("what is it?", image_bytes(74))]

    def sampled(**fields):
        return client.chat.completions.create(
            model="blip2", messages=messages, max_tokens=10, temperature=1.0, **fields
        )

    def texts(reply) -> list[str]:
        return [c.message.content for c in reply.choices]

    plain_messages = [[user(None, image_bytes(90 + i))] for i in range(3)]
    plain_alone = [
        client.chat.completions.create(model="blip2", messages=m, max_tokens=12).choices[0].message.content
        for m in plain_messages
    ]
    with ThreadPoolExecutor(4) as pool:  # the choices decode beside plain greedy requests
        crowd = [
            pool.submit(client.chat.completions.create, model="blip2", messages=m, max_tokens=12)
            for m in plain_messages
        ]
        first = sampled(n=3, seed=7)
        assert [f.result().choices[0].message.content for f in crowd] == plain_alone
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts(first))) > 1
    assert texts(sampled(n=3, seed=7)) == texts(first)
    assert [texts(sampled(seed=7 + i))[0] for i in range(3)] == texts(first)
    scores = [c.model_extra["score"] for c in first.choices]
    assert all(s < 0 for s in scores)
    scored = sampled(n=3, seed=7, logprobs=True)  # asking for the tokens' log-probabilities changes no sample
    assert texts(scored) == texts(first)
    assert [c.model_extra["score"] for c in scored.choices] == pytest.approx(scores, abs=1e-4)  # other batches
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in scored.choices)
    greedy = client.chat.completions.create(model="blip2", messages=messages, max_tokens=10, n=2)
    assert len(set(texts(greedy))) == 1 and len(greedy.choices) == 2
    single = client.chat.completions.create(model="blip2", messages=messages, max_tokens=10)
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens


SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"enum": ["cat", "dog", "bird"]},
        "indoors": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["animal", "indoors", "name"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_json_schema_output_always_validates_beside_free_requests(apps, llm):
    """response_format json_schema: every answer parses and validates against the schema, for images decoded in one
    batch with unconstrained requests, which keep the answers they have alone; streamed too; json_object gives an
    object. T5's vocabulary writes no braces (nor, in the tiny one, quotes or commas): the guide writes them, the
    model reads <unk>. A schema the server cannot compile, or whose text no token can write, is a 400."""
    import jsonschema

    app = apps[llm]
    client = client_for(app)
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    free = [[user(None, image_bytes(110 + i))] for i in range(3)]
    free_alone = [
        client.chat.completions.create(model="blip2", messages=m, max_tokens=12).choices[0].message.content
        for m in free
    ]
    with ThreadPoolExecutor(8) as pool:
        guided = [
            pool.submit(
                client.chat.completions.create,
                model="blip2",
                messages=[user("describe the pet", image_bytes(120 + i))],
                max_tokens=80,
                response_format=response_format,
                **({"temperature": 1.0, "seed": i} if i % 2 else {}),
            )
            for i in range(6)
        ]
        beside = [pool.submit(client.chat.completions.create, model="blip2", messages=m, max_tokens=12) for m in free]
        answers = [f.result().choices[0] for f in guided]
        assert [f.result().choices[0].message.content for f in beside] == free_alone
    for answer in answers:
        assert answer.finish_reason == "stop", answer
        jsonschema.validate(json.loads(answer.message.content), SCHEMA)

    def guided(**extra):
        return client.chat.completions.create(
            model="blip2",
            messages=[user(None, image_bytes(126))],
            max_tokens=80,
            response_format=response_format,
            **extra,
        )

    stream = guided(stream=True)
    jsonschema.validate(json.loads("".join(c.delta.content or "" for chunk in stream for c in chunk.choices)), SCHEMA)
    scored = guided(logprobs=True).choices[0]
    assert "".join(entry.token for entry in scored.logprobs.content) == scored.message.content
    # any object: a random model may not close it within max_tokens (then finish_reason is length), but it opens one
    anything = client.chat.completions.create(
        model="blip2", messages=[user(None, image_bytes(127))], max_tokens=40, response_format={"type": "json_object"}
    ).choices[0]
    assert anything.message.content.startswith('{"'), anything
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.message.content), dict), anything

    if llm == "t5":  # OPT's byte-level vocabulary writes any text
        with pytest.raises(openai.BadRequestError, match="cannot write that format"):
            client.chat.completions.create(
                model="blip2",
                messages=[user(None, image_bytes(128))],
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\u2603"]}}},
            )
    with pytest.raises(openai.BadRequestError, match="cannot guide decoding by that JSON schema"):
        client.chat.completions.create(
            model="blip2",
            messages=[user(None, image_bytes(128))],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )


def test_response_format_needs_the_continuous_scheduler(tight_app):
    with pytest.raises(openai.BadRequestError, match="continuous scheduler"):
        client_for(tight_app).chat.completions.create(
            model="blip2", messages=[user(None, image_bytes(129))], response_format={"type": "json_object"}
        )


def test_logprobs_on_the_static_scheduler(tight_app, references):
    """The whole-batch scheduler (generate with output_logits) gives the same log-probabilities."""
    client, reference, image = client_for(tight_app), references["opt"], image_bytes(73)
    reply = client.chat.completions.create(model="blip2", messages=[user(None, image)], max_tokens=6, logprobs=True)
    tokens, expected = reference.logprobs([image], None, max_new_tokens=6)[0]
    got = [entry.logprob for entry in reply.choices[0].logprobs.content]
    assert len(got) == len(tokens) and all(abs(a - b) < 1e-4 for a, b in zip(got, expected))
    assert all(entry.top_logprobs == [] for entry in reply.choices[0].logprobs.content)


def test_disconnect_stops_generation(apps):
    """A client that goes away mid-stream: the LLM stage cancels its generation and has no stream left."""
    app = apps["t5"]  # relative positions: a long answer is possible
    llm = app.deployment("LLM")
    before = llm.stats.remote().result(timeout_s=30)["streams"]
    body = {"model": "blip2", "messages": [user("describe it", image_bytes(76))], "max_tokens": 1000, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{app.http}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few chunks, then hang up
    assert any('"content"' in line for line in received)
    deadline = time.monotonic() + 30
    while True:
        streams = llm.stats.remote().result(timeout_s=30)["streams"]
        if streams["cancelled"] > before["cancelled"] and streams["active"] == 0:
            break
        assert time.monotonic() < deadline, streams
        time.sleep(0.2)
    assert streams["finished"] == before["finished"], "the abandoned stream did not run to its end"


BAD = {
    "unknown model": ({"model": "gpt-4o"}, 404, "does not exist"),
    "no image": ({"messages": [{"role": "user", "content": "hello"}]}, 400, "exactly one image"),
    "two images": (
        {"messages": [{"role": "user", "content": [image_part(image_bytes(1)), image_part(image_bytes(2))]}]},
        400,
        "exactly one image",
    ),
    "remote url": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}
            ]
        },
        400,
        "fetches no remote images",
    ),
    "bad base64": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}
            ]
        },
        400,
        "base64",
    ),
    "truncated image": ({"messages": [user(None, truncated_png())]}, 400, "truncated"),
    "last message not user": (
        {"messages": [user("hi", image_bytes(1)), {"role": "assistant", "content": "x"}]},
        400,
        "last message",
    ),
    "n=17": ({"n": 17}, 400, "'n' must be between 1 and 16"),
    "response_format xml": ({"response_format": {"type": "xml"}}, 400, "json_object or json_schema"),
    "json_schema without a schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "must be a JSON schema object",
    ),
    "n=0": ({"n": 0}, 400, "'n' must be between 1 and 16"),
    "top_logprobs alone": ({"top_logprobs": 2}, 400, "'top_logprobs' needs 'logprobs': true"),
    "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, 400, "between 0 and 20"),
    "n with stream": ({"n": 2, "stream": True}, 400, "not supported with stream"),
    "logprobs with stream": ({"logprobs": True, "stream": True}, 400, "not supported with stream"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "'tools' is not supported"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "out of range"),
    "bad role": ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    "messages missing": ({"messages": None}, 400, "messages"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_are_4xx_in_openai_shape(apps, case):
    app = apps["opt"]
    fields, status, words = BAD[case]
    body = {"model": "blip2", "messages": [user("hi", image_bytes(1))], **fields}
    response = httpx.post(f"{app.http}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as info:  # the openai package raises its typed error
        client_for(app).chat.completions.create(**body)
    assert info.value.status_code == status and words in info.value.message


def test_allow_listed_remote_image(tight_app, image_server):
    client = client_for(tight_app)
    part = {"type": "image_url", "image_url": {"url": f"{image_server}/cat.png"}}
    reply = client.chat.completions.create(model="blip2", messages=[{"role": "user", "content": [part]}], max_tokens=5)
    inline = client.chat.completions.create(model="blip2", messages=[user(None, image_bytes(77))], max_tokens=5)
    assert reply.choices[0].message.content == inline.choices[0].message.content
    part["image_url"]["url"] = f"{image_server}/missing.png"
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        client.chat.completions.create(model="blip2", messages=[{"role": "user", "content": [part]}], max_tokens=5)


def test_curl_streams_server_sent_events(apps):
    app = apps["opt"]
    body = json.dumps({"model": "blip2", "messages": [user("hi", image_bytes(78))], "max_tokens": 6, "stream": True})
    result = subprocess.run(
        ["curl", "-sN", f"{app.http}/v1/chat/completions", "-H", "content-type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    events = [line[len("data: ") :] for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"
