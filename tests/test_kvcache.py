"""The slab KV cache (deployments/kvcache.py) holds what transformers' DynamicLayer and the engine's concatenating
join and select hold, step by step, whatever the order of joins, steps and retirements and through every growth."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from blip2_serve.deployments.engine import _join_layers, _select_layers
from blip2_serve.deployments.kvcache import SPARE_COLUMNS, SlabLayer
from transformers.cache_utils import DynamicLayer


class Reference:
    """The concatenating path, as the engine runs it with transformers' cache: DynamicLayer.update, and the engine's
    own padded join and indexed select (engine._join_layers, engine._select_layers)."""

    def __init__(self, keys, values):
        self.cache = self._holding(keys, values)

    @staticmethod
    def _holding(keys, values) -> SimpleNamespace:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.update(keys, values)
        return SimpleNamespace(layers=[layer])  # what the engine's helpers read of a cache

    @property
    def keys(self):
        return self.cache.layers[0].keys

    @property
    def values(self):
        return self.cache.layers[0].values

    def update(self, keys, values):
        self.cache.layers[0].update(keys, values)

    def join(self, keys, values, left):
        _join_layers(self.cache, self._holding(keys, values), left)

    def select(self, rows, first_column):
        _select_layers(self.cache, rows, first_column)


def _states(rows: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 3, length, 4, generator=generator), torch.randn(rows, 3, length, 4, generator=generator)


@pytest.mark.parametrize("left", [True, False], ids=["self-attention", "cross-attention"])
def test_slab_holds_what_concatenation_holds(left):
    generator = torch.Generator().manual_seed(1)
    first = _states(2, 5, generator)
    slab, reference = SlabLayer(*first, max_rows=3), Reference(*first)
    allocations = []

    def check(what: str) -> None:
        assert slab.get_seq_length() == reference.keys.shape[2], what
        assert torch.equal(slab.keys, reference.keys) and torch.equal(slab.values, reference.values), what
        assert slab.get_mask_sizes(1) == (reference.keys.shape[2] + 1, 0)
        allocations.append(slab._keys)

    check("prefill")
    # joins longer (the running rows gain padding), shorter and longer again; the first outgrows 3 rows
    for step, (kind, argument) in enumerate(
        [("join", 7), ("update", 1), ("join", 2), ("update", 1), ("select", ([0, 2, 3, 5], 0)), ("join", 9)]
        + [("update", 1)] * (SPARE_COLUMNS + 5)  # past the spare columns: a reallocation
        + [("select", ([1, 2, 4], 2)), ("update", 1), ("join longer by", 1), ("update", 1)]
        + [("select", ([0], 0)), ("join", 3), ("update", 1)]
    ):
        if kind.startswith("join"):  # "join longer by": into the columns a select freed, where stale values lie
            length = argument if kind == "join" else slab.get_seq_length() + argument
            states = _states(2, length, generator)
            slab.join(*states, left=left)
            reference.join(*states, left=left)
        elif kind == "update":
            states = _states(slab.rows, argument, generator)
            returned = slab.update(*states)
            reference.update(*states)
            assert torch.equal(returned[0], reference.keys) and torch.equal(returned[1], reference.values)
        else:
            rows, first_column = argument
            slab.select(rows, first_column)
            reference.select(torch.tensor(rows), first_column)
        check(f"{step}: {kind} {argument}")
    # the buffers grew a few times (rows past 3, columns past the spare ones), not at every step or join
    grown = sum(before is not after for before, after in zip(allocations, allocations[1:]))
    assert 2 <= grown <= 5, grown


def test_a_step_writes_in_place():
    """A decode step does not reallocate: the buffers stay, only `end` moves (DynamicLayer copies the whole layer)."""
    generator = torch.Generator().manual_seed(2)
    slab = SlabLayer(*_states(4, 6, generator), max_rows=4)
    buffer = slab._keys
    for _ in range(SPARE_COLUMNS):
        slab.update(*_states(4, 1, generator))
    assert slab._keys is buffer and slab.get_seq_length() == 6 + SPARE_COLUMNS


def test_rows_double_as_requests_join_up_to_the_engine_batch():
    """A lone request holds room for 4 rows, not the engine's 16; joining one at a time up to 16 reallocates twice
    (4 -> 8 -> 16), not at every join."""
    generator = torch.Generator().manual_seed(3)
    slab = SlabLayer(*_states(1, 6, generator), max_rows=16)
    buffers = [slab._keys]
    for _ in range(15):
        slab.join(*_states(1, 6, generator))
        if slab._keys is not buffers[-1]:
            buffers.append(slab._keys)
    assert slab.rows == 16 and [buffer.shape[0] for buffer in buffers] == [4, 8, 16]


def test_a_longer_prompt_joins_without_moving_the_running_rows():
    """A request whose prefix is 20 columns longer than the running rows' (a question beside captions) is written
    beside them: the buffers stay (the running rows gain zeros on their left; kvcache.SPARE_LEFT columns are kept
    free there), and the layer holds what concatenation holds."""
    generator = torch.Generator().manual_seed(4)
    first = _states(2, 5, generator)
    slab, reference = SlabLayer(*first, max_rows=16), Reference(*first)
    buffer = slab._keys
    joining = _states(1, 5 + 20, generator)
    slab.join(*joining)
    reference.join(*joining, left=True)
    assert slab._keys is buffer
    assert torch.equal(slab.keys, reference.keys) and torch.equal(slab.values, reference.values)
    # the same after the buffers grew (4 -> 8 rows): a reallocation keeps free columns on the left
    crowd = _states(3, 4, generator)
    slab.join(*crowd)
    reference.join(*crowd, left=True)
    buffer = slab._keys
    joining = _states(1, slab.get_seq_length() + 20, generator)
    slab.join(*joining)
    reference.join(*joining, left=True)
    assert slab._keys is buffer
    assert torch.equal(slab.keys, reference.keys) and torch.equal(slab.values, reference.values)
