"""/metrics counts what was sent; the image-embedding cache skips the vision model and changes no output."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from blip2_serve.deployments.cache import EmbeddingCache
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.helpers import image_bytes

SETTLE_S = 0.5  # recorded before each answer; this covers what earlier tests' cancelled work still finishes
SERIES = re.compile(r'^(\w+)\{model="(\w+)"\} (\S+)$')


def scrape(app) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{app.http}/metrics", timeout=30).text
    return {(m[1], m[2]): float(m[3]) for line in text.splitlines() if (m := SERIES.match(line))}


def settled_scrape(app) -> dict[tuple[str, str], float]:
    """A scrape once earlier tests' work has ended (two scrapes SETTLE_S apart agree)."""
    previous = scrape(app)
    for _ in range(20):
        time.sleep(SETTLE_S)
        current = scrape(app)
        if current == previous:
            return current
        previous = current
    return previous


def deltas_when_settled(app, before: dict, expected: dict, timeout_s: float = 15.0) -> dict:
    """Scrape until the expected series reach their values, then once more (nothing else may have come)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape(app)
        delta = {key: now.get(key, 0.0) - before.get(key, 0.0) for key in set(now) | set(before)}
        if all(delta.get(k, 0.0) >= v for k, v in expected.items()) or time.monotonic() > deadline:
            time.sleep(SETTLE_S)
            now = scrape(app)
            return {key: now.get(key, 0.0) - before.get(key, 0.0) for key in set(now) | set(before)}
        time.sleep(0.2)


def _infer(app, images: list[bytes], prompt: str | None = None, **parameters):
    client = httpclient.InferenceServerClient(app.url)
    tensor = httpclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[i] for i in images], dtype=np.object_))
    inputs = [tensor]
    if prompt is not None:
        text = httpclient.InferInput("PROMPT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        inputs.append(text)
    return client.infer("blip2", inputs, parameters={"max_new_tokens": 5, **parameters})


@pytest.mark.serve
def test_metrics_count_known_traffic(apps):
    app = apps["opt"]
    before = settled_scrape(app)
    images = [image_bytes(700 + i) for i in range(4)]
    _infer(app, images[:1])
    _infer(app, images[1:3])  # two rows
    _infer(app, images[3:], "a photo of")
    for bad in ({"images": [b"not an image"]}, {"images": [image_bytes(704)], "top_p": 7.0}):
        with pytest.raises(InferenceServerException):
            _infer(app, bad.pop("images"), **bad)

    delta = deltas_when_settled(
        app,
        before,
        {
            ("nv_inference_request_success", "blip2"): 3,
            ("nv_inference_request_failure", "blip2"): 2,
            ("nv_inference_request_success", "blip2_llm"): 4,
        },
    )
    assert delta[("nv_inference_request_success", "blip2")] == 3
    assert delta[("nv_inference_request_failure", "blip2")] == 2
    assert delta[("nv_inference_count", "blip2")] == 4
    for stage in ("blip2_vision", "blip2_llm"):
        assert delta[("nv_inference_request_success", stage)] == 4, stage
        assert delta.get(("nv_inference_request_failure", stage), 0) == 0, stage
        assert delta[("nv_inference_compute_infer_duration_us", stage)] > 0
    assert 1 <= delta[("nv_inference_exec_count", "blip2_vision")] <= 4  # forward passes over batches of images
    # The LLM stage's executions are decode steps: 4 answers of 5 tokens, the first token of each from its prefill.
    assert 4 <= delta[("nv_inference_exec_count", "blip2_llm")] <= 16
    assert delta[("blip2_embedding_cache_misses", "blip2_vision")] == 4
    assert delta[("blip2_generated_tokens", "blip2_llm")] == 20  # 4 answers x max_new_tokens, none ended early here
    text = httpx.get(f"{app.http}/metrics").text
    assert "# TYPE nv_inference_request_success counter" in text
    steps = {"model": "blip2_llm", "le": "+Inf"}
    (batch_sizes,) = [f for f in text_string_to_metric_families(text) if f.name == "blip2_batch_size"]
    assert any(s.name == "blip2_batch_size_bucket" and s.labels == steps and s.value > 0 for s in batch_sizes.samples)


@pytest.mark.serve
def test_cache_hits_skip_the_vision_model_and_change_nothing(apps, references):
    app = apps["t5"]
    png = image_bytes(720)
    bmp = io.BytesIO()
    Image.open(io.BytesIO(png)).save(bmp, "BMP")  # the same pixels, another file
    reference = references["t5"]
    questions = ["Question: what is it? Answer:", "Question: what colour is it? Answer:", "a photo of"]
    expected = [reference.text(reference.generate([png], [q], max_new_tokens=5)[0]) for q in questions]

    before = settled_scrape(app)
    vision = app.deployment("Vision")
    executions = vision.stats.remote().result(timeout_s=30)["batches"]
    answers = [_infer(app, [png], questions[0]).as_numpy("TEXT")[0, 0].decode()]
    answers += [
        _infer(app, [data], q).as_numpy("TEXT")[0, 0].decode()
        for data, q in ((png, questions[1]), (bmp.getvalue(), questions[2]))
    ]
    assert answers == expected
    assert vision.stats.remote().result(timeout_s=30)["batches"] == executions + 1, (
        "only the first request ran the model"
    )
    delta = deltas_when_settled(app, before, {("blip2_embedding_cache_hits", "blip2_vision"): 2})
    assert delta[("blip2_embedding_cache_hits", "blip2_vision")] == 2
    assert delta[("blip2_embedding_cache_misses", "blip2_vision")] == 1


def test_embedding_cache_is_bounded_in_bytes_and_least_recently_used_goes_first():
    entry = torch.zeros(8, 64)  # 2048 bytes
    cache = EmbeddingCache(max_bytes=3 * 2048)
    for key in "abc":
        cache.put(key, entry)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert len(cache) == 3 and cache.bytes == 3 * 2048
    cache.put("huge", torch.zeros(64, 64))  # over the whole budget: not kept, nothing evicted
    assert len(cache) == 3 and (cache.hits, cache.misses) == (3, 1)


DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "grafana-dashboard.json"
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or"}


def promql_metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, labels,
    strings, ranges or Grafana variables."""
    text = re.sub(r'"[^"]*"', "", expression)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # label matchers, range durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # grouping labels
    return {n for n in re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text) if n not in PROMQL_KEYWORDS}


@pytest.mark.serve
def test_every_dashboard_panel_reads_series_the_server_exports(apps):
    """k8s/grafana-dashboard.json: each panel's expressions name only series found in a real scrape of /metrics
    (parsed by prometheus_client's own parser), and Triton's counters keep their names (no `_total`)."""
    text = httpx.get(f"{apps['opt'].http}/metrics", timeout=30).text
    types = {family.name: family.type for family in text_string_to_metric_families(text)}  # well-formed
    assert types["nv_inference_request_success"] == "counter" and types["blip2_batch_size"] == "histogram"
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert "nv_inference_request_success" in exported and "nv_inference_request_success_total" not in exported
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len(panels) >= 10
    for panel in panels:
        names = set().union(*(promql_metric_names(target["expr"]) for target in panel["targets"]))
        assert names, panel["title"]
        assert names <= exported, (panel["title"], names - exported)
