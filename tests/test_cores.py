"""Turns at the node's cores (deployments/cores.py): separate processes never compute at once, busy ones alternate,
and a stage on CPU computes with every core."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from blip2_serve.deployments.cores import BusySignal, CoreTurns, cpu_turns, node_cores


def _worker(directory: str, name: str, turns: int, hold_s: float, log: str, ready) -> None:
    """Take `turns` turns of `hold_s` each, writing `name asked start end` per turn. Both workers start together
    (spawning one and importing torch can take seconds on a loaded machine: the other would have finished alone)."""
    lock = CoreTurns(Path(directory))
    ready.wait(60)
    with open(log, "a") as out:
        for _ in range(turns):
            asked = time.monotonic()
            with lock.turn():
                start = time.monotonic()
                time.sleep(hold_s)
                out.write(f"{name} {asked} {start} {time.monotonic()}\n")
                out.flush()


def test_processes_take_turns_without_overlap_and_alternate(tmp_path):
    log, hold_s = tmp_path / "turns.log", 0.05
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(2)
    workers = [
        context.Process(target=_worker, args=(str(tmp_path), name, 6, hold_s, str(log), ready))
        for name in ("vision", "llm")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    turns = sorted(
        (float(start), float(end), float(asked), name)
        for name, asked, start, end in (line.split() for line in log.open())
    )
    assert len(turns) == 12
    for (_, end, _, _), (start, _, _, _) in zip(turns, turns[1:]):
        assert start >= end, "two processes held the cores at once"
    # The gate hands over: a turn ends, and whoever was already waiting for it goes next, never the holder again.
    # "Already waiting" = asked well before the turn ended (a margin for a process descheduled between its clock
    # read and its lock call on a loaded machine); a process that had not asked yet may lose the turn fairly.
    handed_over = 0
    for index, (_, end, _, name) in enumerate(turns[:-1]):
        waiting = [t for t in turns[index + 1 :] if t[3] != name and t[2] < end - hold_s / 2]
        if waiting:
            handed_over += 1
            assert turns[index + 1][3] != name, f"{name} took the cores again while the other waited: {turns}"
    assert handed_over >= 6, f"the two processes hardly ever waited for each other: {turns}"


def test_threads_of_one_process_queue_too(tmp_path):
    import threading

    lock, inside, overlaps = CoreTurns(tmp_path), [], []

    def work():
        for _ in range(5):
            with lock.turn():
                inside.append(1)
                overlaps.append(len(inside))
                time.sleep(0.005)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(overlaps) == 1 and lock.stats()["turns"] == 15


def test_node_cores_follows_a_cgroup_quota(tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert node_cores(quota) == node_cores(tmp_path / "absent")
    quota.write_text("50000 100000\n")  # half a core: still one thread
    assert node_cores(quota) == 1


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_cpu_stage_takes_every_core_in_turns(restore_threads):
    torch.set_num_threads(1)
    assert isinstance(cpu_turns("cpu", True, None), CoreTurns)
    assert torch.get_num_threads() == node_cores()
    assert cpu_turns("cpu", False, 1) is None and torch.get_num_threads() == 1
    assert cpu_turns("cuda:0", True, None) is None  # a GPU stage computes on its GPU, no turns


def _hold_busy(directory: str, seconds: float, started) -> None:
    signal = BusySignal("vision", Path(directory))
    with signal.busy():
        started.set()
        time.sleep(seconds)


def test_busy_signal_is_seen_from_another_process_and_ends_with_it(tmp_path):
    reader = BusySignal("vision", tmp_path)
    assert not reader.is_busy()
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    holder = context.Process(target=_hold_busy, args=(str(tmp_path), 0.5, started))
    holder.start()
    assert started.wait(30)
    assert reader.is_busy()
    holder.join(30)
    assert not reader.is_busy()


def test_stages_that_take_turns_run_with_passive_openmp():
    """OMP_WAIT_POLICY reaches the model stages' processes through their runtime_env (Serve file included), only
    where they take turns, and never the ingress's."""
    from blip2_serve.serve.config import AppConfig
    from blip2_serve.serve.deploy_config import serve_config

    config = AppConfig.model_validate({"model": {"checkpoint": "x", "device": "cpu"}})
    assert config.model_stage_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    deployments = {d["name"]: d for d in serve_config(config)["applications"][0]["deployments"]}
    for name in ("Vision", "LLM"):
        assert deployments[name]["ray_actor_options"]["runtime_env"] == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    assert "runtime_env" not in deployments["Ingress"]["ray_actor_options"]
    free = AppConfig.model_validate({"model": {"checkpoint": "x", "device": "cpu"}, "cpu_turns": False})
    assert free.model_stage_env() is None
    written = serve_config(free)["applications"][0]["deployments"]
    assert all("runtime_env" not in d["ray_actor_options"] for d in written)


def test_served_model_stages_have_passive_openmp(apps):
    app = apps["t5"]
    for stage in ("Vision", "LLM"):
        pid = app.deployment(stage).stats.remote().result(timeout_s=60)["pid"]
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_WAIT_POLICY=PASSIVE" in environment, stage


def test_a_small_language_model_decodes_on_one_thread(checkpoints):
    """The LLM stage computes a language model whose every linear layer is under PACK_MIN_WEIGHTS (the tiny test
    checkpoints) on one thread unless torch_threads says otherwise; a model with one layer of PACK_MIN_WEIGHTS
    weights is not small. (The stage's class is built in this process, without Ray: cpu_turns off needs no replica
    context; the process's thread count is restored after.)"""
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.llm import LLMDeployment
    from blip2_serve.deployments.loading import PACK_MIN_WEIGHTS, PackedLinear, small_model
    from torch import nn

    assert not small_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(PACK_MIN_WEIGHTS // 1024, 1024)))
    assert small_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(PACK_MIN_WEIGHTS // 1024 - 1, 1024)))
    assert not small_model(nn.Sequential(PackedLinear(nn.Linear(1024, 1024))))
    stage = LLMDeployment
    saved = torch.get_num_threads()
    try:
        for llm in ("opt", "t5"):
            model = ModelConfig(checkpoint=str(checkpoints[llm]), device="cpu")
            torch.set_num_threads(2)
            default = stage(model, cpu_turns=False)
            assert small_model(default._generator.model.language_model) and default._threads == 1, llm
            assert stage(model, cpu_turns=False, torch_threads=2)._threads == 2, llm
    finally:
        torch.set_num_threads(saved)
