"""The scheduler's parts that need no model run: the decode policy, the per-row pool, the layer hooks."""

import torch

from dsvl_app.scheduler import DecodePolicy, layer_owners
from dsvl_app.slots import ALIGN, SlotPool, kv_bytes_per_token


def test_auto_measures_both_ways_then_keeps_the_cheaper_and_probes_again():
    policy = DecodePolicy("auto", probe_every=5)
    assert policy.use_together(1)  # one row: one forward either way
    assert policy.use_together(3)  # nothing known at 3 rows: measure one forward for all
    policy.record(3, True, 0.9)
    assert not policy.use_together(3)  # then one row alone
    policy.record(3, False, 0.6)  # three single-row forwards: 0.2 s each
    choices = [policy.use_together(3) for _ in range(10)]
    assert choices.count(False) == 8 and choices.count(True) == 2  # rows are cheaper; together probed every 5th
    policy.record(3, True, 0.3)
    policy.record(3, True, 0.3)
    policy.record(3, True, 0.3)
    assert policy.use_together(3)  # it got cheaper than 3 × 0.2 s: together now


def test_forced_modes():
    assert all(DecodePolicy("together").use_together(n) for n in range(1, 9))
    assert not any(DecodePolicy("rows").use_together(n) for n in range(2, 9))


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


def test_layer_hooks_are_installed_once_per_model(handle):
    owners = layer_owners(handle.model)
    layers = [layer for name, module in handle.model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") for layer in module]
    counts = [len(layer._forward_pre_hooks) for layer in layers]
    assert layer_owners(handle.model) is owners and [len(layer._forward_pre_hooks) for layer in layers] == counts
    assert len(layers) == 6  # the tiny checkpoint: 2 language, 2 SigLIP, 2 SAM layers — all hooked
