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
            "baseline,peer,one_process,served,multi_question",
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
        ("one_process", 16),  # the 16-client row's work in one process with no serving: the ceiling it is read against
        ("served", 1),
        ("served", 16),
        ("via_proxy", 1),  # the same server's lone requests through Ray's proxy: what direct ingress took off
        ("loop_in_turn", 1),  # the loop's calls taken in turn with the c=1 row: the serving overhead's reference
        ("multi_question", 1),
        ("multi_question", 1),
        ("baseline", 1),  # the loop and the peer again after the served rows: the ratios are against both runs
        ("peer", 1),
        ("peer", 16),
        ("one_process", 16),
        # the 16-client load in rounds taken in turn (ABBA AB), each with the other server stopped: 3 peer rounds,
        # then 3 served rounds, each judged against the loop's answers on its images
        *[("peer", 16)] * 3,
        *[("served", 16)] * 3,
    ]
    assert all(r["valid"] for r in document["results"]), document["results"]
    paired = [r for r in document["results"] if "paired round" in r["variant"]]
    assert len(paired) == 6 and all(r["answers_equal"] == "4/4" for r in paired), paired
    assert document["commit"] and document["versions"]["torch"] and "wide x" in document["checkpoint"]["llm"]
    summary = {
        "captioning_throughput_c16_over_baseline",
        "captioning_throughput_c16_over_peer",
        "c1_p50_over_baseline",
        "serving_overhead_c1_p50_ms",
        "serving_overhead_c1_p50_ms_via_proxy",
        "serving_overhead_c1_p50_ms_loop_alone",
        "five_questions_speedup",
        "baseline_drift",
        "peer_drift",
        "one_process_c16_over_baseline",
        "served_c16_over_one_process",
        "captioning_throughput_c16_over_peer_paired",
        "paired_round_ratios",
    }
    assert summary <= set(document["summary"])
    served = [r for r in document["results"] if r["scenario"] == "served"]
    assert all(r["vision_executions"] >= 1 and r["llm_steps"] >= 1 for r in served)  # the profile behind each row
    assert len(document["summary"]["paired_round_ratios"]) == 3
    assert (out / "tiny-opt.md").read_text().startswith("# bench: tiny opt")
    assert (out / "tiny-opt.png").stat().st_size > 10_000


def test_device_check_dry_run_measures_every_part_and_matches_transformers(tmp_path):
    """`python -m bench.device_check --dry-run`: the GPU script's own code at tiny shapes on CPU (fp32), so that a
    lent GPU's few minutes are not spent finding its bugs. fp32 on CPU: every answer equals transformers'."""
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--dry-run", "--out", str(out), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "device-check-dry-run.json").read_text())
    assert [part["llm"] for part in document["checks"]] == ["opt", "t5"]
    assert document["rates"]["copy_gb_s"] > 0 and document["rates"]["matmul_tflop_s"] > 0
    opt, t5 = document["checks"]
    assert t5["vision_compiled"] is None and t5["decode_compiled"] is None  # compiled with the first LLM only
    decode = opt["decode_compiled"]
    assert decode["running"] == 64 and decode["step_ms"] > 0 and decode["compile_s"] > 0, decode
    assert decode["answers_equal_to_eager"] == 8, decode
    compiled = opt["vision_compiled"]
    assert compiled["batch"] == 32 and compiled["compile_s"] > 0 and compiled["ms"] > 0, compiled
    assert 0 <= compiled["max_abs_diff"] < 1e-3, compiled
    assert "compile_vision" in (out / "device-check-dry-run.md").read_text()
    for part in document["checks"]:
        assert [row["batch"] for row in part["vision"]] == [1, 8, 32]
        assert all(row["images_per_s"] > 0 and 0 < row["of_floor"] for row in part["vision"])
        assert [row["running"] for row in part["decode"]] == [1, 8, 32, 64]
        assert part["decode_dynamic_cache"]["running"] == 64 and part["decode_dynamic_cache"]["step_ms"] > 0
        assert all(row["step_ms"] > 0 and row["prefill_ms"] > 0 for row in part["decode"]), part["decode"]
        parity = part["parity"]
        assert parity["equal"] == parity["images"] == 8, parity
        for quantization in ("int8", "int4"):  # bitsandbytes' CPU backend: served = transformers' same config
            q = part["quantized"][quantization]
            assert q["images"] == 8 and q["equal_to_transformers"] == 8 and q["llm_weight_bytes"] > 0, q
        assert len(set(parity["served"])) > 1  # the images give different answers: the comparison means something
        # the end-to-end rows (loop, batched generate, stages): fp32 on CPU gives the loop's answers everywhere
        e2e = part["end_to_end"]
        assert e2e["images"] == 16 and e2e["answers_equal_to_loop"] == {"batched_generate": 16, "stages": 16}, e2e
        assert e2e["five_questions"]["answers_equal"] == 5, e2e
        assert min(e2e["loop_s"], e2e["batched_generate_s"], e2e["stages_s"], *e2e["lone_p50_ms"].values()) > 0, e2e
        assert set(e2e["first_call_s"]) == {
            "batched_generate",
            "stages",
            "five_questions_loop",
            "five_questions_stages",
        }
        assert "_then" not in part  # the quantized rows' hand-over stays out of the JSON
    assert document["complete"] is True
    assert (out / "device-check-dry-run.md").read_text().startswith("# device check")
    assert "End to end in one process" in (out / "device-check-dry-run.md").read_text()


def test_the_peers_clock_starts_with_its_requests_not_with_making_its_clients():
    """bench.peer.peer_load's wall time (its throughput's denominator) is the requests' time: its 16 httpx clients
    are made before the clock starts. Made inside it (about 20 ms each on 2 cores, an httpx client's SSL context),
    they added about 0.3 s to every 16-client peer row, which the served side's tritonclient clients (well under a
    millisecond for 16) did not. A plain HTTP server on 127.0.0.1 records when the first request arrives and when
    the last answer leaves, and holds every answer until all 16 are in (they are concurrent)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bench.peer import peer_load

    arrived: list[float] = []
    answered: list[float] = []
    everyone = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            arrived.append(time.monotonic())
            if len(arrived) == 16:
                everyone.set()
            everyone.wait(10)
            body = json.dumps({"text": "a caption"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            answered.append(time.monotonic())

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # as uvicorn's 2048: at socketserver's 5, connections past it waited a second

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        jobs = [(bytes([i]) * 1000, "") for i in range(16)]
        latencies, wall, answers = peer_load(f"http://127.0.0.1:{server.server_address[1]}", jobs, 16, 20)
    finally:
        server.shutdown()
        server.server_close()
    assert answers == ["a caption"] * 16 and len(latencies) == 16
    served = max(answered) - min(arrived)  # the server's part of the timed load
    assert max(arrived) - min(arrived) < 0.1  # concurrent: all 16 sent before any answer
    assert wall < served + 0.1, f"wall {1000 * wall:.0f} ms for {1000 * served:.0f} ms at the server"
