"""The running decode batch's KV cache in preallocated buffers ("slab"): a request joins, a step appends and a
finished request leaves without copying the rest of the running batch.

transformers' DynamicLayer concatenates: every decode step copies every layer's keys and values to append one
column, and the engine's join (a request admitted between steps) copied the whole running cache again to add its
rows. A SlabLayer keeps rows [0, rows) and columns [start, end) of buffers [row capacity, heads, column capacity,
head dim] and hands attention views of that region: a step writes one column, a join writes the new rows only (and
zeros where they are padded), a finished request moves only the rows after it, and dropping leading padding
columns moves `start`. The buffers grow (doubling their spare room) when a step or a join does not fit, which is a
copy, but seldom: amortised, not per step.

The values attention reads are those a DynamicLayer holds (zeros where a row is padded, as the engine pads), so the
greedy tokens do not change (tests/test_engine.py runs the engine's parity tests on both).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 32  # at least this many free columns after a (re)allocation: 32 decode steps before the next one
# and this many before the first column in use: a request whose prompt is up to this much longer than the running
# rows joins without moving them (they gain padding on their left)
SPARE_LEFT = 32


def slab_wanted(setting: str) -> bool:
    """Whether ModelConfig.kv_cache `setting` ("auto", "slab", "dynamic") keeps the running batch in a SlabLayer."""
    return setting in ("auto", "slab")


class SlabLayer(DynamicLayer):
    """One layer's keys and values of the running batch, in preallocated buffers (see the module)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, max_rows: int = 0):
        """The layer of a prefill's `keys`, `values` `[rows, heads, length, head dim]`. Its rows double as requests
        join, up to `max_rows` (the engine's most running sequences): a lone request does not hold a full batch's
        memory, and a batch filling up reallocates a few times, not at every join."""
        self.is_initialized, self.device = True, keys.device
        self.max_rows = max_rows
        self._keys = self._values = keys  # replaced by _allocate
        self.rows, self.start, self.end = 0, 0, 0
        rows, length = keys.shape[0], keys.shape[2]
        self._allocate(self._grown_rows(rows, rows), SPARE_LEFT, self._columns(SPARE_LEFT, length), keys)
        self.rows, self.end = rows, self.start + length
        self._keys[:rows, :, self.start : self.end] = keys
        self._values[:rows, :, self.start : self.end] = values

    # what attention and the engine read: views of the rows and columns in use
    @property
    def keys(self) -> torch.Tensor:
        return self._keys[: self.rows, :, self.start : self.end]

    @keys.setter
    def keys(self, _value) -> None:  # DynamicLayer's reset/crop paths assign; the engine never calls them
        raise AttributeError("a SlabLayer's keys change through update, join and select only")

    @property
    def values(self) -> torch.Tensor:
        return self._values[: self.rows, :, self.start : self.end]

    @values.setter
    def values(self, _value) -> None:
        raise AttributeError("a SlabLayer's values change through update, join and select only")

    def _allocate(self, rows: int, left: int, columns: int, like: torch.Tensor) -> None:
        """New zeroed buffers of `rows` x `columns`, the region in use copied to start at column `left`."""
        heads, dim = like.shape[1], like.shape[3]
        keys = like.new_zeros((rows, heads, columns, dim))
        values = like.new_zeros((rows, heads, columns, dim))
        used = self.end - self.start
        if self.rows and used:
            keys[: self.rows, :, left : left + used] = self.keys
            values[: self.rows, :, left : left + used] = self.values
        self._keys, self._values = keys, values
        self.start, self.end = left, left + used

    @staticmethod
    def _columns(left: int, used: int, right: int = 0) -> int:
        """Columns to allocate for `used` in use after `left` free ones: at least `right` more, and at least as many
        spare as are used (doubling), never fewer than SPARE_COLUMNS."""
        return left + used + max(right, used, SPARE_COLUMNS)

    def _grown_rows(self, needed: int, capacity: int) -> int:
        """Rows to allocate for `needed`: twice the `capacity` (at least 4), at most max_rows unless more are needed."""
        return max(needed, min(max(2 * capacity, 4), self.max_rows))

    def _reserve(self, rows: int = 0, left: int = 0, right: int = 0) -> None:
        """Room for `rows` rows, `left` free columns before `start` and `right` after `end`; a reallocation
        (a copy of what is in use) only where there is not."""
        capacity_rows, capacity_columns = self._keys.shape[0], self._keys.shape[2]
        if rows <= capacity_rows and left <= self.start and self.end + right <= capacity_columns:
            return
        grown = capacity_rows if rows <= capacity_rows else self._grown_rows(rows, capacity_rows)
        left = max(left, SPARE_LEFT)
        self._allocate(grown, left, self._columns(left, self.end - self.start, right), self._keys)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A step's new columns for every running row (what DynamicLayer.update concatenates): written in place."""
        added = key_states.shape[2]
        self._reserve(right=added)
        self._keys[: self.rows, :, self.end : self.end + added] = key_states
        self._values[: self.rows, :, self.end : self.end + added] = value_states
        self.end += added
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end - self.start + query_length, 0

    def join(self, keys: torch.Tensor, values: torch.Tensor, left: bool = True) -> None:
        """Append rows `keys`, `values` `[m, heads, length, head dim]`, the shorter side padded with zeros: on the
        left of its columns where `left` (a decoder's self-attention: the rows end together), else on the right (an
        encoder's cross-attention keys: they start together). Writes the new rows, and zeros in the columns the
        running rows gain where the newcomer is longer; the running rows are not copied unless a buffer grows."""
        count, length = keys.shape[0], keys.shape[2]
        longer = max(0, length - (self.end - self.start))
        if left:
            self._reserve(rows=self.rows + count, left=longer)
            if longer:  # the running rows' new leading columns are padding
                self._keys[: self.rows, :, self.start - longer : self.start] = 0
                self._values[: self.rows, :, self.start - longer : self.start] = 0
                self.start -= longer
            first = self.end - length
        else:
            self._reserve(rows=self.rows + count, right=longer)
            self.end += longer  # padding for the running rows: no row was ever written after `end`, they are zeros
            first = self.start
        new = slice(self.rows, self.rows + count)
        self._keys[new, :, self.start : self.end] = 0
        self._values[new, :, self.start : self.end] = 0
        self._keys[new, :, first : first + length] = keys
        self._values[new, :, first : first + length] = values
        self.rows += count

    def select(self, rows: list[int], first_column: int = 0) -> None:
        """Keep `rows` (ascending), in that order, and drop the first `first_column` columns (all padding): only the
        rows after the first one dropped move."""
        moved = next((index for index, row in enumerate(rows) if row != index), len(rows))
        if moved < len(rows):
            source = torch.tensor(rows[moved:], device=self._keys.device)
            columns = slice(self.start, self.end)
            self._keys[moved : len(rows), :, columns] = self._keys[source, :, columns]
            self._values[moved : len(rows), :, columns] = self._values[source, :, columns]
        self.rows = len(rows)
        self.start += first_column
