"""OpenAI's Batch API on the server (serve/openai_batch.py, serve/batch_jobs.py), driven with the openai package
unchanged: upload, create, poll, download; per-line errors; cancel; a Batches replica killed half way."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.helpers import image_bytes
from tests.test_openai import client_for, user

pytestmark = pytest.mark.serve

FINISHED = ("completed", "failed", "cancelled", "expired")


@pytest.fixture
def batch_app(retrieval_app):
    """The OPT graph with the retrieval stage and the Batch API on (tests/conftest.py)."""
    return retrieval_app


def _chat_line(custom_id: str, seed: int, question: str | None, max_tokens: int = 6) -> dict:
    body = {"model": "blip2", "messages": [user(question, image_bytes(seed))], "max_tokens": max_tokens}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _upload(client: openai.OpenAI, lines: list, tmp_path) -> str:
    path = tmp_path / "input.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    with path.open("rb") as stream:
        return client.files.create(file=stream, purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, until=lambda b: b.status in FINISHED, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_batch_of_chat_lines_answers_as_one_by_one_and_keeps_bad_lines_as_errors(batch_app, tmp_path):
    client = client_for(batch_app)
    lines = [_chat_line(f"req-{i}", i, None if i % 2 else "what is in the picture?") for i in range(20)]
    lines.insert(7, '{"custom_id": "broken", "method": "POST", "url": ')  # cut JSON: an error line
    bad_model = _chat_line("wrong-model", 3, None)
    bad_model["body"]["model"] = "gpt-4o"  # the request's own 404, in the error file
    lines.append(bad_model)
    input_id = _upload(client, lines, tmp_path)
    assert client.files.retrieve(input_id).purpose == "batch"

    created = client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert created.status in ("validating", "in_progress") and created.input_file_id == input_id
    batch = _wait(client, created.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (22, 20, 2)
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at

    outputs = _lines(client, batch.output_file_id)
    assert [o["custom_id"] for o in outputs] == [f"req-{i}" for i in range(20)]  # input order
    for output in outputs:
        line = next(x for x in lines if isinstance(x, dict) and x["custom_id"] == output["custom_id"])
        alone = client.chat.completions.create(**line["body"])
        assert output["response"]["status_code"] == 200 and output["error"] is None
        assert output["response"]["body"]["choices"][0]["message"]["content"] == alone.choices[0].message.content

    errors = {e["custom_id"]: e for e in _lines(client, batch.error_file_id)}
    assert set(errors) == {None, "wrong-model"}
    assert errors[None]["error"]["code"] == "invalid_json" and "line 8" in errors[None]["error"]["message"]
    assert errors["wrong-model"]["response"]["status_code"] == 404
    assert "gpt-4o" in errors["wrong-model"]["response"]["body"]["error"]["message"]

    with pytest.raises(openai.BadRequestError, match="status 'completed'"):
        client.batches.cancel(batch.id)
    assert batch.id in [b.id for b in client.batches.list(limit=100)]


def test_cancel_stops_a_batch_and_keeps_what_finished(batch_app, tmp_path):
    client = client_for(batch_app)
    lines = [_chat_line(f"c-{i}", 2100 + i, "describe it", max_tokens=24) for i in range(16)]
    created = client.batches.create(
        input_file_id=_upload(client, lines, tmp_path), endpoint="/v1/chat/completions", completion_window="24h"
    )
    _wait(client, created.id, until=lambda b: b.request_counts.completed >= 1)
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = _wait(client, created.id, timeout_s=60)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = batch.request_counts.completed
    assert 1 <= done < 16 and batch.request_counts.total == 16
    assert len(_lines(client, batch.output_file_id)) == done
    assert client.batches.cancel(created.id).status == "cancelled"  # again: as it is
    with pytest.raises(openai.NotFoundError, match="No such Batch"):
        client.batches.cancel("batch_" + "0" * 32)


def test_a_killed_batches_replica_resumes_and_runs_each_line_once(batch_app, tmp_path):
    """The replica that runs batches dies half way (as in a crash or a node lost); Serve starts another, which takes
    the batch up from what was kept: every line answered exactly once."""
    import ray

    client = client_for(batch_app)
    lines = [_chat_line(f"k-{i}", 200 + i, None, max_tokens=16) for i in range(24)]
    created = client.batches.create(
        input_file_id=_upload(client, lines, tmp_path), endpoint="/v1/chat/completions", completion_window="24h"
    )
    before = _wait(client, created.id, until=lambda b: b.request_counts.completed >= 4)
    assert before.status == "in_progress" and before.request_counts.completed < 20, before
    time.sleep(0.6)  # one flush: what finished is kept
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "retrieval#Batches" in a["name"]]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    def retrieved(batch_id):
        try:
            return client.batches.retrieve(batch_id)
        except (openai.APIStatusError, openai.APIConnectionError):
            return None  # the replica is being replaced

    deadline = time.monotonic() + 180
    while (batch := retrieved(created.id)) is None or batch.status not in FINISHED:
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    assert batch.status == "completed" and batch.request_counts.completed == 24, batch
    outputs = _lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"k-{i}" for i in range(24))


def test_embedding_lines_answer_as_one_by_one(batch_app, tmp_path):
    client = client_for(batch_app)
    texts = ["a cat on a mat", ["two dogs", "a red car"], "an empty street at night"]
    lines = [
        {
            "custom_id": f"e-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "blip2_embed_text", "input": t},
        }
        for i, t in enumerate(texts)
    ]
    created = client.batches.create(
        input_file_id=_upload(client, lines, tmp_path), endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = _wait(client, created.id, timeout_s=60)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    for output, text in zip(_lines(client, batch.output_file_id), texts):
        alone = client.embeddings.create(model="blip2_embed_text", input=text)
        got = [row["embedding"] for row in output["response"]["body"]["data"]]
        assert len(got) == len(alone.data)
        for vector, expected in zip(got, alone.data):
            assert max(abs(a - b) for a, b in zip(vector, expected.embedding)) < 1e-5


@pytest.mark.parametrize(
    "case, status, text",
    [
        ({"input_file_id": "file-missing", "endpoint": "/v1/chat/completions"}, 404, "No such File"),
        ({"endpoint": "/v1/completions"}, 400, "endpoint"),
        ({"completion_window": "1h"}, 400, "24h"),
        ({"metadata": {"k": 1}}, 400, "metadata"),
        ({"surprise": True}, 400, "unknown field"),
    ],
)
def test_bad_create_requests_are_4xx_in_openai_shape(batch_app, tmp_path, case, status, text):
    client = client_for(batch_app)
    body = {"input_file_id": "", "endpoint": "/v1/chat/completions", "completion_window": "24h", **case}
    if not body["input_file_id"]:
        body["input_file_id"] = _upload(client, [_chat_line("x", 1, None)], tmp_path)
    answer = httpx.post(f"{batch_app.http}/v1/batches", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert text in answer.json()["error"]["message"]


def test_a_file_that_cannot_be_a_batch_fails_it_with_the_reason(batch_app, tmp_path):
    client = client_for(batch_app)
    twice = [_chat_line("same", 1, None), _chat_line("same", 2, None)]
    created = client.batches.create(
        input_file_id=_upload(client, twice, tmp_path), endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = _wait(client, created.id, timeout_s=60)
    assert batch.status == "failed" and batch.failed_at
    assert "custom_id 'same'" in batch.errors.data[0].message
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")


def test_input_lines_that_are_not_requests_become_error_lines_and_bad_files_are_refused():
    from blip2_serve.deployments.errors import InvalidInput
    from blip2_serve.serve.batch_jobs import parse_lines

    good = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    lines = [
        json.dumps(good),
        "",  # blank lines are skipped
        "[1, 2]",
        json.dumps({**good, "custom_id": ""}),
        json.dumps({**good, "custom_id": "b", "method": "GET"}),
        json.dumps({**good, "custom_id": "c", "url": "/v1/chat/completions"}),
        json.dumps({**good, "custom_id": "d", "body": "x"}),
        "[" * 100 + "]" * 100,  # deeper than the bounded parser takes
    ]
    requests, errors = parse_lines("\n".join(lines).encode(), "/v1/embeddings", 100)
    assert requests == [(0, "a", {"input": "x"})]
    assert [(e["line"], e["output"]["custom_id"], e["output"]["error"]["code"]) for e in errors] == [
        (2, None, "invalid_request"),
        (3, None, "invalid_request"),
        (4, "b", "invalid_request"),
        (5, "c", "invalid_request"),
        (6, "d", "invalid_request"),
        (7, None, "invalid_json"),
    ]
    for data, why in [
        (b"\n\n", "no requests"),
        (b"\xff\xfe", "UTF-8"),
        ((json.dumps(good) + "\n") * 2, "also on line 1"),
        ("\n".join(json.dumps({**good, "custom_id": str(i)}) for i in range(101)), "at most 100"),
    ]:
        with pytest.raises(InvalidInput, match=why):
            parse_lines(data if isinstance(data, bytes) else data.encode(), "/v1/embeddings", 100)


def test_each_server_keeps_its_batches_apart():
    """Every Batches replica takes up the unfinished batches it finds: two servers on one machine (the default
    batch_dir) must not find each other's; the same server started again must find its own."""
    from blip2_serve.serve.config import AppConfig

    def location(**server):
        return AppConfig.model_validate({"model": {"checkpoint": "x"}, "server": server}).batch_location()

    home = "~/.cache/blip2-serve/batches"
    assert location(batch_dir=home) == location(batch_dir=home) == f"{home}/blip2-8000"
    assert location(batch_dir=home, http_port=8010) != location(batch_dir=home)
    assert location(batch_dir="s3://b/p/") == "s3://b/p/blip2-8000"
    assert location() is None  # off by default
