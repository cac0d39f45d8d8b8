"""Turns at the node's cores (deployments/cores.py): separate processes never compute at once, busy ones alternate,
and a stage on CPU computes with every core."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from blip2_serve.deployments.cores import BusySignal, CoreTurns, cpu_turns, load_threads, node_cores


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


def test_a_stage_loads_its_model_on_the_threads_it_computes_on(checkpoints, monkeypatch, restore_threads):
    """oneDNN packs the linear layers and `tune_plain_rows` times its GEMMs at load, on the loading thread's count: a
    stage loads on the count it will compute on (a Ray worker starts at its num_cpus, 1), and the process gets its
    own count back for `cpu_turns` to set. (The stages' classes are built here without Ray: cpu_turns off needs no
    replica context.)"""
    from blip2_serve.deployments import llm, vision
    from blip2_serve.deployments.config import ModelConfig

    seen = {}
    for module, name in ((llm, "LanguageGenerator"), (vision, "VisionEncoder")):

        def spy(*args, _real=getattr(module, name), _name=name, **kwargs):
            seen[_name] = torch.get_num_threads()  # the count the real class loads and packs on
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    model = ModelConfig(checkpoint=str(checkpoints["t5"]), device="cpu")
    torch.set_num_threads(1)
    llm.LLMDeployment(model, cpu_turns=False, torch_threads=2)
    vision.VisionDeployment(model, cpu_turns=False, torch_threads=2)
    assert seen == {"LanguageGenerator": 2, "VisionEncoder": 2}
    torch.set_num_threads(1)
    with load_threads(True, None):  # a stage that takes turns: every core of the node
        assert torch.get_num_threads() == node_cores()
    assert torch.get_num_threads() == 1


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


def _replica_envs(document: dict) -> dict[str, dict]:
    deployments = document["applications"][0]["deployments"]
    return {d["name"]: d["ray_actor_options"].get("runtime_env", {}).get("env_vars") for d in deployments}


def _built_envs(application) -> dict[str, dict]:
    """Each deployment of a built application (build_app) and its runtime_env's variables."""
    from ray.serve import Application

    envs, pending = {}, [application]
    while pending:
        deployment = pending.pop()._bound_deployment
        envs[deployment.name] = deployment.ray_actor_options.get("runtime_env", {}).get("env_vars")
        arguments = list(deployment.init_args) + list(deployment.init_kwargs.values())
        pending.extend(a for a in arguments if isinstance(a, Application))
    return envs


def test_every_replica_takes_the_request_path_setting_and_stages_that_take_turns_passive_openmp(monkeypatch):
    """Every replica's runtime_env (built application and Serve file alike, so a cluster and KubeRay get them) carries
    REQUEST_PATH_ENVIRONMENT; the model stages' also OMP_WAIT_POLICY where they take turns, never the ingress's; a
    stage's own `env` wins."""
    from blip2_serve.serve.app import build_app
    from blip2_serve.serve.config import REQUEST_PATH_ENVIRONMENT, AppConfig
    from blip2_serve.serve.deploy_config import serve_config

    assert REQUEST_PATH_ENVIRONMENT == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    turns = {**REQUEST_PATH_ENVIRONMENT, "OMP_WAIT_POLICY": "PASSIVE"}
    config = AppConfig.model_validate({"model": {"checkpoint": "x", "device": "cpu"}})
    for envs in (_replica_envs(serve_config(config)), _built_envs(build_app(config))):
        assert envs["Vision"] == envs["LLM"] == turns
        assert envs["Ingress"] == REQUEST_PATH_ENVIRONMENT
    free = AppConfig.model_validate({"model": {"checkpoint": "x", "device": "cpu"}, "cpu_turns": False})
    for envs in (_replica_envs(serve_config(free)), _built_envs(build_app(free))):
        assert envs["Vision"] == envs["LLM"] == envs["Ingress"] == REQUEST_PATH_ENVIRONMENT
    mine = {"env": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}}
    own = AppConfig.model_validate({"model": {"checkpoint": "x", "device": "cpu"}, "vision": mine})
    for envs in (_replica_envs(serve_config(own)), _built_envs(build_app(own))):
        assert envs["Vision"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
        assert envs["LLM"] == turns
    # where the builder's environment already holds it (`blip2-serve run`'s embedded Ray, whose workers inherit it),
    # the built application leaves it out: a replica with no runtime_env starts in a worker Ray keeps ready
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    built = _built_envs(build_app(config))
    assert built["Ingress"] is None and built["Vision"] == built["LLM"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert _replica_envs(serve_config(config))["Ingress"] == REQUEST_PATH_ENVIRONMENT  # a file is read elsewhere


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def test_served_replicas_have_the_request_path_setting_and_passive_openmp(apps):
    """In the replicas' processes (the suite's Ray itself runs without the request path's setting: it reaches them
    through their runtime_env only)."""
    import subprocess

    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in os.environ
    app = apps["t5"]
    for stage in ("Vision", "LLM"):
        environment = _environ(app.deployment(stage).stats.remote().result(timeout_s=60)["pid"])
        assert b"OMP_WAIT_POLICY=PASSIVE" in environment, stage
        assert b"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0" in environment, stage
    found = subprocess.run(["pgrep", "-f", f"ServeReplica:{app.name}:Ingress"], capture_output=True, text=True)
    (ingress,) = found.stdout.split()
    environment = _environ(int(ingress))
    assert b"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0" in environment
    assert not any(line.startswith(b"OMP_WAIT_POLICY=") for line in environment)


def test_a_small_model_computes_on_one_thread(checkpoints):
    """The LLM and vision stages compute a model whose every linear layer is under PACK_MIN_WEIGHTS (the tiny test
    checkpoints) on one thread unless torch_threads says otherwise; a model with one layer of PACK_MIN_WEIGHTS
    weights is not small. (The stages' classes are built in this process, without Ray: cpu_turns off needs no
    replica context; the process's thread count is restored after.)"""
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.llm import LLMDeployment
    from blip2_serve.deployments.loading import PACK_MIN_WEIGHTS, PackedLinear, small_model
    from blip2_serve.deployments.vision import VisionDeployment
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
        model = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu")
        torch.set_num_threads(2)
        vision = VisionDeployment(model, cpu_turns=False)
        assert small_model(vision._encoder.backend.model) and vision._threads == 1
        assert VisionDeployment(model, cpu_turns=False, torch_threads=2)._threads == 2
    finally:
        torch.set_num_threads(saved)
