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


def check(prompts: Iterable[str]) -> None:
    """Raise InjectedFault where a fault is asked for and one of `prompts` holds its marker."""
    marker = os.environ.get(ENV)
    if marker and any(marker in prompt for prompt in prompts):
        raise InjectedFault(f"injected fault: a prompt in this batch holds the marker {marker!r} ({ENV})")
