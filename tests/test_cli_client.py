"""`blip2-serve caption | ask | chat` against the served graph, as a person runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blip2_serve.clients import Blip2Client

from tests.helpers import image_bytes

pytestmark = pytest.mark.serve

BLIP2_SERVE = str(Path(sys.executable).parent / "blip2-serve")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_caption_directory_resumes_after_a_kill(apps, tmp_path):
    app = apps["opt"]
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for i in range(20):
        (folder / ("nested" if i % 4 == 0 else "") / f"img{i:02d}.png").write_bytes(image_bytes(200 + i))
    (folder / "notes.txt").write_text("not an image, not picked up")
    out = tmp_path / "captions.jsonl"
    command = [BLIP2_SERVE, "caption", str(folder), "--url", app.url, "--out", str(out), "--concurrency", "1"]
    command += ["--max-new-tokens", "60", "--no-progress"]

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not out.exists() or len(out.read_text().splitlines()) < 5:
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = len(_lines(out))
    assert 5 <= written < 20, f"killed after {written} of 20"
    with out.open("a") as handle:  # as if the kill had landed in the middle of a line
        handle.write('{"image": "half a li')

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    records = _lines(out)
    images = [r["image"] for r in records]
    assert len(images) == 20 and len(set(images)) == 20
    assert set(images) == {str(p) for p in folder.rglob("*.png")}
    with Blip2Client(app.url) as client:
        sample = records[-1]
        assert sample["caption"] == client.caption(Path(sample["image"]), max_new_tokens=60)


def test_ask_prints_each_answer(apps, tmp_path):
    app = apps["opt"]
    image = tmp_path / "cat.png"
    image.write_bytes(image_bytes(230))
    result = subprocess.run(
        [
            BLIP2_SERVE,
            "ask",
            str(image),
            "what is it?",
            "what colour is it?",
            "--url",
            app.url,
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    with Blip2Client(app.url) as client:
        answers = client.ask_many(image, ["what is it?", "what colour is it?"], max_new_tokens=6)
    assert result.stdout == f"Q: what is it?\nA: {answers[0]}\nQ: what colour is it?\nA: {answers[1]}\n"


def test_chat_streams_a_conversation(apps, tmp_path):
    app = apps["opt"]
    image = tmp_path / "cat.png"
    image.write_bytes(image_bytes(231))
    result = subprocess.run(
        [BLIP2_SERVE, "chat", str(image), "--url", app.url, "--max-new-tokens", "8"],
        input="what is it?\nwhat colour is it?\nquit\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    replies = [line.split("blip2> ", 1)[1] for line in result.stdout.splitlines() if "blip2> " in line]
    with Blip2Client(app.url) as client:
        first = client.chat(image, ["what is it?"], max_new_tokens=8)
        second = client.chat(image, ["what is it?", first, "what colour is it?"], max_new_tokens=8)
    assert replies == [first, second]


def test_errors_are_one_line_and_non_zero(apps, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(image_bytes(232))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cases = [
        ([BLIP2_SERVE, "caption", str(image), "--url", "127.0.0.1:9", "--no-progress"], "cannot reach the server"),
        ([BLIP2_SERVE, "ask", str(tmp_path / "missing.png"), "q"], "No such file"),
        ([BLIP2_SERVE, "caption", str(bad), "--url", apps["opt"].url, "--no-progress"], "1 of 1 images failed"),
    ]
    for command, words in cases:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
