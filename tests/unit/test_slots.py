"""The per-row key/value pool: rows kept apart, written at their own positions, moved, grown, freed."""

import torch

from dsvl_app.slots import ALIGN, SlotPool, kv_bytes_per_token


def test_the_pool_keeps_rows_apart_and_moves_them(handle):
    config = handle.model.config
    pool = SlotPool(config, torch.device("cpu"), torch.float32)
    assert pool.bytes_per_token == kv_bytes_per_token(config, torch.float32) and pool.nbytes == 0
    layers, heads, dim = pool.n_layers, pool.heads, pool.head_dim
    kv = [(torch.randn(1, heads, 10, dim), torch.randn(1, heads, 10, dim)) for _ in range(layers)]
    other = [(torch.randn(1, heads, 20, dim), torch.randn(1, heads, 20, dim)) for _ in range(layers)]
    pool.resize(1, 100, 0, 0)
    pool.write(0, kv, 10)
    pool.resize(2, 300, 1, 10)  # grows: row 0 kept
    assert (pool.rows, pool.length) == (2, 2 * ALIGN) and pool.nbytes == 2 * 2 * ALIGN * pool.bytes_per_token
    pool.write(1, other, 20)
    assert all(torch.equal(k, kv[i][0]) for i, (k, _) in enumerate(pool.read(0, 10)))
    pool.move(1, 0, 20)  # row 1 leaves row 0's place to it
    assert all(torch.equal(v, other[i][1]) for i, (_, v) in enumerate(pool.read(0, 20)))
    assert pool.bytes_for(3, 700) == 3 * 3 * ALIGN * pool.bytes_per_token
    pool.free()
    assert pool.nbytes == 0 and pool.keys == []


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


def test_a_joining_row_is_finite_wherever_it_may_attend(handle):
    """The pool is not zeroed when it grows (too slow); a row joining and the rows kept are, past their data."""
    pool = SlotPool(handle.model.config, torch.device("cpu"), torch.float32)
    pool.resize(1, 10, 0, 0)
    for tensors in (pool.keys, pool.values):
        for layer in tensors:
            layer.fill_(float("nan"))  # the worst garbage fresh memory could hold
    kv = [(torch.ones(1, pool.heads, 4, pool.head_dim),) * 2 for _ in range(pool.n_layers)]
    pool.write(0, kv, 4)
    pool.resize(2, 600, 1, 4)
    pool.write(1, kv, 4)
    assert all(torch.isfinite(t).all() for t in pool.keys + pool.values)
