"""Bench results as JSON, a markdown table and a PNG plot, and the targets they are judged by."""

from __future__ import annotations

import json
import time
from pathlib import Path

TARGETS = {  # summary key -> (comparison, bound, sizes it applies to, what it means)
    "captioning_throughput_c16_over_peer": (
        ">=",
        1.0,
        ("realistic",),
        "captioning throughput, 16 clients / the LitServe peer's (the peer's mean before and after)",
    ),
    "captioning_throughput_c16_over_peer_paired": (
        ">=",
        1.0,
        ("realistic",),
        "captioning throughput, 16 clients / the LitServe peer's (paired rounds, the other server stopped)",
    ),
    "c1_p50_over_baseline": (
        "<=",
        1.05,
        ("realistic",),
        "one request alone: served p50 / the loop's p50",
    ),
    "captioning_throughput_c16_over_baseline": (
        ">=",
        3.0,
        ("medium",),
        "captioning throughput, 16 clients / baseline loop (decode-heavy)",
    ),
    "five_questions_speedup": (
        ">=",
        2.5,
        ("realistic", "medium"),
        "5 questions about one image: 5 baseline calls / one ask_many",
    ),
    "serving_overhead_c1_p50_ms": (
        "<=",
        15.0,
        ("tiny",),
        "served p50 at concurrency 1 minus the loop's p50 in the same rounds, ms",
    ),
    "mixed_continuous_over_static": (">=", 1.3, ("medium",), "mixed 4/64-token answers: continuous / static tokens/s"),
}
PROFILE_KEYS = (
    "tokens_per_s",
    "ttft_p50_ms",
    "inter_token_p50_ms",
    "vision_executions",
    "vision_mean_batch",
    "vision_busy_s",
    "vision_waited_s",
    "llm_busy_s",
    "llm_steps",
    "llm_mean_running",
    "llm_waited_s",
)


def targets(summary: dict, size: str) -> list[dict]:
    rows = []
    for key, (comparison, bound, sizes, meaning) in TARGETS.items():
        if key not in summary:
            continue
        value = summary[key]
        met = value >= bound if comparison == ">=" else value <= bound
        rows.append(
            {
                "target": meaning,
                "measured": value,
                "bound": f"{comparison} {bound}",
                "applies": size in sizes,
                "met": met,
            }
        )
    return rows


def flops_sentence(flops: dict) -> str:
    """The checkpoint's vision : Q-Former : LLM split of one caption against the published model's."""
    parts = flops["parts"]
    return (
        f"FLOPs per caption (bench/flops.py), GFLOP vision / Q-Former / LLM: {flops['gflop']['vision']} / "
        f"{flops['gflop']['qformer']} / {flops['gflop']['llm']} (published shapes: {flops['reference_gflop']['vision']}"
        f" / {flops['reference_gflop']['qformer']} / {flops['reference_gflop']['llm']}); vision / LLM "
        f"{parts['vision']['per_llm']} vs {parts['vision']['reference_per_llm']} ({parts['vision']['off']:+.0%}), "
        f"Q-Former / LLM {parts['qformer']['per_llm']} vs {parts['qformer']['reference_per_llm']} "
        f"({parts['qformer']['off']:+.0%}); within 25%: {'yes' if flops['within_tolerance'] else 'NO'}."
    )


def markdown(document: dict) -> str:
    lines = [
        f"# bench: {document['size']} {document['llm']} ({document['measured_at']}, commit {document['commit'][:10]})",
        "",
        f"Machine: {document['machine']}. Checkpoint: {document['checkpoint']}. "
        f"{document['images']} images, max_new_tokens {document['max_new_tokens']}, greedy.",
        "",
        "| scenario | variant | concurrency | requests | req/s | p50 ms | p95 ms | answers = baseline | valid | more |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["results"]:
        if r["scenario"] == "vision":
            continue
        more = ", ".join(f"{k} {v}" for k, v in r.items() if k in PROFILE_KEYS)
        valid = "yes" if r["valid"] else "**INVALID**"
        lines.append(
            f"| {r['scenario']} | {r['variant']} | {r['concurrency']} | {r['requests']} | {r['throughput_rps']} | "
            f"{r['p50_ms']} | {r['p95_ms']} | {r['answers_equal']} | {valid} | {more} |"
        )
    vision = [r for r in document["results"] if r["scenario"] == "vision"]
    if vision:
        lines += ["", "| vision backend | batch | images/s | max abs diff vs torch |", "|---|---|---|---|"]
        lines += [
            f"| {r['variant']} | {r['batch']} | {r['images_per_s']} | {r['max_abs_diff_vs_torch']} |" for r in vision
        ]
    flops = document.get("flops_per_caption")
    if flops:
        lines += ["", flops_sentence(flops)]
    profile = document["summary"].get("overhead_profile")
    if profile:
        lines += [
            "",
            "Serving overhead, where it goes (p50, model idle): " + ", ".join(f"{k} {v}" for k, v in profile.items()),
        ]
    summary = document["summary"]
    if "baseline_drift" in summary:
        peer = f", the peer's {summary['peer_drift']}" if summary.get("peer_drift") is not None else ""
        lines += [
            "",
            "The loop and the peer ran before and after the served rows (each alone on the machine); every ratio is "
            f"against the mean of both runs. Time after / before: the loop's p50 {summary['baseline_drift']}{peer}. "
            "Every 16-client row (peer, served, one_process) follows an untimed batch of 16 other images on the same "
            "server or process: steady state, not a first batch of 16.",
        ]
        if "serving_overhead_c1_p50_ms_loop_alone" in summary:  # where the c=1 row ran in turn with the loop
            lines += [
                "",
                "The serving overhead is the lone served requests' p50 minus the loop's p50 over the same rounds "
                "(loop_in_turn: one loop call on the same image, in a process of its own, after each served "
                "request, the server idle meanwhile; every call 0.2 s after the one before ended). Against the "
                "loop alone before and after instead: "
                f"{summary['serving_overhead_c1_p50_ms_loop_alone']} ms.",
            ]
    if "paired_round_ratios" in summary:
        lines += [
            "",
            "Paired rounds: with both servers up, 16-client rounds in the order peer, served, served, peer, peer, "
            "served (a steady drift falls on both alike), each round with every process of the other server stopped "
            "(SIGSTOP: an idle Ray takes about 5% of two cores), both servers on the same fresh images in each pair. "
            "Served throughput over all its rounds / the peer's over all its rounds: "
            f"{summary['captioning_throughput_c16_over_peer_paired']}; each pair's (peer seconds / served seconds): "
            f"{', '.join(str(r) for r in summary['paired_round_ratios'])}.",
        ]
    if "one_process_c16_over_baseline" in summary:
        lines += [
            "",
            "one_process is the 16-client row's work with no serving at all: this project's stage code in one process "
            "of its own, every image in one vision batch and every sequence in one decode batch from the first step "
            "(the most a server built on these kernels could do here; it ran before and after the served rows). It "
            f"took {summary['one_process_c16_over_baseline']}x the loop's throughput; the served 16-client row "
            f"reached {summary['served_c16_over_one_process']} of it.",
        ]
    if document["targets"]:
        lines += ["", "| target | measured | bound | applies to this size | met |", "|---|---|---|---|---|"]
        for t in document["targets"]:
            applies, met = "yes" if t["applies"] else "no", "yes" if t["met"] else "NO"
            lines.append(f"| {t['target']} | {t['measured']} | {t['bound']} | {applies} | {met} |")
    return "\n".join(lines) + "\n"


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = [r for r in document["results"] if r["scenario"] != "vision" and r["throughput_rps"]]
    vision = [r for r in document["results"] if r["scenario"] == "vision"]
    figure, axes = plt.subplots(1, 2 if vision else 1, figsize=(14 if vision else 9, 5), squeeze=False)
    labels = [f"{r['scenario']}\n{r['variant']}\nc={r['concurrency']}" for r in load]
    colours = [
        "tab:gray" if r["scenario"] == "baseline" else ("tab:red" if not r["valid"] else "tab:blue") for r in load
    ]
    axes[0][0].bar(range(len(load)), [r["throughput_rps"] for r in load], color=colours)
    axes[0][0].set_xticks(range(len(load)), labels, fontsize=6, rotation=90)
    axes[0][0].set_ylabel("requests/s")
    axes[0][0].set_title(f"{document['size']} {document['llm']}: throughput (red: answers differ from baseline)")
    if vision:
        for name in sorted({r["variant"] for r in vision}):
            mine = [r for r in vision if r["variant"] == name]
            axes[0][1].plot([r["batch"] for r in mine], [r["images_per_s"] for r in mine], marker="o", label=name)
        axes[0][1].set_xlabel("batch")
        axes[0][1].set_ylabel("images/s")
        axes[0][1].set_title("vision stage alone")
        axes[0][1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(document: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(document))
    plot(document, stem.with_suffix(".png"))


def write_table(out: str, name: str, title: str, document: dict, lines: list[str]) -> None:
    """A side benchmark's result: `<out>/<name>.json` (the document) and `.md` (a dated title with the commit, then
    `lines`), the markdown printed."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = [f"# bench: {title} ({stamp}, commit {document['commit']})", "", *lines]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    (Path(out) / f"{name}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
