"""The playground page in a real browser: Debian's Chromium, headless, driven by Playwright against the served app.

Chromium comes from Debian's packages (`apt-get install chromium`; .ci/run installs it), Playwright from PyPI; no
browser is downloaded. The page is served with a strict Content-Security-Policy, so an inline script would show up
here as a console error.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import matplotlib
import pytest
from playwright.sync_api import expect

from tests.conftest import API_KEY
from tests.helpers import image_bytes

pytestmark = pytest.mark.serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A real photograph that ships with matplotlib (bench extra): Grace Hopper, JPEG, 512 x 600.
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
# Where the test also writes its screenshot for the README (docs/playground.png), when set.
SCREENSHOT_DIR = os.environ.get("BLIP2_PLAYGROUND_SCREENSHOT_DIR")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page whose console errors and uncaught exceptions are collected in `page.problems`."""
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(f"console: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.problems = problems
    yield page
    context.close()


def _chat(app, content: list[dict], headers: dict | None = None, **fields) -> httpx.Response:
    body = {"model": "blip2", "messages": [{"role": "user", "content": content}], "max_tokens": 30, **fields}
    return httpx.post(f"{app.http}/v1/chat/completions", json=body, headers=headers or {}, timeout=120)


def _image_part(data: bytes, kind: str) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{base64.b64encode(data).decode()}"}}


def test_upload_caption_stream_and_a_non_image(apps, page, tmp_path):
    """The page loads with no console error; an uploaded photo gets the caption the API gives; a question's answer
    appears piece by piece and equals the streamed API answer; a file that is not an image shows the server's own
    message; the last request's curl snippet and latency are shown; a screenshot is saved."""
    app = apps["opt"]
    photo = PHOTO.read_bytes()
    expected = _chat(app, [_image_part(photo, "image/jpeg")]).json()["choices"][0]["message"]["content"]

    response = page.goto(f"{app.http}/")
    assert response.status == 200 and "script-src 'self'" in response.headers["content-security-policy"]
    assert page.title() == "blip2-serve playground"
    page.set_input_files("#file", str(PHOTO))
    page.wait_for_selector("#preview:not([hidden])")
    page.click("#caption")
    page.wait_for_selector("#captions li.caption")
    assert page.inner_text("#captions li.caption") == expected
    assert "Caption:" in page.inner_text("#latency")
    # The snippets of the last request run as they are, beside a copy of the photo, and give the same caption.
    (tmp_path / PHOTO.name).write_bytes(photo)
    curl = subprocess.run(["bash", "-c", page.inner_text("#curl-snippet")], cwd=tmp_path, capture_output=True)
    assert json.loads(curl.stdout)["choices"][0]["message"]["content"] == expected, curl
    snippet = page.inner_text("#python-snippet")
    python = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True)
    assert python.stdout.decode().strip() == expected, python

    # Every text the answer shows on its way is recorded: streamed, it grows in several steps. The tiny model writes
    # its whole answer in a few milliseconds, so a loaded machine can hand the browser every event in one read (seen
    # once in a clean-clone run): the browser's downloads are throttled (DevTools' network emulation, 1.5 KB/s) so
    # that the body reaches the page in pieces whatever the server's timing. A page that waited for the whole body
    # would still render once.
    devtools = page.context.new_cdp_session(page)
    devtools.send("Network.enable")
    devtools.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": 1500, "uploadThroughput": -1},
    )
    page.evaluate(
        """() => {
            window.__answers = [];
            new MutationObserver(() => {
                const answers = document.querySelectorAll('#turns .answer');
                if (answers.length) window.__answers.push(answers[answers.length - 1].textContent);
            }).observe(document.getElementById('turns'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    question = "what is the person wearing?"
    page.fill("#question", question)
    page.press("#question", "Enter")
    expect(page.locator("#latency")).to_have_text(re.compile("^Answer:"), timeout=60_000)
    answer = page.inner_text("#turns .answer")
    seen = [text for text in page.evaluate("window.__answers") if text]
    devtools.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    streamed = _chat(app, [_image_part(photo, "image/jpeg"), {"type": "text", "text": question}], stream=True)
    events = [json.loads(line[len("data: ") :]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert answer and answer == "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert len(set(seen)) >= 2 and all(answer.startswith(text) for text in seen), seen  # it grew piece by piece
    assert page.inner_text("#turns .question") == question
    assert page.problems == []  # loading, captioning and streaming logged no error

    screenshot = page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR, "playground.png").write_bytes(screenshot)

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are notes, not a picture\n" * 20)
    message = _chat(app, [_image_part(not_an_image.read_bytes(), "image/png")]).json()["error"]["message"]
    page.set_input_files("#file", str(not_an_image))
    expect(page.locator("#drop-help")).to_have_text(re.compile("^notes.png"))
    page.click("#caption")
    page.wait_for_selector("#error:not([hidden])")
    assert "HTTP 400" in page.inner_text("#error") and message in page.inner_text("#error")
    assert page.problems == [_failed(400, "Bad Request")], page.problems  # the browser's own line for a 400


def _failed(status: int, reason: str) -> str:
    return f"console: Failed to load resource: the server responded with a status of {status} ({reason})"


def test_keyboard_and_the_api_key(secured_app, page):
    """Behind an API key the page asks for it: without it the caption request shows the 401, with it the caption
    comes. The image is chosen from the keyboard (Tab to the drop zone, Enter opens the file chooser)."""
    app = secured_app
    page.goto(f"{app.http}/playground")
    page.wait_for_selector("#key-section:not([hidden])")
    # From the keyboard: Tab reaches the drop zone, Enter opens the file input's chooser (its click; the chooser
    # dialog itself is the browser's), and the chosen file is taken.
    page.evaluate("() => { window.__chooser = 0; document.getElementById('file').onclick = () => window.__chooser++; }")
    page.focus("#api-key")
    page.keyboard.press("Shift+Tab")  # the file input, then the drop zone before it
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "drop"
    page.keyboard.press("Enter")
    assert page.evaluate("window.__chooser") == 1
    page.set_input_files("#file", files=[{"name": "block.png", "mimeType": "image/png", "buffer": image_bytes(93)}])
    page.wait_for_selector("#preview:not([hidden])")
    page.click("#caption")
    page.wait_for_selector("#error:not([hidden])")
    assert "HTTP 401" in page.inner_text("#error")
    page.fill("#api-key", API_KEY)
    page.fill("#max-tokens", "8")  # this app's limit is 16
    page.click("#caption")
    headers = {"authorization": f"Bearer {API_KEY}"}
    expected = _chat(app, [_image_part(image_bytes(93), "image/png")], headers=headers, max_tokens=8)
    expect(page.locator("#captions li.caption")).to_have_text(expected.json()["choices"][0]["message"]["content"])
    assert "authorization: Bearer $BLIP2_SERVE_API_KEY" in page.inner_text("#curl-snippet")
    assert page.problems and set(page.problems) == {_failed(401, "Unauthorized")}, page.problems


def test_the_page_and_its_files_are_public_and_strict(secured_app):
    """The page and its two files are served without the key (they hold no secret) with the strict policy; the
    API behind them still wants the key; the page has no inline script or style."""
    base = secured_app.http
    page = httpx.get(f"{base}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'content="{secured_app.route_prefix}"' in page.text  # the app's mount point, for the page's calls
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text) and "style=" not in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{base}/playground/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "default-src 'none'" in asset.headers["content-security-policy"]
    assert httpx.get(f"{base}/playground/secret.txt", timeout=30).status_code in (401, 404)
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
