"""Fault injection, for tests and failure drills: a model error on demand, where a real one would happen.

With `BLIP2_SERVE_INJECT_FAULT=<marker>` in a stage's environment (a stage's `env` in the config), the LLM stage's
model raises `InjectedFault` for any batch that holds a prompt containing `<marker>`: inside a static `generate`
batch and inside the continuous engine's prefill. What follows is the server's real handling of a model error: the
batch is split, the culprit's request fails with a message, its neighbours are answered. Unset, nothing happens.
"""

from __future__ import annotations

import os
from typing import Iterable

ENV = "BLIP2_SERVE_INJECT_FAULT"


class InjectedFault(RuntimeError):
    """The error `check` raises: it stands for any failure of the model on one input."""


# `blip2-serve batch` with BLIP2_SERVE_BATCH_DIE_AFTER=<n> dies (os._exit, as a kill: no cleanup, no summary) right
# after writing its n-th batch, so that a resume can be tested at a known point (a real kill lands anywhere).
DIE_AFTER_ENV = "BLIP2_SERVE_BATCH_DIE_AFTER"


def die_after(batches_written: int) -> None:
    """End this process at once where BLIP2_SERVE_BATCH_DIE_AFTER asks for it after this many batches."""
    wanted = os.environ.get(DIE_AFTER_ENV)
    if wanted and batches_written >= int(wanted):
        os._exit(137)


def check(prompts: Iterable[str]) -> None:
    """Raise InjectedFault where a fault is asked for and one of `prompts` holds its marker."""
    marker = os.environ.get(ENV)
    if marker and any(marker in prompt for prompt in prompts):
        raise InjectedFault(f"injected fault: a prompt in this batch holds the marker {marker!r} ({ENV})")
