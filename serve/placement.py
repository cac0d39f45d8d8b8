"""Whether an application's replicas fit the Ray cluster, checked before deploying.

Ray Serve waits for resources without end: a replica that asks for more than any node has stays pending, logs "taken
more than 30s to be scheduled" every 30 s, and the application never starts. `blip2-serve run` checks first: every
starting replica (num_replicas, or the autoscaling minimum) of every stage is placed, biggest first, on the live nodes'
resources (CPUs, GPUs, custom resources); a replica that finds no node is reported with its stage, what it asks for,
what the cluster has, and the setting to change. Where the cluster grows on demand (a KubeRay worker group, the Ray
autoscaler), `--wait-for-resources` skips the check and readiness stays false until every stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blip2_serve.serve.config import AppConfig

_SLACK = 1e-9  # fractional CPUs (0.5 + 0.5) must not fail by rounding


@dataclass(frozen=True)
class Demand:
    """What one stage's starting replicas ask for, each."""

    stage: str  # its section in the config: ingress, vision, llm, retrieval
    replicas: int
    cpus: float
    gpus: float
    resources: dict[str, float] = field(default_factory=dict)

    def per_replica(self) -> dict[str, float]:
        return {k: v for k, v in {"CPU": self.cpus, "GPU": self.gpus, **self.resources}.items() if v > 0}

    def describe(self) -> str:
        parts = {"CPU": f"{self.cpus:g} CPU", "GPU": f"{self.gpus:g} GPU"}
        return ", ".join(parts.get(k, f"{v:g} {k}") for k, v in self.per_replica().items()) or "nothing"


def demands(config: AppConfig) -> list[Demand]:
    """Per stage, the replicas that start and what each asks for, resolved as build_app resolves them."""
    from blip2_serve.serve.app import deployed_gpus

    demands = []
    for name, gpus in deployed_gpus(config).items():
        stage = getattr(config, name)  # the config section of that name
        cpus = stage.cpus_for(gpus, config.cpu_turns)
        demands.append(Demand(name, stage.initial_replicas, cpus, gpus, dict(stage.resources)))
    return demands


def _unplaced(replicas: list[Demand], nodes: list[dict[str, float]]) -> dict[str, int]:
    """Each replica in turn on the first node with room for it; the replicas per stage that found none."""
    free = [dict(node) for node in nodes]
    unplaced: dict[str, int] = {}
    for demand in replicas:
        need = demand.per_replica()
        node = next((n for n in free if all(n.get(k, 0.0) + _SLACK >= v for k, v in need.items())), None)
        if node is None:
            unplaced[demand.stage] = unplaced.get(demand.stage, 0) + 1
            continue
        for key, value in need.items():
            node[key] = node.get(key, 0.0) - value
    return unplaced


def shortfalls(wanted: list[Demand], nodes: list[dict[str, float]]) -> list[str]:
    """Whether every starting replica fits `nodes` (each node's total resources), placed biggest asks first; where
    not, one message per stage left without room when the stages are placed in their order (the graph's own stages
    first, so that the one named is the one that does not fit beside them)."""
    replicas = [demand for demand in wanted for _ in range(demand.replicas)]
    biggest_first = sorted(replicas, key=lambda d: (-d.gpus, -sum(d.resources.values()), -d.cpus))
    if not _unplaced(biggest_first, nodes):
        return []
    unplaced = _unplaced(replicas, nodes)
    if not unplaced:
        return []
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + value
    asked = "; ".join(f"{d.stage} {d.replicas} x ({d.describe()})" for d in wanted)
    have = f"{totals.get('CPU', 0):g} CPUs and {totals.get('GPU', 0):g} GPUs on {len(nodes)} node(s)"
    messages = []
    for demand in wanted:
        if demand.stage not in unplaced:
            continue
        missing = [k for k, v in demand.per_replica().items() if max((n.get(k, 0.0) for n in nodes), default=0) < v]
        hint = (
            f"no node has {', '.join(missing)} enough for one replica"
            if missing
            else "the other stages take what it needs"
        )
        messages.append(
            f"stage '{demand.stage}' cannot be placed: {unplaced[demand.stage]} of its {demand.replicas} replica(s) "
            f"asking {demand.describe()} each find no room ({hint}). The cluster has {have}; the stages ask: {asked}. "
            f"Lower {demand.stage}.num_cpus / {demand.stage}.num_gpus / its replicas, or give Ray more "
            f"(blip2-serve run --num-cpus N, a bigger cluster); on a cluster that adds nodes on demand, "
            f"--wait-for-resources."
        )
    return messages


def cluster_nodes() -> list[dict[str, float]]:
    """The live nodes' total resources, from the connected Ray."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check(config: AppConfig) -> list[str]:
    """Shortfalls of `config` on the connected Ray cluster (empty when every starting replica has room)."""
    return shortfalls(demands(config), cluster_nodes())
