"""Sharing one node's CPU cores between the model stages on it: each forward pass takes all the cores, in turns.

On a CPU node the vision, LLM and retrieval stages are separate processes and every one of them is compute-bound.
Giving each a slice of the cores (Ray's num_cpus) leaves cores idle whenever one stage has no work, and a lone
request runs on half the machine; giving each all the cores oversubscribes them whenever two compute at once, and
OpenMP threads spinning against each other are slower still (both measured on 2 cores in bench/). So each stage
computes with every core of the node, and a node-local lock makes the stages take turns: a vision batch, then an
LLM decode step, then the next vision batch. The stage with work gets the whole machine; none waits on an idle one.

The lock is two `flock`ed files in the machine's temp directory, so every process on the machine shares it (Ray
nodes started on one machine share its cores too), and the kernel drops a lock whose process died. A stage waiting
for its turn holds the gate, so the one that just finished cannot take the cores again before it: with two stages
busy they alternate.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

DEFAULT_DIRECTORY = Path(tempfile.gettempdir()) / "blip2-serve-cores"

# The environment of a stage that takes turns, set when its process starts (OpenMP reads it once, when torch loads):
# between parallel regions torch's OpenMP threads sleep instead of spinning. By default they spin for a while after
# every region, so a stage that has just finished its turn, or an engine between two decode steps, keeps the other
# cores busy doing nothing while the stage whose turn it is, the ingress and Ray's own threads need them. Measured on
# 2 cores: the LLM replica burned 5.1 s of CPU to serve 100 tiny captions in 5.8 s; passive, a lone tiny caption's
# p50 went from 67 to 45 ms (bench/ has the figures for the realistic checkpoints).
TURN_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def node_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a Kubernetes CPU limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class CoreTurns:
    """A node-wide lock around model work. `with turns.turn(): forward()`; threads of one process queue too."""

    def __init__(self, directory: Path = DEFAULT_DIRECTORY):
        directory.mkdir(parents=True, exist_ok=True)
        self._gate = os.open(directory / "gate.lock", os.O_RDWR | os.O_CREAT, 0o666)
        self._cores = os.open(directory / "cores.lock", os.O_RDWR | os.O_CREAT, 0o666)
        self._local = threading.Lock()  # flock is per open file: threads of this process must queue here first
        self.turns = 0
        self.waited_s = 0.0  # time spent waiting for other stages to finish their turn

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold all of the node's cores for the duration of the block."""
        asked = time.perf_counter()
        with self._local:
            fcntl.flock(self._gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(self._cores, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
            self.turns += 1
            self.waited_s += time.perf_counter() - asked
            try:
                yield
            finally:
                fcntl.flock(self._cores, fcntl.LOCK_UN)

    def stats(self) -> dict:
        return {"turns": self.turns, "waited_s": round(self.waited_s, 3)}


def threads_here() -> None:
    """Give the calling thread this process's torch thread count. OpenMP keeps the count per thread, and Ray starts
    every worker with OMP_NUM_THREADS at its num_cpus (1 here): a new thread's first oneDNN call (a packed linear) runs
    on that many threads until some ATen parallel op has run in the thread and set the count (measured on 2 cores, a
    2560 -> 10240 packed linear at 16 rows: 12.2 ms on one thread, 6.1 ms after this call). The stages' model threads
    happen to run an ATen op first (the patch or token embedding), so this is a safeguard, not a measured speed-up:
    the count no longer depends on which op a model starts with."""
    import torch

    torch.set_num_threads(torch.get_num_threads())


@contextmanager
def load_threads(enabled: bool, torch_threads: int | None) -> Iterator[None]:
    """Load a model stage's model on the threads it will compute on (`torch_threads`, else where the stage takes
    turns every core of the node), then give the process back its count (`cpu_turns` sets the stage's own after
    loading, once it knows the device). Loading is where the count matters first: oneDNN packs the linear layers and
    creates their primitives on the calling thread's count, which in a Ray worker is its num_cpus (1) until the stage
    sets its own. Measured on 2 cores, a realistic Flan-T5 stage loaded in a Ray actor at 1 thread then computing on
    2: a lone caption's second OpenMP thread did 0.26-0.29 CPU-s of its 20 tokens; loaded on 2, 0.52-0.56; in one
    process 0.73-0.78."""
    import torch

    before = torch.get_num_threads()
    wanted = torch_threads or (node_cores() if enabled else None)
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def turn_of(turns: CoreTurns | None) -> AbstractContextManager:
    """`turns.turn()`, or nothing where the stage takes no turns (a GPU stage, or `cpu_turns: false`)."""
    return nullcontext() if turns is None else turns.turn()


class BusySignal:
    """Node-wide: whether some replica of one stage ("vision" of one application) has work on this node.

    A busy replica holds a shared `flock` on a file named after `name` (released by the kernel if it dies);
    `is_busy` asks for an exclusive one without waiting. The LLM stage reads its own application's vision signal
    to leave the cores to it while its decode batch has room (deployments/engine.py).
    """

    def __init__(self, name: str, directory: Path = DEFAULT_DIRECTORY):
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]  # any application name makes a file name
        self._fd = os.open(directory / f"busy-{digest}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        self._count = 0
        self._lock = threading.Lock()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark this replica busy for the duration of the block (nested and concurrent blocks count)."""
        with self._lock:
            if self._count == 0:
                fcntl.flock(self._fd, fcntl.LOCK_SH)
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if self._count == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def is_busy(self) -> bool:
        """Whether any replica of this kind on the node (another process) is busy now."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False


def vision_signal() -> BusySignal:
    """The busy signal of this Serve application's vision stage (called in its vision and LLM replicas)."""
    from ray import serve

    return BusySignal(f"vision:{serve.get_replica_context().app_name}")


def cpu_turns(device: str, enabled: bool, torch_threads: int | None) -> CoreTurns | None:
    """Set this process's torch threads for a model stage on `device`, and return its turns at the cores.

    On CPU with `enabled`: every core of the node (or `torch_threads`), in turns with the other stages. Otherwise
    `torch_threads` where given (else Ray's num_cpus, through OMP_NUM_THREADS) and no turns; on a GPU no turns.
    """
    import torch

    on_cpu = str(device).startswith("cpu")
    if on_cpu and enabled:
        torch.set_num_threads(torch_threads or node_cores())
        logger.info("computing on %d threads, in turns with the node's other stages", torch.get_num_threads())
        return CoreTurns()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return None
