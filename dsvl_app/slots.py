"""The keys/values of the replies being written: one row per reply, each at its own position.

transformers' `StaticCache` writes every row of a batch at one shared position, so it cannot hold
replies that started at different times. `SlotPool` keeps, per decoder layer, keys and values of shape
`[rows, kv_heads, length, head_dim]`; a decode forward over rows `[start, end)` writes each row's new
key and value at that row's own position and attends over the first `view_len` positions (the caller
passes per-row `position_ids` and a 4D mask, which transformers uses as it is).

Rows `[0, n)` are the replies decoding now, so a batched step runs its matrix products on exactly
them; a reply that ends leaves by moving the last row into its place. A newcomer's prompt is read
straight into a row of its own past them (`prefill_view`): its first forward copies in the prefix an
earlier turn computed and zeroes the rest of the row, layer by layer, so that joining the decoding rows
copies nothing. The pool grows when a newcomer needs a row and none is free (layer by layer, so the
extra memory at that moment is one layer's; the scheduler takes rows ahead where the budget allows, so
that growing rarely copies) and is freed when no reply uses it. Positions past a row's length hold
zeros or stale but finite values, which its mask hides.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .reuse import KV

ALIGN = 256  # the pool's length grows in steps of this many positions


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head dim) of a model's text config."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(text.num_hidden_layers), int(heads), int(head_dim)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    layers, heads, head_dim = kv_shape(config)
    return 2 * layers * heads * head_dim * dtype.itemsize


class _PoolLayer(CacheLayerMixin):
    """One decoder layer's cache backed by the pool (which allocates); subclasses say which rows a forward uses."""

    is_compileable = False

    def __init__(self, pool: SlotPool, index: int):
        super().__init__()
        self.pool, self.index = pool, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the pool allocates


class _SlotLayer(_PoolLayer):
    """A decode forward over some rows of the pool."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self.pool._update(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.pool.view_len, 0

    def get_seq_length(self) -> int:
        return 0  # never asked for: the engine always passes position_ids and a 4D mask

    def get_max_length(self) -> int:
        return self.pool.length


class _RowLayer(_PoolLayer):
    """A prefill forward of one row: to the model it is the row's own static cache of `attend` positions (its
    prompt + max_new_tokens), so a prompt read here is read as generate reads it."""

    # What transformers reads from this flag is "the attended length is fixed, not the positions filled": like a
    # StaticCache, a one-token query (a prompt reused but for its last token) then still gets its causal mask, where
    # a growing cache's would be skipped — and the row's zeroed tail attended (seen: a different first token).
    is_compileable = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self.pool._update_row(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.pool._row_attend, 0

    def get_seq_length(self) -> int:
        return self.pool._row_start  # the positions already written: where this forward's queries begin

    def get_max_length(self) -> int:
        return self.pool._row_attend


class SlotPool:
    """Per-row keys/values of the replies being decoded; see the module docstring. One thread uses it."""

    def __init__(self, config: Any, device: torch.device, dtype: torch.dtype,
                 layer_devices: list[torch.device] | None = None):
        self.n_layers, self.heads, self.head_dim = kv_shape(config)
        self.device, self.dtype = device, dtype
        # Each layer's keys/values live where that layer runs (a model spread over several GPUs).
        self.layer_devices = layer_devices or [device] * self.n_layers
        self.bytes_per_token = kv_bytes_per_token(config, dtype)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # allocated
        self.length = 0  # allocated positions per row
        self.cache = Cache(layers=[_SlotLayer(self, i) for i in range(self.n_layers)])
        self.row_cache = Cache(layers=[_RowLayer(self, i) for i in range(self.n_layers)])
        # The forward being run: rows [start, end), each row's write position, the attended length.
        self._start, self._end = 0, 0
        self._positions = torch.zeros(0, dtype=torch.long)
        self.view_len = 0
        # The prefill forward being run: its row, where it writes, how far it attends; the row's pending set-up.
        self._row, self._row_start, self._row_attend = -1, 0, 0
        self._setup: tuple[int, KV | None, int, set[int]] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes allocated (after a resize that ran out of memory half-way, some layers are already larger)."""
        return sum(t.numel() for t in self.keys + self.values) * self.dtype.itemsize

    def bytes_for(self, rows: int, length: int) -> int:
        """What the pool would take holding `rows` rows of at least `length` positions."""
        return rows * self._aligned(length) * self.bytes_per_token

    @staticmethod
    def _aligned(length: int) -> int:
        return -(-length // ALIGN) * ALIGN if length else 0

    def resize(self, rows: int, length: int, used_rows: int, used_length: int) -> None:
        """`rows` rows of `length` positions (rounded up), keeping rows `[0, used_rows)` up to `used_length`.

        Out of memory half-way leaves a usable pool of the old shape (the layers already resized hold the same
        rows, in a larger tensor), so that the replies decoding go on."""
        length = self._aligned(length)
        if rows == self.rows and length == self.length:
            return
        shape = (rows, self.heads, length, self.head_dim)
        for tensors in (self.keys, self.values):
            for i in range(self.n_layers):
                # Not zeroed (that alone cost a second per join on a CPU): every position a row may attend
                # is written or zeroed (here for the rows kept, in `write` for a row joining).
                resized = torch.empty(shape, dtype=self.dtype, device=self.layer_devices[i])
                if i < len(tensors):
                    resized[:used_rows, :, :used_length] = tensors[i][:used_rows, :, :used_length]
                    resized[:used_rows, :, used_length:] = 0
                    tensors[i] = resized  # the old layer goes now: one layer's extra memory at a time
                else:
                    tensors.append(resized)
        self.rows, self.length = rows, length

    def free(self) -> None:
        """Give all the memory back (no reply uses it)."""
        self.keys, self.values = [], []
        self.rows = self.length = 0
        self._setup = None

    def begin_row(self, row: int, prefix: KV | None, prefix_length: int) -> None:
        """Row `row` will be a newcomer's: at its first prefill forward each layer copies in the first `prefix_length`
        positions of `prefix` (per layer (keys, values) `[1, heads, *, dim]`: an earlier turn's) and zeroes the rest
        of the row — masked positions are still read, and 0 × NaN would be NaN in attention."""
        self._setup = (row, prefix, prefix_length, set())

    def prefill_view(self, row: int, start: int, attend: int) -> Cache:
        """The cache for a prefill forward of row `row`: its positions from `start` on are written, and it attends
        over its first `attend` positions."""
        self._row, self._row_start, self._row_attend = row, start, attend
        return self.row_cache

    def _update_row(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys, values = self.keys[layer], self.values[layer]
        row, start = self._row, self._row_start
        setup = self._setup
        if setup is not None and setup[0] == row and layer not in setup[3]:
            _, prefix, length, done = setup
            for i, pool in enumerate((keys, values)):
                if length:
                    pool[row, :, :length] = prefix[layer][i][0, :, :length].to(pool.device)  # type: ignore[index]
                pool[row, :, length:] = 0
            done.add(layer)
            if len(done) == self.n_layers:
                self._setup = None
        end = start + key_states.shape[-2]
        keys[row, :, start:end] = key_states[0]
        values[row, :, start:end] = value_states[0]
        return keys[row: row + 1, :, : self._row_attend], values[row: row + 1, :, : self._row_attend]

    def move(self, src: int, dst: int, length: int, zero_rest: bool = False) -> None:
        """Row `dst` takes row `src`'s first `length` positions (a reply leaving makes room this way); with
        `zero_rest`, the rest of `dst` is zeroed too (its old contents were another reply's)."""
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[dst, :, :length] = layer[src, :, :length]
                if zero_rest:
                    layer[dst, :, length:] = 0

    def read(self, row: int, length: int) -> KV:
        """Compact copies of row `row`'s first `length` positions, per layer (for the reuse cache)."""
        return tuple((k[row: row + 1, :, :length].clone(), v[row: row + 1, :, :length].clone())
                     for k, v in zip(self.keys, self.values, strict=True))

    def view(self, start: int, end: int, positions: torch.Tensor, view_len: int) -> Cache:
        """The cache for a forward over rows `[start, end)`: row `start + i` writes at `positions[i]` and
        attends over the first `view_len` positions (`planner.view_length`: the positions in use, rounded up)."""
        self._start, self._end, self._positions, self.view_len = start, end, positions, view_len
        return self.cache

    def _update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys, values = self.keys[layer], self.values[layer]
        rows = torch.arange(self._start, self._end, device=keys.device)
        positions = self._positions.to(keys.device)
        keys[rows, :, positions] = key_states[:, :, 0]
        values[rows, :, positions] = value_states[:, :, 0]
        return (keys[self._start: self._end, :, : self.view_len], values[self._start: self._end, :, : self.view_len])
