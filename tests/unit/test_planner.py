"""The planner and the budget: the scheduler's decisions and its memory truth, from plain numbers (no model)."""

import pytest

from dsvl_app import planner
from dsvl_app.budget import Budget
from dsvl_app.planner import DecodePolicy, PoolGeometry


class Store:
    """What the budget needs of the reuse cache: it gives way down to what the budget leaves it."""

    def __init__(self, capacity: int, nbytes: int = 0):
        self.capacity_bytes, self.nbytes, self.reserved = capacity, nbytes, 0

    def reserve(self, nbytes: int) -> None:
        self.reserved = nbytes
        self.nbytes = min(self.nbytes, max(0, self.capacity_bytes - nbytes))


# ---------------------------------------------------------------- who joins, how the pool grows


def test_a_newcomer_needs_its_features_and_the_pools_growth_for_its_row():
    empty = PoolGeometry(0, 0, bytes_per_token=10, align=256, layers=2)
    first = planner.need(empty, [], capacity=300, feature_bytes=7)
    assert (first.features, first.pool_growth) == (7, 1 * 512 * 10)
    pool = PoolGeometry(2, 512, 10, 256, layers=2)  # room for a second row of 300 already
    assert planner.need(pool, [300], 300, 0).pool_growth == 0
    third = planner.need(pool, [300, 400], 600, 0)  # 3 rows of 768: grows, and one old tensor lives meanwhile
    assert third.pool_growth == 3 * 768 * 10 - pool.nbytes + pool.nbytes // 4
    assert third.total == third.features + third.pool_growth


def test_admission_waits_for_a_row_and_for_memory_but_alone_always_starts():
    need = planner.Need(features=100, pool_growth=50)
    assert planner.admission(running=0, prefilling=False, batch=4, needed=need, room=0)  # alone: always
    assert planner.admission(running=2, prefilling=False, batch=4, needed=need, room=150)
    assert not planner.admission(running=2, prefilling=False, batch=4, needed=need, room=149)  # waits for memory
    assert not planner.admission(running=4, prefilling=False, batch=4, needed=need, room=10**9)  # no free row
    assert not planner.admission(running=1, prefilling=True, batch=4, needed=need, room=10**9)  # one read at a time


def test_the_pool_doubles_its_rows_where_the_budget_allows():
    pool = PoolGeometry(2, 512, 10, 256, layers=2)
    assert planner.pool_target(pool, 2, 400, batch=8, room=0) == (2, 512)  # fits as it is
    assert planner.pool_target(pool, 3, 400, batch=8, room=10**9) == (4, 512)  # doubled: the next join copies nothing
    assert planner.pool_target(pool, 3, 400, batch=3, room=10**9) == (3, 512)  # never beyond --batch
    assert planner.pool_target(pool, 3, 400, batch=8, room=3 * 512 * 10 - pool.nbytes) == (3, 512)  # just enough
    # Rows ahead of need only with bytes nobody uses: earlier turns in the reuse cache are not evicted for them.
    assert planner.pool_target(pool, 3, 400, batch=8, room=10**9, spare=3 * 512 * 10 - pool.nbytes) == (3, 512)
    # ... but rows for requests already waiting in line are taken ahead (the reuse cache gives way for them).
    assert planner.pool_target(pool, 3, 400, batch=8, room=10**9, spare=0, coming=2) == (5, 512)
    assert planner.pool_target(pool, 3, 400, batch=4, room=10**9, spare=0, coming=9) == (4, 512)
    assert planner.pool_target(pool, 3, 900, batch=8, room=10**9) == (4, 900)  # longer rows too
    # On a CPU: all --batch rows at once where the budget allows (memory not written costs nothing), else doubling.
    assert planner.pool_target(pool, 3, 400, batch=8, room=10**9, all_rows_at_once=True) == (8, 512)
    doubling_room = 4 * 512 * 10 - pool.nbytes
    assert planner.pool_target(pool, 3, 400, batch=8, room=doubling_room, all_rows_at_once=True) == (4, 512)
    empty = PoolGeometry(0, 0, 10, 256, layers=2)
    assert planner.pool_target(empty, 1, 300, batch=4, room=10**9, all_rows_at_once=True) == (4, 300)


def test_prefill_pieces_and_how_far_a_decode_step_looks_back():
    assert planner.prefill_piece(0, 1000, others_decoding=False, chunk=256) == 1000  # alone: one forward
    assert planner.prefill_piece(768, 1000, others_decoding=True, chunk=256) == 232
    assert planner.view_length([5], [900], pool_length=1024) == 64
    assert planner.view_length([63, 64, 10], [900, 900, 300], pool_length=1024) == 128  # in use, rounded up
    assert planner.view_length([1000], [2000], pool_length=1024) == 1024  # never past the pool
    assert planner.view_length([650], [660, 300], pool_length=1024) == 660  # nor the longest row's capacity
    assert planner.decode_groups(3, together=True) == [(0, 3)]
    assert planner.decode_groups(3, together=False) == [(0, 1), (1, 2), (2, 3)]
    assert planner.newest([4, 9, 2]) == 1


# ---------------------------------------------------------------- one forward for all rows, or one per row


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


def test_auto_never_probes_on_a_gpu():
    """On CUDA a step of n rows costs about one row's: a probe of one forward per row would cost n steps."""
    policy = DecodePolicy("auto", probe_every=2, device="cuda")
    policy.record(4, True, 10.0)  # even a slow measurement does not make it try rows
    policy.record(4, False, 0.1)
    assert all(policy.use_together(n) for n in range(1, 9) for _ in range(5))
    assert "GPU" in policy.describe()


def test_forced_modes():
    assert all(DecodePolicy("together").use_together(n) for n in range(1, 9))
    assert not any(DecodePolicy("rows").use_together(n) for n in range(2, 9))
    with pytest.raises(ValueError, match="decode mode"):
        DecodePolicy("sideways")


# ---------------------------------------------------------------- the budget


def test_the_reuse_cache_gives_way_as_soon_as_bytes_are_reserved():
    store = Store(capacity=1000, nbytes=900)
    budget = Budget(1000, store)
    assert budget.room() == 1000 and budget.fits(1000)
    budget.hold({"pool": 400})
    assert store.nbytes == 600 and budget.accounted == 1000  # gave way before anything was allocated
    budget.hold({("prefill", 1): 300, "pool": 500})
    assert budget.reserved == 800 and store.nbytes == 200 and budget.peak == 1000
    assert budget.room() == 200 and budget.room(replacing=("pool",)) == 700
    assert not budget.try_hold("keep", 201) and budget.held("keep") == 0
    assert budget.try_hold("keep", 200) and store.nbytes == 0
    budget.release("keep", ("prefill", 1))
    assert budget.reserved == 500 and store.reserved == 500
    budget.reset()
    assert budget.reserved == 0 and store.reserved == 0


def test_a_reuse_cache_set_above_the_budget_still_stays_within_it():
    store = Store(capacity=2000, nbytes=1500)
    budget = Budget(1000, store)
    budget.hold({"pool": 300})
    assert budget.accounted <= 1000 and store.nbytes == 700
