"""AIPerf (NVIDIA's benchmark client, from its own virtual environment) against the served tiny graph's OpenAI
endpoint, with images: the recipe of bench/aiperf.md, run as written, and its export read by the bench harness."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.aiperf import command, environment, read_export

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[1]
# .ci/run makes this environment (pip install aiperf, about a minute); elsewhere BLIP2_AIPERF names the executable.
AIPERF = os.environ.get("BLIP2_AIPERF", str(ROOT / ".venv-aiperf" / "bin" / "aiperf"))


def test_aiperf_streams_image_questions_and_its_report_is_read(apps, checkpoints, tmp_path):
    install = "python3 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf"
    assert Path(AIPERF).exists(), f"no AIPerf at {AIPERF}: {install}"
    app = apps["opt"]
    before = app.deployment("LLM").stats.remote().result(timeout_s=60)["streams"]["finished"]
    out = tmp_path / "aiperf"
    cmd = command(AIPERF, app.http, checkpoints["opt"], out, requests=8, concurrency=2, output_tokens=6)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=environment())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = read_export(out)
    assert summary["requests"] == 8 and summary["errors"] == 0 and summary["complete"], summary
    metrics = summary["metrics"]
    assert 0 < metrics["time_to_first_token"]["avg"] <= metrics["request_latency"]["avg"], metrics
    assert metrics["request_throughput"]["avg"] > 0 and metrics["output_token_throughput"]["avg"] > 0, metrics
    after = app.deployment("LLM").stats.remote().result(timeout_s=60)["streams"]["finished"]
    assert after - before >= 8  # the server streamed every one of them to its end (warm-up requests on top)
