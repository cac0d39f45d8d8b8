"""The bench harness runs end to end on the tiny checkpoint (a smoke run: figures come from bench/, not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_bench_smoke_run_writes_json_markdown_and_plot(tmp_path, checkpoints):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(checkpoints["opt"], cache / "tiny-opt")  # the session's checkpoint, not a second one
    out = tmp_path / "results"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--size",
            "tiny",
            "--images",
            "4",
            "--max-new-tokens",
            "6",
            "--scenarios",
            "baseline,peer,served,multi_question",
            "--out",
            str(out),
            "--cache",
            str(cache),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "tiny-opt.json").read_text())
    scenarios = [(r["scenario"], r["concurrency"]) for r in document["results"]]
    assert scenarios == [
        ("baseline", 1),
        ("peer", 1),
        ("peer", 16),
        ("served", 1),
        ("served", 16),
        ("multi_question", 1),
        ("multi_question", 1),
        ("baseline", 1),  # the loop and the peer again after the served rows: the ratios are against both runs
        ("peer", 1),
        ("peer", 16),
    ]
    assert all(r["valid"] for r in document["results"]), document["results"]
    assert document["commit"] and document["versions"]["torch"] and "wide x" in document["checkpoint"]["llm"]
    summary = {
        "captioning_throughput_c16_over_baseline",
        "captioning_throughput_c16_over_peer",
        "c1_p50_over_baseline",
        "serving_overhead_c1_p50_ms",
        "five_questions_speedup",
        "baseline_drift",
        "peer_drift",
    }
    assert summary <= set(document["summary"])
    served = [r for r in document["results"] if r["scenario"] == "served"]
    assert all(r["vision_executions"] >= 1 and r["llm_steps"] >= 1 for r in served)  # the profile behind each row
    assert (out / "tiny-opt.md").read_text().startswith("# bench: tiny opt")
    assert (out / "tiny-opt.png").stat().st_size > 10_000

