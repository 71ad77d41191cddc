"""The per-row key/value pool: rows kept apart, prompts read into a row of their own, rows written at their own
positions, moved, grown, freed."""

import torch

from dsvl_app.slots import ALIGN, SlotPool, kv_bytes_per_token


def kv(pool, tokens, fill=None):
    """Per-layer (keys, values) of `tokens` positions, as a forward or an earlier turn holds them."""
    def one():
        return torch.full((1, pool.heads, tokens, pool.head_dim), fill) if fill is not None else \
            torch.randn(1, pool.heads, tokens, pool.head_dim)
    return [(one(), one()) for _ in range(pool.n_layers)]


def read_prompt(pool, row, prefix, prefix_length, new, attend):
    """What a prefill forward does with the pool: the row's first forward copies `prefix` in, then writes `new`."""
    pool.begin_row(row, prefix, prefix_length)
    cache = pool.prefill_view(row, prefix_length, attend)
    assert cache.get_seq_length() == prefix_length and cache.layers[0].get_mask_sizes(1) == (attend, 0)
    return [layer.update(k, v) for layer, (k, v) in zip(cache.layers, new, strict=True)]


def test_the_pool_keeps_rows_apart_and_moves_them(handle):
    config = handle.model.config
    pool = SlotPool(config, torch.device("cpu"), torch.float32)
    assert pool.bytes_per_token == kv_bytes_per_token(config, torch.float32) and pool.nbytes == 0
    first, first_new, other = kv(pool, 10), kv(pool, 2), kv(pool, 20)
    pool.resize(1, 100, 0, 0)
    read_prompt(pool, 0, first, 10, first_new, attend=100)
    pool.resize(2, 300, 1, 12)  # grows: row 0 kept
    assert (pool.rows, pool.length) == (2, 2 * ALIGN) and pool.nbytes == 2 * 2 * ALIGN * pool.bytes_per_token
    read_prompt(pool, 1, other, 20, kv(pool, 1), attend=300)
    for i, (k, v) in enumerate(pool.read(0, 12)):
        assert torch.equal(k, torch.cat([first[i][0], first_new[i][0]], dim=2))
        assert torch.equal(v, torch.cat([first[i][1], first_new[i][1]], dim=2))
    pool.move(1, 0, 20)  # row 1 leaves row 0's place to it
    assert all(torch.equal(v, other[i][1]) for i, (_, v) in enumerate(pool.read(0, 20)))
    assert pool.bytes_for(3, 700) == 3 * 3 * ALIGN * pool.bytes_per_token
    pool.free()
    assert pool.nbytes == 0 and pool.keys == []


def test_a_prompt_is_read_into_its_row_as_into_a_cache_of_its_own(handle):
    """The row's forward sees the prefix, its new positions and zeros up to its own capacity — what a static cache of
    that capacity would give it — and the rows beside it are untouched."""
    pool = SlotPool(handle.model.config, torch.device("cpu"), torch.float32)
    pool.resize(3, 64, 0, 0)
    for tensors in (pool.keys, pool.values):
        for layer in tensors:
            layer.fill_(3.0)
    prefix, new = kv(pool, 7), kv(pool, 5)
    returned = read_prompt(pool, 1, prefix, 7, new, attend=40)
    keys, values = returned[0]
    assert keys.shape == (1, pool.heads, 40, pool.head_dim)  # its own capacity, not the pool's length
    want = torch.cat([prefix[0][0], new[0][0], torch.zeros(1, pool.heads, 28, pool.head_dim)], dim=2)
    assert torch.equal(keys, want)
    assert (pool.keys[0][0] == 3.0).all() and (pool.keys[0][2] == 3.0).all()  # the other rows untouched
    assert (pool.keys[0][1, :, 40:] == 0).all() and pool.length > 40  # zeroed to the end of the row
    # A second piece of the same prompt: written after the first, nothing copied again.
    cache = pool.prefill_view(1, 12, 40)
    more = kv(pool, 3)
    keys, _ = cache.layers[0].update(*more[0])
    assert torch.equal(keys[:, :, :12], want[:, :, :12]) and torch.equal(keys[:, :, 12:15], more[0][0])


def test_a_forward_writes_each_row_at_its_own_position(handle):
    pool = SlotPool(handle.model.config, torch.device("cpu"), torch.float32)
    pool.resize(3, 64, 0, 0)
    # The pool is allocated with torch.empty: give row 0 known values, since stale memory may hold NaN (NaN != NaN).
    row0 = pool.keys[0][0].fill_(7.0).clone()
    positions = torch.tensor([5, 9])
    cache = pool.view(1, 3, positions, 40)
    new = torch.randn(2, pool.heads, 1, pool.head_dim)
    keys, values = cache.update(new, new * 2, 0)
    assert keys.shape == (2, pool.heads, 40, pool.head_dim)  # rows 1-2, the attended length
    assert torch.equal(pool.keys[0][1, :, 5], new[0, :, 0]) and torch.equal(pool.keys[0][2, :, 9], new[1, :, 0])
    assert torch.equal(pool.values[0][2, :, 9], 2 * new[1, :, 0]) and torch.equal(pool.keys[0][0], row0)  # row 0 untouched


def test_a_row_is_finite_wherever_it_may_attend(handle):
    """The pool is not zeroed when it grows (too slow); a newcomer's row and the rows kept are, past their data, and
    a row moved into another's place is too."""
    pool = SlotPool(handle.model.config, torch.device("cpu"), torch.float32)
    pool.resize(1, 10, 0, 0)
    for tensors in (pool.keys, pool.values):
        for layer in tensors:
            layer.fill_(float("nan"))  # the worst garbage fresh memory could hold
    read_prompt(pool, 0, kv(pool, 4, 1.0), 4, kv(pool, 1, 1.0), attend=10)
    pool.resize(3, 600, 1, 5)
    read_prompt(pool, 1, None, 0, kv(pool, 6, 1.0), attend=600)
    pool.move(1, 2, 6, zero_rest=True)
    assert all(torch.isfinite(t[:3]).all() for t in pool.keys + pool.values)
